"""Timestep-forcing pipeline parallelism: one process per rank, torch.distributed point to point.

Ranks 0..K-1 own contiguous ranges of the denoising steps (K = world_size - 1 <= num_steps); rank
K (the last) runs the streaming VAE decode. Rank 0 also owns the audio: it runs the session's audio
stream exactly as `Engine.step`/`flush` would, draws each block's noise from the session generator
and sends header, audio condition and noise to every other step rank (no rank re-encodes audio).

KV cache (LiveTalk family): one ring of CLEAN K/V, written by the t=0 refresh forward of each block,
read by step 0 of the next block. Every step rank keeps its own replica of the ring and runs the
refresh of every block itself, once the last step rank has sent x0 (a few hundred kB) to all of
them: shipping the refreshed K/V instead would move ~0.57 GB per block at 512x512 bf16. The refresh
is run lazily, right before the rank's next block of the same session. See docs/pipeline.md.

Several sessions (streams) can be in flight: rank 0 issues their blocks round-robin and every rank
handles blocks in that order, so rank i runs session A's step i while rank i-1 runs session B's.

Wire protocol (tensors only; nothing is pickled between peers):
- meta group (always gloo, CPU): int64[8] headers rank 0 -> every rank, the block's audio samples
  rank 0 -> decode rank.
- data group (NCCL on GPUs, gloo on CPU): audio condition and noise rank 0 -> step ranks, x_t hops
  rank i -> i+1, x0 from the last step rank -> every other step rank and the decode rank.
Every rank posts its operations in block order, and within a block in the order
inputs -> x_t hops -> x0, so both ends of every pair post in the same order (NCCL matches
point-to-point operations of a pair in issue order).

Drivers: `run_pipeline` / `run_pipeline_streams` spawn the ranks on this machine (gloo on CPU: tests);
`main()` runs under torchrun (one process per GPU):
    torchrun --nproc-per-node 5 -m runtime.pipeline --model tiny --out out.mp4
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import PRESETS, EngineConfig
from .engine import BlockWork, Engine, VideoBlock, frames_uint8
from .sampler import BlockInputs
from .session import plan_block

log = logging.getLogger(__name__)

FAIL_ENV = "RUNTIME_PIPELINE_FAIL"  # "RANK:STAGE[:BLOCK]": raise in that stage (tests, drills)
STAGES = ("begin", "audio", "denoise", "refresh", "decode", "emit")

TAG_HEADER, TAG_SPAN, TAG_AUDIO, TAG_NOISE, TAG_X, TAG_X0 = 1, 2, 3, 4, 5, 6
KIND_BLOCK, KIND_END = 1, 2
HEADER_LEN = 8  # kind, session, block, first_frame, num_frames, num_samples, 0, 0


# ---- rank layout ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Which rank owns which denoising steps; the last rank decodes."""

    world_size: int
    num_steps: int

    def __post_init__(self):
        if not 2 <= self.world_size <= self.num_steps + 1:
            raise ValueError(f"world_size must be 2..{self.num_steps + 1} for {self.num_steps} denoising steps "
                             f"(step ranks + 1 decode rank), got {self.world_size}")

    @property
    def step_ranks(self) -> int:
        return self.world_size - 1

    @property
    def decode_rank(self) -> int:
        return self.world_size - 1

    @property
    def last_step_rank(self) -> int:
        return self.world_size - 2

    def steps_of(self, rank: int) -> range:
        """Contiguous steps of a step rank; when steps do not divide evenly, later ranks take the extra
        ones (rank 0 also encodes the audio)."""
        if not 0 <= rank < self.step_ranks:
            raise ValueError(f"rank {rank} is not a step rank (0..{self.step_ranks - 1})")
        base, extra = divmod(self.num_steps, self.step_ranks)
        first_big = self.step_ranks - extra
        start = rank * base + max(0, rank - first_big)
        return range(start, start + base + (rank >= first_big))

    def role(self, rank: int) -> str:
        if rank == self.decode_rank:
            return "decode"
        steps = self.steps_of(rank)
        name = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
        return name + (" + audio" if rank == 0 else "")


# ---- errors and failure injection ----------------------------------------------------------------

def stages_of(layout: Layout, rank: int) -> tuple[str, ...]:
    if rank == layout.decode_rank:
        return ("decode", "emit")
    return ("begin", "audio", "denoise", "refresh") if rank == 0 else ("denoise", "refresh")


