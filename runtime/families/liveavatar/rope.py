"""3-D rotary position embedding of Wan2.2-S2V, with positions that are data, not table rows.

Each token has a (frame, height, width) index. head_dim is split (frame, height, width) =
(d - 4*(d//6), 2*(d//6), 2*(d//6)); each part rotates adjacent pairs (real, imag) by
index * theta^(-2j/part). Negative frame indices (motion frames) rotate the other way, which is what
upstream's `freqs[...].conj()` does. Angles are computed from the indices in float64, so there is no
table to run off the end of (upstream's has 45000 rows) and any stream length works.

Upstream places tokens with `rope_precompute` (wan/modules/s2v/s2v_utils.py): a group of tokens covering
a (f, h, w) grid gets `np.linspace(start, start + extent - 1, count).astype(int)` along each axis, so a
downsampled grid (FramePack's 2x and 4x buckets) spreads its few tokens over the full-resolution range.
`sampled_axis` is that rule, with numpy itself so the truncation matches bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtime.transfer import to_device


def sampled_axis(start: int, stop: int, count: int) -> np.ndarray:
    """`count` integer indices from start to stop inclusive, as upstream: linspace then truncate."""
    return np.linspace(start, stop, count).astype(np.int64)


@dataclass(frozen=True)
class Positions:
    """RoPE indices of a token sequence, one (frame, height, width) per token, in token order."""

    frame: np.ndarray
    height: np.ndarray
    width: np.ndarray

    def __len__(self) -> int:
        return len(self.frame)

    @staticmethod
    def grid(frames, heights, widths) -> Positions:
        """Tokens of a (f, h, w) grid in raster order (frame slowest), as Conv3d output is flattened."""
        f, h, w = np.meshgrid(np.asarray(frames), np.asarray(heights), np.asarray(widths), indexing="ij")
        return Positions(f.ravel().astype(np.int64), h.ravel().astype(np.int64), w.ravel().astype(np.int64))

    @staticmethod
    def concat(*parts: Positions) -> Positions:
        return Positions(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("frame", "height", "width")))

    def shift_frames(self, where: np.ndarray, offset: int) -> Positions:
        """Move the temporal index of the tokens selected by `where` by `offset` (the rolling sink)."""
        return Positions(np.where(where, self.frame + offset, self.frame), self.height, self.width)


def _inverse_frequencies(part_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / torch.pow(theta, torch.arange(0, part_dim, 2, dtype=torch.float64) / part_dim)


def rope_angles(pos: Positions, split: tuple[int, int, int], theta: float) -> torch.Tensor:
    """[L, head_dim / 2] rotation angles in float64: frame part, then height part, then width part."""
    parts = []
    for index, part_dim in zip((pos.frame, pos.height, pos.width), split):
        idx = torch.from_numpy(np.ascontiguousarray(index)).to(torch.float64)
        parts.append(torch.outer(idx, _inverse_frequencies(part_dim, theta)))
    return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class Rope:
    """cos / sin of the angles of one token sequence, fp32, [L, head_dim / 2], on the model's device."""

    cos: torch.Tensor
    sin: torch.Tensor

    @staticmethod
    def of(pos: Positions, split: tuple[int, int, int], theta: float, device) -> Rope:
        angles = rope_angles(pos, split, theta)
        # pinned, non-blocking: a pageable upload would make the host wait for the stream every forward
        device = torch.device(device)
        return Rope(to_device(torch.cos(angles).float(), device), to_device(torch.sin(angles).float(), device))


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, L, heads, head_dim] in fp32; returns x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = rope.cos[:, None], rope.sin[:, None]  # broadcast over heads
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
