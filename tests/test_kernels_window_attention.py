"""Triton window attention vs the fp32 reference (avatar_kernels/window_attention.py).

On a machine without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, see tests/triton_kernels.py;
Triton reads it when a kernel is first built). Shapes are tiny there.
The `gpu` tests repeat the comparison at the real shape (Lq 3072, 15 slots x 1024 tokens, 12 x 128).

The kernel reads keys that carry their height/width rotation (the layout the Triton KV write stores,
`avatar_kernels.rope.rotate_spatial`); the reference is given the same ring with `spatial_roped_keys=True`,
and `test_spatially_roped_ring_is_the_unroped_ring` ties that layout to un-roped keys.

Tolerances (max |kernel - reference| <= atol + rtol * |reference|), reference in fp32 on the same
(rounded) inputs:
- fp32: 1e-5. Everything stays fp32 (MMA in IEEE fp32); angles are bit-identical to the reference.
- fp16: 3e-3. Rotated q/k and the probabilities are rounded to fp16 (11-bit mantissa) for the MMA.
- bf16: 4e-2. Same with an 8-bit mantissa; Triton's interpreter also truncates fp32 -> bf16 instead of
  rounding to nearest, which roughly doubles the error seen on the CPU (observed max ~1.2e-2).
"""
from __future__ import annotations

import pytest
import torch

from avatar_kernels.rope import rotate_spatial
from avatar_kernels.window_attention import (
    INVALID_POS,
    AttentionConfig,
    window_attention_reference,
    window_attention_triton,
)
from tests.triton_kernels import DEVICE

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 4e-2}
X = INVALID_POS


def case_inputs(name, dtype, seed, heads=None):
    c = CASES[name]
    return make_inputs(c["B"], heads or c["H"], c["D"], c["grid"], c["slot_pos"], c["q_pos"], dtype, seed)


def make_inputs(B, H, D, grid, slot_pos, q_pos, dtype, seed):
    """Random q and rings (keys spatially roped, as stored); empty slots of the kernel's ring are
    poisoned with NaN (never to be read), the reference gets zeros there (it multiplies them by a zero
    weight)."""
    g = torch.Generator().manual_seed(seed)
    T = grid[0] * grid[1]
    slot_pos = torch.tensor(slot_pos, dtype=torch.int32)
    q_pos = torch.tensor(q_pos, dtype=torch.int32)
    S, Fq = slot_pos.shape[1], q_pos.shape[1]
    q = torch.randn(B, Fq * T, H, D, generator=g).to(dtype)
    k = rotate_spatial(torch.randn(B, S * T, H, D, generator=g).to(dtype), *grid).to(dtype)
    v = torch.randn(B, S * T, H, D, generator=g).to(dtype)
    empty = (slot_pos == INVALID_POS).repeat_interleave(T, dim=1)[:, :, None, None]
    k_ref, v_ref = k.masked_fill(empty, 0.0), v.masked_fill(empty, 0.0)
    k_nan, v_nan = k.masked_fill(empty, float("nan")), v.masked_fill(empty, float("nan"))
    dev = [t.to(DEVICE) for t in (q, k_nan, v_nan, slot_pos, q_pos)]
    ref = [t.to(DEVICE) for t in (q, k_ref, v_ref, slot_pos, q_pos)]
    return dev, ref


def reference(q, k, v, slot_pos, q_pos, grid, **kw):
    return window_attention_reference(q.float(), k.float(), v.float(), slot_pos, q_pos, *grid,
                                      spatial_roped_keys=True, **kw)


def check(out, ref_inputs, grid, dtype):
    expected = reference(*ref_inputs, grid)
    assert out.dtype == dtype and out.shape == ref_inputs[0].shape
    assert torch.isfinite(out).all(), "unwritten or NaN-contaminated outputs"
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


