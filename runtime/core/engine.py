"""`Engine`: the one engine of every model family. Sessions in, video blocks out.

    engine = Engine.from_pretrained("tiny", max_sessions=4)   # a preset or a checkpoint directory
    with engine.open(image, seed=0) as session:
        for chunk in audio_chunks:
            for block in session.step(chunk):    # the blocks finished so far
                show(block.frames)
        show(session.flush())                    # pads with silence, waits for every block

    engine.reset(image); engine.step(chunk); engine.flush()   # the one-session shorthand

The family (runtime/families/) is found from the preset name or the files in the directory; this
module names none. What it does for every family (docs/engine.md):
- sessions: slots up to `max_sessions`, one caller per session, failure isolation (core/session.py);
- the audio timeline: pushes into the session's ring, resampling, readiness, flush/idle/interrupt;
- rounds (continuous batching): a round runs the next block of every session whose audio is ready,
  never waiting for one that has none; rows are padded to a batch size of the family's (1, 2, 4, 8);
  sessions join and leave at block boundaries;
- in flight: a round is a list of tasks for a runner. `mode="eager"` runs them in order in the
  caller's thread (the numerical reference); "auto" uses runtime.scheduler.RoundRunner when it is
  there (one log line says which), so `step()` returns the blocks finished so far and rounds still
  running finish in a later call; `drain()` and `flush()` wait.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

from ..audio import Resampler, check_chunk
from ..errors import AtCapacityError, BlockFailedError
from ..families import BATCH, Family, Row, families, family_for
from .blocks import VideoBlock, cut_to_frames
from .rounds import InlineRunner
from .session import Session

log = logging.getLogger(__name__)

MODES = ("auto", "eager", "scheduled")
MAX_ROUNDS_IN_FLIGHT = 2


class Engine:
    def __init__(self, family: Family, *, max_sessions: int | None = None, mode: str = "auto"):
        """`family`: a built family (see `from_pretrained`); `max_sessions` defaults to what the family
        was built for (it sizes the family's shared rows, so it can only be lowered here)."""
        if not isinstance(family, Family):
            raise TypeError(f"Engine(family): expected a runtime.families.Family, got {type(family).__name__}; "
                            "use Engine.from_pretrained(preset_or_dir) or Engine.random(config)")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        built = family.max_sessions
        max_sessions = built if max_sessions is None else max_sessions
        _check_max_sessions(max_sessions)
        if max_sessions > built:
            raise ValueError(f"max_sessions={max_sessions} but the family was built for {built}")
        if getattr(family, "_engine_bound", False):
            raise ValueError("this family already serves an engine (its shared buffers hold that engine's "
                             "sessions); build another family")
        family._engine_bound = True
        family.capture_graphs = mode != "eager"
        self.family, self.mode, self.max_sessions = family, mode, max_sessions
        self.runner = self._make_runner(mode)
        self._slots: list[Session | None] = [None] * max_sessions
        self._default: Session | None = None                # the one-session shorthand's session
        self._slots_lock = threading.Lock()
        # Pushes into any session's audio ring and the rounds (which read every ring) are serialised.
        self._round_lock = threading.RLock()
        self._inflight: deque[tuple[object, list[Row]]] = deque()
        self.rounds = 0       # rounds submitted
        self.rows_run = 0     # blocks planned into them (> rounds once rounds batched sessions)

    def _make_runner(self, mode: str):
        if mode == "eager":
            return InlineRunner()
        try:
            from ..scheduler import RoundRunner
        except ImportError as err:
            if mode == "scheduled":
                raise RuntimeError(f"mode='scheduled' needs runtime.scheduler.RoundRunner: {err}") from err
            log.info("engine mode eager: runtime.scheduler has no RoundRunner (%s)", err)
            return InlineRunner()
        runner = RoundRunner(backend="auto", device=getattr(self.family, "device", None),
                             lanes=("compute", "decode", "copy"))
        log.info("engine mode scheduled: RoundRunner backend %s%s", runner.backend,
                 f" ({runner.fallback_reason})" if runner.fallback_reason else "")
        return runner

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_preset: str, device=None, dtype=None, backend: str = "auto", seed: int = 0,
                        config=None, *, max_sessions: int = 4, mode: str = "auto", **options) -> Engine:
        """A preset name gives random weights of its shapes (seeded by `seed`); a directory gives the
        checkpoint files of the family that recognises them, loaded strictly. `backend` picks the
        attention ops ("auto": by device capability); `config` and `options` go to the family's
        `build` (for LiveTalk: decoder=, text_encoder=, quantize=, ...)."""
        _check_max_sessions(max_sessions)
        family = family_for(path_or_preset)
        if config is not None:
            options["config"] = config
        built = family.build(path_or_preset, device=device, dtype=dtype, seed=seed, max_sessions=max_sessions,
                             backend=backend, **options)
        return cls(built, mode=mode)

    @classmethod
    def random(cls, config, device=None, dtype=None, backend: str = "auto", seed: int = 0, *,
               max_sessions: int = 4, mode: str = "auto", **options) -> Engine:
        """Random weights of the shapes `config` states (a family's config object)."""
        _check_max_sessions(max_sessions)
        for family in families().values():
            kind = getattr(family, "config_class", None)
            if kind is not None and isinstance(config, kind):
                return cls(family.random(config, device, dtype, backend, seed, max_sessions=max_sessions, **options),
                           mode=mode)
        raise TypeError(f"no model family takes a {type(config).__name__} config")

    def eager_twin(self, max_sessions: int = 1) -> Engine:
        """An engine of mode="eager" on this engine's weights (the family's `share_weights`: no copy,
        new rows and buffers): the reference path beside the default one, e.g. in `avatar bench`."""
        return Engine(self.family.share_weights(max_sessions), mode="eager")

    def __getattr__(self, name: str):
        # Family attributes (config, dit, device, dtype, quantize, ...) read through the engine.
        if name.startswith("__") or name == "family":
            raise AttributeError(name)
        return getattr(self.family, name)

    def close(self) -> None:
        """Close every session and the runner. Idempotent."""
        for session in self.sessions:
            session.close()
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the stream format ----------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.family.timeline.sample_rate

    @property
    def fps(self) -> int:
        return self.family.timeline.fps

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the video frames."""
        return self.family.timeline.height, self.family.timeline.width

    # ---- sessions -------------------------------------------------------------------------------
    def open(self, reference_image, prompt: str | None = None, prompt_embeds=None, seed: int = 0) -> Session:
        """A new stream from a reference image (HxWx3 uint8 array or a path), in a free slot.

        The prompt is `prompt` (text, encoded by the family's text encoder) or `prompt_embeds`, not
        both; neither gives an all-zero embedding. `seed` (an int in [0, 2**63)) seeds the session's
        noise. Raises AtCapacityError when `max_sessions` sessions are open; bad input raises before
        anything changes."""
        check_seed(seed)
        with self._slots_lock:
            slot = self._free_slot()
            with self._round_lock:  # the slot's shared rows may still be read by a round in flight
                self._wait_all()
                state = self.family.open_state(slot, reference_image, prompt, prompt_embeds, seed)
            session = self._slots[slot] = Session(self, state, slot)
        return session

    def _free_slot(self) -> int:
        for i, held in enumerate(self._slots):
            if held is None:
                return i
        raise AtCapacityError(self.max_sessions)

    def _release(self, session: Session) -> None:
        """Session.close(): its blocks in flight are waited for and dropped, the slot is free."""
        with self._slots_lock, self._round_lock:  # the order open() and reset() take them in
            self._wait_all()
            session.outbox.clear()
            if self._slots[session.slot] is session:
                self._slots[session.slot] = None
                self.family.close_state(session.state)
            if self._default is session:
                self._default = None

    @property
    def num_sessions(self) -> int:
        """Sessions open now."""
        return sum(s is not None for s in self._slots)

    @property
    def sessions(self) -> list[Session]:
        """The open sessions, by slot."""
        return [s for s in self._slots if s is not None]

    def reset(self, reference_image, prompt_embeds=None, seed: int = 0, *, prompt: str | None = None) -> None:
        """The one-session shorthand: (re)start the engine's default session (see `open`); `step`,
        `flush`, ... then act on it. The previous default session ends and its slot is reused.

        `prompt` is keyword-only because `prompt_embeds` has long been the second positional argument.
        Bad input raises before anything changes (the previous stream goes on).
        """
        check_seed(seed)
        old = self._default
        if old is None:
            self._default = self.open(reference_image, prompt=prompt, prompt_embeds=prompt_embeds, seed=seed)
            return
        with old._lock, self._slots_lock, self._round_lock:
            self._wait_all()
            # Built in the old slot before the old session ends: bad input changes nothing.
            state = self.family.open_state(old.slot, reference_image, prompt, prompt_embeds, seed)
            old.closed = True
            self.family.close_state(old.state)
            self._default = self._slots[old.slot] = Session(self, state, old.slot)

    @property
    def _session(self):
        """The default session's state (runtime/families/livetalk/pipeline.py drives its stages directly)."""
        return self._default.state if self._default is not None else None

    @_session.setter
    def _session(self, value: None) -> None:
        if value is not None:
            raise ValueError("only None (end the default session) can be assigned")
        if self._default is not None:
            self._default.close()

    def _default_session(self) -> Session:
        if self._default is None:
            raise RuntimeError("call reset(reference_image) before step()")
        return self._default

    def _require_session(self):
        """The default session's state, for code that drives the stages itself (runtime/families/livetalk/pipeline.py)."""
        return self._open_state(self._default_session())

    @staticmethod
    def _open_state(session: Session):
        if session.state.flushed:
            raise RuntimeError("this stream was flushed; call reset() (or open()) to start a new one")
        return session.state

    # ---- the one-session shorthand --------------------------------------------------------------
    def step(self, audio_chunk, sample_rate: int = 16000, resample: bool = False) -> list[VideoBlock]:
        """The default session's `Session.step` (see `reset`)."""
        return self._default_session().step(audio_chunk, sample_rate, resample)

    def flush(self) -> list[VideoBlock]:
        return self._default_session().flush()

    def drain(self) -> list[VideoBlock]:
        return self._default_session().drain()

    def end_segment(self) -> list[VideoBlock]:
        return self._default_session().end_segment()

    def idle(self, blocks: int = 1) -> list[VideoBlock]:
        return self._default_session().idle(blocks)

    def interrupt(self) -> int:
        return self._default_session().interrupt()

    @property
    def next_block(self) -> int:
        """Index of the next block the default session will plan."""
        return self._default_session().next_block

    @property
    def pending_samples(self) -> int:
        return self._default_session().pending_samples

    # ---- what a Session's calls run (that session's lock is held) ----------------------------------
    def _session_step(self, session: Session, audio_chunk, sample_rate, resample) -> list[VideoBlock]:
        """Audio at another rate is an error unless `resample=True`, which converts it with a streaming
        soxr resampler kept per session (chunking-independent; one input rate per stream)."""
        s = self._open_state(session)
        target = self.sample_rate
        check_rate(sample_rate)
        if not isinstance(resample, (bool, np.bool_)):
            raise TypeError(f"resample must be a bool, got {type(resample).__name__}")
        if resample and sample_rate != target:
            check_chunk(audio_chunk, sample_rate, sample_rate)  # before a resampler exists: a refusal changes nothing
            samples = self._resampler(s, sample_rate)(audio_chunk)
        else:
            samples = check_chunk(audio_chunk, sample_rate, target)
        self._feed(session, samples)
        return self._collect(session, wait=False)

    def _resampler(self, s, rate: int) -> Resampler:
        if s.resampler is None:
            s.resampler = Resampler(rate, self.sample_rate)
        elif s.resampler.from_rate != rate:
            raise ValueError(f"sample rate changed mid-stream ({s.resampler.from_rate} -> {rate} Hz); "
                             "call reset() to start a stream at another rate")
        return s.resampler

    def _session_flush(self, session: Session) -> list[VideoBlock]:
        """Pad with silence so every pushed sample is covered by a block, emit the rest, end the stream."""
        s, t = self._open_state(session), self.family.timeline
        pushed = self._cover_pushed_audio(session)
        s.flushed = True
        blocks = self._collect(session, wait=True)
        if not t.trim_flush:
            return blocks
        end = -(-pushed // t.samples_per_frame)  # the input's frames, rounded up
        return [cut_to_frames(b, end, t.samples_per_frame) for b in blocks]

    def _session_drain(self, session: Session) -> list[VideoBlock]:
        self._open_state(session)
        return self._collect(session, wait=True)

    def _session_end_segment(self, session: Session) -> list[VideoBlock]:
        """End of an utterance (LiveKit's AudioSegmentEnd): like `flush`, every pushed sample is covered
        by a block now (silence fills the last one), but the stream goes on. The silence queued past
        the last block is dropped, so the next speech starts exactly at the next block boundary."""
        s = self._open_state(session)
        self._cover_pushed_audio(session)
        s.resampler = None   # flushed: the next segment starts a fresh delay line
        with session.audio_lock:
            s.audio.truncate(self.family.timeline.block_start(s.block))
        return self._collect(session, wait=True)

    def _cover_pushed_audio(self, session: Session) -> int:
        """Pads with silence until every pushed sample is in a block; returns the samples pushed before."""
        s, t = session.state, self.family.timeline
        if s.resampler is not None:
            self._feed(session, s.resampler.flush())
        pushed = s.audio.total_samples
        last = t.last_block_to_flush(s.block, s.audio.total_samples)
        if last is not None:
            self._feed(session, np.zeros(max(0, t.samples_to_run(last) - s.audio.total_samples), np.float32))
        return pushed

    def _session_next_block(self, session: Session) -> int:
        return self._open_state(session).block

    def _session_pending_samples(self, session: Session) -> int:
        s = self._open_state(session)
        return max(0, s.audio.total_samples - self.family.timeline.block_start(s.block))

    def _session_interrupt(self, session: Session) -> int:
        """Barge-in: drop audio pushed but not yet turned into a block; the stream goes on from there.

        The KV cache and the video timeline are kept (the avatar does not jump); the next pushed audio
        drives the next block. Returns the number of samples dropped.
        """
        s = self._open_state(session)
        s.resampler = None  # its buffered input belongs to the dropped audio
        with session.audio_lock:
            return s.audio.truncate(self.family.timeline.block_start(s.block))

    def _session_idle(self, session: Session, blocks: int = 1) -> list[VideoBlock]:
        """Emit `blocks` more blocks driven by silence (listening / idle avatar), after any queued audio."""
        s = self._open_state(session)
        if not isinstance(blocks, (int, np.integer)) or isinstance(blocks, bool) or blocks < 1:
            raise ValueError(f"blocks must be an int >= 1, got {blocks!r}")
        need = self.family.timeline.samples_to_run(s.block + blocks - 1)
        self._feed(session, np.zeros(max(0, need - s.audio.total_samples), np.float32))
        return self._collect(session, wait=True)

    # ---- rounds ---------------------------------------------------------------------------------
    def _feed(self, session: Session, samples: np.ndarray) -> None:
        """Push in pieces that fit the bounded audio ring, running rounds as blocks become ready.

        The push takes only the session's audio lock: while another thread runs a round, the audio of
        other sessions keeps arriving, and the next round batches every session that became ready."""
        s = session.state
        pos = 0
        while pos < len(samples) and session._failure is None:
            with session.audio_lock:
                n = min(len(samples) - pos, s.audio.free_samples)
                s.audio.push(samples[pos:pos + n])
                pos += n
            with self._round_lock:
                while self._run_round():
                    pass

    def _collect(self, session: Session, wait: bool) -> list[VideoBlock]:
        """This session's finished blocks (after every round in flight when `wait`)."""
        with self._round_lock:
            if wait:
                self._wait_all()
            else:
                self._reap()
            out = list(session.outbox)
            session.outbox.clear()
        return out

    def _ready(self) -> list[Session]:
        t = self.family.timeline
        return [s for s in self._slots if s is not None and not s.closed and s._failure is None
                and s.state.audio.total_samples >= t.samples_to_run(s.state.block)]

    def _run_round(self) -> bool:
        """Plan and submit the next block of every ready session; False when none is ready."""
        ready = self._ready()
        if not ready:
            return False
        rows = [row for row in map(self._plan_row, ready) if row is not None]
        if rows:
            batch = self.family.padded(1 + max(row.slot for row in rows))
            self._submit(rows, batch)
        return True

    def _plan_row(self, session: Session) -> Row | None:
        """The session's next block, planned (None: planning failed, the session with it)."""
        t0 = time.perf_counter()
        block = session.state.block
        try:
            with session.audio_lock:  # the session's thread may be pushing (or truncating) meanwhile
                if session.state.audio.total_samples < self.family.timeline.samples_to_run(block):
                    return None  # interrupted since the readiness check
                work = self.family.plan_block(session.state)
        except Exception as err:  # noqa: BLE001 - any stage fault fails this session only
            self._fail(session, "plan", block, err)
            return None
        return Row(session.slot, session.state, work, timings={"audio": time.perf_counter() - t0})

    def _submit(self, rows: list[Row], batch: int) -> None:
        while len(self._inflight) >= MAX_ROUNDS_IN_FLIGHT:
            self._finish_round(*self._inflight.popleft())
        tasks = self.family.round_tasks(rows, batch)
        self._inflight.append((self.runner.submit(tasks), rows))
        self.rounds += 1
        self.rows_run += len(rows)
        self._reap()

    def _reap(self) -> None:
        while self._inflight and self._inflight[0][0].done():
            self._finish_round(*self._inflight.popleft())

    def _wait_all(self) -> None:
        while self._inflight:
            self._finish_round(*self._inflight.popleft())

    def _finish_round(self, handle, rows: list[Row]) -> None:
        failed = handle.wait()
        for row in rows:
            session = self._slots[row.slot]
            if session is None or session.state is not row.state:
                continue  # closed meanwhile: its blocks are dropped
            err = failed.get(row.slot) or failed.get(BATCH)
            if err is not None:
                self._fail(session, getattr(err, "stage", "?"), row.work.index, err.__cause__ or err)
                continue
            try:
                session.outbox.append(self.family.finish_block(row))
            except Exception as exc:  # noqa: BLE001 - any stage fault fails this session only
                self._fail(session, "finish", row.work.index, exc)

    def _fail(self, session: Session, stage: str, block: int, err: BaseException) -> None:
        failure = BlockFailedError(f"session {session.slot}: stage '{stage}' of block {block} failed: "
                                   f"{type(err).__name__}: {err}", session=session.slot, block=block, stage=stage)
        failure.__cause__ = err
        session._record_failure(failure)


def _check_max_sessions(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"max_sessions must be an int >= 1, got {n!r}")


def check_seed(seed) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")


def check_rate(sample_rate) -> None:
    if not isinstance(sample_rate, (int, np.integer)) or isinstance(sample_rate, (bool, np.bool_)):
        raise TypeError(f"sample_rate must be an int (samples per second), got {type(sample_rate).__name__} "
                        f"{sample_rate!r}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
