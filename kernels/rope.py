"""3-D rotary position embedding (frame / height / width), fp32 reference.

Layout: head_dim is split into (frame, height, width) parts (44/42/42 for head_dim 128, as Wan);
each part holds adjacent (real, imag) pairs, so pair p of a head rotates channels 2p and 2p+1.
Pair p < F/2 turns with the frame position, the next H/2 pairs with the token's row in the
latent grid, the last W/2 pairs with its column.

Angles are position * inv_freq in fp32 with inv_freq = theta ** (-2k / part): no lookup table, so
there is no length cap. Callers keep positions small by passing them relative to the current block
(rotations are relative, so a common offset on queries and keys changes nothing but rounding).
The Triton attention kernel computes exactly these angles in-kernel.
"""
from __future__ import annotations

import math

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def inv_freqs(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[head_dim // 2] fp32: the inverse frequency of every rotation pair, frame part first."""
    parts = []
    for part in rope_split(head_dim):
        k = torch.arange(0, part, 2, dtype=torch.float32, device=device)
        parts.append(torch.exp2(-(k / part) * math.log2(theta)))
    return torch.cat(parts)


def rope_angles(frame_pos: torch.Tensor, grid_h: int, grid_w: int, head_dim: int,
                theta: float = 10000.0) -> torch.Tensor:
    """Angles for every token of the given frames.

    frame_pos: [..., F] (any int or float dtype): the RoPE position of each frame.
    Returns [..., F * grid_h * grid_w, head_dim // 2] fp32, tokens in (frame, row, col) order.
    """
    nf, nh, _ = (p // 2 for p in rope_split(head_dim))
    freqs = inv_freqs(head_dim, theta, device=frame_pos.device)
    tokens = grid_h * grid_w
    t = torch.arange(tokens, device=frame_pos.device)
    row = (t // grid_w).to(torch.float32)
    col = (t % grid_w).to(torch.float32)
    fpos = frame_pos.to(torch.float32)
    lead = fpos.shape
    f_ang = fpos[..., :, None, None] * freqs[:nf]                                   # [..., F, 1, nf]
    f_ang = f_ang.expand(*lead, tokens, nf)
    h_ang = (row[:, None] * freqs[nf:nf + nh]).expand(*lead, tokens, nh)
    w_ang = (col[:, None] * freqs[nf + nh:]).expand(*lead, tokens, freqs.numel() - nf - nh)
    ang = torch.cat([f_ang, h_ang, w_ang], dim=-1)                                    # [..., F, T, D/2]
    return ang.reshape(*lead[:-1], lead[-1] * tokens, freqs.numel())


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by angles [B or 1, L, D/2]; returns fp32 [B, L, H, D]."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos = torch.cos(angles)[:, :, None, :]
    sin = torch.sin(angles)[:, :, None, :]
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
