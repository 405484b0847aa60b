"""Triton LayerNorm + modulate and gated residual vs the fp32 references (avatar_kernels/norm_modulate.py).

CPU runs use Triton's interpreter (TRITON_INTERPRET=1: tests/triton_kernels.py). Output
buffers are poisoned with NaN first. The modulation is passed as strided views of one
[B, F, 6, dim] tensor, as the model slices it.

Tolerances (|kernel - reference| <= atol + rtol * |reference|), both sides fp32 math rounded once:
fp32 1e-5; fp16 rtol 1e-3 (one unit in the last place); bf16 rtol 1e-2 (one unit, 2^-7, with
margin: Triton's interpreter truncates fp32 -> bf16 where torch rounds to nearest). atol 1e-5 (fp32)
or 1e-3 covers results that cancel to near zero.
"""
from __future__ import annotations

import pytest
import torch

from avatar_kernels.norm_modulate import (
    gated_residual_reference,
    gated_residual_triton,
    layernorm_modulate_reference,
    layernorm_modulate_triton,
)
from tests.triton_kernels import DEVICE

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-3, 1e-2)}
EPS = 1e-6


def make_inputs(B, F, T, dim, dtype, mod_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(B, F * T, dim, generator=g) + 1).to(dtype)     # non-zero mean, non-unit scale
    y = torch.randn(B, F * T, dim, generator=g).to(dtype)
    mod = torch.randn(B, F, 6, dim, generator=g).to(mod_dtype)
    x, y, mod = x.to(DEVICE), y.to(DEVICE), mod.to(DEVICE)
    shift, scale, gate = mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]       # strided views, as the model slices
    return x, y, shift, scale, gate


CASES = [  # (B, F, T, dim, dtype, modulation dtype)
    (2, 2, 15, 48, torch.float32, torch.float32),    # odd frames, width not a power of two
    (1, 3, 6, 64, torch.bfloat16, torch.float32),    # bf16 activations, fp32 modulation (the model's case)
    (2, 1, 7, 40, torch.float16, torch.float16),
]


@pytest.mark.parametrize("B,F,T,dim,dtype,mod_dtype", CASES)
def test_layernorm_modulate_matches_reference(B, F, T, dim, dtype, mod_dtype):
    x, _, shift, scale, _ = make_inputs(B, F, T, dim, dtype, mod_dtype, seed=1)
    out = torch.full_like(x, float("nan"))
    result = layernorm_modulate_triton(x, shift, scale, T, EPS, out=out)
    assert result.data_ptr() == out.data_ptr()
    atol, rtol = TOL[dtype]
    expected = layernorm_modulate_reference(x, shift, scale, T, EPS)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("B,F,T,dim,dtype,mod_dtype", CASES)
def test_gated_residual_matches_reference(B, F, T, dim, dtype, mod_dtype):
    x, y, _, _, gate = make_inputs(B, F, T, dim, dtype, mod_dtype, seed=2)
    expected = gated_residual_reference(x, y, gate, T)
    out = torch.full_like(x, float("nan"))
    gated_residual_triton(x, y, gate, T, out=out)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    in_place = x.clone()
    gated_residual_triton(in_place, y, gate, T, out=in_place)          # the residual updated in place
    torch.testing.assert_close(in_place, expected, atol=atol, rtol=rtol)


def test_bad_inputs_raise_clear_errors():
    x, y, shift, scale, gate = make_inputs(1, 2, 5, 32, torch.float32, torch.float32, seed=3)
    with pytest.raises(ValueError, match="whole number of frames"):
        layernorm_modulate_triton(x, shift, scale, 4, EPS)
    with pytest.raises(ValueError, match="shift"):
        layernorm_modulate_triton(x, shift[:, :1], scale, 5, EPS)
    scale_strided = torch.zeros(1, 2, 64, device=DEVICE)[..., ::2]            # last-dim stride 2
    with pytest.raises(ValueError, match="contiguous"):
        layernorm_modulate_triton(x, shift, scale_strided, 5, EPS)
    with pytest.raises(TypeError, match="x must have dtype"):
        gated_residual_triton(x.double(), y, gate, 5)
    with pytest.raises(ValueError, match="y must have shape"):
        gated_residual_triton(x, y[:, :5], gate, 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_real_shape():
    x, y, shift, scale, gate = make_inputs(1, 3, 1024, 1536, torch.bfloat16, torch.float32, seed=4)
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(layernorm_modulate_triton(x, shift, scale, 1024, EPS),
                               layernorm_modulate_reference(x, shift, scale, 1024, EPS), atol=atol, rtol=rtol)
    torch.testing.assert_close(gated_residual_triton(x, y, gate, 1024),
                               gated_residual_reference(x, y, gate, 1024), atol=atol, rtol=rtol)
