"""What an `AvatarSession` yields, in order: per video frame a `VideoFrame` then its `AudioFrame`,
with a `PlaybackFinished` after the last frame of each speech segment (or at once on barge-in)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .convert import rgb_to_i420


@dataclass(frozen=True)
class VideoFrame:
    index: int                 # position in the session's output: 0, 1, 2, ... with no gaps, barge-ins included
    pts: float                 # index / fps, seconds
    rgb: np.ndarray = field(repr=False)  # uint8 [H, W, 3]
    idle: bool                 # carries no pushed speech: listening, or silence padding after an utterance
    segment: int | None        # the speech segment whose audio this frame carries, if any
    block: int                 # engine block that generated it (a barge-in drops whole blocks' tails)

    def to_i420(self) -> np.ndarray:
        """yuv420p planes as uint8 [H * 3 // 2, W] (see `rgb_to_i420`)."""
        return rgb_to_i420(self.rgb)

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


@dataclass(frozen=True)
class AudioFrame:
    index: int                 # the VideoFrame this audio belongs to (it is yielded right after it)
    pts: float                 # same as that frame's
    pcm: np.ndarray = field(repr=False)  # int16 mono, exactly samples_per_frame samples
    sample_rate: int           # the engine's rate (the output rate, also when input was resampled)
    speech_samples: int = 0    # the first speech_samples samples are pushed speech, the rest silence
    segment: int | None = None  # the speech segment they belong to

    @property
    def speech_pcm(self) -> np.ndarray:
        """Only the pushed speech (what LiveKit counts as played): empty for idle frames."""
        return self.pcm[:self.speech_samples]

    @property
    def data(self) -> bytes:
        """PCM16 little-endian bytes (Pipecat's and LiveKit's audio payload)."""
        return self.pcm.astype("<i2", copy=False).tobytes()

    @property
    def samples_per_channel(self) -> int:
        return int(self.pcm.shape[0])


@dataclass(frozen=True)
class PlaybackFinished:
    """LiveKit's playback acknowledgement for one speech segment."""

    segment: int
    position: float            # seconds of the segment's pushed audio that were yielded
    interrupted: bool          # True when clear_buffer() cut the segment short