class PipelineError(RuntimeError):
    """A rank failed (or the pipeline timed out); names the rank and the stage."""

    def __init__(self, message: str, rank: int | None = None, role: str | None = None,
                 stage: str | None = None, session: int | None = None, block: int | None = None):
        super().__init__(message)
        self.rank, self.role, self.stage, self.session, self.block = rank, role, stage, session, block


class StageError(RuntimeError):
    """Raised inside a rank: the stage that failed, wrapping the original exception."""

    def __init__(self, rank: int, role: str, stage: str, session: int, block: int, transfer: bool,
                 cause: BaseException):
        self.rank, self.role, self.stage, self.session, self.block = rank, role, stage, session, block
        self.transfer = transfer
        self.cause = f"{type(cause).__name__}: {cause}"
        super().__init__(f"pipeline rank {rank} ({role}) failed in stage '{stage}' "
                         f"(session {session}, block {block}): {self.cause}")


class InjectedFailure(RuntimeError):
    pass


@dataclass(frozen=True)
class FailSpec:
    rank: int
    stage: str
    block: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> FailSpec | None:
        if not text:
            return None
        parts = text.split(":")
        try:
            if len(parts) not in (2, 3) or parts[1] not in STAGES:
                raise ValueError
            return cls(int(parts[0]), parts[1], int(parts[2]) if len(parts) == 3 else None)
        except ValueError:
            raise ValueError(f"failure spec must be RANK:STAGE[:BLOCK] with STAGE one of {', '.join(STAGES)}, "
                             f"got {text!r}") from None

    def check(self, layout: Layout) -> None:
        """A spec naming a stage its rank never runs would silently never fire: reject it."""
        if not 0 <= self.rank < layout.world_size:
            raise ValueError(f"failure spec names rank {self.rank}, world size is {layout.world_size}")
        if self.stage not in stages_of(layout, self.rank):
            raise ValueError(f"rank {self.rank} ({layout.role(self.rank)}) runs only "
                             f"{', '.join(stages_of(layout, self.rank))}, not {self.stage!r}")

    def matches(self, rank: int, stage: str, block: int) -> bool:
        return rank == self.rank and stage == self.stage and self.block in (None, block)


# ---- transport -----------------------------------------------------------------------------------

class _Incoming:
    """A posted receive; `wait()` returns the filled buffer (on GPU: orders the current stream after it)."""

    def __init__(self, work, buf: torch.Tensor):
        self.work, self.buf = work, buf

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.buf


class _Transport:
    """Non-blocking point-to-point sends and receives; sent tensors are kept alive until delivered."""

    def __init__(self, device: torch.device, meta_group):
        self.device, self.meta = device, meta_group
        # On GPU the data transfers are issued from their own stream, never from the compute stream.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._sends: deque = deque()

    def _comm_stream(self):
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor must exist first
        return torch.cuda.stream(self.stream)

    def send(self, tensor: torch.Tensor, dst: int, tag: int, meta: bool = False) -> None:
        t = tensor.detach().contiguous()
        if meta:
            work = dist.isend(t, dst, group=self.meta, tag=tag)
        else:
            with self._comm_stream():
                work = dist.isend(t, dst, tag=tag)
        self._sends.append((work, t))
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()

    def recv(self, shape, dtype: torch.dtype, src: int, tag: int, meta: bool = False) -> _Incoming:
        if meta:
            buf = torch.empty(shape, dtype=dtype)
            return _Incoming(dist.irecv(buf, src, group=self.meta, tag=tag), buf)
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        with self._comm_stream():
            return _Incoming(dist.irecv(buf, src, tag=tag), buf)

    def drain(self) -> None:
        while self._sends:
            self._sends.popleft()[0].wait()


@dataclass(frozen=True)
class Header:
    kind: int
    session: int = 0
    block: int = 0
    first_frame: int = 0
    num_frames: int = 0
    num_samples: int = 0

    def tensor(self) -> torch.Tensor:
        values = [self.kind, self.session, self.block, self.first_frame, self.num_frames, self.num_samples]
        return torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64)

    @classmethod
    def of(cls, t: torch.Tensor) -> Header:
        v = [int(x) for x in t.tolist()]
        if v[0] not in (KIND_BLOCK, KIND_END):
            raise RuntimeError(f"corrupt pipeline header {v}")
        return cls(*v[:6])


