"""Self-attention q, k, v as one GEMM over the concatenated [3*dim, dim] weight.

q, k and v are three projections of the same normalised tokens. One product over the stacked weight
reads the input once instead of three times, launches one GEMM with three times the columns (better
tensor-core occupancy at the same FLOPs) and, under FP8, quantises the activation once instead of
three times (runtime/models/fp8.py). The outputs are column views of the one [..., 3*dim] result
(last dim contiguous, rows strided by 3*dim); the kernels and eager code downstream take that.

Checkpoints keep q, k, v as separate linears (strict loading sees the release's keys); `fuse_qkv`
runs after loading, swapping `attn.q`, `attn.k`, `attn.v` for one `attn.qkv`. Models call
`project_qkv(attn, x)`, which takes either form, so one model code serves fused and unfused.
Numerics: in fp32/bf16 each output column is the same dot product as before, computed by a GEMM of
another width (equal up to the summation order the GEMM picks for that width).
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

# the attention modules whose q/k/v see one input: each block's self-attention (cross-attention's
# and the audio injector's k/v read another input than their q)
QKV_OF_SELF_ATTENTION = re.compile(r"blocks\.\d+\.self_attn")


class FusedQKV(nn.Module):
    """One projection `proj` (an nn.Linear or Fp8Linear of the stacked weight) split into q, k, v."""

    def __init__(self, proj: nn.Module, widths: tuple[int, int, int]):
        super().__init__()
        self.proj, self.widths = proj, tuple(widths)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(x).split(self.widths, dim=-1)


def concat_linears(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear whose output is the outputs of `linears` side by side (same input width)."""
    first = linears[0]
    if any(lin.in_features != first.in_features for lin in linears):
        raise ValueError(f"cannot stack linears of input widths {[lin.in_features for lin in linears]}")
    has_bias = {lin.bias is not None for lin in linears}
    if len(has_bias) != 1:
        raise ValueError("cannot stack linears where only some have a bias")
    w = first.weight
    out = nn.Linear(first.in_features, sum(lin.out_features for lin in linears), bias=has_bias.pop(),
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return out.requires_grad_(first.weight.requires_grad)


def fuse_qkv(attn: nn.Module, wrap: Callable[[nn.Linear], nn.Module] = lambda linear: linear) -> FusedQKV:
    """Replace attn.q, attn.k, attn.v (nn.Linear) by attn.qkv = FusedQKV(wrap(stacked linear)), in place."""
    linears = (attn.q, attn.k, attn.v)
    if not all(isinstance(lin, nn.Linear) for lin in linears):
        raise TypeError(f"fuse_qkv needs nn.Linear q, k, v, got {[type(lin).__name__ for lin in linears]}")
    fused = FusedQKV(wrap(concat_linears(*linears)), tuple(lin.out_features for lin in linears))
    del attn.q, attn.k, attn.v
    attn.qkv = fused
    return fused


def fuse_model_qkv(model: nn.Module, select: re.Pattern = QKV_OF_SELF_ATTENTION) -> list[str]:
    """`fuse_qkv` on every module whose qualified name fully matches `select` (unquantized: one
    GEMM in the model's dtype). Returns the fused modules' names."""
    names = [n for n, _ in model.named_modules() if select.fullmatch(n)]
    for name in names:
        fuse_qkv(model.get_submodule(name))
    return names


def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) of x: one GEMM when `attn` has been fused, else its three linears."""
    fused = getattr(attn, "qkv", None)
    if fused is not None:
        return fused(x)
    return attn.q(x), attn.k(x), attn.v(x)