# Slots out of temporal order (ring wrap-around), empty slots, positions far beyond 1024 frames.
CASES = {
    # grid 3x5: T = 15 (odd, below one key tile); Lq = 30 is not a multiple of the query tile
    "T15_wrap_far": {"B": 2, "H": 2, "D": 32, "grid": (3, 5),
                     "slot_pos": [[0, 1, 5003, 5001, X, 5002], [4, X, 0, 1, 2, 3]],
                     "q_pos": [[5002, 5003], [3, 4]]},
    # T = 20 spans two key tiles, the second partial; head_dim 48 is not a power of two
    "T20_D48": {"B": 1, "H": 2, "D": 48, "grid": (4, 5), "slot_pos": [[7, X, 5, 6]], "q_pos": [[7]]},
    # T = 6, three query frames, head_dim 64, rolling positions with a negative one
    "T6_D64": {"B": 1, "H": 1, "D": 64, "grid": (2, 3), "slot_pos": [[2, -1, 0, X, 1]], "q_pos": [[0, 1, 2]]},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_matches_reference(name):
    c = CASES[name]
    dev, ref = case_inputs(name, torch.float32, seed=1)
    out = window_attention_triton(*dev, *c["grid"])
    check(out, ref, c["grid"], torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference(dtype):
    c = CASES["T15_wrap_far"]
    dev, ref = case_inputs("T15_wrap_far", dtype, seed=2)
    check(window_attention_triton(*dev, *c["grid"]), ref, c["grid"], dtype)


def test_every_output_written_and_scale_used():
    """out= filled with NaN first: any element the kernel skips stays NaN and fails."""
    c = CASES["T15_wrap_far"]
    dev, ref = case_inputs("T15_wrap_far", torch.float32, seed=3)
    out = torch.full_like(dev[0], float("nan"))
    result = window_attention_triton(*dev, *c["grid"], scale=0.3, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = reference(*ref, c["grid"], scale=0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_strided_query_view_and_explicit_config():
    """q as a head-sliced view (non-contiguous rows) and a non-default tile shape."""
    c = CASES["T20_D48"]
    dev, ref = case_inputs("T20_D48", torch.float32, seed=4, heads=4)
    q, k, v, slot_pos, q_pos = dev
    sl = slice(1, 3)
    cfg = AttentionConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    out = window_attention_triton(q[:, :, sl], k[:, :, sl], v[:, :, sl], slot_pos, q_pos, *c["grid"],
                                  config=cfg)
    qr, kr, vr, _, _ = ref
    expected = reference(qr[:, :, sl], kr[:, :, sl], vr[:, :, sl], slot_pos, q_pos, c["grid"])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_spatially_roped_ring_is_the_unroped_ring(name):
    """The split rotation (height/width at write time, frame at read time) is the full rotation:
    the reference over un-roped keys equals it over the same keys spatially roped."""
    c = CASES[name]
    g = torch.Generator().manual_seed(7)
    T, S, Fq = c["grid"][0] * c["grid"][1], len(c["slot_pos"][0]), len(c["q_pos"][0])
    q = torch.randn(c["B"], Fq * T, c["H"], c["D"], generator=g)
    k, v = (torch.randn(c["B"], S * T, c["H"], c["D"], generator=g) for _ in range(2))
    slot_pos, q_pos = (torch.tensor(c[n], dtype=torch.int32) for n in ("slot_pos", "q_pos"))
    plain = window_attention_reference(q, k, v, slot_pos, q_pos, *c["grid"])
    split = window_attention_reference(q, rotate_spatial(k, *c["grid"]), v, slot_pos, q_pos, *c["grid"],
                                       spatial_roped_keys=True)
    torch.testing.assert_close(split, plain, atol=2e-5, rtol=1e-5)
    # and the layouts are not interchangeable (the flag matters)
    assert not torch.allclose(window_attention_reference(q, k, v, slot_pos, q_pos, *c["grid"],
                                                         spatial_roped_keys=True), plain, atol=1e-3)


def test_bad_inputs_raise_clear_errors():
    c = CASES["T6_D64"]
    dev, _ = case_inputs("T6_D64", torch.float32, seed=5)
    q, k, v, slot_pos, q_pos = dev
    with pytest.raises(TypeError, match="slot_pos"):
        window_attention_triton(q, k, v, slot_pos.long(), q_pos, *c["grid"])
    with pytest.raises(ValueError, match="k_ring"):
        window_attention_triton(q, k[:, :-1], v, slot_pos, q_pos, *c["grid"])
    with pytest.raises(ValueError, match="q_pos"):
        window_attention_triton(q, k, v, slot_pos, q_pos[:, :2], *c["grid"])
    with pytest.raises(TypeError, match="v_ring"):
        window_attention_triton(q, k, v.half(), slot_pos, q_pos, *c["grid"])
    v_strided = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], device=v.device)[..., ::2]
    v_strided.copy_(v)
    with pytest.raises(ValueError, match="contiguous"):
        window_attention_triton(q, k, v_strided, slot_pos, q_pos, *c["grid"])
    with pytest.raises(ValueError, match="power of two"):
        AttentionConfig(block_m=48, block_n=16, num_warps=4, num_stages=2)


# ------------------------------------------------------------------- v2 paths: TMA / pointers, splits
# Far positions (past 1e5, where fp32 angles are coarse: the table must use the reference's own
# cos/sin), a ring that wraps, an empty slot in the middle, T = 20 over key tiles of 16 (a partial
# last tile in every slot), Lq = 40 over query tiles of 16.
V2_CASE = {"B": 1, "H": 2, "D": 32, "grid": (4, 5),
           "slot_pos": [[123457, X, 123454, 123455, 123456]], "q_pos": [[123456, 123457]]}


def v2_inputs(dtype, seed, slot_pos=None):
    c = V2_CASE
    return make_inputs(c["B"], c["H"], c["D"], c["grid"], slot_pos or c["slot_pos"], c["q_pos"], dtype, seed)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_v2_loads_and_splits_match_reference(tma, splits):
    """Every (load path, split) pair: split 3 cuts the 8 (slot, tile) iterations mid-slot,
    8 leaves shares with no work (one dummy iteration each, reset)."""
    dev, ref = v2_inputs(torch.float32, seed=11)
    cfg = AttentionConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, splits=splits, tma=tma)
    out = torch.full_like(dev[0], float("nan"))
    window_attention_triton(*dev, *V2_CASE["grid"], out=out, config=cfg)
    check(out, ref, V2_CASE["grid"], torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_v2_half_precision_with_split(dtype):
    dev, ref = v2_inputs(dtype, seed=12)
    cfg = AttentionConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, splits=3)
    check(window_attention_triton(*dev, *V2_CASE["grid"], config=cfg), ref, V2_CASE["grid"], dtype)


@pytest.mark.parametrize("splits", [1, 3])
def test_v2_rows_without_a_valid_slot_are_nan(splits):
    """A batch row whose ring is empty gets NaN (softmax over nothing, like the reference) and does
    not disturb the other row; its NaN-poisoned ring is never read into the other row."""
    slot_pos = [[X, X, X], [5, X, 4]]
    dev, ref = make_inputs(2, 1, 32, (2, 3), slot_pos, [[5], [5]], torch.float32, seed=13)
    cfg = AttentionConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, splits=splits)
    out = window_attention_triton(*dev, 2, 3, config=cfg)
    expected = reference(*ref, (2, 3))
    assert torch.isnan(expected[0]).all() and torch.isnan(out[0]).all()
    torch.testing.assert_close(out[1], expected[1], atol=1e-5, rtol=1e-5)


