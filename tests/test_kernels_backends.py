"""Backend selection by capability (never by name), the sdpa/flash-attn window attention, dispatch.

Tolerances as in test_kernels_window_attention.py: fp32 1e-5, bf16 4e-2 (sdpa rounds the rotated
q and k to bf16 before its own bf16 attention).
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from avatar_kernels import backends
from avatar_kernels.backends import (
    available_backends,
    flash_attn_supported,
    select_backend,
    triton_supported,
    window_attention,
    window_attention_sdpa,
)
from avatar_kernels.kv_write import qk_norm_kv_write_reference
from avatar_kernels.norm_modulate import gated_residual_reference, layernorm_modulate_reference
from avatar_kernels.rope import rotate_spatial
from avatar_kernels.window_attention import INVALID_POS, window_attention_reference

X = INVALID_POS
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRID = (3, 5)


def attention_inputs(dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, D, T = 2, 2, 32, 15
    slot_pos = torch.tensor([[0, 1, 3002, 3000, X, 3001], [2, X, 0, 1, X, 3]], dtype=torch.int32)
    q_pos = torch.tensor([[3001, 3002], [2, 3]], dtype=torch.int32)
    q = torch.randn(B, 2 * T, H, D, generator=g).to(dtype)
    k = torch.randn(B, 6 * T, H, D, generator=g).to(dtype)
    v = torch.randn(B, 6 * T, H, D, generator=g).to(dtype)
    return [t.to(device) for t in (q, k, v, slot_pos, q_pos)]


def test_capability_rules():
    assert triton_supported("cuda", (9, 0), interpret=False)
    assert triton_supported("cuda", (8, 0), interpret=False)
    assert not triton_supported("cuda", (7, 5), interpret=False)
    assert not triton_supported("cuda", None, interpret=False)          # ROCm or no device
    assert triton_supported("cpu", None, interpret=True)
    assert not triton_supported("cpu", None, interpret=False)
    assert not triton_supported("cuda", (9, 0), interpret=False, have_triton=False)
    assert not triton_supported("mps", None, interpret=True)
    assert flash_attn_supported("cuda", (9, 0), importable=True)
    assert not flash_attn_supported("cuda", (9, 0), importable=False)
    assert not flash_attn_supported("cuda", (7, 0), importable=True)
    assert not flash_attn_supported("cpu", None, importable=True)


def test_cpu_auto_is_sdpa_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="avatar_kernels.backends"):
        assert select_backend("cpu") == "sdpa"
    assert "'sdpa'" in caplog.text and "cpu" in caplog.text
    names = available_backends("cpu")
    assert names[:2] == ["reference", "sdpa"] and "flash_attn" not in names


def test_cpu_triton_only_in_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ("triton" in available_backends("cpu")) == backends.triton_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in available_backends("cpu")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        select_backend("cpu", "triton")


def test_unknown_and_unavailable_requests_raise():
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend("cpu", "cudnn")
    with pytest.raises(ValueError, match="flash_attn"):
        select_backend("cpu", "flash_attn")


@pytest.mark.parametrize("capability,expected", [((9, 0), "triton"), ((8, 6), "triton"), ((7, 5), "sdpa")])
def test_cuda_auto_follows_capability(monkeypatch, capability, expected):
    """No GPU needed: the capability query is replaced; the choice must follow it, not a name."""
    if not backends.triton_available() and expected == "triton":
        pytest.skip("triton is not installed")
    monkeypatch.setattr(backends, "_cuda_capability", lambda device: capability)
    assert select_backend(torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 4e-2)])
def test_sdpa_matches_reference(dtype, tol):
    q, k, v, slot_pos, q_pos = attention_inputs(dtype, seed=1)
    out = window_attention_sdpa(q, k, v, slot_pos, q_pos, *GRID)
    expected = window_attention_reference(q.float(), k.float(), v.float(), slot_pos, q_pos, *GRID)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_dispatch_every_available_backend_agrees():
    """Every backend, on un-roped keys and on spatially roped keys (the ring the Triton KV write
    stores), gives the reference's result on un-roped keys."""
    q, k, v, slot_pos, q_pos = attention_inputs(seed=2)
    expected = window_attention_reference(q, k, v, slot_pos, q_pos, *GRID)
    k_spatial = rotate_spatial(k, *GRID)
    for name in available_backends(DEVICE):
        if name == "flash_attn":
            continue                              # fp16/bf16 only: covered by the GPU test below
        if name == "sdpa_ring":
            continue                              # reads fully roped keys: tests/test_kernels_sdpa_ring.py
        if name != "triton":
            out = window_attention(q, k, v, slot_pos, q_pos, *GRID, backend=name)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"backend {name}")
        out = window_attention(q, k_spatial, v, slot_pos, q_pos, *GRID, spatial_roped_keys=True, backend=name)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5, msg=f"backend {name}, roped keys")


def test_triton_dispatch_refuses_unroped_keys():
    if "triton" not in available_backends(DEVICE):
        pytest.skip("triton is not available here")
    q, k, v, slot_pos, q_pos = attention_inputs(seed=5)
    with pytest.raises(ValueError, match="spatial_roped_keys"):
        window_attention(q, k, v, slot_pos, q_pos, *GRID, backend="triton")


def test_norm_ops_dispatch_to_reference_on_sdpa():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 10, 8, generator=g), torch.randn(1, 10, 8, generator=g)
    mod = torch.randn(1, 2, 8, generator=g)
    assert torch.equal(backends.layernorm_modulate(x, mod, mod, 5, 1e-6, backend="sdpa"),
                       layernorm_modulate_reference(x, mod, mod, 5, 1e-6))
    assert torch.equal(backends.gated_residual(x, y, mod, 5, backend="sdpa"),
                       gated_residual_reference(x, y, mod, 5))
    q, kk, vv = (torch.randn(1, 10, 8, generator=g) for _ in range(3))
    w = torch.ones(8)
    rings = [torch.zeros(1, 15, 2, 4) for _ in range(4)]
    slots = torch.tensor([[2, 0]], dtype=torch.int32)
    a = backends.qk_norm_kv_write(q, kk, vv, w, w, 1e-6, rings[0], rings[1], slots, backend="sdpa")
    b = qk_norm_kv_write_reference(q, kk, vv, w, w, 1e-6, rings[2], rings[3], slots)
    assert torch.equal(a, b) and torch.equal(rings[0], rings[2]) and torch.equal(rings[1], rings[3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_flash_attn_matches_reference():
    if "flash_attn" not in available_backends("cuda"):
        pytest.skip("flash_attn is not importable on this machine")
    q, k, v, slot_pos, q_pos = attention_inputs(torch.bfloat16, seed=4)
    expected = window_attention_reference(q.float(), k.float(), v.float(), slot_pos, q_pos, *GRID)
    for roped in (False, True):
        keys = rotate_spatial(k, *GRID).to(k.dtype) if roped else k
        out = window_attention(q, keys, v, slot_pos, q_pos, *GRID, spatial_roped_keys=roped, backend="flash_attn")
        torch.testing.assert_close(out.float(), expected, atol=4e-2, rtol=4e-2)
