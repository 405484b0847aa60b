"""`ScheduledEngine`: the engine's block stages run as a DAG by the stage scheduler.

    eng = ScheduledEngine.from_engine(Engine.from_pretrained("tiny"))   # shares the weights
    eng.reset(image, seed=0)
    for chunk in chunks:
        for block in eng.step(chunk):     # the same VideoBlocks as Engine.step, call by call
            show(block.frames)
    eng.flush()
    eng.close()                           # or `with ScheduledEngine(...) as eng:`

The stage methods are `Engine`'s own (`begin_block`, `stage_audio`, `stage_denoise`, ...); only the
order changes. Per block b, on two lanes ("dit": denoising, "vae": decoding; a worker thread each on
the host backend, a CUDA stream each on the cuda backend):

    caller  begin + audio  host plan, noise draw, audio features: on the calling thread before submit,
                           in block order (that thread also feeds the audio ring, which is not shared)
    vae     decode_first   after decode(b-1)         block 0 only: latent frame 0 is the reference latent,
                                                     so its 1-frame decode overlaps the denoising of block 0
    dit     step0          after refresh(b-1)        the KV ring and the static device plan
    dit     step1..N-1     after the previous step
    dit     handoff        after step N-1, decode(b-2)   graphs only: x0 out of the dit lane's static x
    dit     refresh        after step N-1            t = 0 forward, clean K/V into the ring
    vae     decode         after step N-1 (handoff), decode_first, decode(b-1)   the VAE causal cache
    caller  finish         after wait                uint8 host copy

decode(b) does not depend on anything of block b+1, so it overlaps step0..refresh of block b+1.
`step()`/`flush()` keep at most `max_in_flight` blocks submitted and return once every block that
became ready in the call is finished, so they return exactly what `Engine` returns, call by call.

Errors: a failing stage raises `StageError` (`.stage`, `.block`, the original as `__cause__`) from
`step()`/`flush()`; the stream is over (later calls say so) until `reset()`, the process and the
engine stay usable. `cancel()` (any thread) stops the stream: waiting calls raise `Cancelled`.
"""
from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import median

import numpy as np
import torch

from .engine import BlockWork, Engine, VideoBlock, _Session
from .graphs import StageGraphs, variant
from .scheduler import Cancelled, Scheduler, Stage, StageError, prev

__all__ = ["Cancelled", "PipelineTiming", "ScheduledEngine", "StageError", "StageSpan",
           "compare_pipelined_sequential"]

LANES = ("dit", "vae")


@dataclass(frozen=True)
class StageSpan:
    """When a stage ran (time.perf_counter seconds). On the cuda backend: when it was launched."""

    stage: str
    block: int
    start: float
    end: float


@dataclass
class _Job:
    """What `submit_block` hands every stage of a block."""

    session: _Session
    work: BlockWork
    start: float
    audio_s: float
    first_video: torch.Tensor | None = None  # block 0: the decoded first frame [B, 3, 1, H, W]
    lane_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LANES, 0.0))


def _stage_error(stage: str, block: int, err: BaseException) -> StageError:
    """A StageError for a caller-side stage, shaped like the scheduler's own."""
    exc = StageError(f"stage '{stage}' of block {block} failed: {type(err).__name__}: {err}")
    exc.stage, exc.block, exc.waited_block = stage, block, block
    exc.__cause__ = err
    return exc


