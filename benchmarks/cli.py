"""`avatar bench`: end-to-end and DiT-only figures of one preset, a short table, and JSON.

Random weights of the preset's real shapes (speed does not depend on weight values), so the 1.3B
shape is measured on a GPU with no checkpoint. `--compare-upstream` adds the plain eager path
structured like upstream (benchmarks/upstream_path.py) on the same weights, shapes and inputs, and
the ratio of the two, in the same run. Only typer is imported at module level: `avatar --help`
stays fast, and torch loads when the command runs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SECONDS = {"livetalk-1.3b": 15.0}   # others: 6 s (CPU-sized presets)
FAMILIES = ("livetalk", "liveavatar")
# family 1's options that have no meaning for family 2, with their defaults
_FAMILY1_ONLY = {"--resolution": None, "--backend": "auto", "--decoder": "wan", "--compare-upstream": False,
                 "--peak-tflops": None}


def run_bench(engine, seconds: float, chunk_ms: float = 40.0, warmup_blocks: int = 2, rounds: int = 1,
              dit_blocks: int = 8, compare_upstream: bool = False, seed: int = 0,
              peak_tflops: float | None = None) -> dict:
    """Measure `engine` end to end (and, unless it is eager itself, an eager engine on the same weights)
    and DiT only (and the upstream path); returns the JSON report."""
    from runtime.flops import PEAK_TFLOPS_BF16
    from runtime.profiling import profile_session

    from .harness import DitSetup, RingRunner, environment, measure_dit, measure_engine, settings
    from .upstream_path import UpstreamRunner

    peak = PEAK_TFLOPS_BF16 if peak_tflops is None else peak_tflops
    results = {}
    with profile_session(name="bench"):  # a torch.profiler trace only when AVATAR_TORCH_PROFILE is set
        results["e2e"] = measure_engine(engine, seconds, chunk_ms, warmup_blocks, rounds, seed, peak, context=False)
        if engine.mode != "eager":  # the eager path side by side: the same weights, another engine
            with engine.eager_twin() as eager:
                results["e2e_eager"] = measure_engine(eager, seconds, chunk_ms, warmup_blocks, rounds, seed, peak,
                                                      context=False)
        setup = DitSetup.from_engine(engine, seed)
        paths = [("dit", RingRunner)] + ([("dit_upstream", UpstreamRunner)] if compare_upstream else [])
        for key, make_runner in paths:  # one runner (and its KV cache) alive at a time
            results[key] = measure_dit(make_runner(setup), setup, dit_blocks, warmup_blocks, rounds, seed, peak,
                                       context=False)
    report = {
        "tool": "avatar bench",
        "environment": environment(engine.device),
        "settings": {"family": "livetalk",
                     **settings(engine.config, engine.device, engine.dtype, engine.ops.name, engine.decoder_name),
                     "quantize": f"fp8-{engine.quantization.granularity}" if engine.quantization else None,
                     "seconds": seconds, "chunk_ms": chunk_ms, "warmup_blocks": warmup_blocks, "rounds": rounds,
                     "dit_blocks": dit_blocks, "seed": seed, "peak_tflops": peak, "random_weights": True},
        "results": results,
    }
    if compare_upstream:
        ours, up = results["dit"], results["dit_upstream"]
        report["upstream_ratio"] = {
            "meaning": "upstream time / our time, DiT only, same run (> 1: ours is faster)",
            "dit_p50": up["p50_block_ms"] / ours["p50_block_ms"],
            "dit_first_frame": up["first_frame_ms"] / ours["first_frame_ms"],
        }
    return report


COLUMNS = ("p50 ms", "p99 ms", "FPS", "first-frame ms", "peak MB", "TFLOP/s", "% floor")
# printed under the table: the numbers mean nothing to a reader who cannot tell what they measure
LEGEND = (
    "p50 / p99 ms: median / 99th-percentile time of one block, warm-up blocks excluded; FPS: video frames "
    "made per second; first-frame ms: time to the first block; peak MB: peak memory (GPU allocator, or the "
    "process's max RSS on a CPU); TFLOP/s: FLOPs counted by runtime/flops.py / measured time; "
    "% floor: TFLOP/s as a percentage of {peak:g} TFLOP/s (dense bf16 of one H100/H200; --peak-tflops), "
    "i.e. arithmetic floor time / measured time, 100 = the floor (docs/performance-floor.md); tiny on a CPU "
    "by construction.")


def format_table(report: dict) -> str:
    """One row per measurement, then the upstream ratio; a header naming where and how it ran."""
    env, st = report["environment"], report["settings"]
    w = st["window"]
    where = env["gpu_name"] or f"CPU ({env['cpu']}, {env['cpu_threads']} threads)"
    lines = [f"{st['preset']} {st['resolution']} {st['dtype']} on {where}"
             + (f", driver {env['gpu_driver']}" if env["gpu_driver"] else "")
             + f"; torch {env['torch_version']}, triton {env['triton_version']}; commit {env['commit']}",
             (f"window: block {w['block_frames']}, sink {w['sink_frames']}, {w['window_frames']} latent frames "
              f"({w['window_tokens']} tokens); backend {st['backend']}; timer {_timer(report)}"), ""]
    rows = [[f"{r['kind']} {r['path']}", f"{r['p50_block_ms']:.1f}", f"{r['p99_block_ms']:.1f}", f"{r['fps']:.2f}",
             f"{r['first_frame_ms']:.1f}", f"{r['peak_memory_mb']:.0f}", _tflops(r['achieved_tflops']),
             f"{100 * r['fraction_of_floor']:.2g}"] for r in report["results"].values()]
    header = ["measurement", *COLUMNS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(wd) for c, wd in zip(row[1:], widths[1:])]))
    if "upstream_ratio" in report:
        ratio = report["upstream_ratio"]
        lines.append(f"upstream / ours (DiT only): {ratio['dit_p50']:.2f}x per block (p50), "
                     f"{ratio['dit_first_frame']:.2f}x first block")
    lines += ["", LEGEND.format(peak=st["peak_tflops"])]
    return "\n".join(lines)


def _timer(report: dict) -> str:
    return next(iter(report["results"].values()))["timer"]


def _tflops(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def _config(preset: str, resolution: str | None):
    """The preset's config, at `resolution` ("HxW", e.g. 480x832) when given."""
    from runtime.config import PRESETS, EngineConfig

    if preset not in PRESETS and preset in _liveavatar_presets():
        raise typer.BadParameter(f"{preset!r} is a Live Avatar preset: add --family liveavatar",
                                 param_hint="--preset")
    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}",
                                 param_hint="--preset")
    cfg = EngineConfig.from_preset(preset)
    if resolution is None:
        return cfg
    parts = resolution.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise typer.BadParameter(f"resolution must be HxW (e.g. 480x832), got {resolution!r}",
                                 param_hint="--resolution")
    try:
        return cfg.replace(height=int(parts[0]), width=int(parts[1]))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--resolution") from e


