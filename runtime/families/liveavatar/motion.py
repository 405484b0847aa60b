"""FramePack motioner (`frame_packer`) and the RoPE placement of the condition tokens.

Source: liveavatar/models/wan/causal_motioner.py (FramePackMotioner; Wan2.2's motioner.py is the same
module) and the ref grid of causal_model_s2v.py. The motion history is the last 19 latent frames,
zero-padded in front when shorter, split from the oldest into buckets of 16, 2 and 1 frames:
  newest 1  -> proj    Conv3d k=(1,2,2): full resolution          frame index -1
  next 2    -> proj_2x Conv3d k=(2,4,4): 1 frame at 1/2 res       frame index -3
  oldest 16 -> proj_4x Conv3d k=(4,8,8): 4 frames at 1/4 res      frame indices -19, -14, -9, -4
Tokens are concatenated newest bucket first. A downsampled bucket's tokens are spread over the
full-resolution height/width range (see rope.sampled_axis). The reference frame sits at frame index
30 (`ref_rope_frame`), the noisy block at 0..F-1 plus its offset in the stream.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import LiveAvatarConfig
from .rope import Positions, sampled_axis


def _flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # [B, C, f, h, w] -> [B, f*h*w, C]


class FramePackMotioner(nn.Module):
    """`frame_packer`: three Conv3d projections of the motion history (add_last_motion = 2: all used)."""

    def __init__(self, cfg: LiveAvatarConfig):
        super().__init__()
        _, ph, pw = cfg.patch_size
        c, d = cfg.latent_channels, cfg.dim
        k1, k2, k4 = ((s, ph * s, pw * s) for s in cfg.motion_scales)
        self.proj = nn.Conv3d(c, d, kernel_size=k1, stride=k1)
        self.proj_2x = nn.Conv3d(c, d, kernel_size=k2, stride=k2)
        self.proj_4x = nn.Conv3d(c, d, kernel_size=k4, stride=k4)
        self.buckets = cfg.motion_buckets

    def history(self, motion_latents: torch.Tensor) -> torch.Tensor:
        """The last sum(buckets) frames of [B, C, T, h, w], zeros in front when T is shorter."""
        need = sum(self.buckets)
        B, C, T, h, w = motion_latents.shape
        padded = motion_latents.new_zeros(B, C, need, h, w)
        keep = min(need, T)
        if keep:
            padded[:, :, need - keep:] = motion_latents[:, :, T - keep:]
        return padded

    def forward(self, motion_latents: torch.Tensor) -> torch.Tensor:
        """motion_latents [B, C, T, h, w] -> tokens [B, L_motion, dim] (newest bucket first)."""
        newest, middle, oldest = self.buckets
        far, mid, near = self.history(motion_latents).split([oldest, middle, newest], dim=2)
        parts = (self.proj(near), self.proj_2x(mid), self.proj_4x(far))
        return torch.cat([_flatten_tokens(p) for p in parts], dim=1)


def motion_positions(cfg: LiveAvatarConfig, token_hw: tuple[int, int]) -> Positions:
    """RoPE indices of the motion tokens for a full-resolution token grid (H, W)."""
    H, W = token_hw
    parts, covered = [], 0
    for size, scale in zip(cfg.motion_buckets, cfg.motion_scales):
        covered += size  # this bucket spans frame indices -covered .. -(covered - size + 1)
        frames = -sampled_axis(covered, covered - size + 1, size // scale)
        parts.append(Positions.grid(frames, sampled_axis(0, H - 1, H // scale), sampled_axis(0, W - 1, W // scale)))
    return Positions.concat(*parts)


def reference_positions(cfg: LiveAvatarConfig, token_hw: tuple[int, int]) -> Positions:
    H, W = token_hw
    return Positions.grid([cfg.ref_rope_frame], np.arange(H), np.arange(W))


def noisy_positions(first_frame: int, num_frames: int, token_hw: tuple[int, int]) -> Positions:
    H, W = token_hw
    return Positions.grid(np.arange(first_frame, first_frame + num_frames), np.arange(H), np.arange(W))


def check_motion_grid(cfg: LiveAvatarConfig, latent_hw: tuple[int, int]) -> None:
    """The 4x bucket's kernel must tile the latent exactly (upstream would silently drop a border)."""
    _, ph, pw = cfg.patch_size
    step_h, step_w = ph * max(cfg.motion_scales), pw * max(cfg.motion_scales)
    h, w = latent_hw
    if h % step_h or w % step_w:
        raise ValueError(f"latent {h}x{w} must be a multiple of {step_h}x{step_w} for the FramePack motioner")