def test_slot_tables_list_valid_slots_first():
    """order: valid slots in slot order then S; the frame tables are the identity past the count."""
    from avatar_kernels.window_attention import _slot_tables
    slot_pos = torch.tensor([[7, X, 5, X, 6]], dtype=torch.int32, device=DEVICE)
    q_pos = torch.tensor([[7, 8]], dtype=torch.int32, device=DEVICE)
    order, count, fcos, fsin = _slot_tables(slot_pos, q_pos, 32, 1e4, 6)
    assert order.tolist() == [[0, 2, 4, 5, 5]] and count.tolist() == [3]
    assert (fcos[:, :, 3:] == 1).all() and (fsin[:, :, 3:] == 0).all()
    # frame pair 0 has inverse frequency 1: the angle of (q frame 8, slot 2 at position 5) is 3
    torch.testing.assert_close(fcos[0, 1, 1, 0], torch.tensor(3.0).cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(fsin[0, 1, 1, 0], torch.tensor(3.0).sin(), atol=1e-6, rtol=0)


def test_split_plan_fills_132_sms():
    """The wave arithmetic of the real shape (12 heads, Lq = 3 T, 128-row tiles, one CTA per SM):
    512x512 is 288 query tiles (3 waves at 72.7 %), split 3 gives 864 CTAs in 7 waves (93.5 %);
    480x832 is 444 (4 waves, 84.1 %), split 2 gives 888 in 7 waves (96.1 %)."""
    from avatar_kernels.window_attention import plan_splits, wave_efficiency
    assert wave_efficiency(288, 132) == pytest.approx(288 / 396)
    assert plan_splits(288, 132) == 3 and wave_efficiency(864, 132) == pytest.approx(864 / 924)
    assert plan_splits(444, 132) == 2 and wave_efficiency(888, 132) == pytest.approx(888 / 924)
    assert plan_splits(1320, 132) == 1                      # already whole waves: no split
    with pytest.raises(ValueError, match="splits"):
        AttentionConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, splits=9)


