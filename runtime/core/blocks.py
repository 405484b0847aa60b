"""The one block type of every family, and the checks every block passes before it leaves."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class VideoBlock:
    index: int                # block index in the stream
    frames: np.ndarray        # uint8 [N, H, W, 3], a copy owned by the caller
    first_frame: int          # stream index of its first video frame
    pts: float                # time of its first frame, seconds
    audio: np.ndarray         # float32 mono samples these frames cover (silence padding included after flush)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def frames_uint8(video: torch.Tensor) -> np.ndarray:
    """Decoded video [B, 3, N, H, W] in [-1, 1] -> batch row 0 as a uint8 [N, H, W, 3] host copy."""
    frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def check_finite(t: torch.Tensor, what: str, block: int) -> None:
    """A block whose output holds NaN or Inf fails (its session), never reaching the caller as frames."""
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"block {block}: the {what} are not finite (NaN or Inf)")
