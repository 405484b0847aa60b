"""Wall-clock pacing of video frames, the way LiveKit's A/V synchronizer paces them."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Pacer:
    """Holds each frame until its pts on a wall clock anchored at the first frame.

    A frame that is late by up to `max_lag` seconds goes out at once (the stream catches up in a short
    burst). Later than that, the schedule is re-anchored so this frame is due now: the frames after it
    keep their real spacing instead of bursting out to make up for a stall (LiveKit resets at 300 ms).
    `clock` and `sleep` are injectable so tests can drive time by hand.
    """

    def __init__(self, max_lag: float = 0.3, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if max_lag < 0:
            raise ValueError(f"max_lag must be >= 0 seconds, got {max_lag}")
        self.max_lag = max_lag
        self._clock, self._sleep = clock, sleep
        self._origin: float | None = None   # wall-clock time of pts 0
        self.resets = 0                      # times the schedule was re-anchored after a stall

    async def wait(self, pts: float) -> None:
        """Return when the frame at `pts` (seconds) is due."""
        now = self._clock()
        if self._origin is None:
            self._origin = now - pts
            return
        due = self._origin + pts
        if now - due > self.max_lag:
            self._origin = now - pts
            self.resets += 1
        elif due > now:
            await self._sleep(due - now)
