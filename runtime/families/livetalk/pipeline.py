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

Failure isolation: every x / x0 hop carries an int64[8] Status on the meta group, and the decode rank
returns one per block to rank 0. A stage failure of session S sends a zero placeholder with a FAILED
status (rank, stage, block) in place of S's data, so every announced block keeps exactly the same
data transfers; rank 0 then stops issuing S and sends a FAILED (or, for a cancel, CANCELLED) status
on the header channel, after which every rank frees S. Other sessions run on; waits on peers,
timeouts and failures outside a session still end the whole run.

Drivers: `run_pipeline` / `run_pipeline_streams` spawn the ranks on this machine (gloo on CPU: tests);
`main()` runs under torchrun (one process per GPU):
    torchrun --nproc-per-node 5 -m runtime.parallel --model tiny --out out.mp4
"""
from __future__ import annotations

import argparse
import contextlib
import functools
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

from ...config import PRESETS, EngineConfig
from ...engine import BlockWork, Engine, VideoBlock, check_quantize, frames_uint8
from ...parallel.failures import FAIL_ENV, STAGE_NAMES, FailSpec, PipelineError, StageError, error_of
from ...parallel.procs import (
    init_spawned_rank,
    process_context,
    report_rank_error,
    stop,
    wait_for,
    write_json,
)
from ...parallel.rank import RankContext, StageEvent
from ...parallel.transport import Incoming, Transport
from ...sampler import BlockInputs
from ...session import plan_block
from ..base import Row
from .family import LiveTalk

log = logging.getLogger(__name__)

STAGES = STAGE_NAMES  # this pipeline's ranks run every stage name there is
END_STAGES = (*STAGES, "cancel")  # what a status can name as the place a session ended early

TAG_HEADER, TAG_SPAN, TAG_AUDIO, TAG_NOISE, TAG_X, TAG_X0 = 1, 2, 3, 4, 5, 6
TAG_X_STATUS, TAG_X0_STATUS, TAG_ACK = 7, 8, 9
KIND_BLOCK, KIND_END, KIND_OK, KIND_FAILED, KIND_CANCELLED = 1, 2, 3, 4, 5
HEADER_LEN = 8  # kind, session, block, first_frame, num_frames, num_samples, 0, 0
# Rank 0 waits for the decode rank's status of a session's block once this many newer blocks of the
# session are issued: it learns of decode failures within a few blocks and never runs far ahead of decode.
ACK_LAG = 2


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

    def stages(self, rank: int) -> tuple[str, ...]:
        """Stages a rank runs (failure specs naming another stage would never fire)."""
        if rank == self.decode_rank:
            return ("decode", "emit")
        return ("begin", "audio", "denoise", "refresh") if rank == 0 else ("denoise", "refresh")



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
class Status:
    """A session's state, in the header's fixed int64[8] (nothing pickled): kind, session, the block it
    travels with, and for a session that ended early where: rank, stage (index into END_STAGES) and block.

    Sent with every x / x0 hop and by the decode rank for every block (KIND_OK, or KIND_FAILED in place
    of data the session no longer has); on the header channel, rank 0's last word on a session that
    ended early (KIND_FAILED or KIND_CANCELLED).
    """

    kind: int
    session: int
    block: int
    rank: int = -1
    stage: str = ""
    origin: int = -1  # the failed block; for a cancellation, the first block not issued

    @property
    def ok(self) -> bool:
        return self.kind == KIND_OK

    def at(self, block: int) -> Status:
        """The same state, travelling with another block."""
        return Status(self.kind, self.session, block, self.rank, self.stage, self.origin)

    def tensor(self) -> torch.Tensor:
        code = END_STAGES.index(self.stage) + 1 if self.stage else 0
        values = [self.kind, self.session, self.block, self.rank, code, self.origin]
        return torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64)

    @classmethod
    def of(cls, t: torch.Tensor) -> Status:
        v = [int(x) for x in t.tolist()]
        if v[0] not in (KIND_OK, KIND_FAILED, KIND_CANCELLED) or not 0 <= v[4] <= len(END_STAGES):
            raise RuntimeError(f"corrupt pipeline status {v}")
        return cls(v[0], v[1], v[2], v[3], END_STAGES[v[4] - 1] if v[4] else "", v[5])


def parse_header(t: torch.Tensor) -> Header | Status:
    """What comes on the header channel: a block, the end of the run, or a session that ended early."""
    kind = int(t[0])
    return Status.of(t) if kind in (KIND_FAILED, KIND_CANCELLED) else Header.of(t)


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



# ---- one rank's context: the shared one, plus the sessions that failed ------------------------------

class _Rank(RankContext):
    def __init__(self, rank: int, layout: Layout, transport: Transport, fail: FailSpec | None,
                 sleeps: dict[str, float] | None, report: Callable[[dict], None] | None = None):
        super().__init__(rank, layout, transport, fail, sleeps)
        self.report = report or _log_session_error
        self.failed: dict[int, Status] = {}  # session -> where it failed (here, or as a peer told us)

    @contextlib.contextmanager
    def isolate(self):
        """A compute stage of one session that fails inside fails only that session: recorded and reported
        here, not raised. Waits on peers and work outside any session still fail the whole rank."""
        try:
            yield
        except StageError as e:
            if e.transfer or e.session < 0:
                raise
            self.learn(Status(KIND_FAILED, e.session, e.block, self.rank, e.stage, e.block))
            self.report({"rank": self.rank, "role": e.role, "stage": e.stage, "session": e.session,
                         "block": e.block, "transfer": False, "cause": e.cause, "time": time.time(),
                         "traceback": traceback.format_exc()})

    def learn(self, status: Status) -> None:
        """The first failure heard of (or seen) for a session is the one that travels on."""
        if status.kind == KIND_FAILED and status.session not in self.failed:
            self.failed[status.session] = status

    def live(self, session: int) -> bool:
        return session not in self.failed


def _log_session_error(info: dict) -> None:
    log.error("pipeline rank %d (%s) failed session %d in stage '%s' (block %d): %s\n%s", info["rank"],
              info["role"], info["session"], info["stage"], info["block"], info["cause"], info["traceback"])


# ---- rank 0's audio front --------------------------------------------------------------------------

class _FrontEngine(Engine):
    """Engine whose `step`/`flush` stop each ready block after its audio stage.

    The audio ring, the flush padding and the noise draws therefore follow the one-process engine
    exactly; the block is handed to the pipeline instead of being denoised here.
    """

    rank_ctx: _Rank | None = None
    stream_index: int = 0

    def _plan_row(self, session) -> Row:  # type: ignore[override]
        ctx, i, s = self.rank_ctx, self.stream_index, session.state
        with ctx.stage("begin", i, s.block):
            w = self.begin_block(s)  # also copies the samples the block covers (w.audio)
        with ctx.stage("audio", i, w.index):
            self.stage_audio(s, w)
        return Row(session.slot, s, w)

    def _submit(self, rows, batch) -> None:  # type: ignore[override]
        for row in rows:  # handed to the pipeline, in place of the finished block
            self._slots[row.slot].outbox.append(row.work)


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
    """A block this rank has passed on, kept until its x0 has arrived (and its refresh has run) here."""

    session: int
    block: int
    work: BlockWork | None     # None: not denoised here (its session had failed)
    x0: Incoming | None       # the last step rank's x0 (None on the last step rank itself)
    status: Incoming | None   # ... and the Status that travels with it


class _StepRank:
    """One step rank. Every announced block gets the same transfers whatever happens to its session: a
    session that failed sends a zero placeholder with a FAILED status in place of its data, so no peer
    waits for data that never comes and every pair keeps posting in the one global order."""

    def __init__(self, ctx: _Rank, engines: list[_FrontEngine], wire: _Wire,
                 cancel_after: Sequence[int | None] | None = None):
        self.ctx, self.engines, self.wire = ctx, engines, wire
        lay, r = ctx.layout, ctx.rank
        self.steps = lay.steps_of(r)
        self.is_last = r == lay.last_step_rank
        self.sessions: list = [e._require_session() for e in engines]  # None once freed
        self.pending: deque[_Item] = deque()
        self.closed: set[int] = set()  # sessions rank 0 ended early: KV ring freed here
        self.placeholder = torch.zeros(wire.latent, dtype=torch.float32, device=engines[0].device)
        # rank 0 only: cancellation hook, blocks issued and the decode rank's statuses still to read
        self.cancel_after = list(cancel_after) if cancel_after is not None else [None] * len(engines)
        self.issued = [0] * len(engines)
        self.acks: list[deque[Incoming]] = [deque() for _ in engines]

    # rank 0: blocks come from the audio fronts, round-robin over the streams still running
    def run_front(self, feeds: list[_StreamFeed]) -> None:
        active = list(range(len(feeds)))
        while active:
            for i in list(active):
                self._read_acks(i, keep=ACK_LAG)
                self._end_sessions(active)
                if i not in active:
                    continue
                w = None
                with self.ctx.isolate():  # begin / audio of this session
                    w = feeds[i].next()
                if w is None:
                    if self.ctx.live(i):
                        active.remove(i)  # the stream ended normally
                    continue  # a failed one is ended by _end_sessions next time round
                self._announce(i, w)
                self._refresh_until(i)
                self._denoise_and_pass(i, w.index, w)
        self._finish_front()

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
        self.acks[i].append(t.recv((HEADER_LEN,), torch.int64, lay.decode_rank, TAG_ACK, meta=True))
        self.issued[i] += 1

    def _read_acks(self, i: int, keep: int) -> None:
        """The decode rank's status of session i's older blocks: how rank 0 hears of decode failures."""
        while len(self.acks[i]) > keep:
            with self.ctx.stage("recv ack", i, transfer=True):
                status = Status.of(self.acks[i].popleft().wait())
            self.ctx.learn(status)

    def _end_sessions(self, active: list[int]) -> None:
        """Rank 0's last word on each session that failed (anywhere) or is cancelled: one status on the
        header channel to every rank, after all of the session's blocks, so every rank ends it in order."""
        for i in range(len(self.engines)):
            if i in self.closed:
                continue
            status = self.ctx.failed.get(i)
            cancel = self.cancel_after[i]
            if status is None and i in active and cancel is not None and self.issued[i] >= cancel:
                status = Status(KIND_CANCELLED, i, self.issued[i], self.ctx.rank, "cancel", self.issued[i])
            if status is None:
                continue
            for r in range(1, self.ctx.layout.world_size):
                self.ctx.transport.send(status.tensor(), r, TAG_HEADER, meta=True)
            self._close(i)
            if i in active:
                active.remove(i)

    def _finish_front(self) -> None:
        for item in self.pending:  # x0 statuses may still report failures of last blocks
            self._settle(item, refresh=False)
        self.pending.clear()
        for i in range(len(self.engines)):
            self._read_acks(i, keep=0)
        self._end_sessions([])
        end = Header(KIND_END).tensor()
        for r in range(1, self.ctx.layout.world_size):
            self.ctx.transport.send(end, r, TAG_HEADER, meta=True)
        self._finish()

    def _close(self, i: int) -> None:
        """The session is over (rank 0 said so): free its KV ring replica here."""
        self.closed.add(i)
        self.sessions[i] = None
        self.engines[i]._session = None

    # ranks 1..K-1: blocks come as headers from rank 0, in rank 0's order
    def run_follower(self) -> None:
        t, r, wire = self.ctx.transport, self.ctx.rank, self.wire
        model_dtype = self.engines[0].dtype
        next_header = t.recv((HEADER_LEN,), torch.int64, 0, TAG_HEADER, meta=True)
        while True:
            with self.ctx.stage("recv header", transfer=True):
                h = parse_header(next_header.wait())
            if isinstance(h, Status):  # rank 0 ended this session early; none of its blocks follow
                next_header = t.recv((HEADER_LEN,), torch.int64, 0, TAG_HEADER, meta=True)
                self.ctx.learn(h)
                self._close(h.session)
                continue
            if h.kind == KIND_END:
                break
            audio = t.recv(wire.audio, model_dtype, 0, TAG_AUDIO)
            noise = t.recv(wire.noise, torch.float32, 0, TAG_NOISE)
            x_status = t.recv((HEADER_LEN,), torch.int64, r - 1, TAG_X_STATUS, meta=True)
            x_in = t.recv(wire.latent, torch.float32, r - 1, TAG_X)
            next_header = t.recv((HEADER_LEN,), torch.int64, 0, TAG_HEADER, meta=True)
            self._refresh_until(h.session)  # before the plan update below: the refresh uses the old plan
            w = self._follower_work(h, audio, noise)
            with self.ctx.stage("recv x", h.session, h.block, transfer=True):
                x, status = x_in.wait(), Status.of(x_status.wait())
            self.ctx.learn(status)
            if w is not None:
                w.x = x
            self._denoise_and_pass(h.session, h.block, w)
        self._finish()

    def _follower_work(self, h: Header, audio: Incoming, noise: Incoming) -> BlockWork | None:
        """The block's work, or None when its session has already failed (the inputs are still received)."""
        eng, s = self.engines[h.session], self.sessions[h.session]
        with self.ctx.stage("recv inputs", h.session, h.block, transfer=True):
            audio_cond, noise_t = audio.wait(), noise.wait()
        if not self.ctx.live(h.session):
            return None
        w = BlockWork(index=h.block, first_frame=h.first_frame, num_frames=h.num_frames,
                      host_plan=plan_block(h.block, eng.config.cache, eng.batch), noise=noise_t)
        # As Engine.stage_audio: block 0 carries the reference (condition mask and pinned latent frame 0).
        first = h.block == 0
        w.inputs = BlockInputs(noise=noise_t, cond=s.cond_first if first else s.cond_rest, audio=audio_cond,
                               ref_latent=s.ref_latent if first else None)
        w.plan = s.plan.update(w.host_plan)  # what stage_denoise does at step 0, which another rank ran
        return w

    # every step rank
    def _denoise_and_pass(self, i: int, block: int, w: BlockWork | None) -> None:
        ctx, lay, t = self.ctx, self.ctx.layout, self.ctx.transport
        if ctx.live(i):
            with ctx.isolate():
                for step in self.steps:
                    with ctx.stage("denoise", i, block, step):
                        self.engines[i].stage_denoise(self.sessions[i], w, step)
        ok = ctx.live(i)
        status = Status(KIND_OK, i, block) if ok else ctx.failed[i].at(block)
        x = w.x if ok else self.placeholder  # same shape either way: the receiver posted it already
        if self.is_last:
            for r in [*range(lay.last_step_rank), lay.decode_rank]:
                t.send(status.tensor(), r, TAG_X0_STATUS, meta=True)
                t.send(x, r, TAG_X0)
            if ok:
                self.pending.append(_Item(i, block, w, None, None))
        else:
            t.send(status.tensor(), ctx.rank + 1, TAG_X_STATUS, meta=True)
            t.send(x, ctx.rank + 1, TAG_X)
            # Posted now (not when needed) so that every pair posts in block order: see the module doc.
            x0_status = t.recv((HEADER_LEN,), torch.int64, lay.last_step_rank, TAG_X0_STATUS, meta=True)
            x0 = t.recv(self.wire.latent, torch.float32, lay.last_step_rank, TAG_X0)
            self.pending.append(_Item(i, block, w if ok else None, x0, x0_status))

    def _refresh_until(self, session: int) -> None:
        """Run the pending refreshes (oldest first) up to this session's previous block: step 0 of its
        next block attends to that block's clean K/V."""
        while any(item.session == session for item in self.pending):
            self._settle(self.pending.popleft(), refresh=True)

    def _settle(self, item: _Item, refresh: bool) -> None:
        """Receive the item's x0 (and hear whether its session failed downstream), then refresh."""
        ctx = self.ctx
        if item.x0 is not None:
            with ctx.stage("recv x0", item.session, item.block, transfer=True):
                x0, status = item.x0.wait(), Status.of(item.status.wait())
            ctx.learn(status)
            if item.work is not None:
                item.work.x = x0
        if not refresh or item.work is None or not ctx.live(item.session) or item.session in self.closed:
            return
        with ctx.isolate(), ctx.stage("refresh", item.session, item.block):
            self.engines[item.session].stage_refresh(self.sessions[item.session], item.work)

    def _finish(self) -> None:
        """Match every posted receive, then wait for our sends: no refresh is needed after the last block."""
        for item in self.pending:
            self._settle(item, refresh=False)
        self.pending.clear()
        with self.ctx.stage("drain sends", transfer=True):
            self.ctx.transport.drain()