def _build_engine(cfg, device: str | None, dtype: str | None, backend: str, seed: int, decoder: str = "wan",
                  quantize: str | None = None):
    import torch

    from runtime.engine import Engine

    _check_device_dtype(device, dtype)
    if decoder not in ("wan", "taehv"):
        raise typer.BadParameter(f"decoder must be wan or taehv, got {decoder!r}", param_hint="--decoder")
    try:
        return Engine.random(cfg, device=device, dtype=getattr(torch, dtype) if dtype else None, backend=backend,
                             seed=seed, decoder=decoder, quantize=quantize)
    except (ValueError, RuntimeError) as e:  # e.g. a backend or FP8 mode this device cannot run
        raise typer.BadParameter(str(e), param_hint="--quantize" if "quantiz" in str(e) or "FP8" in str(e)
                                 else "--backend") from e


def _check_device_dtype(device: str | None, dtype: str | None) -> None:
    import torch

    if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise typer.BadParameter(f"device must be cpu or cuda[:N], got {device!r}", param_hint="--device")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA is not available on this machine", param_hint="--device")
    if dtype is not None and dtype not in _DTYPES:
        raise typer.BadParameter(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}", param_hint="--dtype")


def _liveavatar_presets() -> tuple[str, ...]:
    from runtime.families.liveavatar.presets import ENGINE_PRESETS

    return tuple(sorted(ENGINE_PRESETS))


