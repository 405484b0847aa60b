"""Timestep-forcing pipeline parallelism (TPP) for Live Avatar, at the latent level.

Rank i (0 <= i < num_steps) ALWAYS runs denoising step i of every block against its own ring i (the
family keeps one KV cache per step), so block b is at rank i while block b+1 is at rank i-1 and the
throughput is one block per single-forward time. world_size is num_steps (the last step rank hands
the latents to the sink) or num_steps + 1 (a collect rank receives them; with `decode=True` it is a
decode rank: runtime/families/liveavatar/tpp_engine.py runs audio + image in, decoded blocks out). Every rank keeps its own copy of the text K/V and the condition cache.

Rank 0 owns the audio features and the noise: it encodes each block's audio once, draws the noise
exactly as the one-process `LiveAvatarStream` does (same generator, same order) and sends the audio
tokens to every other step rank; x_t hops rank i -> i+1. The rolling sink's `ref_frame(block, step)`
is a pure function: no communication. The adaptive sink needs block 0's first denoised latent frame:
the last step rank sends it to every other step rank after block 0, and each re-fills its condition
cache right before its step of block `adaptive_sink_block`.

Wire protocol (tensors only), posted by both ends of every pair in the same order (NCCL matches a
pair's point-to-point operations in issue order):
- meta group (gloo, CPU): int64[2] header (kind, block counter) rank 0 -> every rank, then END;
- data group (NCCL on GPUs, gloo on CPU): per block, audio tokens (global, local) rank 0 -> every
  step rank, then x_t rank i -> i+1 (the last step rank -> the collect rank); once, after block 0,
  the sink frame from the last step rank -> every other step rank.
The transport, the stage/trace/failure-injection context and the process driver helpers are
runtime/parallel/'s, shared with LiveTalk's pipeline.

Drivers: `run_liveavatar_tpp` spawns the ranks on this machine (gloo on CPU: tests); `serve_rank` is
the per-rank entry for torchrun (NCCL on GPUs): `init_torchrun_rank()`, build the model on the
rank's device with the same weights everywhere, then `serve_rank(rank, world, model, session, device,
meta, sink)`. The NCCL path has not run yet (no GPUs where this was written).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.parallel.failures import FailSpec, PipelineError
from runtime.parallel.procs import init_spawned_rank, process_context, report_rank_error, stop, wait_for
from runtime.parallel.rank import RankContext, StageEvent
from runtime.parallel.transport import Transport

from .config import LiveAvatarConfig, resolve_config
from .model import LiveAvatarDiT, build_liveavatar
from .random_weights import randomize_weights
from .stream import StreamSettings
from .tpp_layout import DEFAULT_SETTINGS, TppLayout, TppSession
from .tpp_ranks import BlockDecoder, _collect, _StepRank
from .tpp_step import StepState

__all__ = ["PipelineError", "TppLayout", "TppRun", "TppSession", "init_torchrun_rank", "run_liveavatar_tpp",
           "serve_rank"]

Sink = Callable[[int, torch.Tensor], None]


def serve_rank(rank: int, world_size: int, model: LiveAvatarDiT, session: TppSession, device: torch.device,
               meta_group, sink: Sink | None = None, *, decode: bool = False, decoder: BlockDecoder | None = None,
               fail_at: str | FailSpec | None = None, step_sleep_s: float = 0.0) -> list[StageEvent]:
    """This rank's part of one session, to the stream's end; returns its stage trace.

    The default process group (NCCL or gloo) and `meta_group` (gloo) must exist; `model` is on `device`
    with the same weights on every rank. The output rank (collect rank, else the last step rank) calls
    `sink(block_counter, latents)` per block. `decode` (every rank): the collect rank is a decode rank;
    it needs `decoder` (its sink then gets `decoder.decode(...)`'s result) and rank 0 needs
    `session.block_audio`. fail_at ("RANK:STAGE[:BLOCK]") and step_sleep_s (a sleep
    after every denoising step, no CPU) are test hooks.
    """
    layout = TppLayout(world_size, model.cfg.num_steps, decode)
    if decode and layout.collect_rank is None:
        raise ValueError(f"decoding needs a decode rank: world_size {model.cfg.num_steps + 1}, got {world_size}")
    if decode and rank == layout.collect_rank and decoder is None:
        raise ValueError(f"rank {rank} decodes: it needs a decoder")
    if decode and rank == 0 and session.block_audio is None:
        raise ValueError("rank 0 sends the decode rank each block's audio: the session needs block_audio")
    fail = FailSpec.parse(fail_at)
    if fail is not None:
        fail.check(layout)
    if rank == layout.output_rank and sink is None:
        raise ValueError(f"rank {rank} hands out the latents: it needs a sink")
    if rank == 0 and session.features is None:
        raise ValueError("rank 0 owns the audio: the session needs its features")
    sleeps = {"denoise": step_sleep_s} if step_sleep_s else None
    ctx = RankContext(rank, layout, Transport(device, meta_group), fail, sleeps)
    if rank == layout.collect_rank:
        B, C, _, lh, lw = session.ref_latent.shape
        _collect(ctx, layout, (B, C, model.cfg.block_frames, lh, lw), model.dtype, session.settings.start_block,
                 sink, decoder if decode else None)
    else:
        state = StepState(model, rank, session.ref_latent.to(device), session.motion_latents.to(device),
                          session.prompt_embeds.to(device), session.settings)
        _StepRank(ctx, layout, state, session, sink).run()
    ctx.transport.drain()
    return ctx.events


def init_torchrun_rank(comm_timeout_s: float = 120.0) -> tuple[int, int, torch.device, object]:
    """Under torchrun (one process per GPU): the NCCL default group on this rank's GPU and the gloo meta
    group `serve_rank` needs; returns (rank, world_size, device, meta_group). Not run in this repo's
    tests (no GPUs there): the CPU tests run the same `serve_rank` over gloo."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    timeout = timedelta(seconds=comm_timeout_s)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout)
    return rank, world, device, dist.new_group(backend="gloo", timeout=timeout)


# ---- local driver (spawned processes) ------------------------------------------------------------------

@dataclass
class TppRun:
    latents: list[torch.Tensor]  # per block, in order
    trace: list[StageEvent]      # compute stages of every rank (perf_counter: one clock per machine)
    wall_s: float


@dataclass
class _Job:
    config: LiveAvatarConfig
    world_size: int
    settings: StreamSettings
    dtype: str
    weights_seed: int
    fail_at: str | None
    step_sleep_s: float
    comm_timeout_s: float
    threads: int


def _spawned_rank(rank: int, job: _Job, root: str, backend: str) -> None:
    """Entry point of a spawned rank. Errors go to a JSON file for the driver, then the process exits."""
    try:
        device, meta = init_spawned_rank(rank, job.world_size, root, backend, job.threads, job.comm_timeout_s)
        model = randomize_weights(build_liveavatar(job.config, dtype=getattr(torch, job.dtype)), job.weights_seed)
        inputs = torch.load(os.path.join(root, "inputs.pt"), weights_only=True)
        session = TppSession(inputs["ref"], inputs["motion"], inputs["prompt"], job.settings,
                             inputs["features"] if rank == 0 else None)
        sink = functools.partial(_save_latents, Path(root))
        events = serve_rank(rank, job.world_size, model.to(device), session, device, meta, sink,
                            fail_at=job.fail_at, step_sleep_s=job.step_sleep_s)
        Path(root, f"trace{rank}.json").write_text(json.dumps([asdict(e) for e in events]))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - every failure must reach the driver
        _report_error(Path(root), rank, job, e)
        os._exit(1)  # peers may still hold sockets to us; do not wait for them at exit


def _save_latents(root: Path, counter: int, x: torch.Tensor) -> None:
    tmp = root / f"latents{counter}.pt.tmp"
    torch.save(x.cpu(), tmp)
    tmp.replace(root / f"latents{counter}.pt")


def _report_error(root: Path, rank: int, job: _Job, e: BaseException) -> None:
    """One session per run: a stage failure is reported as session 0's (these stages name none)."""
    report_rank_error(root, rank, e, lambda: TppLayout(job.world_size, job.config.num_steps,
                                                       getattr(job, "decode", False)).role(rank), session=0, name="tpp")


def _check_inputs(cfg: LiveAvatarConfig, features: Sequence[torch.Tensor], ref_latent: torch.Tensor) -> None:
    """Bad input fails here, before any process starts."""
    if ref_latent.dim() != 5 or ref_latent.shape[2] != 1:
        raise ValueError(f"ref_latent must be [B, C, 1, h, w], got {tuple(ref_latent.shape)}")
    want = (ref_latent.shape[0], cfg.audio_layers, cfg.audio_dim, 4 * cfg.block_frames)
    for i, f in enumerate(features):
        if tuple(f.shape) != want:
            raise ValueError(f"features of block {i} must be {list(want)}, got {list(f.shape)}")


def run_liveavatar_tpp(config: LiveAvatarConfig | str, features_per_block: Sequence[torch.Tensor],
                       ref_latent: torch.Tensor, motion_latents: torch.Tensor, prompt_embeds: torch.Tensor,
                       settings: StreamSettings = DEFAULT_SETTINGS, world_size: int | None = None, *,
                       backend: str = "gloo", dtype: str = "float32", weights_seed: int = 0,
                       timeout_s: float = 300.0, comm_timeout_s: float = 60.0, threads_per_rank: int = 1,
                       fail_at: str | FailSpec | None = None, step_sleep_s: float = 0.0,
                       start_method: str = "forkserver") -> TppRun:
    """One session through a `world_size`-process TPP on this machine (default: one rank per step).

    The model is `build_liveavatar(config)` with `randomize_weights(weights_seed)` on every rank (real
    weights: run `serve_rank` under torchrun with a loaded model). The seed is `settings.seed`. Returns
    the same latents as `LiveAvatarStream(...).generate_block` per block. A failing rank raises
    PipelineError naming its rank, role, stage and block; every rank process is ended before returning.
    """
    cfg = resolve_config(config)
    layout = TppLayout(world_size or cfg.num_steps, cfg.num_steps)
    spec = FailSpec.parse(fail_at)
    if spec is not None:
        spec.check(layout)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    features = list(features_per_block)
    _check_inputs(cfg, features, ref_latent)
    job = _Job(cfg, layout.world_size, settings, dtype, weights_seed, str(spec) if spec else None, step_sleep_s,
               comm_timeout_s, threads_per_rank)
    root = Path(tempfile.mkdtemp(prefix="tpp-"))
    torch.save({"ref": ref_latent, "motion": motion_latents, "prompt": prompt_embeds, "features": features},
               root / "inputs.pt")
    procs = _start(job, root, backend, start_method)
    start = time.perf_counter()
    try:
        wait_for(procs, root, start + timeout_s)
        wall = time.perf_counter() - start
        latents = [torch.load(root / f"latents{k}.pt", weights_only=True) for k in range(len(features))]
        trace = [StageEvent(**e) for r in range(layout.world_size)
                 for e in json.loads((root / f"trace{r}.json").read_text())]
        return TppRun(latents, trace, wall)
    finally:
        stop(procs, 0)
        shutil.rmtree(root, ignore_errors=True)


def _start(job, root: Path, backend: str, start_method: str, target=None) -> list:
    """Spawns job.world_size processes of `target(rank, job, root, backend)` (default: `_spawned_rank`)."""
    target = target or _spawned_rank
    ctx = process_context(start_method, ["runtime.parallel.procs", __name__, target.__module__])
    procs = [ctx.Process(target=target, args=(r, job, str(root), backend), daemon=True,
                         name=f"tpp-rank{r}") for r in range(job.world_size)]
    try:
        for p in procs:
            p.start()
    except BaseException:
        stop(procs, 0)
        raise
    return procs