# ---- decode rank -----------------------------------------------------------------------------------

class _DecodeRank:
    def __init__(self, ctx: _Rank, engine: Engine, wire: _Wire, sink: Callable[[int, VideoBlock], None]):
        self.ctx, self.engine, self.wire, self.sink = ctx, engine, wire, sink
        self.decoders: dict[int, object] = {}  # session -> its streaming decoder (own causal cache)

    def run(self) -> None:
        t, lay, ctx = self.ctx.transport, self.ctx.layout, self.ctx
        next_header = t.recv((HEADER_LEN,), torch.int64, 0, TAG_HEADER, meta=True)
        while True:
            with ctx.stage("recv header", transfer=True):
                h = parse_header(next_header.wait())
            if isinstance(h, Status):  # rank 0 ended this session early: stop its stream
                next_header = t.recv((HEADER_LEN,), torch.int64, 0, TAG_HEADER, meta=True)
                self._end(h)
                continue
            if h.kind == KIND_END:
                break
            span = t.recv((self.wire.span,), torch.float32, 0, TAG_SPAN, meta=True)
            x0_status = t.recv((HEADER_LEN,), torch.int64, lay.last_step_rank, TAG_X0_STATUS, meta=True)
            x0 = t.recv(self.wire.latent, torch.float32, lay.last_step_rank, TAG_X0)
            next_header = t.recv((HEADER_LEN,), torch.int64, 0, TAG_HEADER, meta=True)
            with ctx.stage("recv x0", h.session, h.block, transfer=True):
                x, status = x0.wait(), Status.of(x0_status.wait())
                audio = span.wait()[:h.num_samples].numpy().copy()
            ctx.learn(status)
            if ctx.live(h.session):
                with ctx.isolate():
                    self._decode_and_emit(h, x, audio)
            ack = Status(KIND_OK, h.session, h.block) if ctx.live(h.session) else ctx.failed[h.session].at(h.block)
            t.send(ack.tensor(), 0, TAG_ACK, meta=True)
        with ctx.stage("drain sends", transfer=True):
            t.drain()

    def _decode_and_emit(self, h: Header, x: torch.Tensor, audio: np.ndarray) -> None:
        start = time.perf_counter()
        with self.ctx.stage("decode", h.session, h.block):
            decoder = self.decoders.setdefault(h.session, self.engine.new_decoder())
            frames = frames_uint8(decoder.decode(x.to(self.engine.dtype)))
        block = VideoBlock(index=h.block, frames=frames, first_frame=h.first_frame, pts=h.first_frame / self.engine.config.fps,
                           audio=audio, timings={"decode": time.perf_counter() - start})
        with self.ctx.stage("emit", h.session, h.block):
            self.sink(h.session, block)

    def _end(self, status: Status) -> None:
        self.ctx.learn(status)
        self.decoders.pop(status.session, None)
        end = getattr(self.sink, "end", None)
        if end is not None:
            with self.ctx.stage("end stream", status.session, status.origin):  # not isolated: a sink bug is fatal
                end(status.session, status)