# ---------------------------------------------------------------------------------------------- GPU
def _real_shape_inputs(slot_pos, seed, grid=(32, 32)):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, H, D, T, S = 1, 12, 128, grid[0] * grid[1], 15
    q = torch.randn(B, 3 * T, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(B, S * T, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k = rotate_spatial(k, *grid).to(torch.bfloat16)
    v = torch.randn(B, S * T, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    sp = torch.tensor([slot_pos], dtype=torch.int32, device="cuda")
    qp = torch.tensor([[0, 1, 2]], dtype=torch.int32, device="cuda")
    return q, k, v, sp, qp


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("slot_pos", [
    # block 10, absolute mode: 9 sink frames keep positions -30..-22, the rolling slots wrap around
    [-30, -29, -28, -27, -26, -25, -24, -23, -22, 0, 1, 2, -3, -2, -1],
    # block 1: the ring is not full yet (empty slots)
    [-3, -2, -1, 0, 1, 2, X, X, X, X, X, X, X, X, X],
])
@pytest.mark.parametrize("grid", [(32, 32), (30, 52)], ids=["512x512", "480x832"])
def test_gpu_real_shape_matches_reference(slot_pos, grid):
    q, k, v, sp, qp = _real_shape_inputs(slot_pos, seed=0, grid=grid)
    out = window_attention_triton(q, k, v, sp, qp, *grid)
    expected = reference(q, k, v, sp, qp, grid)
    torch.testing.assert_close(out.float(), expected, atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


def test_misaligned_ring_falls_back_to_pointer_loads():
    """TMA needs 16-byte aligned strides: fp16 with H * D = 3 * 6 (36-byte rows) gets no descriptor
    (pointer loads) and still matches the reference; an aligned ring gets one."""
    from avatar_kernels.window_attention import _INTERPRETER_CONFIG, _kv_descriptor
    dev, ref = make_inputs(1, 3, 6, (2, 3), [[1, X, 0]], [[1]], torch.float16, seed=14)
    assert _kv_descriptor(dev[1], 3, 6, _INTERPRETER_CONFIG, 8) is None
    check(window_attention_triton(*dev, 2, 3), ref, (2, 3), torch.float16)
    aligned, _ = make_inputs(1, 2, 32, (2, 3), [[1, X, 0]], [[1]], torch.float16, seed=14)
    assert _kv_descriptor(aligned[1], 3, 6, _INTERPRETER_CONFIG, 32) is not None
