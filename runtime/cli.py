"""Command-line interface: `avatar demo` (others add `bench`, `export`, ... to the same `app`).

The engine is imported inside the commands, so the app object (and `--help`) imports even where the
engine cannot, and no model is built until a command runs.

User mistakes (a file that is not what it should be, a missing checkpoint file, a bad option) end in
one line naming the file and what was expected, exit code 2, no traceback: the errors are raised
precisely where they are found (runtime.checkpoint.CheckpointError, runtime.media.MediaError, OSError
for paths) and turned into that line by one boundary, `_UserErrorGroup`. `avatar --debug ...` shows
the traceback instead.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from typer.core import TyperGroup

EXIT_USER_ERROR = 2  # as click's usage errors


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the user gave something unusable"; CheckpointError only when its
    module was imported (if it was not, it cannot have been raised, and torch stays unloaded)."""
    from runtime.media import MediaError

    types: list[type[BaseException]] = [MediaError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                        PermissionError]
    checkpoint = sys.modules.get("runtime.checkpoint")
    if checkpoint is not None:
        types.append(checkpoint.CheckpointError)
    return tuple(types)


class _UserErrorGroup(TyperGroup):
    """The CLI's one error boundary: a user mistake from any command becomes one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:
            if ctx.params.get("debug") or not isinstance(e, _user_error_types()):
                raise
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None


app = typer.Typer(cls=_UserErrorGroup, add_completion=False, no_args_is_help=True,
                  help="Streaming talking-avatar inference runtime (LiveTalk and Live Avatar families).")

RANDOM_WEIGHTS_WARNING = (
    "NOTE: preset {preset!r} has RANDOM weights: the video will be NOISE, not a face. "
    "Pass --checkpoint DIR (the real release files) for a real avatar.")

LIVETALK_LAYOUT = ("LiveTalk-1.3B-V0.1/model.safetensors (or a shard set with its index json), "
                   "Wan2.1_VAE.pth (or .safetensors) and wav2vec2-base-960h/ (a Hugging Face directory)")

_DTYPES = ("float32", "bfloat16", "float16")
_FAMILIES = ("livetalk", "liveavatar")
_VIDEO_SUFFIXES = (".mp4", ".m4v")  # Mp4Writer writes the MP4 container


@app.callback()
def _main(debug: Annotated[bool, typer.Option(
        "--debug", help="Show the full traceback of an error instead of one line.")] = False) -> None:
    """Streaming talking-avatar inference runtime (LiveTalk and Live Avatar families)."""
    # A callback keeps `demo` a named subcommand; `debug` is read back by _UserErrorGroup.


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


# "audio" is the time of the audio-feature stage; as a bare column name it reads like audio length.
_STAGE_LABELS = {"audio": "audio-stage"}
TABLE_CAPTION = "per-block compute time of each stage, in ms ('audio-stage': audio features, not audio length)"


def format_block_table(report: StreamReport) -> str:
    """Per-block table: block index, frames, then milliseconds per stage ('-' where a block lacks one)."""
    stages = report.stage_names()
    header = ["block", "frames"] + [f"{_STAGE_LABELS.get(s, s)} ms" for s in stages]
    rows = [[str(b.index), str(b.frames)] + [_ms(b.timings.get(s)) for s in stages] for b in report.blocks]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([TABLE_CAPTION] + lines)


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
    from runtime import Engine

    return Engine.from_pretrained(source, device=device, dtype=_torch_dtype(dtype), decoder=decoder,
                                  text_encoder=text_encoder, text_device=text_device, quantize=quantize)


def _torch_dtype(dtype: str | None):
    if dtype is None:
        return None
    import torch

    return getattr(torch, dtype)


def _check_out(out: Path) -> None:
    """The output can be written: a known extension, an existing writable folder, not a directory."""
    if out.suffix.lower() not in _VIDEO_SUFFIXES:
        raise typer.BadParameter(f"{out}: the demo writes an MP4 (H.264 + AAC); use a name ending in "
                                 f"{' or '.join(_VIDEO_SUFFIXES)}", param_hint="--out")
    folder = out.parent
    if not folder.is_dir():
        raise typer.BadParameter(f"{out}: folder {folder} does not exist", param_hint="--out")
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a directory; give a file name", param_hint="--out")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise typer.BadParameter(f"{out}: cannot write there (permission denied)", param_hint="--out")


def _check_options(family: str, device: str | None, dtype: str | None, quantize: str | None) -> None:
    if family not in _FAMILIES:
        raise typer.BadParameter(f"family must be livetalk or liveavatar, got {family!r}", param_hint="--family")
    if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise typer.BadParameter(f"device must be cpu or cuda[:N], got {device!r}", param_hint="--device")
    if dtype is not None and dtype not in _DTYPES:
        raise typer.BadParameter(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}", param_hint="--dtype")
    if quantize is not None and quantize not in ("fp8", "fp8-row"):
        raise typer.BadParameter(f"quantize must be fp8 or fp8-row, got {quantize!r}", param_hint="--quantize")


def _resolve_preset(family: str, preset: str | None, checkpoint: Path | None) -> str | None:
    """The preset to build (None: a LiveTalk checkpoint brings its own configuration), checked to exist
    before anything is said about random weights."""
    if family == "livetalk":
        if checkpoint is not None:
            if preset is not None:
                raise typer.BadParameter("a LiveTalk --checkpoint has its own configuration; --preset is for "
                                         "random weights", param_hint="--preset")
            return None
        from runtime.config import PRESETS
        known = PRESETS
    else:
        from runtime.families.liveavatar.presets import ENGINE_PRESETS
        known = ENGINE_PRESETS
        if preset is None and checkpoint is not None:
            return "liveavatar-14b"
    preset = preset or "tiny"
    if preset not in known:
        raise typer.BadParameter(f"unknown {family} preset {preset!r}; known: {', '.join(sorted(known))}",
                                 param_hint="--preset")
    return preset


def check_livetalk_release(root: Path) -> None:
    """The LiveTalk release files are all under `root` (names only, nothing read), else one error
    naming what is missing and the expected layout."""
    from runtime.checkpoint import CheckpointError

    dit_dir = root / "LiveTalk-1.3B-V0.1" if (root / "LiveTalk-1.3B-V0.1").is_dir() else root
    missing = [] if any(dit_dir.glob("*.safetensors*")) else [f"DiT weights (*.safetensors in {dit_dir})"]
    missing += [] if any(root.rglob("Wan2.1_VAE.*")) else ["Wan2.1_VAE.pth"]
    missing += [] if any(root.rglob("wav2vec2-base-960h")) else ["wav2vec2-base-960h/"]
    if missing:
        raise CheckpointError(f"{root}: not a LiveTalk release directory: no {', no '.join(missing)} "
                              f"(expected {LIVETALK_LAYOUT}, at any depth)")


_CHANNELS = {1: "mono", 2: "stereo"}


def _load_demo_audio(audio: Path | None, seconds: float | None, sample_rate: int,
                     resample: bool, seed: int) -> np.ndarray:
    """Synthetic speech, or the file converted to mono at `sample_rate`; any conversion is said in one
    line (the API refuses such input: the CLI converts only what it names)."""
    from runtime.media import read_audio_file, synth_speech_like

    if audio is None:
        return synth_speech_like(4.0 if seconds is None else seconds, sample_rate, seed=seed)
    planes, rate = read_audio_file(audio)
    if rate != sample_rate and not resample:
        raise typer.BadParameter(f"{audio} is {rate} Hz but the engine takes {sample_rate} Hz; "
                                 f"pass --resample to convert it", param_hint="--audio")
    done = []
    samples = planes[0]
    if planes.shape[0] > 1:
        samples = planes.mean(axis=0, dtype=np.float32)
        done.append("averaged to mono")
    if rate != sample_rate:
        import soxr
        samples = soxr.resample(samples, rate, sample_rate).astype(np.float32)
        done.append(f"resampled to {sample_rate / 1000:g} kHz")
    if done:
        kind = _CHANNELS.get(planes.shape[0], f"{planes.shape[0]}-channel")
        typer.echo(f"{audio}: {kind} {rate / 1000:g} kHz -> {', '.join(done)}")
    if seconds is not None:
        samples = samples[: round(seconds * sample_rate)]
    # Float files may exceed full scale; the engine rejects that, so say it here in terms of the file.
    peak = float(np.abs(samples).max())
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

        # One tick per chunk and one for flush(), whose blocks (the last) are counted on the bar too.
        with tqdm(total=len(starts) + 1, desc="streaming", unit="chunk", disable=not progress) as bar:
            for start in starts:
                take(engine.step(audio[start:start + chunk_samples], sr))
                bar.set_postfix(blocks=len(report.blocks), refresh=False)
                bar.update()
            take(engine.flush())
            bar.set_postfix(blocks=len(report.blocks), refresh=False)
            bar.update()
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
        help="A wav (or any audio file); stereo is averaged to mono, which the CLI says.")] = None,
    resample: Annotated[bool, typer.Option(
        "--resample", help="Resample --audio to the engine's rate (16 kHz) if needed.")] = False,
    image: Annotated[Path | None, typer.Option(
        "--image", exists=True, dir_okay=False,
        help="Reference portrait (default: a drawn placeholder face).")] = None,
    preset: Annotated[str | None, typer.Option(
        "--preset", help="Config preset with random weights (default tiny; with a liveavatar --checkpoint: "
                         "the shapes to load, default liveavatar-14b).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", exists=True, file_okay=False,
        help="Directory with the real release files of --family.")] = None,
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
        "--family", help="livetalk (family 1) or liveavatar (family 2: --checkpoint DIR with the Live Avatar "
                         "release, or random weights of --preset tiny / liveavatar-14b).")] = "livetalk",
) -> None:
    """Stream speech through the engine and write an MP4 with per-block timings."""
    # Everything the user gave is checked and read before any model is built.
    _check_out(out)
    _check_options(family, device, dtype, quantize)
    preset = _resolve_preset(family, preset, checkpoint)
    if decoder not in ("wan", "taehv"):
        raise typer.BadParameter(f"decoder must be wan or taehv, got {decoder!r}", param_hint="--decoder")
    from runtime.media import load_image

    reference = load_image(image) if image else None
    samples = _load_demo_audio(audio, seconds, 16000, resample, seed)  # both families take 16 kHz
    if family == "liveavatar":
        return _demo_liveavatar(out, samples, reference, preset, checkpoint, device, dtype, seed, chunk_ms,
                                quantize, progress)
    prompt_args = _prompt_args(prompt, prompt_embeds, checkpoint is None)
    if checkpoint is not None:
        check_livetalk_release(checkpoint)
    else:
        typer.secho(RANDOM_WEIGHTS_WARNING.format(preset=preset), fg=typer.colors.YELLOW, bold=True, err=True)
    # The 11 GB text encoder is loaded only when a text prompt needs it.
    engine = _create_engine(str(checkpoint) if checkpoint else preset, device, dtype, decoder,
                            text_encoder=prompt is not None, text_device=text_device, quantize=quantize)
    cfg = engine.config
    from runtime.media import synthetic_face
    try:
        engine.reset(synthetic_face(cfg.height, cfg.width) if reference is None else reference, seed=seed,
                     **prompt_args)
    except ValueError as e:  # a prompt over the token limit, or embeddings of the wrong shape
        raise typer.BadParameter(str(e), param_hint="--prompt / --prompt-embeds") from e
    _stream_and_report(engine, samples, out, chunk_ms, progress, f"{cfg.name} {cfg.width}x{cfg.height}")


def _stream_and_report(engine, samples: np.ndarray, out: Path, chunk_ms: float, progress: bool,
                       name: str) -> None:
    sr = engine.sample_rate
    chunk = max(1, round(chunk_ms * sr / 1000.0))
    typer.echo(f"engine: {name} @ {engine.fps} fps; audio {len(samples) / sr:.2f} s at {sr} Hz in chunks "
               f"of {chunk} samples")
    report = stream_to_mp4(engine, samples, out, chunk, progress=progress)
    typer.echo(format_block_table(report))
    typer.echo(format_summary(report, engine.fps))
    typer.echo(f"wrote {out}")


def _demo_liveavatar(out, samples, reference, preset, checkpoint, device, dtype, seed, chunk_ms, quantize,
                     progress) -> None:
    """Family 2: the release files under --checkpoint (runtime.families.liveavatar.loading.find_release), or
    random weights of the preset."""
    from runtime.engine import Engine
    from runtime.families.liveavatar.family import PRESET_OF
    from runtime.media import synthetic_face

    engine_preset = {v: k for k, v in PRESET_OF.items()}[preset]   # CLI preset -> engine preset name
    if checkpoint is not None:
        from runtime.families.liveavatar.loading import find_release

        find_release(checkpoint)  # names every missing file before anything is built
        engine = Engine.from_pretrained(str(checkpoint), device, _torch_dtype(dtype), config=engine_preset,
                                        quantize=quantize, max_sessions=1)
    else:
        typer.secho(RANDOM_WEIGHTS_WARNING.format(preset=preset), fg=typer.colors.YELLOW, bold=True, err=True)
        engine = Engine.from_pretrained(engine_preset, device, _torch_dtype(dtype), seed=seed, quantize=quantize,
                                        max_sessions=1)
    engine.reset(synthetic_face(*engine.size) if reference is None else reference, seed=seed)
    h, w = engine.size
    _stream_and_report(engine, samples, out, chunk_ms, progress, f"Live Avatar {preset} {w}x{h}")


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
