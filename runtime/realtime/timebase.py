"""Media clocks for WebRTC: 20 ms audio frames and the 90 kHz RTP video clock, both exact integers."""
from __future__ import annotations

import numpy as np

VIDEO_CLOCK_RATE = 90_000   # RTP's video clock (RFC 3551); aiortc's VIDEO_CLOCK_RATE


def video_pts(index: int, fps: int, clock_rate: int = VIDEO_CLOCK_RATE) -> int:
    """pts of frame `index` in ticks of `clock_rate`; exact only when fps divides the clock (16, 25 do)."""
    if clock_rate % fps:
        raise ValueError(f"{fps} fps does not divide the {clock_rate} Hz video clock: pts would drift")
    return index * (clock_rate // fps)


class AudioRechunker:
    """Re-cuts a PCM16 stream into frames of exactly `frame_samples` (20 ms for WebRTC: aiortc's Opus
    encoder takes 20 ms frames and drops most of longer ones). `pts` counts samples from 0."""

    def __init__(self, sample_rate: int, frame_ms: int = 20):
        if (sample_rate * frame_ms) % 1000:
            raise ValueError(f"{frame_ms} ms is not a whole number of samples at {sample_rate} Hz")
        self.sample_rate, self.frame_samples = sample_rate, sample_rate * frame_ms // 1000
        self._carry = np.zeros(0, np.int16)
        self.pts = 0                 # samples already handed out

    def push(self, pcm: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(pts, int16 frame) for every whole frame now available; the rest waits for the next push."""
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"AudioRechunker takes 1-D int16 PCM, got {pcm.dtype} {pcm.shape}")
        data = np.concatenate([self._carry, pcm])
        whole = len(data) // self.frame_samples * self.frame_samples
        self._carry = data[whole:]
        frames = []
        for start in range(0, whole, self.frame_samples):
            frames.append((self.pts, data[start:start + self.frame_samples]))
            self.pts += self.frame_samples
        return frames

    def clear(self) -> None:
        """Barge-in: the part-frame held back is stale speech: silence it, keeping the clock in step."""
        self._carry = np.zeros_like(self._carry)
