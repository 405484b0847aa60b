"""The bounded hand-off from the engine worker thread to the event loop.

Every item carries the epoch it was made in. `clear()` (barge-in) starts a new epoch and empties the
buffer; items of an old epoch are refused on `put`, so a block the worker was still generating when the
barge-in came is dropped too. The worker waits in `wait_for_room` while `max_frames` frames are
unemitted (backpressure): a put adds one whole engine block, so the buffer holds at most
`max_frames + frames_per_block - 1` frames.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FrameItem:
    epoch: int
    block: int
    rgb: np.ndarray = field(repr=False)     # uint8 [H, W, 3]
    audio: np.ndarray = field(repr=False)   # float32, samples_per_frame samples
    segment: int | None                     # speech segment whose audio the frame carries
    speech_samples: int                     # how many of its samples are that segment's pushed audio


@dataclass(frozen=True)
class SegmentEnd:
    """Follows the frame that carries a segment's last pushed sample."""

    epoch: int
    segment: int


class OutputBuffer:
    def __init__(self, max_frames: int, on_put: Callable[[], None]):
        if max_frames < 1:
            raise ValueError(f"max_buffered_frames must be >= 1, got {max_frames}")
        self.max_frames = max_frames
        self._on_put = on_put   # wakes the event loop; called outside the lock
        self._cond = threading.Condition()
        self._items: deque[FrameItem | SegmentEnd] = deque()
        self._frames = 0
        self._epoch = 0
        self._closed = False

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def frames(self) -> int:
        """Generated frames not yet taken by the consumer."""
        return self._frames

    @property
    def closed(self) -> bool:
        return self._closed

    def is_current(self, epoch: int) -> bool:
        return not self._closed and epoch == self._epoch

    # ---- worker side ----------------------------------------------------------------------------
    def wait_for_room(self, epoch: int) -> bool:
        """Block until a frame fits; False when a barge-in or close made `epoch` stale meanwhile."""
        with self._cond:
            self._cond.wait_for(lambda: self._frames < self.max_frames or not self.is_current(epoch))
            return self.is_current(epoch)

    def put(self, items: Iterable[FrameItem | SegmentEnd], epoch: int) -> bool:
        items = list(items)
        with self._cond:
            if not self.is_current(epoch):
                return False
            self._items.extend(items)
            self._frames += sum(isinstance(i, FrameItem) for i in items)
        self._on_put()
        return True

    # ---- event-loop side ------------------------------------------------------------------------
    def pop(self) -> FrameItem | SegmentEnd | None:
        with self._cond:
            if not self._items:
                return None
            item = self._items.popleft()
            if isinstance(item, FrameItem):
                self._frames -= 1
                self._cond.notify_all()
            return item

    def clear(self) -> int:
        """Drop everything and start a new epoch (returned)."""
        with self._cond:
            self._drop_all()
            self._epoch += 1
            return self._epoch

    def close(self) -> None:
        """Drop everything and refuse all further puts; wakes a waiting worker."""
        with self._cond:
            self._closed = True
            self._drop_all()

    def _drop_all(self) -> None:
        self._items.clear()
        self._frames = 0
        self._cond.notify_all()