# ---- running one rank --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamSpec:
    """One stream (session): its audio (16 kHz mono), reference image and noise seed.

    cancel_after_blocks: rank 0 cancels the session once it has issued that many blocks (a hook for a
    cancel arriving mid-stream); the blocks issued so far are still decoded and returned.
    """

    audio: np.ndarray
    image: object  # path or uint8 HxWx3 array
    seed: int = 0
    prompt_embeds: np.ndarray | None = None
    cancel_after_blocks: int | None = None


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
    quantize: str | None = None        # Engine.quantize mode, applied on every rank before any session


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
        base = _FrontEngine.random(job.model, device, dtype, job.ops_backend, job.weights_seed, max_sessions=1)
    else:
        # Streams carry prompt embeddings, never text: no rank needs the 11 GB text encoder.
        base = _FrontEngine.from_pretrained(job.model, device, dtype, job.ops_backend, job.weights_seed,
                                            text_encoder=False, max_sessions=1)
    if job.quantize:
        base.quantize(job.quantize)          # deterministic from the weights: the same on every rank
    more = [_FrontEngine(LiveTalk(base.config, base.dit, base.vae, base.audio_encoder, device=base.device,
                                  dtype=base.dtype, backend=job.ops_backend, max_sessions=1))
            for _ in range(count - 1)]
    return [base, *more]


