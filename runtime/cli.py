"""Command-line interface: `avatar demo` (others add `bench`, `export`, ... to the same `app`).

The engine is imported inside the commands, so the app object (and `--help`) imports even where the
engine cannot, and no model is built until a command runs.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Streaming talking-avatar inference runtime (LiveTalk family).")

RANDOM_WEIGHTS_WARNING = (
    "NOTE: preset {preset!r} has RANDOM weights: the video will be NOISE, not a face. "
    "Pass --checkpoint DIR (real LiveTalk files) for a real avatar.")

_DTYPES = ("float32", "bfloat16", "float16")


@app.callback()
def _main() -> None:
    """Streaming talking-avatar inference runtime (LiveTalk family)."""
    # A callback keeps `demo` a named subcommand even while it is the only one.


# ---- timing report ------------------------------------------------------------------------------

@dataclass
class BlockRecord:
    index: int
    frames: int
    timings: dict[str, float]


@dataclass
class StreamReport:
    """What the demo measured: per-block timings and the stream's wall-clock figures."""

    blocks: list[BlockRecord] = field(default_factory=list)
    first_block_latency_s: float | None = None  # from the first step() call to the first block
    wall_s: float = 0.0                          # whole streaming loop, step() + flush()
    audio_s: float = 0.0

    @property
    def total_frames(self) -> int:
        return sum(b.frames for b in self.blocks)

    def stage_names(self) -> list[str]:
        names: list[str] = []
        for b in self.blocks:
            names += [k for k in b.timings if k not in names]
        # "total" reads best as the last column.
        return [n for n in names if n != "total"] + (["total"] if "total" in names else [])


def format_block_table(report: StreamReport) -> str:
    """Per-block table: block index, frames, then milliseconds per stage ('-' where a block lacks one)."""
    stages = report.stage_names()
    header = ["block", "frames"] + [f"{s} ms" for s in stages]
    rows = [[str(b.index), str(b.frames)] + [_ms(b.timings.get(s)) for s in stages] for b in report.blocks]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000.0 * seconds:.1f}"


def format_summary(report: StreamReport, fps: int) -> str:
    """First-block latency, median block time, generation FPS and the real-time factor."""
    totals = [b.timings["total"] for b in report.blocks if "total" in b.timings]
    lines = [(f"blocks: {len(report.blocks)}, frames: {report.total_frames} "
              f"({report.total_frames / fps:.2f} s of video at {fps} fps)")]
    if report.first_block_latency_s is not None:
        lines.append(f"first-block latency: {1000.0 * report.first_block_latency_s:.1f} ms")
    if totals:
        lines.append(f"median block time: {1000.0 * statistics.median(totals):.1f} ms")
    if report.wall_s > 0:
        gen_fps = report.total_frames / report.wall_s
        lines.append(f"throughput: {gen_fps:.2f} FPS ({gen_fps / fps:.2f}x real time; "
                     f"{report.audio_s:.2f} s of audio in {report.wall_s:.2f} s)")
    return "\n".join(lines)


# ---- demo ---------------------------------------------------------------------------------------

def _create_engine(source: str, device: str | None, dtype: str | None, decoder: str = "wan",
                   text_encoder: bool | None = None, text_device: str | None = None, quantize: str | None = None):
    """Engine.from_pretrained, imported late so the CLI loads without the engine's dependencies.
    `text_encoder`: load the umT5 prompt encoder (True: required), or not (False)."""
    try:
        from runtime import Engine
    except ImportError as e:
        raise typer.BadParameter(f"the engine cannot be imported ({e})") from e
    torch_dtype = None
    if dtype is not None:
        import torch
        torch_dtype = getattr(torch, dtype)
    if decoder not in ("wan", "taehv"):
        raise typer.BadParameter(f"decoder must be wan or taehv, got {decoder!r}", param_hint="--decoder")
    try:
        return Engine.from_pretrained(source, device=device, dtype=torch_dtype, decoder=decoder,
                                      text_encoder=text_encoder, text_device=text_device, quantize=quantize)
    except (ValueError, RuntimeError) as e:
        if quantize and ("quantiz" in str(e) or "FP8" in str(e) or "fp8" in str(e)):
            raise typer.BadParameter(str(e), param_hint="--quantize") from e
        raise


