"""Checks on caller audio before it enters a stream, and explicit resampling.

Accepted: 1-D mono numpy arrays of int16 PCM (scaled by 1/32768) or float32 in [-1, 1], at the
engine's sample rate. Everything else is refused with an `AudioInputError` that names the problem;
nothing is converted silently (no implicit resampling, downmixing or clipping).
"""
from __future__ import annotations

import numpy as np
import soxr


class AudioInputError(ValueError):
    """Caller audio the engine cannot take as is."""


_INT16_SCALE = 1.0 / 32768.0


def check_chunk(chunk, sample_rate: int, expected_rate: int) -> np.ndarray:
    """Validate one chunk and return it as a new 1-D float32 array (empty chunk -> empty array).

    The input is never modified; the result never shares memory with it.
    """
    if not isinstance(chunk, np.ndarray):
        hint = " (for PCM16 bytes use np.frombuffer(data, dtype=np.int16))" if isinstance(
            chunk, (bytes, bytearray, memoryview)) else ""
        raise AudioInputError(f"audio must be a numpy array, got {type(chunk).__name__}{hint}")
    if chunk.ndim != 1:
        raise AudioInputError(
            f"audio must be 1-D mono samples, got shape {chunk.shape}; stereo or multi-channel "
            "audio is not downmixed implicitly (average the channels yourself)")
    if chunk.dtype not in (np.int16, np.float32):
        raise AudioInputError(f"unsupported audio dtype {chunk.dtype}: pass int16 PCM or float32 in [-1, 1]")
    if sample_rate != expected_rate:
        raise AudioInputError(
            f"audio sample rate is {sample_rate} Hz but the engine expects {expected_rate} Hz; "
            "resampling is not done implicitly: call runtime.audio.resample(chunk, "
            f"{sample_rate}, {expected_rate}) first")
    if chunk.size == 0:
        return np.zeros(0, dtype=np.float32)
    if chunk.dtype == np.int16:
        return chunk.astype(np.float32) * np.float32(_INT16_SCALE)
    return _checked_float(chunk)


def _checked_float(chunk: np.ndarray) -> np.ndarray:
    finite = np.isfinite(chunk)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise AudioInputError(f"audio contains NaN or Inf (first at sample {bad}: {chunk[bad]})")
    peak = int(np.argmax(np.abs(chunk)))
    if abs(float(chunk[peak])) > 1.0:
        raise AudioInputError(
            f"float audio must lie in [-1, 1], sample {peak} is {float(chunk[peak])}; "
            "it is not clipped implicitly (scale or clip it yourself)")
    return np.array(chunk, dtype=np.float32, copy=True)


def resample(chunk: np.ndarray, from_rate: int, to_rate: int, quality: str = "HQ") -> np.ndarray:
    """One-shot resampling of a whole clip with soxr, for callers who ask for it explicitly.

    Returns float32 clipped to [-1, 1] (band-limiting can overshoot slightly past full scale, which
    check_chunk would otherwise refuse). For audio that arrives in pieces use `Resampler`:
    resampling each piece on its own adds edge artefacts at every boundary.
    """
    if from_rate <= 0 or to_rate <= 0:
        raise AudioInputError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    x = check_chunk(chunk, from_rate, from_rate)
    if x.size == 0 or from_rate == to_rate:
        return x
    return np.clip(soxr.resample(x, from_rate, to_rate, quality=quality), -1.0, 1.0).astype(np.float32)


class Resampler:
    """Streaming resampler (soxr.ResampleStream): output does not depend on how input is chunked,
    up to the resampler's own delay. Call `flush()` at the end of the stream for the tail."""

    def __init__(self, from_rate: int, to_rate: int, quality: str = "HQ"):
        if from_rate <= 0 or to_rate <= 0:
            raise AudioInputError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        self.from_rate, self.to_rate = from_rate, to_rate
        self._stream = soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality=quality)

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        x = check_chunk(chunk, self.from_rate, self.from_rate)
        return self._finish(self._stream.resample_chunk(x, last=False))

    def flush(self) -> np.ndarray:
        return self._finish(self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))

    @staticmethod
    def _finish(y: np.ndarray) -> np.ndarray:
        return np.clip(y, -1.0, 1.0).astype(np.float32, copy=False)