def serve_rank(rank: int, job: _Job, device: torch.device, sink: Callable[[int, VideoBlock], None] | None,
               meta_group, report: Callable[[dict], None] | None = None) -> list[StageEvent]:
    """Run this rank's part of the pipeline to the end of every stream; returns its stage trace.

    A stage failure of one session fails only that session: `report` gets it (default: logged) and the
    rank goes on with the other sessions. The sink's optional `end(session, Status)` hears of every
    session that ended early (failed or cancelled)."""
    layout = Layout(job.world_size, _config_of(job.model).sampler.num_steps)
    fail = FailSpec.parse(job.fail_at or os.environ.get(FAIL_ENV))
    ctx = _Rank(rank, layout, Transport(device, meta_group), fail, job.stage_sleep_s, report)
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
    step_rank = _StepRank(ctx, engines, _Wire.of(engines[0].config, engines[0].batch),
                          [spec.cancel_after_blocks for spec in job.streams])
    if rank == 0:
        step_rank.run_front([_StreamFeed(e, s.audio) for e, s in zip(engines, job.streams)])
    else:
        step_rank.run_follower()
    return ctx.events


# ---- local driver (spawned processes) ------------------------------------------------------------------

@dataclass
class PipelineRun:
    blocks: list[list[VideoBlock]]  # per stream, in order (a failed or cancelled one: the blocks it produced)
    trace: list[StageEvent]         # compute stages of every rank (perf_counter times)
    wall_s: float
    errors: dict[int, PipelineError] = field(default_factory=dict)  # session -> why it failed
    cancelled: set[int] = field(default_factory=set)                # sessions cancelled (and not failed)

    def result(self, session: int) -> list[VideoBlock]:
        """The session's blocks; raises its PipelineError if it failed."""
        if session in self.errors:
            raise self.errors[session]
        return self.blocks[session]


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

    def end(self, session: int, status: Status) -> None:
        """A session that rank 0 ended early: failed (where, from the status header) or cancelled."""
        meta = {"session": session, "end": "failed" if status.kind == KIND_FAILED else "cancelled",
                "rank": status.rank, "stage": status.stage, "block": status.origin}
        with open(self.root / "blocks.jsonl", "a") as f:
            f.write(json.dumps(meta) + "\n")

    def read(self, streams: int) -> tuple[list[list[VideoBlock]], dict[int, dict]]:
        """Blocks per stream, and the end records of the sessions that ended early."""
        out: list[list[VideoBlock]] = [[] for _ in range(streams)]
        ends: dict[int, dict] = {}
        index = self.root / "blocks.jsonl"
        for line in index.read_text().splitlines() if index.exists() else []:
            m = json.loads(line)
            if "end" in m:
                ends[m["session"]] = m
                continue
            stem = self.root / "blocks" / f"s{m['session']}_b{m['index']}"
            out[m["session"]].append(VideoBlock(
                index=m["index"], frames=np.load(f"{stem}_frames.npy", allow_pickle=False),
                first_frame=m["first_frame"], pts=m["pts"],
                audio=np.load(f"{stem}_audio.npy", allow_pickle=False), timings=m["timings"]))
        return out, ends