class ScheduledEngine(Engine):
    """`Engine` whose blocks run through `runtime.scheduler.Scheduler` (see the module docstring).

    scheduler_backend: "host" or "cuda"; default "cuda" for an engine on a CUDA device, else "host".
    graphs: run the stages over static buffers through `runtime.graphs.StageGraphs` (CUDA graphs on
        a GPU, with an eager fallback per stage; eager bodies on CPU).
    max_in_flight: blocks submitted and not yet finished, at most (bounds memory on long pushes).
    trace: keep the last `trace` StageSpans in `self.trace` (0: off).
    """

    def __init__(self, config, dit, vae, audio_encoder, device="cpu", dtype=torch.float32, backend="auto", *,
                 scheduler_backend: str | None = None, graphs: bool = False, max_in_flight: int = 3,
                 trace: int = 0, taehv=None, text_encoder=None):
        super().__init__(config, dit, vae, audio_encoder, device=device, dtype=dtype, backend=backend, taehv=taehv,
                         text_encoder=text_encoder)
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        sched_backend = scheduler_backend or ("cuda" if self.device.type == "cuda" else "host")
        if sched_backend == "cuda" and self.device.type != "cuda":
            raise ValueError(f"scheduler_backend='cuda' needs an engine on a CUDA device, not {self.device}")
        self.max_in_flight = max_in_flight
        self.use_graphs = graphs
        self.graphs: StageGraphs | None = None
        self.trace: deque[StageSpan] | None = deque(maxlen=trace) if trace else None
        self._inflight: deque[tuple[object, _Job]] = deque()
        self._ready: list[VideoBlock] = []
        self._failure: str | None = None
        self._lane_streams: dict[int, torch.cuda.ExternalStream] = {}
        device_index = self.device.index if self.device.type == "cuda" else None
        self._sched = Scheduler(self._stages(), backend=sched_backend, lanes=LANES, device=device_index)

    @classmethod
    def from_engine(cls, engine: Engine, **options) -> ScheduledEngine:
        """A scheduled engine over the same modules (no copy of the weights); its own sessions."""
        return cls(engine.config, engine.dit, engine.vae, engine.audio_encoder, device=engine.device,
                   dtype=engine.dtype, backend=engine.ops.name, taehv=engine.taehv,
                   text_encoder=engine.text_encoder, **options)

    @property
    def scheduler(self) -> Scheduler:
        return self._sched

    # ---- the DAG ----------------------------------------------------------------------------------
    def _stages(self) -> list[Stage]:
        n = self.config.sampler.num_steps
        last = f"step{n - 1}"
        stages = [Stage("decode_first", self._wrap("decode_first", "vae", "_run_decode_first"), lane="vae",
                        deps=[prev("decode")])]
        for i in range(n):
            stages.append(Stage(f"step{i}", self._wrap(f"step{i}", "dit", "_run_step", i), lane="dit",
                                deps=[prev("refresh")] if i == 0 else [f"step{i - 1}"]))
        x0_ready = last
        if self.use_graphs:
            # The static x is rewritten by the next block's step 0: decode reads a per-parity copy,
            # which block b+2 may overwrite only once decode(b) is done.
            stages.append(Stage("handoff", self._wrap("handoff", "dit", "_run_handoff"), lane="dit",
                                deps=[last, prev("decode", 2)]))
            x0_ready = "handoff"
        stages.append(Stage("refresh", self._wrap("refresh", "dit", "_run_refresh"), lane="dit", deps=[last]))
        stages.append(Stage("decode", self._wrap("decode", "vae", "_run_decode"), lane="vae",
                            deps=[x0_ready, "decode_first", prev("decode")]))
        return stages

    def _wrap(self, name: str, lane: str, method: str, *args):
        """A stage callable: runs `self.<method>(*args, block, job)` on the lane (thread or stream).

        The engine is held weakly: the scheduler keeps its callables, and a strong reference would
        be a cycle through C++ that keeps a dropped engine (and its worker threads) alive."""
        engine_ref = weakref.ref(self)

        def stage(block: int, job: _Job, stream: int | None) -> None:
            engine = engine_ref()
            if engine is None:
                raise RuntimeError("the ScheduledEngine was garbage-collected")
            t0 = time.perf_counter()
            try:
                if stream is None:
                    getattr(engine, method)(*args, block, job)
                else:
                    with torch.cuda.stream(engine._on_lane(stream)):
                        getattr(engine, method)(*args, block, job)
            finally:
                t1 = time.perf_counter()
                job.lane_s[lane] += t1 - t0
                if engine.trace is not None:
                    engine.trace.append(StageSpan(name, block, t0, t1))

        stage.__name__ = name
        return stage

    def _on_lane(self, stream: int) -> torch.cuda.ExternalStream:
        """The lane's stream, made to wait for the caller's stream: the noise and audio condition of
        the block (and a new session's tensors) were produced there."""
        lane = self._lane_streams.get(stream)
        if lane is None:
            lane = self._lane_streams[stream] = torch.cuda.ExternalStream(stream, device=self.device)
        lane.wait_stream(torch.cuda.current_stream(self.device))
        return lane

    # ---- stages (lane side) -----------------------------------------------------------------------
    def _run_step(self, step: int, block: int, job: _Job) -> None:
        s, w = job.session, job.work
        if self.graphs is None:
            self.stage_denoise(s, w, step)
            return
        if step == 0:
            self.graphs.load_block(s, w)
        self.graphs.run(f"step{step}/{variant(block)}")

    def _run_refresh(self, block: int, job: _Job) -> None:
        if self.graphs is None:
            self.stage_refresh(job.session, job.work)
        else:
            self.graphs.run(f"refresh/{variant(block)}")

    def _run_handoff(self, block: int, job: _Job) -> None:
        self.graphs.handoff(block)

    @torch.no_grad()
    def _run_decode_first(self, block: int, job: _Job) -> None:
        if block != 0:
            return
        s = job.session
        if self.graphs is None:
            # Latent frame 0 of block 0's x0 IS the reference latent (the sampler pins it).
            job.first_video = s.decoder.decode(s.ref_latent.to(self.dtype))
        else:
            job.first_video = self.graphs.decode_first()

    @torch.no_grad()
    def _run_decode(self, block: int, job: _Job) -> None:
        s, w = job.session, job.work
        if block != 0:
            if self.graphs is not None:
                w.video = self.graphs.decode(block)
            else:
                self.stage_decode(s, w)
            return
        if self.config.cache.block_frames == 1:
            w.video = job.first_video
            return
        if self.graphs is not None:
            rest = self.graphs.decode(block)
        else:
            rest = s.decoder.decode(w.x.to(self.dtype)[:, :, 1:])  # the decoder has seen frame 0
        w.video = torch.cat([job.first_video, rest], dim=2)

    # ---- session ----------------------------------------------------------------------------------
    def reset(self, reference_image, prompt_embeds=None, seed: int = 0, *, prompt: str | None = None) -> None:
        # Leftover stages of a failed or cancelled stream finish before any session state changes.
        self._sched.reset()
        self._inflight.clear()
        self._ready = []
        super().reset(reference_image, prompt_embeds, seed, prompt=prompt)
        self._failure = None
        if self.use_graphs:
            if self.graphs is None:
                self.graphs = StageGraphs(self, self._session)
            else:
                self.graphs.load_session(self._session)

    def _require_session(self) -> _Session:
        if self._failure is not None:
            raise RuntimeError(f"this stream ended ({self._failure}); call reset() to start a new one")
        return super()._require_session()

    def cancel(self) -> None:
        """Stop the stream (callable from any thread): no new stage starts, running ones finish, a
        `step()`/`flush()` waiting on a block raises `Cancelled`. `reset()` starts a new stream."""
        if self._failure is None:
            self._failure = "cancelled"
        self._sched.cancel()

    def close(self) -> None:
        """Stop the lanes (worker threads / streams). Idempotent; the engine is unusable after it."""
        self._sched.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- streaming (caller side) ------------------------------------------------------------------
    def _feed(self, s: _Session, samples: np.ndarray) -> list[VideoBlock]:
        try:
            super()._feed(s, samples)  # pushes the audio; `_drain` submits blocks as they get ready
            while self._inflight:
                self._ready.append(self._collect(*self._inflight.popleft()))
        except BaseException as err:
            self._abort(err)
            raise
        out, self._ready = self._ready, []
        return out

    def _drain(self, s: _Session) -> list[VideoBlock]:
        """Submit every block the pushed audio allows; `_feed` collects them."""
        cfg = self.config
        while s.audio.ready(cfg.first_video_frame(s.block) + cfg.video_frames_in_block(s.block)):
            if len(self._inflight) >= self.max_in_flight:
                self._ready.append(self._collect(*self._inflight.popleft()))
            self._inflight.append(self._submit(s))
        return []

    def _submit(self, s: _Session) -> tuple[object, _Job]:
        t0 = time.perf_counter()
        block = s.block
        try:
            w = self.begin_block(s)
        except Exception as err:
            raise _stage_error("begin", block, err) from err
        try:
            self.stage_audio(s, w)
        except Exception as err:
            raise _stage_error("audio", block, err) from err
        job = _Job(session=s, work=w, start=t0, audio_s=time.perf_counter() - t0)
        return self._sched.submit_block(w.index, job), job

    def _collect(self, handle, job: _Job) -> VideoBlock:
        self._sched.wait(handle)
        w = job.work
        try:
            block = self.finish_block(job.session, w)
        except Exception as err:
            raise _stage_error("finish", w.index, err) from err
        block.timings = {"audio": job.audio_s, "total": time.perf_counter() - job.start}
        if self._sched.backend == "host":  # on the cuda backend lane times are launch times only
            block.timings.update(denoise=job.lane_s["dit"], decode=job.lane_s["vae"])
        return block

    def _abort(self, err: BaseException) -> None:
        """The stream is over: stop its remaining stages and remember why."""
        if self._failure is None or not isinstance(err, Cancelled):
            self._failure = f"{type(err).__name__}: {err}"
        self._inflight.clear()
        self._ready = []
        self._sched.cancel()


