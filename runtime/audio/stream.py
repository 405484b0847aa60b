"""Streaming audio: a bounded ring buffer on the absolute sample timeline + windowed wav2vec2.

Window rule
-----------
With spf = sample_rate // fps samples per video frame, L = left context and A = lookahead (both
whole video frames, `AudioConfig.window_frames(fps)`), the features of video frames [v0, v1) come
from ONE encoder run over the samples

    [v0 * spf - L * spf,  v1 * spf + A * spf)        (samples before stream time 0 are zeros)

encoded to L + (v1 - v0) + A per-frame vectors (interpolation over the whole window, as upstream
does over a whole clip), of which the middle v1 - v0 are returned. The window is a pure function of
the audio content and (v0, v1), so features never depend on how the caller chunked its audio, and
for a given span the window length is fixed (one static shape per block size: 9 and 12 frames).

Waveform normalisation (upstream: over the whole clip) is over the window's samples at or after
time 0; the leading zeros of the first windows stay zeros and do not dilute the statistics.

Latency cost
------------
Frames [v0, v1) can be encoded only once audio up to (v1 + A) * spf has arrived: the lookahead adds
A / fps seconds (0.25 s for the release config) on top of the block's own duration. Left context
costs compute (L + span + A frames per run instead of span), not latency. Compared with upstream's
whole-clip encoding, a frame sees at most L frames of past and A frames of future audio.

Memory
------
The buffer is allocated once: L + A + max_span_frames frames of audio plus `max_chunk_samples` of
room for incoming pushes. `features(v0, v1)` releases everything before min(v0 * spf, (v1 - L) * spf)
(the next contiguous block's window and the current block's own audio stay), `drop_before` releases
explicitly, and a push that does not fit raises `AudioBufferFull` instead of dropping audio.
"""
from __future__ import annotations

import numpy as np
import torch

from runtime.audio.encoder import AudioEncoder
from runtime.config import AudioConfig
from runtime.transfer import to_device


class AudioBufferFull(RuntimeError):
    """A push would overwrite audio that has not been consumed yet."""