def _load_demo_audio(audio: Path | None, seconds: float | None, sample_rate: int,
                     resample: bool, seed: int) -> np.ndarray:
    from runtime.media import read_wav, synth_speech_like

    if audio is None:
        return synth_speech_like(4.0 if seconds is None else seconds, sample_rate, seed=seed)
    samples, rate = read_wav(audio, mixdown=True)
    if rate != sample_rate:
        if not resample:
            raise typer.BadParameter(f"{audio} is {rate} Hz but the engine takes {sample_rate} Hz; "
                                     f"pass --resample to convert it", param_hint="--audio")
        import soxr
        samples = soxr.resample(samples, rate, sample_rate).astype(np.float32)
    if seconds is not None:
        samples = samples[: round(seconds * sample_rate)]
    # Float files may exceed full scale; the engine rejects that, so say it here in terms of the file.
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak > 1.0:
        raise typer.BadParameter(f"{audio} has samples up to {peak:.3f}, outside [-1, 1]", param_hint="--audio")
    return samples


def stream_to_mp4(engine, audio: np.ndarray, out: Path, chunk_samples: int,
                  progress: bool = True) -> StreamReport:
    """Push `audio` through engine.step in chunks, then flush; write every block to `out`."""
    from tqdm import tqdm

    from runtime.media import Mp4Writer

    sr = engine.sample_rate          # either family's engine: sample_rate, size, fps, step, flush
    height, width = engine.size
    report = StreamReport(audio_s=len(audio) / sr)
    starts = range(0, len(audio), chunk_samples)
    with Mp4Writer(out, width, height, engine.fps, sr) as writer:
        t0 = time.perf_counter()

        def take(blocks) -> None:
            for block in blocks:
                if report.first_block_latency_s is None:
                    report.first_block_latency_s = time.perf_counter() - t0
                writer.write_block(block.frames, block.audio)
                report.blocks.append(BlockRecord(block.index, len(block.frames), dict(block.timings)))

        bar = tqdm(starts, desc="streaming", unit="chunk", disable=not progress)
        for start in bar:
            take(engine.step(audio[start:start + chunk_samples], sr))
            bar.set_postfix(blocks=len(report.blocks), refresh=False)
        take(engine.flush())
        report.wall_s = time.perf_counter() - t0
    if not report.blocks:
        raise RuntimeError("the engine produced no video blocks (is the audio long enough for one block?)")
    return report


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="MP4 file to write (H.264 + AAC).")] = Path("demo.mp4"),
    seconds: Annotated[float | None, typer.Option(
        "--seconds", min=0.05, help="Seconds of synthetic speech (default 4), or a cut of --audio.")] = None,
    audio: Annotated[Path | None, typer.Option(
        "--audio", exists=True, dir_okay=False,
        help="A wav (or any audio file) to use instead of synthetic speech.")] = None,
    resample: Annotated[bool, typer.Option(
        "--resample", help="Resample --audio to the engine's rate if needed.")] = False,
    image: Annotated[Path | None, typer.Option(
        "--image", exists=True, dir_okay=False,
        help="Reference portrait (default: a drawn placeholder face).")] = None,
    preset: Annotated[str, typer.Option(
        "--preset", help="Config preset with random weights (no checkpoint).")] = "tiny",
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", exists=True, file_okay=False,
        help="Directory with the real LiveTalk release files.")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="cpu or cuda (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help=f"One of {', '.join(_DTYPES)} (default per device).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Session seed (noise) and synthetic-speech seed.")] = 0,
    chunk_ms: Annotated[float, typer.Option(
        "--chunk-ms", min=1.0, help="Audio chunk size pushed per step() call.")] = 40.0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    decoder: Annotated[str, typer.Option("--decoder", help="Video decoder: wan (Wan2.1 VAE) or taehv (tiny "
                                         "decoder; taew2_1.pth in the checkpoint directory).")] = "wan",
    prompt: Annotated[str | None, typer.Option(
        "--prompt", help="Text prompt, encoded by umT5-XXL (needs --checkpoint with the T5 files).")] = None,
    prompt_embeds: Annotated[Path | None, typer.Option(
        "--prompt-embeds", exists=True, dir_okay=False,
        help="Precomputed prompt embeddings (from `avatar encode-prompt`); no T5 needed.")] = None,
    text_device: Annotated[str | None, typer.Option(
        "--text-device", help="Device of the text encoder (default: the engine's; cpu saves 11 GB of GPU "
                              "memory, encoding is once per prompt).")] = None,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="fp8 (per-tensor scales, compute capability >= 8.9) or fp8-row (per token / "
                           "channel, >= 9.0): FP8 weights and activations in the DiT's linears.")] = None,
    family: Annotated[str, typer.Option(
        "--family", help="livetalk (family 1) or liveavatar (family 2: random weights of --preset, "
                         "tiny or liveavatar-14b).")] = "livetalk",
) -> None:
    """Stream speech through the engine and write an MP4 with per-block timings."""
    if family == "liveavatar":
        return _demo_liveavatar(out, seconds, audio, resample, image, preset, device, dtype, seed, chunk_ms,
                                quantize, progress)
    if family != "livetalk":
        raise typer.BadParameter(f"family must be livetalk or liveavatar, got {family!r}", param_hint="--family")
    if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise typer.BadParameter(f"device must be cpu or cuda[:N], got {device!r}", param_hint="--device")
    if dtype is not None and dtype not in _DTYPES:
        raise typer.BadParameter(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}", param_hint="--dtype")
    random_weights = checkpoint is None
    prompt_args = _prompt_args(prompt, prompt_embeds, random_weights)
    warning = RANDOM_WEIGHTS_WARNING.format(preset=preset)
    if random_weights:
        typer.secho(warning, fg=typer.colors.YELLOW, bold=True, err=True)

    # The 11 GB text encoder is loaded only when a text prompt needs it.
    engine = _create_engine(str(checkpoint) if checkpoint else preset, device, dtype, decoder,
                            text_encoder=prompt is not None, text_device=text_device, quantize=quantize)
    cfg = engine.config
    sr = cfg.audio.sample_rate
    samples = _load_demo_audio(audio, seconds, sr, resample, seed)
    from runtime.media import load_image, synthetic_face
    reference = load_image(image) if image else synthetic_face(cfg.height, cfg.width)
    try:
        engine.reset(reference, seed=seed, **prompt_args)
    except ValueError as e:  # a prompt over the token limit, or embeddings of the wrong shape
        raise typer.BadParameter(str(e), param_hint="--prompt / --prompt-embeds") from e

    chunk = max(1, round(chunk_ms * sr / 1000.0))
    typer.echo(f"engine: {cfg.name} {cfg.width}x{cfg.height} @ {cfg.fps} fps; audio "
               f"{len(samples) / sr:.2f} s at {sr} Hz in chunks of {chunk} samples")
    report = stream_to_mp4(engine, samples, out, chunk, progress=progress)

    typer.echo(format_block_table(report))
    typer.echo(format_summary(report, cfg.fps))
    typer.echo(f"wrote {out}")
    if random_weights:
        typer.secho(warning, fg=typer.colors.YELLOW, bold=True, err=True)


