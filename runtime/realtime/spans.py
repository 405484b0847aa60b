"""Where pushed speech lies on the engine's audio timeline, so each frame knows whose audio it carries."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Span:
    segment: int
    start: int   # absolute samples on the engine's timeline, [start, stop)
    stop: int


class SpeechSpans:
    """Pushed speech per segment. Silence the session adds (idle blocks, padding after a segment) is in
    no span, which is how frames tell speech from idle and playback positions exclude padding."""

    def __init__(self):
        self._spans: list[_Span] = []

    def add(self, segment: int, start: int, length: int) -> None:
        last = self._spans[-1] if self._spans else None
        if last is not None and last.segment == segment and last.stop == start:
            last.stop += length
        else:
            self._spans.append(_Span(segment, start, start + length))

    def end_of(self, segment: int) -> int | None:
        """End of the segment's speech still held, None when it has none (or all was released)."""
        stops = [s.stop for s in self._spans if s.segment == segment]
        return max(stops) if stops else None

    def speech_in(self, start: int, stop: int) -> tuple[int | None, int]:
        """(segment, samples) of the speech inside [start, stop); (None, 0) for silence."""
        best: tuple[int | None, int] = (None, 0)
        for s in self._spans:
            overlap = min(stop, s.stop) - max(start, s.start)
            if overlap > best[1]:
                best = (s.segment, overlap)
        return best

    def truncate(self, at: int) -> None:
        """Forget speech from `at` on (barge-in dropped it from the engine)."""
        self._spans = [_Span(s.segment, s.start, min(s.stop, at)) for s in self._spans if s.start < at]

    def release_before(self, at: int) -> None:
        """Forget spans wholly before `at` (frames for them exist): memory stays flat on long streams."""
        self._spans = [s for s in self._spans if s.stop > at]
