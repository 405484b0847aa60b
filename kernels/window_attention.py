"""Block-causal attention of the current block over a session's KV ring, RoPE applied at read time.

Ring layout (one layer): k_ring / v_ring are [B, S * T, H, D]: S slots of one latent frame each,
T tokens per frame in (row, col) order. Keys are stored un-roped. `slot_pos[b, s]` is the RoPE frame
position of slot s (INVALID_POS for a slot that holds nothing yet); `q_pos[b, f]` that of query
frame f. Queries and keys are both rotated here (3-D RoPE, see kernels/rope.py), so the sink frames'
position shift is a change of `slot_pos`, never a rewrite of the cache. Every valid slot is visible
to every query (bidirectional within the block; the caller decides which frames the ring holds).
"""
from __future__ import annotations

import torch

from .rope import apply_rope, rope_angles

INVALID_POS = -(2 ** 31)


def window_attention_reference(q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                               slot_pos: torch.Tensor, q_pos: torch.Tensor, grid_h: int, grid_w: int,
                               theta: float = 10000.0, scale: float | None = None) -> torch.Tensor:
    """fp32 reference. q [B, Fq*T, H, D]; returns [B, Fq*T, H, D] in q.dtype."""
    B, Lq, H, D = q.shape
    T = grid_h * grid_w
    S = slot_pos.shape[1]
    assert k_ring.shape == v_ring.shape == (B, S * T, H, D), (k_ring.shape, (B, S * T, H, D))
    assert Lq == q_pos.shape[1] * T
    valid = slot_pos != INVALID_POS                                                   # [B, S]
    safe_pos = torch.where(valid, slot_pos, torch.zeros_like(slot_pos))
    qr = apply_rope(q, rope_angles(q_pos, grid_h, grid_w, D, theta))
    kr = apply_rope(k_ring, rope_angles(safe_pos, grid_h, grid_w, D, theta))
    scale = D ** -0.5 if scale is None else scale
    logits = torch.einsum("bqhd,bkhd->bhqk", qr, kr) * scale
    key_valid = valid.repeat_interleave(T, dim=1)                                     # [B, S*T]
    logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(dim=-1), v_ring.float())
    return out.to(q.dtype)