def _demo_liveavatar(out, seconds, audio, resample, image, preset, device, dtype, seed, chunk_ms, quantize,
                     progress) -> None:
    """Family 2 with random weights (no release files are wired to the CLI yet)."""
    import torch

    from runtime.liveavatar.engine import LiveAvatarEngine
    from runtime.media import load_image, synthetic_face

    warning = RANDOM_WEIGHTS_WARNING.split(" Pass")[0].format(preset=preset)
    typer.secho(warning, fg=typer.colors.YELLOW, bold=True, err=True)
    try:
        engine = LiveAvatarEngine.random(preset, device, getattr(torch, dtype) if dtype else None, seed,
                                         quantize=quantize)
    except (ValueError, RuntimeError) as e:
        raise typer.BadParameter(str(e), param_hint="--preset / --quantize") from e
    sr = engine.sample_rate
    samples = _load_demo_audio(audio, seconds, sr, resample, seed)
    engine.reset(load_image(image) if image else synthetic_face(*engine.size), seed=seed)
    chunk = max(1, round(chunk_ms * sr / 1000.0))
    report = stream_to_mp4(engine, samples, out, chunk, progress=progress)
    typer.echo(format_block_table(report))
    typer.echo(format_summary(report, engine.fps))
    typer.echo(f"wrote {out}")
    typer.secho(warning, fg=typer.colors.YELLOW, bold=True, err=True)