@dataclass(frozen=True)
class _Wire:
    """Fixed shapes of everything that travels (static per config)."""

    latent: tuple[int, ...]   # x_t / x0: [B, C, F, h, w] fp32
    noise: tuple[int, ...]    # [steps, B, C, F, h, w] fp32
    audio: tuple[int, ...]    # audio condition [B, F, A, dim], model dtype
    span: int                 # audio samples of the longest block

    @classmethod
    def of(cls, cfg: EngineConfig, batch: int = 1) -> _Wire:
        h, w = cfg.latent_hw
        latent = (batch, cfg.vae.z_dim, cfg.cache.block_frames, h, w)
        frames = max(cfg.video_frames_in_block(0), cfg.video_frames_in_block(1))
        return cls(latent=latent, noise=(cfg.sampler.num_steps, *latent),
                   audio=(batch, cfg.cache.block_frames, len(cfg.dit.audio_layers), cfg.dit.dim),
                   span=frames * cfg.samples_per_video_frame)


# ---- one rank's context: stages, tracing, failure injection ------------------------------------------

@dataclass
class StageEvent:
    rank: int
    stage: str
    session: int
    block: int
    step: int
    start: float  # time.perf_counter(): one monotonic clock for every process on the machine
    end: float


class _Rank:
    def __init__(self, rank: int, layout: Layout, transport: _Transport, fail: FailSpec | None,
                 sleeps: dict[str, float] | None):
        self.rank, self.layout, self.transport = rank, layout, transport
        self.role = layout.role(rank)
        self.fail, self.sleeps = fail, dict(sleeps or {})
        self.events: list[StageEvent] = []

    @contextlib.contextmanager
    def stage(self, name: str, session: int = -1, block: int = -1, step: int = -1, transfer: bool = False):
        """Names the work inside for errors and the trace; `transfer` marks waits on peers."""
        start = time.perf_counter()
        try:
            if self.fail is not None and self.fail.matches(self.rank, name, block):
                raise InjectedFailure(f"injected failure at {self.fail.rank}:{self.fail.stage}")
            yield
            if name in self.sleeps:  # test hook: emulate a slow stage without using CPU
                time.sleep(self.sleeps[name])
        except StageError:
            raise
        except Exception as e:
            raise StageError(self.rank, self.role, name, session, block, transfer, e) from e
        if not transfer:
            self.events.append(StageEvent(self.rank, name, session, block, step, start, time.perf_counter()))


# ---- rank 0's audio front --------------------------------------------------------------------------

class _FrontEngine(Engine):
    """Engine whose `step`/`flush` stop each ready block after its audio stage.

    The audio ring, the flush padding and the noise draws therefore follow the one-process engine
    exactly; the block is handed to the pipeline instead of being denoised here.
    """

    rank_ctx: _Rank | None = None
    stream_index: int = 0

    def _run_block(self, s) -> BlockWork:  # type: ignore[override]
        ctx, i = self.rank_ctx, self.stream_index
        with ctx.stage("begin", i, s.block):
            w = self.begin_block(s)  # also copies the samples the block covers (w.audio)
        with ctx.stage("audio", i, w.index):
            self.stage_audio(s, w)
        return w


class _StreamFeed:
    """Pushes a stream's audio one block's worth at a time; yields its blocks in order."""

    def __init__(self, engine: _FrontEngine, audio: np.ndarray):
        self.engine, self.audio = engine, audio
        cfg = engine.config
        self.chunk = cfg.video_frames_in_block(1) * cfg.samples_per_video_frame
        self.pos, self.flushed = 0, False
        self.ready: deque[BlockWork] = deque()

    def next(self) -> BlockWork | None:
        sr = self.engine.config.audio.sample_rate
        while not self.ready and not self.flushed:
            if self.pos < len(self.audio):
                self.ready.extend(self.engine.step(self.audio[self.pos:self.pos + self.chunk], sample_rate=sr))
                self.pos += self.chunk
            else:
                self.ready.extend(self.engine.flush())
                self.flushed = True
        return self.ready.popleft() if self.ready else None


# ---- step ranks ------------------------------------------------------------------------------------

@dataclass
class _Item:
    """A block this rank has denoised, kept until its refresh has run here."""

    session: int
    work: BlockWork
    x0: _Incoming | None  # the last step rank's x0 (None on the last step rank itself)