def _spawned_rank(rank: int, job: _Job, root: str, backend: str) -> None:
    """Entry point of a spawned rank. Errors go to a JSON file for the driver, then the process exits."""
    try:
        device, meta = init_spawned_rank(rank, job.world_size, root, backend, job.threads, job.comm_timeout_s)
        decode = rank == job.world_size - 1
        report = functools.partial(_report_session_error, Path(root))
        events = serve_rank(rank, job, device, _FileSink(Path(root)) if decode else None, meta, report)
        Path(root, f"trace{rank}.json").write_text(json.dumps([asdict(e) for e in events]))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - every failure must reach the driver
        _report_error(Path(root), rank, job, e)
        os._exit(1)  # peers may still hold sockets to us; do not wait for them at exit


def _report_error(root: Path, rank: int, job: _Job, e: BaseException) -> None:
    report_rank_error(root, rank, e, lambda: Layout(job.world_size, _config_of(job.model).sampler.num_steps).role(rank))


def _report_session_error(root: Path, info: dict) -> None:
    """A rank failed one session (the run goes on): the driver reads this back for PipelineRun.errors."""
    write_json(root / f"failed_s{info['session']}_r{info['rank']}.json", info)
    print(f"[pipeline rank {info['rank']}] session {info['session']} failed in {info['stage']} "
          f"(block {info['block']}): {info['cause']}", flush=True)