# ---- timing: pipelined vs sequential ------------------------------------------------------------

@dataclass
class PipelineTiming:
    """Per-block latency of the sequential and the scheduled engine on the same stream.

    A block's latency is the duration of the `step()`/`flush()` call that returned it, the audio for
    the call being pushed at once: with `chunk_samples` of one block's audio that is the delay
    between a block's audio arriving and its frames coming back; with the whole stream in one call
    it is the wall time of the stream (throughput)."""

    device: str
    scheduler_backend: str
    captured: tuple[str, ...]
    chunk_samples: int | None
    sequential: list[float]
    pipelined: list[float]
    sequential_wall: float
    pipelined_wall: float
    sequential_blocks: list[VideoBlock] = field(repr=False, default_factory=list)
    pipelined_blocks: list[VideoBlock] = field(repr=False, default_factory=list)
    sequential_calls: list[list[int]] = field(repr=False, default_factory=list)  # block indices per call
    pipelined_calls: list[list[int]] = field(repr=False, default_factory=list)

    def summary(self) -> dict[str, float]:
        n = len(self.sequential)
        return {
            "blocks": n,
            "sequential_median_s": median(self.sequential), "pipelined_median_s": median(self.pipelined),
            "sequential_first_s": self.sequential[0], "pipelined_first_s": self.pipelined[0],
            "sequential_wall_s": self.sequential_wall, "pipelined_wall_s": self.pipelined_wall,
            "sequential_s_per_block": self.sequential_wall / n,
            "pipelined_s_per_block": self.pipelined_wall / n,
        }

    def as_markdown(self) -> str:
        s = self.summary()
        chunk = "whole stream" if self.chunk_samples is None else f"{self.chunk_samples} samples"
        head = (f"device: {self.device}; scheduler backend: {self.scheduler_backend}; "
                f"graphs: {', '.join(self.captured) or 'none'}; audio per call: {chunk}; "
                f"blocks: {s['blocks']}")
        rows = [head, "", "| | sequential (ms) | pipelined (ms) |", "| --- | --- | --- |"]
        for label, key in (("block latency, median", "median_s"), ("first block", "first_s"),
                           ("wall per block", "s_per_block")):
            seq_ms, pip_ms = 1e3 * s["sequential_" + key], 1e3 * s["pipelined_" + key]
            rows.append(f"| {label} | {seq_ms:.2f} | {pip_ms:.2f} |")
        return "\n".join(rows)


