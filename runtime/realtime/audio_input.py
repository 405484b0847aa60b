"""Checks on audio pushed into a session, done at the push so a bad chunk fails its caller at once."""
from __future__ import annotations

import numpy as np

from ..audio import AudioInputError, check_chunk


def decode_pcm(pcm, sample_rate: int, channels: int = 1) -> np.ndarray:
    """PCM16 bytes, or a 1-D int16 / float32 array, -> validated float32 mono at `sample_rate`.

    `channels > 1` means interleaved samples (L R L R ...), averaged into mono: the one conversion done
    here, and only when asked for. Rate checks are the caller's (`check_rate`).
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise AudioInputError(f"channels must be a positive integer, got {channels!r}")
    samples = _as_array(pcm)
    if samples.ndim != 1:
        raise AudioInputError(f"audio must be 1-D, got shape {samples.shape}; pass multi-channel audio "
                              "interleaved (L R L R ...) as 1-D with channels=N to downmix it")
    mono = check_chunk(samples, sample_rate, sample_rate)  # dtype, finite, [-1, 1]; a float32 copy
    if channels == 1:
        return mono
    if len(mono) % channels:
        raise AudioInputError(f"{len(mono)} interleaved samples are not a whole number of {channels}-channel "
                              "frames")
    return mono.reshape(-1, channels).mean(axis=1, dtype=np.float32)


def check_rate(sample_rate, engine_rate: int, resample: bool, segment_rate: int | None) -> None:
    """Another rate needs resample=True; one segment keeps one rate (it has one resampler stream)."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioInputError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if sample_rate != engine_rate and not resample:
        raise AudioInputError(f"audio sample rate is {sample_rate} Hz but the engine runs at {engine_rate} Hz; "
                              "audio is not resampled implicitly: create the session with resample=True")
    if segment_rate is not None and sample_rate != segment_rate:
        raise AudioInputError(f"sample rate changed within a segment ({segment_rate} -> {sample_rate} Hz); "
                              "call end_of_segment() before switching rates")


def _as_array(pcm) -> np.ndarray:
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        data = bytes(pcm)
        if len(data) % 2:
            raise AudioInputError(f"PCM16 bytes must have an even length, got {len(data)} bytes")
        return np.frombuffer(data, dtype="<i2").astype(np.int16)
    if not isinstance(pcm, np.ndarray):
        raise AudioInputError(f"audio must be PCM16 bytes or a numpy array, got {type(pcm).__name__}")
    return pcm
