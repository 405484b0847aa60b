"""Pixel and sample formats integrators hand to WebRTC / LiveKit: I420 video and PCM16 audio."""
from __future__ import annotations

import numpy as np

# BT.601 limited range (16..235 luma, 16..240 chroma): what libyuv's RGB24ToI420 and swscale's default
# RGB -> yuv420p use, so frames converted here look the same as frames the integrator converts itself.
_TO_Y = np.array([65.481, 128.553, 24.966], np.float32) / 255
_TO_U = np.array([-37.797, -74.203, 112.0], np.float32) / 255
_TO_V = np.array([112.0, -93.786, -18.214], np.float32) / 255


def rgb_to_i420(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] (H, W even) -> I420 / yuv420p as uint8 [H * 3 // 2, W].

    The rows are the Y plane, then U and V (each [H/2, W/2], stored back to back), which is the
    layout of PyAV's `yuv420p` ndarray and, flattened (`.tobytes()`), LiveKit's `VideoBufferType.I420`.
    Chroma is the mean of each 2x2 pixel square.
    """
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        raise ValueError(f"rgb_to_i420 takes uint8 [H, W, 3], got {getattr(rgb, 'dtype', type(rgb))} "
                         f"{getattr(rgb, 'shape', '')}")
    h, w, _ = rgb.shape
    if h % 2 or w % 2:
        raise ValueError(f"I420 needs even frame dimensions, got {w}x{h} (WxH)")
    x = rgb.astype(np.float32)
    y = 16 + x @ _TO_Y
    quad = x.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    u, v = 128 + quad @ _TO_U, 128 + quad @ _TO_V
    planes = [_to_uint8(p).reshape(-1) for p in (y, u, v)]
    return np.concatenate(planes).reshape(h * 3 // 2, w)


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16. Scale 32768 inverts check_chunk's int16 -> float, so int16 pushed
    into a session comes back bit-identical; +1.0 (not representable) clips to 32767."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


def _to_uint8(plane: np.ndarray) -> np.ndarray:
    return np.clip(np.round(plane), 0, 255).astype(np.uint8)
