"""Live Avatar TPP end to end: 16 kHz audio and a reference image in, decoded blocks out.

world_size = num_steps + 1: step ranks as runtime/families/liveavatar/tpp.py, and the collect rank becomes a
decode rank. Every rank builds the same family (`LiveAvatar.build(preset, seed=weights_seed)`, the
engine's `Engine.from_pretrained(preset)` weights) and takes its session inputs from
`family.session_inputs(image, prompt, seed)` (what `engine.open` starts a stream from). Rank 0 owns
the audio: per block, `family.block_features(audio, b)` (the family's front end and windows, the
flush's silence padding) and the samples of the block's frames, sent to the decode rank on the gloo
side channel. The decode rank runs a `StreamingDecoder` through `family.decode_block` (block 0's lead
frames from the reference latent) and builds each `VideoBlock` on the family's timeline: frames, pts
and audio equal one engine session fed `step(audio)` then `flush()`.
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
from runtime.core.blocks import VideoBlock, cut_to_frames
from runtime.models.streaming import StreamingDecoder
from runtime.parallel.failures import FailSpec
from runtime.parallel.procs import init_spawned_rank, stop, wait_for
from runtime.parallel.rank import StageEvent

from .audio_front import SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME
from .family import PRESET_OF, LiveAvatar, window_samples
from .presets import engine_preset
from .tpp import _report_error, _start, serve_rank
from .tpp_layout import TppLayout, TppSession

__all__ = ["FamilyDecoder", "TppBlocks", "run_liveavatar_tpp_audio"]


class FamilyDecoder:
    """The decode rank's `BlockDecoder`: the family's streaming decode and output timeline."""

    def __init__(self, family: LiveAvatar, ref_latent: torch.Tensor):
        self.family, self.ref_latent = family, ref_latent  # the reference makes block 0's lead frames
        self.decoder = StreamingDecoder(family.vae)
        self.latents: dict[int, torch.Tensor] = {}

    def covered_samples(self, counter: int) -> int:
        return self.family.timeline.frames_in_block(counter) * self.family.timeline.samples_per_frame

    def decode(self, counter: int, latents: torch.Tensor, audio: torch.Tensor) -> VideoBlock:
        start = time.perf_counter()
        frames = self.family.decode_block(self.decoder, counter, latents, self.ref_latent)
        v0 = self.family.timeline.first_frame(counter)
        self.latents[counter] = latents
        return VideoBlock(counter, frames, v0, v0 / self.family.timeline.fps, audio.numpy().copy(),
                          timings={"decode": time.perf_counter() - start})


@dataclass
class TppBlocks:
    blocks: list[VideoBlock]      # in order, as an engine session's step(audio) + flush() returns them
    latents: list[torch.Tensor]   # each block's denoised latents (what the decode rank got)
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
        return engine_preset(PRESET_OF[self.preset]).dit


def _spawned_rank(rank: int, job: _AvJob, root: str, backend: str) -> None:
    try:
        device, meta = init_spawned_rank(rank, job.world_size, root, backend, job.threads, job.comm_timeout_s)
        layout = TppLayout(job.world_size, job.num_steps, decode=True)
        decodes = rank == layout.collect_rank
        family = LiveAvatar.build(job.preset, device=device, dtype=getattr(torch, job.dtype), seed=job.weights_seed)
        inputs = torch.load(os.path.join(root, "inputs.pt"), weights_only=True)
        ref, motion, prompt, settings = family.session_inputs(inputs["image"].numpy(), inputs["prompt"], job.seed)
        features = block_audio = None
        if rank == 0:  # lazily, block by block, as a session would compute them
            audio, t = inputs["audio"].numpy(), family.timeline
            blocks = range(_blocks_covering(family, len(audio)))
            features = (family.block_features(audio, b).to(family.model.dtype) for b in blocks)
            block_audio = (torch.from_numpy(window_samples(audio, t.block_start(b), t.block_start(b + 1)))
                           for b in blocks)
        session = TppSession(ref, motion, prompt, settings, features, block_audio)
        decoder = FamilyDecoder(family, ref) if decodes else None
        events = serve_rank(rank, job.world_size, family.model, session, device, meta,
                            lambda counter, block: _save_block(Path(root), counter, block, decoder), decode=True,
                            decoder=decoder, fail_at=job.fail_at)
        Path(root, f"trace{rank}.json").write_text(json.dumps([asdict(e) for e in events]))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - every failure must reach the driver
        _report_error(Path(root), rank, job, e)
        os._exit(1)


def _blocks_covering(family: LiveAvatar, num_samples: int) -> int:
    """How many blocks a session's flush makes of a stream of `num_samples` samples."""
    last = family.timeline.last_block_to_flush(0, num_samples)
    return 0 if last is None else last + 1


