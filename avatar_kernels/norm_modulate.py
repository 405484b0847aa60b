"""LayerNorm (no affine) fused with per-frame shift/scale modulation, and the gated residual add.

Modulation vectors are per latent frame ([B, F, dim]) and broadcast over the frame's T tokens;
the math is fp32 and the result is cast back to the activation dtype.
"""
from __future__ import annotations

import torch

from ._triton_util import (
    FLOAT_DTYPES,
    FP_FUSION,
    check_dtype,
    check_last_dim_contiguous,
    check_launchable,
    check_same_device,
    check_shape,
    compiled,
    next_pow2,
    row_warps,
    tl,
)


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


# --------------------------------------------------------------------------------------------------
# Triton kernels: one program per token row (the full model width). The token's latent frame
# f = t // tokens_per_frame selects its row of the [B, F, dim] modulation, read in place (the
# modulation is usually a strided view of a [B, F, 6, dim] tensor); nothing is broadcast in memory.
# --------------------------------------------------------------------------------------------------
def _layernorm_modulate_kernel(
        x_ptr, shift_ptr, scale_ptr, out_ptr,
        stride_xb, stride_xl, stride_sb, stride_sf, stride_cb, stride_cf, stride_ob, stride_ol,
        L, T, eps,
        DIM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    i = row % L
    f = i // T
    c = tl.arange(0, BLOCK)
    c_ok = c < DIM
    x = tl.load(x_ptr + b * stride_xb + i * stride_xl + c, mask=c_ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / DIM
    centred = tl.where(c_ok, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, 0) / DIM + eps)   # biased variance, as F.layer_norm
    shift = tl.load(shift_ptr + b * stride_sb + f * stride_sf + c, mask=c_ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_cb + f * stride_cf + c, mask=c_ok, other=0.0).to(tl.float32)
    y = centred * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + b * stride_ob + i * stride_ol + c, y.to(out_ptr.dtype.element_ty), mask=c_ok)


def _gated_residual_kernel(
        x_ptr, y_ptr, gate_ptr, out_ptr,
        stride_xb, stride_xl, stride_yb, stride_yl, stride_gb, stride_gf, stride_ob, stride_ol,
        L, T,
        DIM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    i = row % L
    f = i // T
    c = tl.arange(0, BLOCK)
    c_ok = c < DIM
    x = tl.load(x_ptr + b * stride_xb + i * stride_xl + c, mask=c_ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + i * stride_yl + c, mask=c_ok, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * stride_gb + f * stride_gf + c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + i * stride_ol + c, (x + y * gate).to(out_ptr.dtype.element_ty),
             mask=c_ok)


def _check_rows(op: str, x: torch.Tensor, tokens_per_frame: int, **per_frame: torch.Tensor) -> int:
    """Checks x [B, F*T, dim] and every [B, F, dim] modulation; returns F."""
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, F*T, dim], got shape {tuple(x.shape)}")
    B, L, dim = x.shape
    if tokens_per_frame < 1 or L % tokens_per_frame:
        raise ValueError(f"{op}: {L} tokens are not a whole number of frames of {tokens_per_frame} tokens")
    F = L // tokens_per_frame
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_last_dim_contiguous(op, "x", x)
    for name, m in per_frame.items():
        check_shape(op, name, m, (B, F, dim))
        check_dtype(op, name, m, FLOAT_DTYPES)
        check_last_dim_contiguous(op, name, m)
    return F


def _prepare_out(op: str, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    check_shape(op, "out", out, tuple(x.shape))
    if out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{op}: out must be {x.dtype} on {x.device}, got {out.dtype} on {out.device}")
    check_last_dim_contiguous(op, "out", out)
    return out


def layernorm_modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                              tokens_per_frame: int, eps: float, *,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `layernorm_modulate_reference`: LN(x) * (1 + scale) + shift, fp32 math.

    x [B, F*T, dim] (bf16, fp16 or fp32); shift, scale [B, F, dim] in any float dtype and any
    strides with a contiguous last dim. `out` (x's shape and dtype) receives the result if given.
    """
    op = "layernorm_modulate_triton"
    _check_rows(op, x, tokens_per_frame, shift=shift, scale=scale)
    device = check_same_device(op, x=x, shift=shift, scale=scale)
    check_launchable(op, device)
    out = _prepare_out(op, x, out)
    B, L, dim = x.shape
    block = next_pow2(dim)
    compiled(_layernorm_modulate_kernel)[(B * L,)](
        x, shift, scale, out,
        x.stride(0), x.stride(1), shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
        out.stride(0), out.stride(1),
        L, tokens_per_frame, float(eps),
        DIM=dim, BLOCK=block, num_warps=row_warps(block), enable_fp_fusion=FP_FUSION)
    return out


def gated_residual_triton(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, tokens_per_frame: int,
                          *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `gated_residual_reference`: x + y * gate, fp32 math, x's dtype.

    y has x's shape (any float dtype); gate is [B, F, dim]. `out=x` updates the residual in place
    (each element is read before it is written, by the same thread).
    """
    op = "gated_residual_triton"
    _check_rows(op, x, tokens_per_frame, gate=gate)
    check_shape(op, "y", y, tuple(x.shape))
    check_dtype(op, "y", y, FLOAT_DTYPES)
    check_last_dim_contiguous(op, "y", y)
    device = check_same_device(op, x=x, y=y, gate=gate)
    check_launchable(op, device)
    out = _prepare_out(op, x, out)
    B, L, dim = x.shape
    block = next_pow2(dim)
    compiled(_gated_residual_kernel)[(B * L,)](
        x, y, gate, out,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0), gate.stride(1),
        out.stride(0), out.stride(1),
        L, tokens_per_frame,
        DIM=dim, BLOCK=block, num_warps=row_warps(block), enable_fp_fusion=FP_FUSION)
    return out
