"""3-D rotary position embedding (frame / height / width), fp32 reference.

Layout: head_dim is split into (frame, height, width) parts (44/42/42 for head_dim 128, as Wan);
each part holds adjacent (real, imag) pairs, so pair p of a head rotates channels 2p and 2p+1.
Pair p < F/2 turns with the frame position, the next H/2 pairs with the token's row in the
latent grid, the last W/2 pairs with its column.

The frame part is the only one that depends on where a frame sits in time; the height/width parts
depend only on a token's place inside its frame. `rotate_spatial` applies just those (frame part =
identity) and `frame_only` keeps just the frame part of some angles: a key rotated by its spatial part
when it is written, then by its frame part when it is read, gets exactly the full rotation, and the
sink shift (a new frame position) never rewrites it.

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


_device_tables: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}


def _device_table(key: tuple, device: torch.device, build):
    """Built once per key on `device` and kept for the Triton kernels. Warm up before CUDA-graph
    capture (Triton compiles at the first launch anyway): building one during capture is an error."""
    key = (*key, torch.device(device))
    if key not in _device_tables:
        if key[-1].type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"RoPE table {key[:-1]} first needed during CUDA-graph capture; run one "
                               "warm-up call before capturing")
        _device_tables[key] = build()
    return _device_tables[key]


def device_inv_freqs(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """`inv_freqs` computed on `device` itself: the kernels' angles pos * inv_freq are then
    bit-identical to the reference's."""
    return _device_table(("inv_freq", head_dim, float(theta)), device,
                         lambda: inv_freqs(head_dim, theta, device=device).contiguous())


def device_spatial_cos_sin(grid_h: int, grid_w: int, head_dim: int, theta: float,
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, D/2] fp32 of every token's height/width angles (frame pairs: angle 0), as
    `rotate_spatial` uses them. Bounded by the frame's token count, not by any position."""
    def build():
        angles = rope_angles(torch.zeros(1, 1, device=device), grid_h, grid_w, head_dim, theta)[0]
        return torch.cos(angles).contiguous(), torch.sin(angles).contiguous()
    return _device_table(("spatial", grid_h, grid_w, head_dim, float(theta)), device, build)


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


def frame_only(angles: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`angles` [..., D/2] with the height/width pairs zeroed (rotation by the frame part only)."""
    nf = rope_split(head_dim)[0] // 2
    keep = torch.arange(angles.shape[-1], device=angles.device) < nf
    return angles * keep


def rotate_spatial(x: torch.Tensor, grid_h: int, grid_w: int, theta: float = 10000.0) -> torch.Tensor:
    """x [B, F*T, H, D] (whole frames of T = grid_h*grid_w tokens) rotated by the height/width part
    of RoPE only; the frame pairs are untouched (angle 0). Returns fp32."""
    T = grid_h * grid_w
    if x.shape[1] % T:
        raise ValueError(f"rotate_spatial: {x.shape[1]} tokens are not whole frames of {T}")
    zero_pos = torch.zeros(1, x.shape[1] // T, device=x.device)
    return apply_rope(x, rope_angles(zero_pos, grid_h, grid_w, x.shape[-1], theta))