@dataclass
class _Run:
    latencies: list[float]
    wall: float
    blocks: list[VideoBlock]
    calls: list[list[int]]


def _timed_stream(engine: Engine, image, audio: np.ndarray, chunks: Sequence[int], seed: int) -> _Run:
    engine.reset(image, seed=seed)
    run = _Run([], 0.0, [], [])
    pos = 0
    start = time.perf_counter()
    for n in [*chunks, None]:  # None: the final flush()
        t0 = time.perf_counter()
        got = engine.step(audio[pos:pos + n]) if n is not None else engine.flush()
        run.latencies += [time.perf_counter() - t0] * len(got)
        run.blocks += got
        run.calls.append([b.index for b in got])
        pos += n or 0
    run.wall = time.perf_counter() - start
    return run


def compare_pipelined_sequential(sequential: Engine, pipelined: ScheduledEngine, image, audio: np.ndarray, *,
                                 chunk_samples: int | None = None, seed: int = 0,
                                 warmup_samples: int | None = None) -> PipelineTiming:
    """Run the same stream through both engines (same weights expected) and time every block.

    chunk_samples: audio per `step()` call (None: the whole stream in one call). warmup_samples:
    audio streamed once through each engine before timing (lazy init, autotuning, graph capture);
    default one second."""
    if chunk_samples is not None and chunk_samples < 1:
        raise ValueError(f"chunk_samples must be >= 1 or None, got {chunk_samples}")
    audio = np.asarray(audio, dtype=np.float32)
    size = len(audio) if chunk_samples is None else chunk_samples
    chunks = [min(size, len(audio) - p) for p in range(0, len(audio), size)] if len(audio) else []
    warm = sequential.config.audio.sample_rate if warmup_samples is None else warmup_samples
    for engine in (sequential, pipelined):
        if warm:
            _timed_stream(engine, image, audio[:warm], [min(warm, len(audio))], seed)
    seq = _timed_stream(sequential, image, audio, chunks, seed)
    pip = _timed_stream(pipelined, image, audio, chunks, seed)
    captured = pipelined.graphs.captured if pipelined.graphs is not None else ()
    return PipelineTiming(device=str(pipelined.device), scheduler_backend=pipelined.scheduler.backend,
                          captured=captured, chunk_samples=chunk_samples, sequential=seq.latencies,
                          pipelined=pip.latencies, sequential_wall=seq.wall, pipelined_wall=pip.wall,
                          sequential_blocks=seq.blocks, pipelined_blocks=pip.blocks,
                          sequential_calls=seq.calls, pipelined_calls=pip.calls)
