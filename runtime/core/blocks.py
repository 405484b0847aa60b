"""The one block type of every family, and the checks every block passes before it leaves."""
from __future__ import annotations

import dataclasses
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


def cut_to_frames(block: VideoBlock, end_frame: int, samples_per_frame: int) -> VideoBlock:
    """`block` without its frames from stream frame `end_frame` on, and without their audio."""
    keep = end_frame - block.first_frame
    if keep >= block.num_frames:
        return block
    if keep < 1:
        raise ValueError(f"block {block.index} starts at frame {block.first_frame}, at or after frame {end_frame}")
    return dataclasses.replace(block, frames=block.frames[:keep].copy(),
                               audio=block.audio[:keep * samples_per_frame].copy())


def frames_uint8_device(video: torch.Tensor) -> torch.Tensor:
    """Decoded video [B, 3, N, H, W] in [-1, 1] -> batch row 0 as uint8 [N, H, W, 3], on its device."""
    frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0)


def frames_uint8(video: torch.Tensor) -> np.ndarray:
    """frames_uint8_device as a host copy (the copy waits for the decode: postprocess only)."""
    return frames_uint8_device(video).cpu().numpy()


def check_finite(t: torch.Tensor, what: str, block: int) -> None:
    """A block whose output holds NaN or Inf fails (its session), never reaching the caller as frames."""
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"block {block}: the {what} are not finite (NaN or Inf)")