def _session_errors(root: Path, layout: Layout, ends: dict[int, dict]) -> dict[int, PipelineError]:
    """Per failed session, the failing rank's own report. When ranks failed a session independently
    before hearing of each other, the one rank 0 announced (the decode rank's end record) wins."""
    reports: dict[int, list[dict]] = {}
    for path in sorted(root.glob("failed_s*_r*.json")):
        r = json.loads(path.read_text())
        reports.setdefault(r["session"], []).append(r)
    errors = {}
    for session, rs in reports.items():
        end = ends.get(session, {})
        told = [r for r in rs if (r["rank"], r["stage"], r["block"]) == (end.get("rank"), end.get("stage"),
                                                                             end.get("block"))]
        errors[session] = error_of(min(told or rs, key=lambda r: r["time"]))
    for session, end in ends.items():  # announced as failed, but the failing rank's report is missing
        if end["end"] == "failed" and session not in errors:
            errors[session] = error_of({**end, "session": session, "role": layout.role(end["rank"]),
                                         "cause": "(no report from that rank)", "traceback": ""})
    return errors



def _check_streams(cfg: EngineConfig, streams: Sequence[StreamSpec]) -> list[StreamSpec]:
    from ...audio import check_chunk
    from ...media import load_image

    if not streams:
        raise ValueError("at least one stream is needed")
    out = []
    for i, s in enumerate(streams):
        if not isinstance(s, StreamSpec):
            raise TypeError(f"stream {i} must be a StreamSpec, got {type(s).__name__}")
        audio = check_chunk(s.audio, cfg.audio.sample_rate, cfg.audio.sample_rate)
        load_image(s.image)  # raises on a bad image before any process starts
        cancel = s.cancel_after_blocks
        if cancel is not None and (isinstance(cancel, bool) or not isinstance(cancel, int) or cancel < 0):
            raise ValueError(f"stream {i}: cancel_after_blocks must be an int >= 0 or None, got {cancel!r}")
        out.append(StreamSpec(audio, s.image, int(s.seed), s.prompt_embeds, cancel))
    return out