def _check_liveavatar_args(preset: str, family1_options: dict) -> None:
    """Family 2's preset, and no family-1-only option set (each error names its option)."""
    if preset not in _liveavatar_presets():
        raise typer.BadParameter(f"unknown Live Avatar preset {preset!r}; known: {', '.join(_liveavatar_presets())}"
                                 " (family livetalk presets need --family livetalk)", param_hint="--preset")
    for option, value in family1_options.items():
        if value != _FAMILY1_ONLY[option]:
            raise typer.BadParameter("applies to --family livetalk only", param_hint=option)


def _fits_on_device(preset: str, device, quantize: str | None) -> None:
    """On CUDA, refuse early (naming --preset) when the session alone cannot fit in the device's memory."""
    import torch

    from .liveavatar import memory_budget

    if device.type != "cuda":
        return
    need = memory_budget(preset, quantize)["total_gb"]
    have = torch.cuda.get_device_properties(device).total_memory / 1e9
    if need > have:
        raise typer.BadParameter(f"{preset} needs {need:.1f} GB before activations (weights + 4 KV rings + "
                                 f"condition), the device has {have:.1f} GB: use --quantize fp8 or a larger GPU",
                                 param_hint="--preset")


def _liveavatar_engine(preset: str, device: str | None, dtype: str | None, seed: int, quantize: str | None):
    import torch

    from runtime.engine import _FP8_MODES, Engine, _default_device_dtype
    from runtime.families.liveavatar import LiveAvatar
    from runtime.families.liveavatar.build import random_parts

    _check_device_dtype(device, dtype)
    if quantize is not None and quantize not in _FP8_MODES:
        raise typer.BadParameter(f"quantize must be None or one of {', '.join(_FP8_MODES)}, got {quantize!r}",
                                 param_hint="--quantize")
    dev, dt = _default_device_dtype(device, getattr(torch, dtype) if dtype else None)
    _fits_on_device(preset, dev, _FP8_MODES[quantize] if quantize else None)
    try:
        return Engine(LiveAvatar(random_parts(preset, dev, dt, seed, quantize, device_init=True), max_sessions=1))
    except (ValueError, RuntimeError) as e:  # e.g. an FP8 mode this device cannot run
        raise typer.BadParameter(str(e), param_hint="--quantize" if quantize else "--device") from e


def _bench_liveavatar(preset: str, device, dtype, seconds, chunk_ms, warmup_blocks, rounds, dit_blocks, seed,
                      quantize) -> dict:
    from .liveavatar import run_liveavatar_bench, seconds_for_blocks

    engine = _liveavatar_engine(preset, device, dtype, seed, quantize)
    secs = 6.0 if seconds is None else seconds
    if secs < seconds_for_blocks(engine, 2):
        raise typer.BadParameter(f"{secs} s of audio gives fewer than 2 blocks; need >= "
                                 f"{seconds_for_blocks(engine, 2):.3f} s", param_hint="--seconds")
    return run_liveavatar_bench(engine, preset, secs, chunk_ms, warmup_blocks, rounds, dit_blocks, seed)


