"""Playback acknowledgements per speech segment (LiveKit's playback_finished)."""
from __future__ import annotations

from .events import PlaybackFinished


class PlaybackLedger:
    """Speech samples yielded so far for each segment that has not been acknowledged yet."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self._played: dict[int, int] = {}

    def open(self, segment: int) -> None:
        self._played[segment] = 0

    def played(self, segment: int | None, samples: int) -> None:
        if segment in self._played:
            self._played[segment] += samples

    def finished(self, segment: int) -> PlaybackFinished | None:
        """The segment's last frame was yielded: all its speech played."""
        played = self._played.pop(segment, None)
        return None if played is None else self._record(segment, played, interrupted=False)

    def interrupt_all(self) -> list[PlaybackFinished]:
        """Barge-in: every open or still-playing segment stops where it is."""
        records = [self._record(s, played, interrupted=True) for s, played in self._played.items()]
        self._played.clear()
        return records

    def _record(self, segment: int, samples: int, interrupted: bool) -> PlaybackFinished:
        return PlaybackFinished(segment, samples / self.sample_rate, interrupted)