def run_pipeline_streams(model: str | EngineConfig, world_size: int, streams: Sequence[StreamSpec], *,
                         backend: str = "gloo", dtype: str | None = None, ops_backend: str = "auto",
                         weights_seed: int = 0, timeout_s: float = 600.0, comm_timeout_s: float = 120.0,
                         threads_per_rank: int = 1, fail_at: str | FailSpec | None = None,
                         stage_sleep_s: dict[str, float] | None = None,
                         start_method: str = "forkserver", quantize: str | None = None) -> PipelineRun:
    """Run streams through a `world_size`-process pipeline on this machine; blocks come back per stream.

    model: a preset name (seeded random weights), a LiveTalk release directory, or an EngineConfig.
    fail_at (a FailSpec or "RANK:STAGE[:BLOCK[:SESSION]]", else $RUNTIME_PIPELINE_FAIL) and stage_sleep_s
    (stage -> seconds) are test hooks. start_method "forkserver" imports the runtime once per driver
    process and forks ranks from it (seconds saved per rank and run); "spawn" starts every rank from
    scratch. `quantize` ("fp8", "fp8-row") is applied to the DiT on every rank (Engine.quantize).

    A stage failure of one session fails only that session: the run goes on, and `errors[session]` is a
    PipelineError naming its rank, role, stage and block (`blocks[session]` keeps the blocks decoded
    before it). Failures not attributable to one session (a rank dying, a peer wait failing, the
    timeout) raise PipelineError for the whole run. Every rank process is ended before it returns or raises.
    """
    cfg = _config_of(model)
    layout = Layout(world_size, cfg.sampler.num_steps)
    # Resolved here: forkserver children inherit the server's environment, not the driver's current one.
    spec = FailSpec.parse(fail_at or os.environ.get(FAIL_ENV))
    if spec is not None:
        spec.check(layout, len(streams))
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    check_quantize(quantize)
    job = _Job(model, world_size, _check_streams(cfg, streams), dtype, ops_backend, weights_seed,
               str(spec) if spec else None, dict(stage_sleep_s or {}), comm_timeout_s, threads_per_rank, quantize)
    root = Path(tempfile.mkdtemp(prefix="pipeline-"))
    ctx = process_context(start_method, [__name__])
    procs = [ctx.Process(target=_spawned_rank, args=(r, job, str(root), backend), daemon=True,
                         name=f"pipeline-rank{r}") for r in range(world_size)]
    start = time.perf_counter()
    try:
        for p in procs:
            p.start()
        wait_for(procs, root, start + timeout_s)
        wall = time.perf_counter() - start
        blocks, ends = _FileSink(root).read(len(job.streams))
        trace = [StageEvent(**e) for r in range(world_size) for e in json.loads((root / f"trace{r}.json").read_text())]
        errors = _session_errors(root, layout, ends)
        cancelled = {s for s, e in ends.items() if e["end"] == "cancelled" and s not in errors}
        return PipelineRun(blocks, trace, wall, errors, cancelled)
    finally:
        stop(procs, 0)
        shutil.rmtree(root, ignore_errors=True)