class _StepRank:
    def __init__(self, ctx: _Rank, engines: list[_FrontEngine], wire: _Wire):
        self.ctx, self.engines, self.wire = ctx, engines, wire
        lay, r = ctx.layout, ctx.rank
        self.steps = lay.steps_of(r)
        self.is_last = r == lay.last_step_rank
        self.sessions = [e._require_session() for e in engines]
        self.pending: deque[_Item] = deque()

    # rank 0: blocks come from the audio fronts, round-robin over the streams still running
    def run_front(self, feeds: list[_StreamFeed]) -> None:
        active = list(range(len(feeds)))
        while active:
            for i in list(active):
                w = feeds[i].next()
                if w is None:
                    active.remove(i)
                    continue
                self._announce(i, w)
                self._refresh_until(i)
                self._denoise_and_pass(i, w)
        end = Header(KIND_END).tensor()
        for r in range(1, self.ctx.layout.world_size):
            self.ctx.transport.send(end, r, TAG_HEADER, meta=True)
        self._finish()

    def _announce(self, i: int, w: BlockWork) -> None:
        t, lay = self.ctx.transport, self.ctx.layout
        if tuple(w.inputs.audio.shape) != self.wire.audio:
            raise RuntimeError(f"audio condition shape {tuple(w.inputs.audio.shape)} != wire shape {self.wire.audio}")
        header = Header(KIND_BLOCK, i, w.index, w.first_frame, w.num_frames, len(w.audio)).tensor()
        for r in range(1, lay.step_ranks):
            t.send(header, r, TAG_HEADER, meta=True)
            t.send(w.inputs.audio, r, TAG_AUDIO)
            t.send(w.noise, r, TAG_NOISE)
        span = torch.zeros(self.wire.span, dtype=torch.float32)
        span[:len(w.audio)] = torch.from_numpy(np.asarray(w.audio, dtype=np.float32))
        t.send(header, lay.decode_rank, TAG_HEADER, meta=True)
        t.send(span, lay.decode_rank, TAG_SPAN, meta=True)

    # ranks 1..K-1: blocks come as headers from rank 0, in rank 0's order
    def run_follower(self) -> None:
        t, r, wire = self.ctx.transport, self.ctx.rank, self.wire
        model_dtype = self.engines[0].dtype
        next_header = t.recv((HEADER_LEN,), torch.int64, 0, TAG_HEADER, meta=True)
        while True:
            with self.ctx.stage("recv header", transfer=True):
                h = Header.of(next_header.wait())
            if h.kind == KIND_END:
                break
            audio = t.recv(wire.audio, model_dtype, 0, TAG_AUDIO)
            noise = t.recv(wire.noise, torch.float32, 0, TAG_NOISE)
            x_in = t.recv(wire.latent, torch.float32, r - 1, TAG_X)
            next_header = t.recv((HEADER_LEN,), torch.int64, 0, TAG_HEADER, meta=True)
            self._refresh_until(h.session)  # before the plan update below: the refresh uses the old plan
            w = self._follower_work(h, audio, noise)
            with self.ctx.stage("recv x", h.session, h.block, transfer=True):
                w.x = x_in.wait()
            self._denoise_and_pass(h.session, w)
        self._finish()

    def _follower_work(self, h: Header, audio: _Incoming, noise: _Incoming) -> BlockWork:
        eng, s = self.engines[h.session], self.sessions[h.session]
        with self.ctx.stage("recv inputs", h.session, h.block, transfer=True):
            audio_cond, noise_t = audio.wait(), noise.wait()
        w = BlockWork(index=h.block, first_frame=h.first_frame, num_frames=h.num_frames,
                      host_plan=plan_block(h.block, eng.config.cache, eng.batch), noise=noise_t)
        # As Engine.stage_audio: block 0 carries the reference (condition mask and pinned latent frame 0).
        first = h.block == 0
        w.inputs = BlockInputs(noise=noise_t, cond=s.cond_first if first else s.cond_rest, audio=audio_cond,
                               ref_latent=s.ref_latent if first else None)
        w.plan = s.plan.update(w.host_plan)  # what stage_denoise does at step 0, which another rank ran
        return w

    # every step rank
    def _denoise_and_pass(self, i: int, w: BlockWork) -> None:
        eng, s, ctx, lay = self.engines[i], self.sessions[i], self.ctx, self.ctx.layout
        for step in self.steps:
            with ctx.stage("denoise", i, w.index, step):
                eng.stage_denoise(s, w, step)
        if self.is_last:
            for r in [*range(lay.last_step_rank), lay.decode_rank]:
                ctx.transport.send(w.x, r, TAG_X0)
            self.pending.append(_Item(i, w, None))
        else:
            ctx.transport.send(w.x, ctx.rank + 1, TAG_X)
            # Posted now (not when needed) so that every pair posts in block order: see the module doc.
            x0 = ctx.transport.recv(self.wire.latent, torch.float32, lay.last_step_rank, TAG_X0)
            self.pending.append(_Item(i, w, x0))

    def _refresh_until(self, session: int) -> None:
        """Run the pending refreshes (oldest first) up to this session's previous block: step 0 of its
        next block attends to that block's clean K/V."""
        while any(item.session == session for item in self.pending):
            item = self.pending.popleft()
            w = item.work
            if item.x0 is not None:
                with self.ctx.stage("recv x0", item.session, w.index, transfer=True):
                    w.x = item.x0.wait()
            with self.ctx.stage("refresh", item.session, w.index):
                self.engines[item.session].stage_refresh(self.sessions[item.session], w)

    def _finish(self) -> None:
        """Match every posted receive, then wait for our sends: no refresh is needed after the last block."""
        for item in self.pending:
            if item.x0 is not None:
                with self.ctx.stage("recv x0", item.session, item.work.index, transfer=True):
                    item.x0.wait()
        self.pending.clear()
        with self.ctx.stage("drain sends", transfer=True):
            self.ctx.transport.drain()


