"""Triton q/k RMSNorm + KV ring write vs the fp32 reference (avatar_kernels/kv_write.py).

CPU runs use Triton's interpreter (TRITON_INTERPRET=1: tests/triton_kernels.py).
Slots being written are poisoned with NaN first and the q output buffer too, so anything left
unwritten fails; every other slot of the ring must come back bit for bit. Each case runs with keys
stored un-roped and with their height/width rotation (`rope_grid`, the layout the Triton attention
reads).

Tolerances (|kernel - reference| <= atol + rtol * |reference|, k per rotation pair in norm): fp32 1e-5; fp16 rtol 2e-3 (two
units in the last place: the fp32 sum of squares is accumulated in another order, so the normalised
value can round the other way before the product with the weight rounds again); bf16 rtol 2.4e-2
(three units: the same, plus Triton's interpreter truncating fp32 -> bf16 at both roundings where
the GPU and torch round to nearest; observed up to 2.5 units on the CPU); a spatially roped key is
rounded once more (after its rotation), so it gets one unit more. v is copied, so it must match
exactly in every dtype.
"""
from __future__ import annotations

import pytest
import torch

from avatar_kernels.kv_write import qk_norm_kv_write_reference, qk_norm_kv_write_triton
from tests.triton_kernels import DEVICE

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-5, 2.4e-2)}
ULP = {torch.float32: 0.0, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
EPS = 1e-6


def make_inputs(B, Fq, T, H, D, S, dtype, ring_dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    dim = H * D
    q, k, v = (torch.randn(B, Fq * T, dim, generator=g).to(dtype) for _ in range(3))
    q_w, k_w = (1 + 0.5 * torch.randn(dim, generator=g) for _ in range(2))        # fp32 weights
    k_ring = torch.randn(B, S * T, H, D, generator=g).to(ring_dtype)
    v_ring = torch.randn(B, S * T, H, D, generator=g).to(ring_dtype)
    return [t.to(device) for t in (q, k, v, q_w, k_w, k_ring, v_ring)]


def slot_rows(write_slots, T):
    """Per batch row, the ring rows (an index tensor) of the slots being written."""
    return [torch.cat([torch.arange(s * T, (s + 1) * T) for s in row]).to(DEVICE)
            for row in write_slots.tolist()]


def assert_close_pairs(actual, expected, atol, rtol):
    """Closeness of each rotation pair (2 adjacent channels) in Euclidean norm: a rotation keeps a
    pair's norm, so a few-ulp error of the un-rotated pair stays a few ulp of the pair's norm, though
    one rotated channel alone may be tiny (cancellation) and carry a large relative error."""
    a, e = (t.float().unflatten(-1, (-1, 2)) for t in (actual, expected))
    err = (a - e).norm(dim=-1)
    bound = atol + rtol * e.norm(dim=-1)
    assert bool((err <= bound).all()), f"pair error {(err - bound).max().item():.3g} over the bound"


def run_and_check(B, Fq, T, H, D, S, write_slots, dtype, ring_dtype=None, seed=0, rope_grid=None):
    ring_dtype = ring_dtype or dtype
    q, k, v, q_w, k_w, k_ring, v_ring = make_inputs(B, Fq, T, H, D, S, dtype, ring_dtype, seed)
    slots = write_slots.to(DEVICE)
    k_ref, v_ref = k_ring.clone(), v_ring.clone()
    q_expected = qk_norm_kv_write_reference(q, k, v, q_w, k_w, EPS, k_ref, v_ref, slots, rope_grid=rope_grid)
    rows = slot_rows(write_slots, T)
    for b in range(B):                                   # poison what the kernel must write
        k_ring[b, rows[b]] = float("nan")
        v_ring[b, rows[b]] = float("nan")
    before_k, before_v = k_ring.clone(), v_ring.clone()
    out = torch.full((B, Fq * T, H, D), float("nan"), dtype=dtype, device=DEVICE)

    result = qk_norm_kv_write_triton(q, k, v, q_w, k_w, EPS, k_ring, v_ring, slots, rope_grid=rope_grid,
                                     out=out)

    assert result.data_ptr() == out.data_ptr()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, q_expected, atol=atol, rtol=rtol)
    for b in range(B):
        untouched = torch.ones(S * T, dtype=torch.bool, device=DEVICE)
        untouched[rows[b]] = False
        assert torch.equal(k_ring[b, untouched], before_k[b, untouched]), "k written outside its slots"
        assert torch.equal(v_ring[b, untouched], before_v[b, untouched]), "v written outside its slots"
        # a rotated key is rounded once more than an un-roped one: one more ulp (bf16/fp16 only)
        k_rtol = rtol + (ULP[dtype] if rope_grid is not None else 0.0)
        assert_close_pairs(k_ring[b, rows[b]], k_ref[b, rows[b]], atol, k_rtol)
        assert torch.equal(v_ring[b, rows[b]], v_ref[b, rows[b]]), "v must be copied exactly"


ROPE = pytest.mark.parametrize("roped", [False, True], ids=["unroped", "spatial_rope"])


@ROPE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_and_touches_only_its_slots(dtype, roped):
    # T = 15 tokens per frame (grid 3x5), width 48 (not a power of two), slots out of order
    write_slots = torch.tensor([[3, 1], [0, 4]], dtype=torch.int32)
    run_and_check(B=2, Fq=2, T=15, H=3, D=16, S=5, write_slots=write_slots, dtype=dtype, seed=1,
                  rope_grid=(3, 5) if roped else None)


@ROPE
def test_ring_dtype_differs_and_int64_slots(roped):
    write_slots = torch.tensor([[5, 0, 2]], dtype=torch.int64)
    run_and_check(B=1, Fq=3, T=6, H=2, D=32, S=6, write_slots=write_slots, dtype=torch.bfloat16,
                  ring_dtype=torch.float32, seed=2, rope_grid=(2, 3) if roped else None)


def test_spatial_rope_changes_keys_but_not_q_or_v():
    """The rope_grid ring differs from the un-roped one in k only (so the flag is really applied)."""
    write_slots = torch.tensor([[1, 0]], dtype=torch.int32)
    q, k, v, q_w, k_w, k_ring, v_ring = make_inputs(1, 2, 6, 2, 32, 3, torch.float32, torch.float32, 5)
    plain = [t.clone() for t in (k_ring, v_ring)]
    roped = [t.clone() for t in (k_ring, v_ring)]
    q_plain = qk_norm_kv_write_triton(q, k, v, q_w, k_w, EPS, *plain, write_slots.to(DEVICE))
    q_roped = qk_norm_kv_write_triton(q, k, v, q_w, k_w, EPS, *roped, write_slots.to(DEVICE), rope_grid=(2, 3))
    assert torch.equal(q_plain, q_roped) and torch.equal(plain[1], roped[1])
    assert not torch.allclose(plain[0], roped[0], atol=1e-3)


def test_bad_inputs_raise_clear_errors():
    cpu = torch.device("cpu")
    q, k, v, q_w, k_w, k_ring, v_ring = make_inputs(1, 2, 6, 2, 16, 4, torch.float32, torch.float32, 3, cpu)
    ok = torch.tensor([[1, 2]], dtype=torch.int32)
    if DEVICE.type == "cpu":       # slot values are only inspected when they already live on the host
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            qk_norm_kv_write_triton(q, k, v, q_w, k_w, EPS, k_ring, v_ring, torch.tensor([[1, 4]]).int())
        with pytest.raises(ValueError, match="twice"):
            qk_norm_kv_write_triton(q, k, v, q_w, k_w, EPS, k_ring, v_ring, torch.tensor([[2, 2]]).int())
    with pytest.raises(ValueError, match="whole number"):
        qk_norm_kv_write_triton(q, k, v, q_w, k_w, EPS, k_ring, v_ring, torch.tensor([[0, 1, 2, 3, 0]]).int())
    with pytest.raises(ValueError, match="k_ring"):
        qk_norm_kv_write_triton(q, k, v, q_w, k_w, EPS, k_ring[:, :, :1], v_ring, ok)
    with pytest.raises(TypeError, match="write_slots"):
        qk_norm_kv_write_triton(q, k, v, q_w, k_w, EPS, k_ring, v_ring, ok.float())
    with pytest.raises(ValueError, match="rope_grid"):
        qk_norm_kv_write_triton(q, k, v, q_w, k_w, EPS, k_ring, v_ring, ok, rope_grid=(2, 2))
    with pytest.raises(TypeError, match="k dtype"):
        qk_norm_kv_write_triton(q, k.half(), v, q_w, k_w, EPS, k_ring, v_ring, ok)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_real_shape():
    # 3 frames x 1024 tokens, width 1536 = 12 x 128, 15 slots; the block lands in rolling slots 12..14
    write_slots = torch.tensor([[12, 13, 14]], dtype=torch.int32)
    run_and_check(B=1, Fq=3, T=1024, H=12, D=128, S=15, write_slots=write_slots, dtype=torch.bfloat16, seed=4,
                  rope_grid=(32, 32))
