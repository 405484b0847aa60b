"""Live Avatar TPP end to end: 16 kHz audio and a reference image in, decoded blocks out.

world_size = num_steps + 1: step ranks as runtime/liveavatar/tpp.py, and the collect rank becomes a
decode rank. Every rank builds the same `LiveAvatarEngine.random(preset, seed=weights_seed)` and takes
its session inputs from `engine.session_inputs(image, prompt, seed)` (what `reset` starts a stream
from). Rank 0 owns the audio: per block, `engine.block_features(audio, b)` (the engine's own
front end, windows and flush padding) and `engine.covered_audio(audio, b)`, sent to the decode rank on
the gloo side channel. The decode rank runs the engine's `StreamingDecoder` and builds each
`LiveAvatarBlock` with `engine.block_place(b)` (block 0's lead frames from the reference latent; the
last block trimmed to the input as `flush()` does): frames, pts and audio equal a one-process engine
fed `step(audio)` then `flush()`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from runtime.audio.validate import check_chunk
from runtime.pipeline import FailSpec, StageEvent, _stop, _wait, init_spawned_rank

from .audio_front import SAMPLE_RATE
from .engine import LiveAvatarBlock, LiveAvatarEngine, trim_to_input
from .presets import engine_preset
from .tpp import _report_error, _start, serve_rank
from .tpp_layout import TppLayout, TppSession

__all__ = ["EngineDecoder", "TppBlocks", "run_liveavatar_tpp_audio"]


class EngineDecoder:
    """The decode rank's `BlockDecoder`: the engine's streaming decode and output timeline."""

    def __init__(self, engine: LiveAvatarEngine, ref_latent: torch.Tensor):
        if engine.decoder is None:
            raise ValueError("the decode rank's engine needs a decoder")
        self.engine, self.ref_latent = engine, ref_latent  # the reference makes block 0's lead frames
        engine.decoder.reset()

    def covered_samples(self, counter: int) -> int:
        lo, hi = self.engine.block_place(counter).span
        return hi - lo

    def decode(self, counter: int, latents: torch.Tensor, audio: torch.Tensor) -> LiveAvatarBlock:
        start = time.perf_counter()
        frames = self.engine.decode_block(counter, latents, self.ref_latent)
        p = self.engine.block_place(counter)
        return LiveAvatarBlock(counter, latents, p.span, frames, first_frame=p.first_frame, pts=p.pts,
                               audio=audio.numpy().copy(), timings={"decode": time.perf_counter() - start})


@dataclass
class TppBlocks:
    blocks: list[LiveAvatarBlock]  # in order, as LiveAvatarEngine.step(audio) + flush() returns them
    trace: list[StageEvent]
    wall_s: float


@dataclass
class _AvJob:
    preset: str
    world_size: int
    num_steps: int
    seed: int
    weights_seed: int
    dtype: str
    fail_at: str | None
    comm_timeout_s: float
    threads: int
    decode: bool = True

    @property
    def config(self):  # what tpp._report_error reads
        return engine_preset(self.preset).dit


def _spawned_rank(rank: int, job: _AvJob, root: str, backend: str) -> None:
    try:
        device, meta = init_spawned_rank(rank, job.world_size, root, backend, job.threads, job.comm_timeout_s)
        layout = TppLayout(job.world_size, job.num_steps, decode=True)
        decodes = rank == layout.collect_rank
        engine = LiveAvatarEngine.random(job.preset, device=device, dtype=getattr(torch, job.dtype),
                                         seed=job.weights_seed, decoder=decodes)
        inputs = torch.load(os.path.join(root, "inputs.pt"), weights_only=True)
        ref, motion, prompt, settings = engine.session_inputs(inputs["image"].numpy(), inputs["prompt"], job.seed)
        features = block_audio = None
        if rank == 0:  # lazily, block by block, as the engine would compute them
            audio = inputs["audio"].numpy()
            blocks = range(engine.blocks_covering(len(audio)))
            features = (engine.block_features(audio, b).to(engine.model.dtype) for b in blocks)
            block_audio = (torch.from_numpy(engine.covered_audio(audio, b)) for b in blocks)
        session = TppSession(ref, motion, prompt, settings, features, block_audio)
        events = serve_rank(rank, job.world_size, engine.model, session, device, meta,
                            lambda counter, block: _save_block(Path(root), counter, block), decode=True,
                            decoder=EngineDecoder(engine, ref) if decodes else None, fail_at=job.fail_at)
        Path(root, f"trace{rank}.json").write_text(json.dumps([asdict(e) for e in events]))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - every failure must reach the driver
        _report_error(Path(root), rank, job, e)
        os._exit(1)


def _save_block(root: Path, counter: int, b: LiveAvatarBlock) -> None:
    tmp = root / f"block{counter}.pt.tmp"
    torch.save({"index": b.index, "latents": b.latents.cpu(), "span": list(b.audio_span),
                "frames": torch.from_numpy(b.frames), "first_frame": b.first_frame, "pts": b.pts,
                "audio": torch.from_numpy(b.audio), "timings": b.timings}, tmp)
    tmp.replace(root / f"block{counter}.pt")


def _load_block(path: Path) -> LiveAvatarBlock:
    d = torch.load(path, weights_only=True)
    return LiveAvatarBlock(d["index"], d["latents"], tuple(d["span"]), d["frames"].numpy(), d["first_frame"],
                           d["pts"], d["audio"].numpy(), d["timings"])


def run_liveavatar_tpp_audio(preset: str, audio, reference_image: np.ndarray, *, sample_rate: int = SAMPLE_RATE,
                             prompt_embeds: torch.Tensor | None = None, seed: int = 0, weights_seed: int = 0,
                             world_size: int | None = None, backend: str = "gloo", dtype: str = "float32",
                             timeout_s: float = 300.0, comm_timeout_s: float = 60.0, threads_per_rank: int = 1,
                             fail_at: str | FailSpec | None = None, start_method: str = "forkserver") -> TppBlocks:
    """One stream (the whole `audio`, mono int16 or float32 at 16 kHz, and an HxWx3 uint8 reference image)
    through num_steps step ranks and a decode rank on this machine. Every rank builds
    `LiveAvatarEngine.random(preset, seed=weights_seed)`; the result equals that engine's
    `reset(reference_image, prompt_embeds, seed)`, `step(audio, 16000)` + `flush()`. A failing rank
    raises PipelineError naming rank, role, stage and block; every rank process is ended before returning."""
    num_steps = engine_preset(preset).dit.num_steps
    layout = TppLayout(world_size or num_steps + 1, num_steps, decode=True)
    if layout.collect_rank is None:
        raise ValueError(f"world_size must be {num_steps + 1} (the step ranks + a decode rank), got {world_size}")
    spec = FailSpec.parse(fail_at)
    if spec is not None:
        layout.check_fail(spec)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    samples = check_chunk(audio, sample_rate, SAMPLE_RATE)
    image = np.asarray(reference_image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"reference_image must be HxWx3 uint8, got {image.dtype} {image.shape}")
    job = _AvJob(preset, layout.world_size, num_steps, seed, weights_seed, dtype, str(spec) if spec else None,
                 comm_timeout_s, threads_per_rank)
    root = Path(tempfile.mkdtemp(prefix="tpp-av-"))
    torch.save({"audio": torch.from_numpy(samples), "image": torch.from_numpy(image.copy()),
                "prompt": prompt_embeds}, root / "inputs.pt")
    procs = _start(job, root, backend, start_method, _spawned_rank)
    start = time.perf_counter()
    try:
        _wait(procs, root, start + timeout_s)
        wall = time.perf_counter() - start
        blocks = sorted(root.glob("block*.pt"), key=lambda p: int(p.stem[5:]))
        trace = [StageEvent(**e) for r in range(layout.world_size)
                 for e in json.loads((root / f"trace{r}.json").read_text())]
        loaded = [_load_block(p) for p in blocks]
        if loaded:  # as the engine's flush: no silence padding past the input's last frame
            loaded[-1] = trim_to_input(loaded[-1], len(samples))
        return TppBlocks(loaded, trace, wall)
    finally:
        _stop(procs, 0)
        shutil.rmtree(root, ignore_errors=True)