# ---- decode rank -----------------------------------------------------------------------------------

class _DecodeRank:
    def __init__(self, ctx: _Rank, engine: Engine, wire: _Wire, sink: Callable[[int, VideoBlock], None]):
        self.ctx, self.engine, self.wire, self.sink = ctx, engine, wire, sink
        self.decoders: dict[int, object] = {}  # session -> its streaming decoder (own causal cache)

    def run(self) -> None:
        t, lay, cfg = self.ctx.transport, self.ctx.layout, self.engine.config
        next_header = t.recv((HEADER_LEN,), torch.int64, 0, TAG_HEADER, meta=True)
        while True:
            with self.ctx.stage("recv header", transfer=True):
                h = Header.of(next_header.wait())
            if h.kind == KIND_END:
                break
            span = t.recv((self.wire.span,), torch.float32, 0, TAG_SPAN, meta=True)
            x0 = t.recv(self.wire.latent, torch.float32, lay.last_step_rank, TAG_X0)
            next_header = t.recv((HEADER_LEN,), torch.int64, 0, TAG_HEADER, meta=True)
            with self.ctx.stage("recv x0", h.session, h.block, transfer=True):
                x = x0.wait()
                audio = span.wait()[:h.num_samples].numpy().copy()
            start = time.perf_counter()
            with self.ctx.stage("decode", h.session, h.block):
                decoder = self.decoders.setdefault(h.session, self.engine.new_decoder())
                frames = frames_uint8(decoder.decode(x.to(self.engine.dtype)))
            block = VideoBlock(index=h.block, frames=frames, first_frame=h.first_frame, pts=h.first_frame / cfg.fps,
                               audio=audio, timings={"decode": time.perf_counter() - start})
            with self.ctx.stage("emit", h.session, h.block):
                self.sink(h.session, block)
        with self.ctx.stage("drain sends", transfer=True):
            t.drain()


# ---- running one rank --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamSpec:
    """One stream (session): its audio (16 kHz mono), reference image and noise seed."""

    audio: np.ndarray
    image: object  # path or uint8 HxWx3 array
    seed: int = 0
    prompt_embeds: np.ndarray | None = None


@dataclass
class _Job:
    model: str | EngineConfig
    world_size: int
    streams: list[StreamSpec]
    dtype: str | None = None
    ops_backend: str = "auto"
    weights_seed: int = 0
    fail_at: str | None = None
    stage_sleep_s: dict[str, float] = field(default_factory=dict)
    comm_timeout_s: float = 120.0
    threads: int = 1


def _config_of(model: str | EngineConfig) -> EngineConfig:
    if isinstance(model, EngineConfig):
        return model
    if model in PRESETS and not Path(model).exists():
        return EngineConfig.from_preset(model)
    return EngineConfig.from_preset("livetalk-1.3b")  # a LiveTalk release directory


def _build_engines(job: _Job, device: torch.device, count: int) -> list[_FrontEngine]:
    """Identical weights on every rank (seeded random or the same files); sessions share them."""
    dtype = getattr(torch, job.dtype) if job.dtype else None
    if isinstance(job.model, EngineConfig):
        base = _FrontEngine.random(job.model, device, dtype, job.ops_backend, job.weights_seed)
    else:
        base = _FrontEngine.from_pretrained(job.model, device, dtype, job.ops_backend, job.weights_seed)
    more = [_FrontEngine(base.config, base.dit, base.vae, base.audio_encoder, device=base.device, dtype=base.dtype,
                         backend=job.ops_backend) for _ in range(count - 1)]
    return [base, *more]