def run_pipeline(model: str | EngineConfig, world_size: int, audio: np.ndarray, image, seed: int = 0,
                 **kwargs) -> list[VideoBlock]:
    """One stream through the pipeline: the same blocks as Engine.reset(image, seed) + step(audio) + flush().
    Raises PipelineError (rank, role, stage, block) if the stream fails."""
    return run_pipeline_streams(model, world_size, [StreamSpec(audio, image, seed)], **kwargs).result(0)


# ---- torchrun entry point ------------------------------------------------------------------------------

class _Mp4Sink:
    def __init__(self, cfg: EngineConfig, out: Path, streams: int):
        from ...media import Mp4Writer

        paths = [out] if streams == 1 else [out.with_name(f"{out.stem}_s{i}{out.suffix}") for i in range(streams)]
        self.writers = [Mp4Writer(p, cfg.width, cfg.height, cfg.fps, cfg.audio.sample_rate) for p in paths]
        self.start = time.perf_counter()

    def __call__(self, session: int, block: VideoBlock) -> None:
        self.writers[session].write_block(block.frames, block.audio)
        log.info("stream %d block %d: %d frames at %.2f s (decode %.1f ms)", session, block.index,
                 block.num_frames, time.perf_counter() - self.start, 1e3 * block.timings["decode"])

    def end(self, session: int, status: Status) -> None:
        """A stream that ended early: keep what was written, close its file."""
        how = "failed" if status.kind == KIND_FAILED else "cancelled"
        log.warning("stream %d %s at rank %d, stage %s, block %d: closing its file", session, how,
                    status.rank, status.stage, status.origin)
        if self.writers[session] is not None:
            self.writers[session].close()
            self.writers[session] = None

    def close(self) -> None:
        for w in self.writers:
            if w is not None:
                w.close()


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m runtime.parallel", description=(
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
    p.add_argument("--quantize", default=None, choices=["fp8", "fp8-row"], help="FP8 DiT linears on every rank")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """torchrun entry: every rank runs this; RANK/WORLD_SIZE/LOCAL_RANK come from torchrun."""
    from ...media import read_wav, synth_speech_like, synthetic_face

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
    job = _Job(args.model, world, streams, args.dtype, comm_timeout_s=args.comm_timeout, threads=torch.get_num_threads(),
               quantize=args.quantize)
    sink = _Mp4Sink(cfg, args.out, len(streams)) if rank == world - 1 else None
    try:
        serve_rank(rank, job, device, sink, meta)
    finally:
        if sink is not None:
            sink.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
