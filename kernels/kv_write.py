"""q/k RMSNorm over the full model width, fused with writing k and v into the KV ring.

The norm is the release's: x * rsqrt(mean(x^2) + eps) in fp32, cast to the activation dtype, then
times the weight. k is stored un-roped (RoPE is applied when attention reads it).
"""
from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return normed * weight.to(x.dtype)


def qk_norm_kv_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                               k_ring: torch.Tensor, v_ring: torch.Tensor,
                               write_slots: torch.Tensor) -> torch.Tensor:
    """q, k, v: [B, Fq*T, dim]; rings [B, S*T, H, D]; write_slots [B, Fq] (slot of each block frame).

    Writes RMSNorm(k) and v into the ring slots; returns RMSNorm(q) as [B, Fq*T, H, D].
    """
    B, Lq, dim = q.shape
    _, ST, H, D = k_ring.shape
    Fq = write_slots.shape[1]
    T = Lq // Fq
    kn = rms_norm_reference(k, k_weight, eps).view(B, Fq, T, H, D)
    vv = v.view(B, Fq, T, H, D)
    kr = k_ring.view(B, ST // T, T, H, D)
    vr = v_ring.view(B, ST // T, T, H, D)
    for b in range(B):
        kr[b, write_slots[b].long()] = kn[b].to(k_ring.dtype)
        vr[b, write_slots[b].long()] = vv[b].to(v_ring.dtype)
    return rms_norm_reference(q, q_weight, eps).view(B, Lq, H, D)
