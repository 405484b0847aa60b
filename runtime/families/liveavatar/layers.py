"""Building blocks of the Wan2.2-S2V trunk, named so the state dict is the release's.

Parameter-free norms (norm1, norm2, the head's norm, the audio LayerNorms) are functions here, not
modules: the release has no tensors for them, so modules would only add names that must not exist.
Precision follows upstream (wan/modules/model.py, liveavatar/models/wan/causal_model_s2v.py): norms are
computed in fp32, q/k RMSNorm in fp32 then cast before the weight, matmuls in the model dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...models.qkv import project_qkv


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm over the last dim computed in fp32; returns fp32 (callers cast where upstream does)."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, Lq, H, D] over k/v [B, Lk, H, D] -> [B, Lq, H, D].

    key_mask: [Lk] bool, False for keys no query may see (empty KV-ring slots: static shapes).
    """
    mask = None if key_mask is None else key_mask.view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class RMSNorm(nn.Module):
    """WanRMSNorm: normalise in fp32, cast back, then scale by the (model-dtype) weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class Attention(nn.Module):
    """q/k/v/o with q/k RMSNorm over the full width before the head split (self, cross and audio alike)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-roped keys and values [B, L, H, D] (what a cache stores for the condition tokens)."""
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        return k, self.v(x).unflatten(-1, (self.num_heads, -1))

    def query_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`query(x)` and `key_value(x)` of one input: one GEMM once q/k/v are fused (runtime/models/qkv.py)."""
        q, k, v = project_qkv(self, x)
        H = self.num_heads
        return self.norm_q(q).unflatten(-1, (H, -1)), self.norm_k(k).unflatten(-1, (H, -1)), v.unflatten(-1, (H, -1))

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        return self.o(attn.flatten(2))

    def cross(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of x's queries over precomputed k/v (text or audio context): no RoPE."""
        return self.output(attend(self.query(x), k, v))


class Block(nn.Module):
    """WanS2VAttentionBlock's parameters: modulation, self_attn, norm3 (affine), cross_attn, ffn."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        self.self_attn = Attention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, num_heads, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))


class Head(nn.Module):
    """Head_S2V: modulation (1, 2, dim) + the time embedding gives shift/scale, then a linear to patches."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)
        self.head = nn.Linear(dim, out_features)


class AdaLayerNorm(nn.Module):
    """diffusers AdaLayerNorm(output_dim=2*dim, chunk_dim=1): LN(x) * (1 + scale) + shift, shift first."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x [N, L, dim] modulated by temb [N, dim]; returns x's dtype."""
        shift, scale = self.linear(F.silu(temb)).float().chunk(2, dim=-1)
        return (layer_norm(x, self.eps) * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)