def serve_rank(rank: int, job: _Job, device: torch.device, sink: Callable[[int, VideoBlock], None] | None,
               meta_group) -> list[StageEvent]:
    """Run this rank's part of the pipeline to the end of every stream; returns its stage trace."""
    layout = Layout(job.world_size, _config_of(job.model).sampler.num_steps)
    fail = FailSpec.parse(job.fail_at or os.environ.get(FAIL_ENV))
    ctx = _Rank(rank, layout, _Transport(device, meta_group), fail, job.stage_sleep_s)
    if rank == layout.decode_rank:
        if sink is None:
            raise ValueError("the decode rank needs a sink for its video blocks")
        engine = _build_engines(job, device, 1)[0]
        _DecodeRank(ctx, engine, _Wire.of(engine.config, engine.batch), sink).run()
        return ctx.events
    engines = _build_engines(job, device, len(job.streams))
    for i, (eng, spec) in enumerate(zip(engines, job.streams)):
        eng.rank_ctx, eng.stream_index = ctx, i
        eng.reset(spec.image, prompt_embeds=spec.prompt_embeds, seed=spec.seed)
    step_rank = _StepRank(ctx, engines, _Wire.of(engines[0].config, engines[0].batch))
    if rank == 0:
        step_rank.run_front([_StreamFeed(e, s.audio) for e, s in zip(engines, job.streams)])
    else:
        step_rank.run_follower()
    return ctx.events


# ---- local driver (spawned processes) ------------------------------------------------------------------

@dataclass
class PipelineRun:
    blocks: list[list[VideoBlock]]  # per stream, in order
    trace: list[StageEvent]         # compute stages of every rank (perf_counter times)
    wall_s: float


