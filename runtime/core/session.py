"""`Session`: one stream on an engine that may hold several (`engine.open(...)`).

    with engine.open(image, seed=1) as s:
        for chunk in chunks:
            show(s.step(chunk))       # the blocks finished so far
        show(s.flush())

A session is a handle: the engine owns the state (`state`, the family's per-stream tensors) and the
slot; the handle adds what every family shares:
- one caller at a time: a call while another thread is inside a call on the same session raises
  `SessionBusyError` at once (never waits, never interleaves two callers' audio);
- failure isolation: a block that fails marks this session failed (`BlockFailedError` now,
  `SessionFailedError` on every later call); other sessions of the engine go on unchanged. A refused
  input (bad audio, bad arguments) is not a failure: it raises before anything changes;
- `close()` frees the slot, idempotent, also on leaving a `with` block.
"""
from __future__ import annotations

import threading
from typing import Any

from ..errors import BlockFailedError, SessionBusyError, SessionFailedError


class Session:
    def __init__(self, engine: Any, state: Any, slot: int):
        self._engine, self.state, self.slot = engine, state, slot
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._unraised: BaseException | None = None  # a failure recorded during another call, raised next
        self.outbox: list = []                        # finished blocks not yet handed back, in order
        self.closed = False

    # ---- calls ----------------------------------------------------------------------------------
    def _call(self, what: str, method: str, *args):
        if not self._lock.acquire(blocking=False):
            raise SessionBusyError(f"session {self.slot}: {what}() while another thread is inside a call on this "
                                   "session; calls on one session must not overlap (one caller per session)")
        try:
            self._check_usable(what)
            try:
                result = getattr(self._engine, method)(self, *args)
            except BlockFailedError as err:
                self._record_failure(err)
                raise
            self._check_usable(what)  # a block of this call failed: say so now
            return result
        finally:
            self._lock.release()

    def _record_failure(self, err: BaseException) -> None:
        """The engine saw a block of this session fail (maybe during another session's call)."""
        if self._failure is None:
            self._failure = self._unraised = err

    def _check_usable(self, what: str) -> None:
        if self.closed:
            raise RuntimeError(f"session {self.slot}: {what}() on a closed session; open a new one")
        if self._unraised is not None:
            err, self._unraised = self._unraised, None
            raise err
        if self._failure is not None:
            raise SessionFailedError(f"session {self.slot} failed earlier ({self._failure}); close it and open a "
                                     "new one") from self._failure

    def step(self, audio_chunk, sample_rate: int = 16000, resample: bool = False) -> list:
        """Push mono audio (int16, or float32 in [-1, 1]); returns the blocks finished so far.
        Another rate is an error unless `resample=True` (a streaming soxr resampler per session)."""
        return self._call("step", "_session_step", audio_chunk, sample_rate, resample)

    def flush(self) -> list:
        """Pad with silence so every pushed sample is in a block, wait for every block, end the stream."""
        return self._call("flush", "_session_flush")

    def drain(self) -> list:
        """Wait for the blocks in flight and return them; the stream goes on."""
        return self._call("drain", "_session_drain")

    def end_segment(self) -> list:
        """End of an utterance: every pushed sample is in a block now, the stream goes on."""
        return self._call("end_segment", "_session_end_segment")

    def idle(self, blocks: int = 1) -> list:
        """`blocks` more blocks driven by silence, after any queued audio."""
        return self._call("idle", "_session_idle", blocks)

    def interrupt(self) -> int:
        """Barge-in: drop audio not yet in a block; returns the samples dropped."""
        return self._call("interrupt", "_session_interrupt")

    @property
    def next_block(self) -> int:
        """Index of the next block this session will plan."""
        self._check_usable("next_block")
        return self._engine._session_next_block(self)

    @property
    def pending_samples(self) -> int:
        """Pushed samples (at the model rate) not yet inside a planned block."""
        self._check_usable("pending_samples")
        return self._engine._session_pending_samples(self)

    @property
    def failed(self) -> BaseException | None:
        """Why this session failed, or None."""
        return self._failure

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the slot (blocks still in flight are waited for and dropped). Idempotent."""
        with self._lock:  # waits for a call of another thread to end: its state is not torn down under it
            if self.closed:
                return
            self.closed = True
            self._engine._release(self)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        status = "closed" if self.closed else "failed" if self._failure else "open"
        return f"<Session {self.slot} {status}>"