def _save_block(root: Path, counter: int, b: VideoBlock, decoder: FamilyDecoder) -> None:
    tmp = root / f"block{counter}.pt.tmp"
    torch.save({"index": b.index, "latents": decoder.latents.pop(counter).cpu(), "frames": torch.from_numpy(b.frames),
                "first_frame": b.first_frame, "pts": b.pts, "audio": torch.from_numpy(b.audio),
                "timings": b.timings}, tmp)
    tmp.replace(root / f"block{counter}.pt")


def _load_block(path: Path) -> tuple[VideoBlock, torch.Tensor]:
    d = torch.load(path, weights_only=True)
    block = VideoBlock(d["index"], d["frames"].numpy(), d["first_frame"], d["pts"], d["audio"].numpy(), d["timings"])
    return block, d["latents"]


def run_liveavatar_tpp_audio(preset: str, audio, reference_image: np.ndarray, *, sample_rate: int = SAMPLE_RATE,
                             prompt_embeds: torch.Tensor | None = None, seed: int = 0, weights_seed: int = 0,
                             world_size: int | None = None, backend: str = "gloo", dtype: str = "float32",
                             timeout_s: float = 300.0, comm_timeout_s: float = 60.0, threads_per_rank: int = 1,
                             fail_at: str | FailSpec | None = None, start_method: str = "forkserver") -> TppBlocks:
    """One stream (the whole `audio`, mono int16 or float32 at 16 kHz, and an HxWx3 uint8 reference image)
    through num_steps step ranks and a decode rank on this machine. Every rank builds
    `LiveAvatar.build(preset, seed=weights_seed)` (preset: liveavatar-tiny or liveavatar-14b); the result
    equals `Engine.from_pretrained(preset, seed=weights_seed)`'s session `open(reference_image,
    prompt_embeds=..., seed=seed)`, `step(audio, 16000)` + `flush()`. A failing rank
    raises PipelineError naming rank, role, stage and block; every rank process is ended before returning."""
    if preset not in PRESET_OF:
        raise ValueError(f"preset must be one of {sorted(PRESET_OF)}, got {preset!r}")
    num_steps = engine_preset(PRESET_OF[preset]).dit.num_steps
    layout = TppLayout(world_size or num_steps + 1, num_steps, decode=True)
    if layout.collect_rank is None:
        raise ValueError(f"world_size must be {num_steps + 1} (the step ranks + a decode rank), got {world_size}")
    spec = FailSpec.parse(fail_at)
    if spec is not None:
        spec.check(layout)
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
        wait_for(procs, root, start + timeout_s)
        wall = time.perf_counter() - start
        blocks = sorted(root.glob("block*.pt"), key=lambda p: int(p.stem[5:]))
        trace = [StageEvent(**e) for r in range(layout.world_size)
                 for e in json.loads((root / f"trace{r}.json").read_text())]
        loaded = [_load_block(p) for p in blocks]
        end = -(-len(samples) // SAMPLES_PER_VIDEO_FRAME)  # as a session's flush: no padding past the input
        return TppBlocks([cut_to_frames(b, end, SAMPLES_PER_VIDEO_FRAME) for b, _ in loaded],
                         [x for _, x in loaded], trace, wall)
    finally:
        stop(procs, 0)
        shutil.rmtree(root, ignore_errors=True)