def _write_report(report: dict, table: str, json_out: Path | None) -> None:
    typer.echo(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


def bench(
    family: Annotated[str, typer.Option("--family", help="livetalk (family 1, runtime.engine) or liveavatar "
                                        "(family 2, runtime.families.liveavatar: presets tiny, liveavatar-14b).")]
    = "livetalk",
    preset: Annotated[str, typer.Option("--preset", help="Config preset (tiny, livetalk-1.3b, ...; "
                                        "liveavatar-14b with --family liveavatar): random weights of its real "
                                        "shapes.")] = "tiny",
    resolution: Annotated[str | None, typer.Option("--resolution", help="HxW instead of the preset's "
                                                   "(e.g. 480x832).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda[:N] (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help=f"One of {', '.join(_DTYPES)} "
                                              "(default: bfloat16 on cuda, float32 on cpu).")] = None,
    backend: Annotated[str, typer.Option("--backend", help="DiT ops backend (auto picks the fastest available).")]
    = "auto",
    seconds: Annotated[float | None, typer.Option("--seconds", min=0.1, help="Audio per end-to-end round "
                                                  "(default 15 for livetalk-1.3b, else 6).")] = None,
    chunk_ms: Annotated[float, typer.Option("--chunk-ms", min=1.0, help="Audio pushed per step() call.")] = 40.0,
    warmup_blocks: Annotated[int, typer.Option("--warmup-blocks", min=0, help="Untimed blocks first.")] = 2,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Measured sessions (medians over all).")] = 1,
    dit_blocks: Annotated[int, typer.Option("--dit-blocks", min=1, help="Steady-state DiT blocks per round "
                                            "(liveavatar: DiT forwards, one denoising step each).")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", dir_okay=False, help="Write the report here.")] = None,
    compare_upstream: Annotated[bool, typer.Option("--compare-upstream", help="Also time the plain eager "
                                                   "upstream-structured DiT path and print the ratio.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Weights, inputs and session seed.")] = 0,
    decoder: Annotated[str, typer.Option("--decoder", help="Video decoder: wan (Wan2.1 VAE) or taehv "
                                         "(tiny decoder, ~25x fewer FLOPs).")] = "wan",
    peak_tflops: Annotated[float | None, typer.Option("--peak-tflops", min=1e-9, help="Rate the floor assumes "
                                                      "(default 790, dense bf16 on H100/H200).")] = None,
    quantize: Annotated[str | None, typer.Option("--quantize", help="fp8 (per-tensor scales) or fp8-row "
                                                 "(per token / channel): FP8 DiT linears.")] = None,
) -> None:
    """Measure per-block latency, FPS, first-frame latency, memory and TFLOP/s; print a table, write JSON.

    --family liveavatar: per-block p50/p99, FPS, first-block latency, stage medians, peak memory and a
    DiT-only forward of one device (weights drawn on the device). liveavatar-14b holds 77.6 GB before
    activations in bf16 (weights 32.6 + 4 KV rings of 10.4 at 384x704 + condition 2.2 + text K/V, VAE,
    wav2vec2 1.3): an H200 (141 GB) runs it; an 80 GB H100 leaves about 6 GiB for activations (tight);
    --quantize fp8 makes it 61.6 GB. Live Avatar's own deployment is TPP over 5 GPUs (docs/liveavatar.md)."""
    if family not in FAMILIES:
        raise typer.BadParameter(f"family must be one of {', '.join(FAMILIES)}, got {family!r}", param_hint="--family")
    if family == "liveavatar":
        _check_liveavatar_args(preset, {"--resolution": resolution, "--backend": backend, "--decoder": decoder,
                                        "--compare-upstream": compare_upstream, "--peak-tflops": peak_tflops})
        from .liveavatar import format_table as liveavatar_table

        report = _bench_liveavatar(preset, device, dtype, seconds, chunk_ms, warmup_blocks, rounds, dit_blocks,
                                   seed, quantize)
        _write_report(report, liveavatar_table(report), json_out)
        return
    engine = _build_engine(_config(preset, resolution), device, dtype, backend, seed, decoder, quantize)
    from .harness import blocks_in_audio, seconds_for_blocks

    secs = DEFAULT_SECONDS.get(preset, 6.0) if seconds is None else seconds
    cfg = engine.config
    if blocks_in_audio(cfg, round(secs * cfg.audio.sample_rate)) < 2:
        raise typer.BadParameter(f"{secs} s of audio gives fewer than 2 blocks; need >= "
                                 f"{seconds_for_blocks(cfg, 2):.3f} s", param_hint="--seconds")
    if engine.device.type == "cpu" and preset == "livetalk-1.3b":
        typer.secho("NOTE: the 1.3B shape on the CPU takes minutes per block; use --device cuda.",
                    fg=typer.colors.YELLOW, err=True)
    report = run_bench(engine, secs, chunk_ms, warmup_blocks, rounds, dit_blocks, compare_upstream, seed, peak_tflops)
    _write_report(report, format_table(report), json_out)


# Standalone: `python -m benchmarks.cli --preset tiny` (the same command `avatar bench` mounts).
app = typer.Typer(add_completion=False)
app.command()(bench)

if __name__ == "__main__":
    app()
