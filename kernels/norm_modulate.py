"""LayerNorm (no affine) fused with per-frame shift/scale modulation, and the gated residual add.

Modulation vectors are per latent frame ([B, F, dim]) and broadcast over the frame's T tokens;
the math is fp32 and the result is cast back to the activation dtype.
"""
from __future__ import annotations

import torch


def _per_token(m: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    return m.float().repeat_interleave(tokens_per_frame, dim=1)


def layernorm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                 tokens_per_frame: int, eps: float) -> torch.Tensor:
    """x [B, F*T, dim]; shift, scale [B, F, dim] -> LN(x) * (1 + scale) + shift."""
    xn = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    out = xn * (1 + _per_token(scale, tokens_per_frame)) + _per_token(shift, tokens_per_frame)
    return out.to(x.dtype)


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                             tokens_per_frame: int) -> torch.Tensor:
    """x + y * gate, gate [B, F, dim] per frame; fp32 math, x.dtype result."""
    return (x.float() + y.float() * _per_token(gate, tokens_per_frame)).to(x.dtype)