class _FileSink:
    """Decode rank -> driver: arrays as .npy (read back with allow_pickle=False), an index as JSON lines."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blocks").mkdir(exist_ok=True)

    def __call__(self, session: int, block: VideoBlock) -> None:
        stem = self.root / "blocks" / f"s{session}_b{block.index}"
        np.save(f"{stem}_frames.npy", block.frames, allow_pickle=False)
        np.save(f"{stem}_audio.npy", block.audio, allow_pickle=False)
        meta = {"session": session, "index": block.index, "first_frame": block.first_frame, "pts": block.pts,
                "timings": block.timings}
        with open(self.root / "blocks.jsonl", "a") as f:
            f.write(json.dumps(meta) + "\n")

    def read(self, streams: int) -> list[list[VideoBlock]]:
        out: list[list[VideoBlock]] = [[] for _ in range(streams)]
        index = self.root / "blocks.jsonl"
        for line in index.read_text().splitlines() if index.exists() else []:
            m = json.loads(line)
            stem = self.root / "blocks" / f"s{m['session']}_b{m['index']}"
            out[m["session"]].append(VideoBlock(
                index=m["index"], frames=np.load(f"{stem}_frames.npy", allow_pickle=False),
                first_frame=m["first_frame"], pts=m["pts"],
                audio=np.load(f"{stem}_audio.npy", allow_pickle=False), timings=m["timings"]))
        return out


def _spawned_rank(rank: int, job: _Job, root: str, backend: str) -> None:
    """Entry point of a spawned rank. Errors go to a JSON file for the driver, then the process exits."""
    try:
        torch.set_num_threads(job.threads)
        device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = dist.FileStore(os.path.join(root, "store"), job.world_size)
        timeout = timedelta(seconds=job.comm_timeout_s)
        dist.init_process_group(backend, store=store, rank=rank, world_size=job.world_size, timeout=timeout)
        meta = dist.new_group(backend="gloo", timeout=timeout)
        decode = rank == job.world_size - 1
        events = serve_rank(rank, job, device, _FileSink(Path(root)) if decode else None, meta)
        Path(root, f"trace{rank}.json").write_text(json.dumps([asdict(e) for e in events]))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - every failure must reach the driver
        _report_error(Path(root), rank, job, e)
        os._exit(1)  # peers may still hold sockets to us; do not wait for them at exit


def _report_error(root: Path, rank: int, job: _Job, e: BaseException) -> None:
    if isinstance(e, StageError):
        info = {"role": e.role, "stage": e.stage, "session": e.session, "block": e.block, "transfer": e.transfer,
                "cause": e.cause}
    else:
        try:
            role = Layout(job.world_size, _config_of(job.model).sampler.num_steps).role(rank)
        except Exception:  # noqa: BLE001
            role = "?"
        info = {"role": role, "stage": "setup", "session": -1, "block": -1, "transfer": False,
                "cause": f"{type(e).__name__}: {e}"}
    info.update(rank=rank, time=time.time(), traceback=traceback.format_exc())
    tmp = root / f"error{rank}.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(root / f"error{rank}.json")
    print(f"[pipeline rank {rank}] {info['stage']}: {info['cause']}", flush=True)


def _root_cause(root: Path, procs) -> PipelineError:
    """The first failure that is not a peer noticing it (waits on a dead peer fail too, later)."""
    reports = [json.loads(p.read_text()) for p in sorted(root.glob("error*.json"))]
    if reports:
        r = min(reports, key=lambda e: (e["transfer"], e["time"]))
        where = f"stage '{r['stage']}'" + (f" (session {r['session']}, block {r['block']})" if r["block"] >= 0 else "")
        return PipelineError(f"pipeline rank {r['rank']} ({r['role']}) failed in {where}: {r['cause']}\n"
                             f"--- rank {r['rank']} traceback ---\n{r['traceback']}",
                             rank=r["rank"], role=r["role"], stage=r["stage"], session=r["session"], block=r["block"])
    dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
    return PipelineError(f"pipeline ranks exited without reporting an error: {dead} (rank, exit code)",
                         rank=dead[0][0] if dead else None)


def _stop(procs, grace_s: float) -> None:
    """Give ranks `grace_s` to exit on their own (peers of a failed rank fail fast), then end them."""
    procs = [p for p in procs if p.pid is not None]  # started ones
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def _check_streams(cfg: EngineConfig, streams: Sequence[StreamSpec]) -> list[StreamSpec]:
    from .audio import check_chunk
    from .media import load_image

    if not streams:
        raise ValueError("at least one stream is needed")
    out = []
    for i, s in enumerate(streams):
        if not isinstance(s, StreamSpec):
            raise TypeError(f"stream {i} must be a StreamSpec, got {type(s).__name__}")
        audio = check_chunk(s.audio, cfg.audio.sample_rate, cfg.audio.sample_rate)
        load_image(s.image)  # raises on a bad image before any process starts
        out.append(StreamSpec(audio, s.image, int(s.seed), s.prompt_embeds))
    return out


def run_pipeline_streams(model: str | EngineConfig, world_size: int, streams: Sequence[StreamSpec], *,
                         backend: str = "gloo", dtype: str | None = None, ops_backend: str = "auto",
                         weights_seed: int = 0, timeout_s: float = 600.0, comm_timeout_s: float = 120.0,
                         threads_per_rank: int = 1, fail_at: str | None = None,
                         stage_sleep_s: dict[str, float] | None = None,
                         start_method: str = "forkserver") -> PipelineRun:
    """Run streams through a `world_size`-process pipeline on this machine; blocks come back per stream.

    model: a preset name (seeded random weights), a LiveTalk release directory, or an EngineConfig.
    fail_at ("RANK:STAGE[:BLOCK]", else $RUNTIME_PIPELINE_FAIL) and stage_sleep_s (stage -> seconds) are
    test hooks. start_method "forkserver" imports the runtime once per driver process and forks ranks
    from it (seconds saved per rank and run); "spawn" starts every rank from scratch. Raises PipelineError naming the rank and stage of the first failure; every rank process
    is ended before it returns or raises.
    """
    cfg = _config_of(model)
    layout = Layout(world_size, cfg.sampler.num_steps)
    # Resolved here: forkserver children inherit the server's environment, not the driver's current one.
    fail_at = fail_at or os.environ.get(FAIL_ENV)
    if (spec := FailSpec.parse(fail_at)) is not None:
        spec.check(layout)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    job = _Job(model, world_size, _check_streams(cfg, streams), dtype, ops_backend, weights_seed, fail_at,
               dict(stage_sleep_s or {}), comm_timeout_s, threads_per_rank)
    root = Path(tempfile.mkdtemp(prefix="pipeline-"))
    ctx = _process_context(start_method)
    procs = [ctx.Process(target=_spawned_rank, args=(r, job, str(root), backend), daemon=True,
                         name=f"pipeline-rank{r}") for r in range(world_size)]
    start = time.perf_counter()
    try:
        for p in procs:
            p.start()
        _wait(procs, root, start + timeout_s)
        wall = time.perf_counter() - start
        blocks = _FileSink(root).read(len(job.streams))
        trace = [StageEvent(**e) for r in range(world_size) for e in json.loads((root / f"trace{r}.json").read_text())]
        return PipelineRun(blocks, trace, wall)
    finally:
        _stop(procs, 0)
        shutil.rmtree(root, ignore_errors=True)


def _process_context(start_method: str):
    import multiprocessing

    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # Only imports happen in the server (no torch thread pool or CUDA context exists to be forked).
        ctx.set_forkserver_preload([__name__])
    return ctx


def _wait(procs, root: Path, deadline: float) -> None:
    while True:
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return
        if any(c not in (None, 0) for c in codes) or any(root.glob("error*.json")):
            _stop(procs, grace_s=3.0)
            raise _root_cause(root, procs)
        if time.perf_counter() > deadline:
            running = [i for i, p in enumerate(procs) if p.is_alive()]
            _stop(procs, 0)
            raise PipelineError(f"pipeline timed out; ranks still running: {running}")
        time.sleep(0.02)


def run_pipeline(model: str | EngineConfig, world_size: int, audio: np.ndarray, image, seed: int = 0,
                 **kwargs) -> list[VideoBlock]:
    """One stream through the pipeline: the same blocks as Engine.reset(image, seed) + step(audio) + flush()."""
    return run_pipeline_streams(model, world_size, [StreamSpec(audio, image, seed)], **kwargs).blocks[0]


# ---- torchrun entry point ------------------------------------------------------------------------------

class _Mp4Sink:
    def __init__(self, cfg: EngineConfig, out: Path, streams: int):
        from .media import Mp4Writer

        paths = [out] if streams == 1 else [out.with_name(f"{out.stem}_s{i}{out.suffix}") for i in range(streams)]
        self.writers = [Mp4Writer(p, cfg.width, cfg.height, cfg.fps, cfg.audio.sample_rate) for p in paths]
        self.start = time.perf_counter()

    def __call__(self, session: int, block: VideoBlock) -> None:
        self.writers[session].write_block(block.frames, block.audio)
        log.info("stream %d block %d: %d frames at %.2f s (decode %.1f ms)", session, block.index,
                 block.num_frames, time.perf_counter() - self.start, 1e3 * block.timings["decode"])

    def close(self) -> None:
        for w in self.writers:
            w.close()


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m runtime.pipeline", description=(
        "Timestep-forcing pipeline: run under torchrun, one process per GPU "
        "(world size 2..num_steps+1; the last rank decodes)."))
    p.add_argument("--model", default="tiny", help="preset name (random weights) or LiveTalk release directory")
    p.add_argument("--audio", type=Path, help="16 kHz mono WAV (default: 4 s of synthetic speech)")
    p.add_argument("--image", help="reference image (default: a synthetic face)")
    p.add_argument("--seconds", type=float, default=4.0, help="length of the synthetic audio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--streams", type=int, default=1, help="sessions kept in flight (interleaved)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--out", type=Path, default=Path("pipeline.mp4"))
    p.add_argument("--comm-timeout", type=float, default=300.0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """torchrun entry: every rank runs this; RANK/WORLD_SIZE/LOCAL_RANK come from torchrun."""
    from .media import read_wav, synth_speech_like, synthetic_face

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = _parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if cuda else torch.device("cpu")
    timeout = timedelta(seconds=args.comm_timeout)
    if cuda:
        torch.cuda.set_device(device)
        # No device_id (eager init) on purpose: lazily created pair communicators give every peer pair its
        # own NCCL stream; on one shared communicator rank 0's sends of session B's inputs would queue
        # behind its receive of session A's x0, and sessions would no longer interleave.
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    meta = dist.new_group(backend="gloo", timeout=timeout)
    cfg = _config_of(args.model)
    audio = read_wav(args.audio)[0] if args.audio else synth_speech_like(args.seconds, cfg.audio.sample_rate, args.seed)
    image = args.image if args.image else synthetic_face(cfg.height, cfg.width)
    streams = _check_streams(cfg, [StreamSpec(np.asarray(audio, np.float32), image, args.seed + i)
                                   for i in range(args.streams)])
    job = _Job(args.model, world, streams, args.dtype, comm_timeout_s=args.comm_timeout, threads=torch.get_num_threads())
    sink = _Mp4Sink(cfg, args.out, len(streams)) if rank == world - 1 else None
    try:
        serve_rank(rank, job, device, sink, meta)
    finally:
        if sink is not None:
            sink.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
