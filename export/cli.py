"""`export` command: a checkpoint (or preset) -> an artifacts directory of verified stage programs.

    avatar export tiny artifacts/tiny                  # torch.export + ONNX, verified on CPU
    avatar export /ckpt/LiveTalk artifacts/lt --device cuda --dtype bfloat16 --tensorrt

Every stage is exported, loaded back from disk and run on fresh random inputs next to the eager
model; the table printed at the end gives the max abs and relative error of every output, and the
command exits non-zero when one exceeds its dtype's tolerance (see export/verify.py).

`export_artifacts` is the same thing as a function (tests and scripts call it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import typer

from .runner import DIT_STAGES, VAE_STAGES, Manifest, StageEntry, config_to_dict, save_time_mods, state_sha256
from .stages import build_stages
from .verify import Check, check_program, check_streaming_decode, format_table, tolerance

log = logging.getLogger(__name__)

app = typer.Typer(help="Export checkpoints to static graphs (torch.export, ONNX, TensorRT).",
                  no_args_is_help=True)

STREAM_BLOCKS = 3  # latent blocks decoded through the carried cache in the streaming check (2 carry it)


@dataclass
class ExportResult:
    manifest: Manifest
    directory: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype name (float32, bfloat16, float16), got {name!r}")
    return dt


def export_artifacts(source: str, directory: str | Path, *, onnx: bool = True, tensorrt: bool = False,
                     tensorrt_dit: bool = False, precision: str = "fp16", device: str = "cpu",
                     dtype: str = "float32", ring_io: str = "rows", seed: int = 0, verify: bool = True,
                     trt_cache_dir: str | Path | None = None,
                     progress: Callable[[str], None] = lambda msg: None) -> ExportResult:
    """Export every stage of `source` (preset name or checkpoint directory) into `directory`."""
    from runtime.engine import Engine

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch_dtype = _dtype(dtype)
    if (tensorrt or tensorrt_dit) and not onnx:
        raise ValueError("TensorRT engines are built from the ONNX graphs: drop --no-onnx")
    progress(f"building {source} on {device} ({dtype})")
    # the export needs no text encoder (prompts enter as embeddings): never load umT5 for it
    eng = Engine.from_pretrained(source, device=device, dtype=torch_dtype, seed=seed, text_encoder=False)
    cfg, dit, vae = eng.config, eng.dit, eng.vae
    stages = build_stages(dit, vae, cfg, batch=1, ring_io=ring_io, dtype=torch_dtype)
    for stage in stages.values():
        stage.make_inputs = _on_device(stage.make_inputs, device)

    from runtime.config import PRESETS

    if not (source in PRESETS and not Path(source).exists()):
        source = str(Path(source).resolve())  # the runner rebuilds the audio encoder from here, from any cwd
    manifest = Manifest(source=source, seed=seed, config=config_to_dict(cfg), batch=1,
                        dtype=str(torch_dtype).removeprefix("torch."), device=str(torch.device(device)),
                        ring_io=ring_io, weights_sha256=state_sha256(dit, vae))
    result = ExportResult(manifest, directory)
    loaded: dict[tuple[str, str], object] = {}  # (backend, stage) -> the program read back from its file
    for name, stage in stages.items():
        progress(f"exporting {name}")
        manifest.stages[name] = _export_stage(stage, directory, onnx, verify, result.checks, loaded)
    _save_time_mods(dit, cfg, directory / manifest.time_mods)
    manifest.save(directory)
    if verify:
        progress("checking the streaming decode over several blocks")
        result.checks += _check_stream(vae, cfg, loaded, torch_dtype, device)
    if tensorrt or tensorrt_dit:
        wanted = VAE_STAGES + (DIT_STAGES if tensorrt_dit else ())
        result.checks += _build_tensorrt(stages, directory, manifest, wanted, precision, trt_cache_dir, progress)
    (directory / "verification.json").write_text(json.dumps(
        [dict(dataclasses.asdict(c), ok=c.ok) for c in result.checks], indent=2))
    return result


def _on_device(make, device: str):
    """Example inputs are drawn on the CPU (same values on every device), then moved."""
    return lambda g: tuple(t.to(device) for t in make(g))


def _export_stage(stage, directory: Path, onnx: bool, verify: bool, checks: list[Check],
                  loaded: dict[tuple[str, str], object]) -> StageEntry:
    """Export one stage; with `verify`, read each file back, check it and keep it in `loaded`."""
    from .onnx_export import OrtProgram, export_onnx
    from .torch_export import TorchProgram, export_program, save_program

    program = export_program(stage)
    pt2 = save_program(program, directory / f"{stage.name}.pt2")
    entry = StageEntry(inputs=list(stage.input_names), outputs=list(stage.output_names), pt2=pt2.name)
    if verify:  # the file on disk, not the in-memory program: the save/load round trip is part of it
        program_read = loaded["torch", stage.name] = TorchProgram.load(pt2, stage.name, stage.input_names,
                                                                        stage.output_names)
        checks += check_program(stage, program_read, "torch.export")
    if onnx:
        path = export_onnx(stage, directory / f"{stage.name}.onnx", program=program)
        entry.onnx = path.name
        dtype = stage.example_inputs(0)[0].dtype
        if verify and dtype != torch.bfloat16:  # numpy (hence onnxruntime's Python API) has no bf16
            loaded["onnx", stage.name] = OrtProgram(path, stage.name)
            checks += check_program(stage, loaded["onnx", stage.name], "onnxruntime")
    return entry


def _save_time_mods(dit, cfg, path: Path) -> None:
    timesteps = [*cfg.sampler.timesteps, cfg.sampler.refresh_timestep]
    frames = cfg.cache.block_frames
    save_time_mods(path, timesteps, [dit.time_mod(torch.full((1, frames), float(t))) for t in timesteps])


def _check_stream(vae, cfg, loaded: dict[tuple[str, str], object], dtype, device) -> list[Check]:
    """The decode stages read back from their files (`loaded`), streamed over several blocks."""
    h, w = cfg.latent_hw
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, cfg.vae.z_dim, STREAM_BLOCKS * cfg.cache.block_frames, h, w, generator=g)
    latents = latents.to(device=device, dtype=dtype)
    checks = []
    for backend, label in (("torch", "torch.export"), ("onnx", "onnxruntime")):
        if (backend, "vae_decode_first") in loaded:  # onnx: only when exported and checkable (not bf16)
            checks += check_streaming_decode(vae, loaded[backend, "vae_decode_first"],
                                             loaded[backend, "vae_decode_step"], latents, label,
                                             block_frames=cfg.cache.block_frames)
    return checks


def _build_tensorrt(stages, directory: Path, manifest: Manifest, wanted, precision: str, cache_dir,
                    progress) -> list[Check]:
    from .tensorrt import TRTProgram, engine_for_onnx

    checks = []
    for name in wanted:
        progress(f"TensorRT ({precision}): {name}")
        engine = engine_for_onnx(directory / manifest.stages[name].onnx, precision=precision, cache_dir=cache_dir)
        program = TRTProgram(engine, name, stages[name].input_names, stages[name].output_names)
        tol = tolerance({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision])
        checks += check_program(stages[name], program, f"tensorrt-{precision}", tol=tol)
    return checks


Opt = typer.Option


@app.command("export")
def export_command(
    source: Annotated[str, typer.Argument(
        metavar="CHECKPOINT_OR_PRESET",
        help="checkpoint directory (LiveTalk release layout) or preset name (random weights)")],
    artifacts_dir: Annotated[Path, typer.Argument(help="output directory for the stage programs")],
    onnx: Annotated[bool, Opt("--onnx/--no-onnx", help="also export ONNX graphs (checked with onnxruntime)")] = True,
    tensorrt: Annotated[bool, Opt("--tensorrt", help="build TensorRT engines for the VAE stages (GPU)")] = False,
    tensorrt_dit: Annotated[bool, Opt("--tensorrt-dit", help="also build engines for the DiT stages")] = False,
    precision: Annotated[str, Opt(help="TensorRT precision: fp32, fp16 or bf16")] = "fp16",
    device: Annotated[str, Opt(help="device to trace on (the programs run on it)")] = "cpu",
    dtype: Annotated[str, Opt(help="model dtype: float32 (the reference), bfloat16, float16")] = "float32",
    ring_io: Annotated[str, Opt(help="step outputs: 'rows' (the block's K/V) or 'full' (whole ring)")] = "rows",
    seed: Annotated[int, Opt(help="weight seed for presets")] = 0,
    verify: Annotated[bool, Opt("--verify/--no-verify", help="check every export against eager")] = True,
) -> None:
    """Export every stage of a checkpoint to ARTIFACTS_DIR and verify each against eager."""
    try:
        result = export_artifacts(
            source, artifacts_dir, onnx=onnx, tensorrt=tensorrt, tensorrt_dit=tensorrt_dit, precision=precision,
            device=device, dtype=dtype, ring_io=ring_io, seed=seed, verify=verify,
            progress=lambda msg: typer.echo(f"[export] {msg}", err=True))
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        typer.echo(f"export failed: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {len(result.manifest.stages)} stages to {result.directory}")
    if result.checks:
        typer.echo(format_table(result.checks))
    if not result.ok:
        bad = sorted({f"{c.stage} ({c.backend})" for c in result.checks if not c.ok})
        typer.echo(f"verification FAILED: {', '.join(bad)}", err=True)
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - `python -m export.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