def _prompt_args(prompt: str | None, embeds_file: Path | None, random_weights: bool) -> dict:
    """reset() keywords for --prompt / --prompt-embeds (none when neither is given)."""
    if prompt is not None and embeds_file is not None:
        raise typer.BadParameter("give --prompt or --prompt-embeds, not both", param_hint="--prompt")
    if prompt is not None and random_weights:
        raise typer.BadParameter("a text prompt needs the umT5 text encoder: pass --checkpoint DIR with "
                                 "models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl/, or --prompt-embeds",
                                 param_hint="--prompt")
    if prompt is not None:
        return {"prompt": prompt}
    if embeds_file is not None:
        from runtime.text import load_prompt_embeds

        try:
            return {"prompt_embeds": load_prompt_embeds(embeds_file)}
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--prompt-embeds") from e
    return {}


# ---- encode-prompt ------------------------------------------------------------------------------

@app.command("encode-prompt")
def encode_prompt(
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", exists=True, file_okay=False,
        help="Directory holding models_t5_umt5-xxl-enc-bf16.pth (or .safetensors) and google/umt5-xxl/.")],
    prompt: Annotated[str, typer.Option("--prompt", help="The text prompt.")],
    out: Annotated[Path, typer.Option("--out", help="safetensors file to write (tensor 'prompt_embeds').")],
    device: Annotated[str, typer.Option("--device", help="Where to run the encoder (cpu or cuda).")] = "cpu",
    dtype: Annotated[str, typer.Option(
        "--dtype", help=f"One of {', '.join(_DTYPES)} (Wan runs it in bfloat16).")] = "bfloat16",
    text_config: Annotated[str, typer.Option(
        "--text-config", help="Text encoder shapes (preset name).")] = "umt5-xxl",
) -> None:
    """Encode a prompt once and save its [L, 4096] embedding: the engine then runs without T5
    (`avatar demo --prompt-embeds FILE`, or Engine.reset(image, prompt_embeds=load_prompt_embeds(FILE)))."""
    import torch

    from runtime.text import PromptEncoder, save_prompt_embeds

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}", param_hint="--dtype")
    encoder = PromptEncoder.from_directory(checkpoint, config=text_config, device=device, dtype=getattr(torch, dtype))
    try:
        embeds = encoder(prompt)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--prompt") from e
    save_prompt_embeds(out, embeds, prompt=prompt, encoder=encoder.config.name)
    typer.echo(f"wrote {out}: prompt_embeds {list(embeds.shape)} {dtype} ({embeds.shape[0]} tokens)")


def _mount_subcommands() -> None:
    """`bench` and `export` live beside their code (benchmarks/, export/); those modules import heavy
    dependencies inside their commands, so `avatar --help` stays fast."""
    from benchmarks.cli import bench
    from export.cli import app as export_app

    app.command(name="bench")(bench)
    app.add_typer(export_app)


_mount_subcommands()

if __name__ == "__main__":
    app()

__import__("runtime.server.cli", fromlist=["register"]).register(app)  # `avatar serve`, runtime/server/