class AudioStream:
    def __init__(self, cfg: AudioConfig, fps: int, encoder: AudioEncoder, device: torch.device | str,
                 dtype: torch.dtype, max_span_frames: int, max_chunk_samples: int | None = None):
        if cfg.sample_rate % fps:
            raise ValueError(f"sample_rate / fps must be an integer ({cfg.sample_rate} / {fps})")
        if max_span_frames < 1:
            raise ValueError(f"max_span_frames must be >= 1, got {max_span_frames}")
        self.cfg, self.fps, self.encoder = cfg, fps, encoder
        self.device, self.dtype = torch.device(device), dtype
        self.samples_per_frame = cfg.sample_rate // fps
        self.left_frames, self.ahead_frames = cfg.window_frames(fps)
        self.max_span_frames = max_span_frames
        spf = self.samples_per_frame
        self.max_chunk_samples = max_span_frames * spf if max_chunk_samples is None else max_chunk_samples
        if self.max_chunk_samples < 1:
            raise ValueError(f"max_chunk_samples must be >= 1, got {max_chunk_samples}")
        window = (self.left_frames + max_span_frames + self.ahead_frames) * spf
        self.capacity = window + self.max_chunk_samples
        self._buf = np.zeros(self.capacity, dtype=np.float32)
        self.reset()

    # ---- timeline -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all audio: the next push starts again at stream time 0."""
        self.total_samples = 0  # absolute end of the pushed audio
        self._floor = 0  # absolute start of the audio still held
        self._buf.fill(0.0)

    @property
    def buffered_samples(self) -> int:
        return self.total_samples - self._floor

    @property
    def free_samples(self) -> int:
        """How many samples can be pushed now without raising AudioBufferFull."""
        return self.capacity - self.buffered_samples

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes

    def push(self, samples: np.ndarray) -> None:
        """Append mono float32 samples (already validated, see validate.check_chunk)."""
        x = np.asarray(samples)
        if x.ndim != 1 or x.dtype != np.float32:
            raise TypeError(f"push expects 1-D float32 samples, got {x.dtype} with shape {x.shape}; "
                            "pass audio through runtime.audio.check_chunk first")
        if len(x) > self.free_samples:
            raise AudioBufferFull(
                f"pushing {len(x)} samples would overflow the audio buffer ({self.buffered_samples} of "
                f"{self.capacity} held, {self.free_samples} free): consume ready blocks first, push "
                "smaller chunks, or build the stream with a larger max_chunk_samples")
        self._write(self.total_samples, x)
        self.total_samples += len(x)

    def pad_silence(self, n: int) -> None:
        """Append n zero samples (flush: lets the last frames' lookahead exist)."""
        if n < 0:
            raise ValueError(f"pad_silence needs n >= 0, got {n}")
        self.push(np.zeros(n, dtype=np.float32))

    def truncate(self, sample: int) -> int:
        """Forget pushed audio from absolute `sample` on (barge-in); returns how many samples went.

        The next push continues at `sample`. Audio already released cannot be truncated into.
        """
        if sample < self._floor:
            raise ValueError(f"cannot truncate to {sample}: audio before {self._floor} was already consumed")
        dropped = max(0, self.total_samples - sample)
        self.total_samples -= dropped
        return dropped

    def drop_before(self, sample: int) -> None:
        """Release audio before absolute `sample` (never moves backwards, never past the end)."""
        self._floor = max(self._floor, min(sample, self.total_samples))

    # ---- reads ----------------------------------------------------------------------------------
    def samples(self, s0: int, s1: int) -> np.ndarray:
        """A copy of absolute samples [s0, s1), e.g. the audio a video block covers."""
        if not 0 <= s0 <= s1:
            raise ValueError(f"need 0 <= s0 <= s1, got [{s0}, {s1})")
        return self._read(s0, s1)

    def window_bounds(self, v0: int, v1: int) -> tuple[int, int]:
        """Absolute sample range [start, stop) of the encoder window for video frames [v0, v1)."""
        spf = self.samples_per_frame
        return (v0 - self.left_frames) * spf, (v1 + self.ahead_frames) * spf

    def ready(self, v_end: int) -> bool:
        """True when the audio for the features of every video frame < v_end has been pushed."""
        return self.window_bounds(v_end, v_end)[1] <= self.total_samples

    def features(self, v0: int, v1: int) -> torch.Tensor:
        """[1, v1 - v0, feature_dim] for video frames [v0, v1), on the configured device/dtype."""
        span = v1 - v0
        if v0 < 0 or not 1 <= span <= self.max_span_frames:
            raise ValueError(f"need 0 <= v0 < v1 with v1 - v0 <= {self.max_span_frames}, got [{v0}, {v1})")
        if not self.ready(v1):
            raise ValueError(f"audio for video frames [{v0}, {v1}) is not there yet: needs samples up to "
                             f"{self.window_bounds(v0, v1)[1]}, have {self.total_samples} (check ready())")
        start, stop = self.window_bounds(v0, v1)
        wave = to_device(torch.from_numpy(self._read(start, stop)), self.encoder.device).unsqueeze(0)
        frames = self.left_frames + span + self.ahead_frames
        with torch.no_grad():  # not inference_mode: callers may update the result in place
            out = self.encoder(wave, frames, pad_before=max(0, -start))
        out = out[:, self.left_frames:self.left_frames + span].to(self.device, self.dtype)
        spf = self.samples_per_frame
        self.drop_before(min(v0 * spf, (v1 - self.left_frames) * spf))
        return out

    # ---- ring storage ---------------------------------------------------------------------------
    def _read(self, start: int, stop: int) -> np.ndarray:
        """Absolute [start, stop) as a new array; negative times read as silence."""
        out = np.zeros(stop - start, dtype=np.float32)
        lo = max(start, 0)
        if stop <= lo:
            return out
        if lo < self._floor or stop > self.total_samples:
            raise ValueError(f"samples [{start}, {stop}) are outside the held audio [{self._floor}, "
                             f"{self.total_samples}): already released or not pushed yet")
        for pos, length, dst in self._segments(lo, stop):
            out[lo - start + dst: lo - start + dst + length] = self._buf[pos:pos + length]
        return out

    def _write(self, start: int, x: np.ndarray) -> None:
        for pos, length, src in self._segments(start, start + len(x)):
            self._buf[pos:pos + length] = x[src:src + length]

    def _segments(self, start: int, stop: int):
        """Split absolute [start, stop) into at most two contiguous ring pieces: (ring pos, len, offset)."""
        pos, n = start % self.capacity, stop - start
        first = min(n, self.capacity - pos)
        pieces = [(pos, first, 0)]
        if n > first:
            pieces.append((0, n - first, first))
        return pieces
