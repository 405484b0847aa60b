"""The `sdpa_ring` backend: fully roped keys, re-rotated when positions move, read by torch SDPA in place.

- `rerotate_frames_triton` against its fp32 reference under the interpreter (awkward shapes, positions
  past 1e5, in place and from a source copy, skipped entries, untouched channels and slots bit for bit).
- Rounding after many shifts: turning the same bf16 keys in place 200 times drifts; rebuilding them from
  a copy at position 0 (what `follow_positions_` does for the sink) stays at two roundings.
- A simulated stream (session plans of both RoPE modes, sink shifts, ring wrap, empty slots, several
  writes per block): `window_attention_sdpa_ring` over the followed ring equals the reference over the
  un-roped ring, every block.
- The engine with `sdpa_ring` equals the engine with `reference` (tests/test_engine_backends.py's bound).
- Timed selection (avatar_kernels/select.py) with an injected timer: fastest kept, cached, logged.

Tolerances: keys per rotation pair in norm (as tests/test_kernels_kv_write.py): fp32 1e-5, bf16 rtol
3.2e-2 (4 units: Triton's interpreter truncates fp32 -> bf16 where torch rounds). Attention: the
window-attention table of docs/kernels.md (fp32 1e-5, bf16 4e-2).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar_kernels import select
from avatar_kernels.backends import (
    RopedRingState,
    available_backends,
    follow_positions_,
    window_attention_sdpa_ring,
)
from avatar_kernels.kv_write import qk_norm_kv_write_reference, qk_norm_kv_write_triton
from avatar_kernels.rerotate import rerotate_frames_reference, rerotate_frames_triton
from avatar_kernels.rope import apply_rope, rope_angles
from avatar_kernels.window_attention import window_attention_reference
from runtime import Engine
from runtime.config import CacheConfig, EngineConfig
from runtime.session import plan_block
from tests.test_engine_backends import engine_frames
from tests.triton_kernels import DEVICE

KEY_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 3.2e-2)}
ATTN_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


def pair_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|a - e| / (|e| + tiny) per rotation pair in Euclidean norm (a rotation keeps a pair's norm)."""
    a, e = (t.float().unflatten(-1, (-1, 2)) for t in (actual, expected))
    return (a - e).norm(dim=-1) / e.norm(dim=-1).clamp_min(1e-6)


def assert_pairs_close(actual, expected, dtype):
    atol, rtol = KEY_TOL[dtype]
    a, e = (t.float().unflatten(-1, (-1, 2)) for t in (actual, expected))
    err = (a - e).norm(dim=-1)
    bound = atol + rtol * e.norm(dim=-1)
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


# --------------------------------------------------------------------------------------------------
# the re-rotation kernel
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,D", [(7, 3, 40), (20, 2, 64)])
def test_rerotate_in_place_matches_reference(dtype, T, H, D):
    g = torch.Generator().manual_seed(T * D)
    B, S = 2, 5
    ring = torch.randn(B, S * T, H, D, generator=g).to(dtype).to(DEVICE)
    slots = torch.tensor([[0, 3, -1], [4, 1, 2]], dtype=torch.int32, device=DEVICE)
    old = torch.tensor([[5, 100003, 0], [7, 7, -3]], dtype=torch.int32, device=DEVICE)
    new = torch.tensor([[2, 123457, 9], [7, -99999, 250001]], dtype=torch.int32, device=DEVICE)
    expected = rerotate_frames_reference(ring.clone(), slots, old, new, T)
    got = rerotate_frames_triton(ring.clone(), slots, old, new, T)
    assert_pairs_close(got, expected, dtype)
    # in place only the frame channels (the low 2 * frame pairs of each head) may change; slots not
    # named and the entry with delta 0 (row 1, slot 4) stay bit for bit
    frame_ch = D - 4 * (D // 6)
    assert torch.equal(got[..., frame_ch:], ring[..., frame_ch:])
    rows = got.view(B, S, T, H, D)
    before = ring.view(B, S, T, H, D)
    for b, s in [(0, 1), (0, 2), (0, 4), (1, 0), (1, 4)]:
        assert torch.equal(rows[b, s], before[b, s]), (b, s)
    assert not torch.equal(rows[0, 3], before[0, 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rerotate_from_a_source_matches_reference_and_full_rope(dtype):
    g = torch.Generator().manual_seed(3)
    B, S, A, grid, H, D = 2, 4, 2, (3, 5), 3, 48
    T = grid[0] * grid[1]
    keys = torch.randn(B, A * T, H, D, generator=g)                     # un-roped
    src = apply_rope(keys, rope_angles(torch.zeros(B, A), *grid, D)).to(dtype).to(DEVICE)   # spatial only
    dst = torch.full((B, S * T, H, D), float("nan")).to(dtype).to(DEVICE)
    slots = torch.tensor([[3, 0], [1, -1]], dtype=torch.int32, device=DEVICE)
    src_slots = torch.tensor([[1, 0], [0, 1]], dtype=torch.int32, device=DEVICE)
    zero = torch.zeros(B, 2, dtype=torch.int32, device=DEVICE)
    new = torch.tensor([[131072, -7], [100019, 4]], dtype=torch.int32, device=DEVICE)
    expected = rerotate_frames_reference(dst.clone(), slots, zero, new, T, src=src, src_slots=src_slots)
    got = rerotate_frames_triton(dst.clone(), slots, zero, new, T, src=src, src_slots=src_slots)
    written = [(0, 3, 1), (0, 0, 0), (1, 1, 0)]
    for b, s, j in written:
        a = got.view(B, S, T, H, D)[b, s]
        assert_pairs_close(a, expected.view(B, S, T, H, D)[b, s], dtype)
        # the full rotation of the un-roped key at the new position, computed in one go
        full = apply_rope(keys.view(B, A, T, H, D)[b, j][None],
                          rope_angles(new[b, slots[b].tolist().index(s)].cpu().view(1, 1), *grid, D))[0]
        assert_pairs_close(a.cpu(), full, dtype)
    untouched = torch.ones(B, S, dtype=torch.bool)
    for b, s, _ in written:
        untouched[b, s] = False
    assert bool(got.view(B, S, T, H, D)[untouched].isnan().all())


_AOT = """
from benchmarks import sass_report as sr
from avatar_kernels import kv_write, rerotate
ptrs = {"dst_ptr": "*bf16", "src_ptr": "*bf16", "dst_slots_ptr": "*i32", "src_slots_ptr": "*i32",
        "old_ptr": "*i32", "new_ptr": "*i32", "inv_freq_ptr": "*fp32"}
for in_place in (True, False):
    k = sr.compile_for(rerotate._kernel, sr.HOPPER, ptrs, {"H": 12, "D": 128, "N_FRAME": 22,
                       "IN_PLACE": in_place, "BLOCK_R": 32, "BLOCK_D": 128}, num_warps=4)
    r = sr.report("rerotate", k)
    assert r.stack_bytes == 0, r
ptrs = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_ring_ptr", "v_ring_ptr")}
ptrs.update(q_weight_ptr="*fp32", k_weight_ptr="*fp32", slots_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32",
            fcos_ptr="*fp32", fsin_ptr="*fp32")
k = sr.compile_for(kv_write._qk_norm_kv_write_kernel, sr.HOPPER, ptrs, {"DIM": 1536, "HEAD_DIM": 128,
                   "BLOCK": 2048, "ROPE": True, "FRAME": True, "N_FRAME": 22}, num_warps=4)
assert sr.report("kv_write", k).stack_bytes == 0
"""


def test_rerotate_and_fully_roped_kv_write_compile_for_hopper():
    """sm_90 ahead of time with Triton's bundled ptxas, in a fresh process (Triton cannot compile where
    its interpreter ran): no stack (local memory) at the real head layout."""
    pytest.importorskip("triton.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _AOT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]


def test_rerotate_rejects_bad_inputs():
    ring = torch.zeros(1, 12, 2, 16, device=DEVICE)
    slots = torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE)
    pos = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="whole 5-token slots"):
        rerotate_frames_triton(ring, slots, pos, pos, 5)
    with pytest.raises(TypeError, match="old_pos"):
        rerotate_frames_triton(ring, slots, pos.long(), pos, 6)
    with pytest.raises(ValueError, match="new_pos must have shape"):
        rerotate_frames_triton(ring, slots, pos, pos[:, :1], 6)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="twice"):
            rerotate_frames_triton(ring, torch.tensor([[1, 1]], dtype=torch.int32), pos, pos, 6)


def test_many_shifts_drift_in_place_but_not_from_the_copy():
    """200 sink shifts in bf16: in place each turn rounds once more; from the position-0 copy the
    keys are two roundings from the truth however many shifts came before."""
    g = torch.Generator().manual_seed(11)
    B, grid, H, D = 1, (2, 3), 2, 64
    T = grid[0] * grid[1]
    keys = torch.randn(B, T, H, D, generator=g)
    slot = torch.zeros(B, 1, dtype=torch.int32, device=DEVICE)
    zero = torch.zeros(B, 1, dtype=torch.int32, device=DEVICE)
    copy = apply_rope(keys, rope_angles(torch.zeros(B, 1), *grid, D)).to(torch.bfloat16).to(DEVICE)
    in_place = copy.clone()
    from_copy = torch.empty_like(copy)
    pos = 0
    for step in range(200):
        new = pos + 3 + (step % 5)                 # 3..7 frames a shift, ending near 1000
        old_t = torch.full((B, 1), pos, dtype=torch.int32, device=DEVICE)
        new_t = torch.full((B, 1), new, dtype=torch.int32, device=DEVICE)
        rerotate_frames_triton(in_place, slot, old_t, new_t, T)
        rerotate_frames_triton(from_copy, slot, zero, new_t, T, src=copy)
        pos = new
    truth = apply_rope(keys, rope_angles(torch.full((B, 1), pos), *grid, D))
    assert_pairs_close(from_copy.cpu(), truth, torch.bfloat16)
    drift = pair_error(in_place.cpu(), truth).max().item()
    rebuilt = pair_error(from_copy.cpu(), truth).max().item()
    assert drift > 3 * rebuilt, (drift, rebuilt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_roped_kv_write_matches_reference(dtype):
    """qk_norm_kv_write(..., rope_grid=, frame_pos=): Triton against the reference (positions past 1e5,
    a 3x5 grid, slots out of order); unwritten slots (NaN) stay bit for bit; v exact."""
    g = torch.Generator().manual_seed(8)
    B, Fq, grid, H, D, S = 2, 2, (3, 5), 3, 40, 4
    T, dim = grid[0] * grid[1], H * D
    q, k, v = (torch.randn(B, Fq * T, dim, generator=g).to(dtype).to(DEVICE) for _ in range(3))
    q_w, k_w = ((1 + 0.5 * torch.randn(dim, generator=g)).to(DEVICE) for _ in range(2))
    slots = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32, device=DEVICE)
    pos = torch.tensor([[123457, -9], [0, 250001]], dtype=torch.int32, device=DEVICE)
    rings = [torch.full((B, S * T, H, D), float("nan"), dtype=dtype, device=DEVICE) for _ in range(4)]
    want = qk_norm_kv_write_reference(q, k, v, q_w, k_w, 1e-6, rings[0], rings[1], slots, rope_grid=grid,
                                      frame_pos=pos)
    got = qk_norm_kv_write_triton(q, k, v, q_w, k_w, 1e-6, rings[2], rings[3], slots, rope_grid=grid,
                                  frame_pos=pos)
    assert_pairs_close(got, want, dtype)
    written = torch.zeros(B, S, dtype=torch.bool)
    written[0, 3] = written[0, 0] = written[1, 1] = written[1, 2] = True
    kr, kw = (r.view(B, S, T, H, D) for r in (rings[0], rings[2]))
    assert_pairs_close(kw[written], kr[written], dtype)
    assert bool(kw[~written].isnan().all())
    assert torch.equal(rings[3].view(B, S, T, H, D)[written], rings[1].view(B, S, T, H, D)[written])
    with pytest.raises(ValueError, match="needs rope_grid"):
        qk_norm_kv_write_triton(q, k, v, q_w, k_w, 1e-6, rings[2], rings[3], slots, frame_pos=pos)


# --------------------------------------------------------------------------------------------------
# sdpa_ring over a simulated stream
# --------------------------------------------------------------------------------------------------
def _stream(mode: str, dtype: torch.dtype, blocks: int, kv_write, seed: int = 0):
    """Blocks of two sessions (sink 3, window 9, 3 frames a block; wraps from block 3; row 1 a block
    ahead of row 0) with random q/k/v, two writes per block (as the denoising steps); yields (block,
    sdpa_ring output, reference output, ring state)."""
    cache = CacheConfig(block_frames=3, sink_frames=3, window_frames=9, rope_mode=mode)
    B, grid, H, D = 2, (2, 3), 2, 32
    T = grid[0] * grid[1]
    S, F = cache.window_frames, cache.block_frames
    g = torch.Generator().manual_seed(seed)
    ones = torch.ones(H * D, device=DEVICE)
    roped = torch.zeros(1, B, S * T, H, D, dtype=dtype, device=DEVICE)
    plain = torch.zeros(B, S * T, H, D, dtype=dtype, device=DEVICE)
    v_ring = torch.zeros(B, S * T, H, D, dtype=dtype, device=DEVICE)
    state = RopedRingState.allocate(roped, S, cache.sink_frames)
    for b in range(blocks):
        # row r is r blocks ahead: rows of one call sit at different blocks (as rows of a round)
        plans = [plan_block(b + r, cache, 1) for r in range(B)]
        slot_pos, q_pos, write = (torch.cat([getattr(p, n) for p in plans]).to(DEVICE)
                                  for n in ("slot_pos", "q_pos", "write_slots"))
        follow_positions_(roped, state, slot_pos, write, T)
        for _ in range(2):
            q, k, v = (torch.randn(B, F * T, H * D, generator=g).to(dtype).to(DEVICE) for _ in range(3))
            qn = kv_write(q, k, v, ones, ones, 1e-6, roped[0], v_ring, write, rope_grid=grid, frame_pos=q_pos)
            qk_norm_kv_write_reference(q, k, v, ones, ones, 1e-6, plain, v_ring.clone(), write)
            got = window_attention_sdpa_ring(qn, roped[0], v_ring, slot_pos, q_pos, *grid)
            ref = window_attention_reference(qn, plain, v_ring, slot_pos, q_pos, *grid)
            yield b, got, ref, state


@pytest.mark.parametrize("mode", ["absolute", "rolling"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_ring_equals_reference_across_sink_shifts(mode, dtype):
    seen_wrap = False
    for b, got, ref, state in _stream(mode, dtype, blocks=7, kv_write=qk_norm_kv_write_reference):
        tol = ATTN_TOL[dtype]
        err = ((got.float() - ref.float()).abs() - tol * ref.float().abs()).max().item()
        assert err <= tol, (mode, b, err)
        seen_wrap |= b >= 3
    assert seen_wrap and bool(state.anchored.all())


def test_sdpa_ring_with_the_triton_kv_write():
    for b, got, ref, _ in _stream("rolling", torch.float32, blocks=5, kv_write=qk_norm_kv_write_triton, seed=1):
        assert (got - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item()), b


def test_sdpa_ring_masks_empty_slots_and_all_valid_drops_the_mask():
    g = torch.Generator().manual_seed(5)
    B, grid, H, D, S = 1, (2, 2), 2, 16, 4
    T = grid[0] * grid[1]
    keys = torch.randn(B, S * T, H, D, generator=g)
    v = torch.randn(B, S * T, H, D, generator=g)
    q = torch.randn(B, T, H, D, generator=g)
    q_pos = torch.zeros(B, 1, dtype=torch.int32)
    slot_pos = torch.tensor([[-4, 0, -(2 ** 31), -2]], dtype=torch.int32)     # slot 2 empty, wrapped order
    safe = torch.where(slot_pos == -(2 ** 31), 0, slot_pos)
    roped = apply_rope(keys, rope_angles(safe, *grid, D))
    ref = window_attention_reference(q, keys, v, slot_pos, q_pos, *grid)
    got = window_attention_sdpa_ring(q, roped, v, slot_pos, q_pos, *grid)
    assert (got - ref).abs().max().item() <= 1e-5
    full = slot_pos.clone()
    full[0, 2] = 3
    roped = apply_rope(keys, rope_angles(full, *grid, D))
    ref = window_attention_reference(q, keys, v, full, q_pos, *grid)
    got = window_attention_sdpa_ring(q, roped, v, full, q_pos, *grid, all_valid=True)
    assert (got - ref).abs().max().item() <= 1e-5
    with pytest.raises(TypeError, match="dtype"):
        window_attention_sdpa_ring(q, roped.double(), v, full, q_pos, *grid)


def test_sdpa_ring_is_available_on_the_cpu():
    assert "sdpa_ring" in available_backends("cpu")


# --------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["absolute", "rolling"])
def test_engine_with_sdpa_ring_equals_reference_engine(mode):
    ref, _ = engine_frames("reference", mode)
    got, eng = engine_frames("sdpa_ring", mode)
    assert eng.ops.name == "sdpa_ring"
    ring = eng.family.rows.ring
    assert ring.roped is not None and bool(ring.roped.anchored[0].all())
    diff = np.abs(ref.astype(int) - got.astype(int))
    # fp32 everywhere (tests/test_engine_backends.py's bound): summation order and the rotation of keys
    # instead of queries move a few pixels by one grey level
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_a_padded_row_of_the_roped_ring_keeps_its_session_unchanged():
    """As tests/test_engine_batching.py: slot 0 waits (blocks in its ring) while slot 1 runs rounds of
    batch 2 with row 0 padded; slot 0's ring and positions stay as they were and it then goes on as
    if alone (padded rows are written and restored, never followed)."""
    cfg = EngineConfig.from_preset("micro").replace(
        cache=CacheConfig(block_frames=1, sink_frames=1, window_frames=3, rope_mode="rolling"))
    eng = Engine.random(cfg, device="cpu", backend="sdpa_ring", max_sessions=2, mode="eager")
    image = np.full((32, 32, 3), 60, np.uint8)
    audio = (np.random.default_rng(1).standard_normal(26000) * 0.2).clip(-1, 1).astype(np.float32)
    with eng.open(image, seed=0) as s:
        want = np.concatenate([b.frames for b in s.step(audio) + s.flush()])
    waiting = eng.open(image, seed=0)
    got = waiting.step(audio[:17000])
    assert len(got) == 4                                     # the ring has wrapped (evicts at block 3)
    ring = waiting.state.ring
    before = (ring.k.clone(), ring.roped.key_pos.clone(), ring.roped.anchors.clone())
    with eng.open(np.full((32, 32, 3), 150, np.uint8), seed=1) as other:
        assert len(other.step(audio[:9000])) >= 2            # rounds of batch 2, row 0 padded
    assert torch.equal(ring.k, before[0]) and torch.equal(ring.roped.key_pos, before[1])
    assert torch.equal(ring.roped.anchors, before[2])
    got += waiting.step(audio[17000:]) + waiting.flush()
    waiting.close()
    np.testing.assert_array_equal(np.concatenate([b.frames for b in got]), want)


def test_sampler_over_the_roped_ring_equals_the_reference_ring():
    """benchmarks.harness.RingRunner (the sampler over a session ring, planned as the engine plans it,
    following positions each block) with sdpa_ring against the same with the reference ops. The sink is
    not block-aligned (its frame 2 is written in block 1 with rolling frame 3), rolling RoPE, evicts
    from block 3. (Absolute mode: the engine test above.)"""
    cache, blocks = CacheConfig(block_frames=2, sink_frames=3, window_frames=7, rope_mode="rolling"), 5
    from benchmarks.harness import DitSetup, RingRunner, block_inputs
    from runtime.models.dit import build_dit
    from runtime.models.ops import ops_for

    cfg = EngineConfig.from_preset("micro").replace(cache=cache)
    torch.manual_seed(0)
    dit = build_dit(cfg)
    runners = {}
    for name in ("reference", "sdpa_ring"):
        setup = DitSetup.build(cfg, dit, ops_for(name), torch.device("cpu"), torch.float32, 0)
        runners[name] = (setup, RingRunner(setup))
    assert runners["sdpa_ring"][1].ring.roped is not None
    for b in range(blocks):
        xs = [runner.run_block(b, block_inputs(setup, b, seed=1)) for setup, runner in runners.values()]
        torch.testing.assert_close(xs[1], xs[0], atol=1e-4, rtol=1e-4, msg=lambda m, b=b: f"block {b}: {m}")


# --------------------------------------------------------------------------------------------------
# timed selection (an injected timer: nothing is timed on the CPU)
# --------------------------------------------------------------------------------------------------
SHAPE = select.AttentionShape(batch=1, frames=1, slots=2, grid_h=2, grid_w=2, heads=2, head_dim=16,
                              dtype="float32")


def _fake_timer(ms: dict[str, float], calls: list[str]):
    def timer(fn):
        name = fn.backend
        calls.append(name)
        if ms[name] is None:
            raise RuntimeError("unsupported")
        fn()
        return ms[name]
    return timer


def _named_case(name, shape, device):
    fn = select.attention_case(name, shape, device)
    fn.backend = name
    return fn


def test_selection_keeps_the_fastest_logs_and_caches(caplog, tmp_path):
    select.clear_cache()
    calls: list[str] = []
    ms = {"sdpa": 2.0, "sdpa_ring": 0.5, "triton": None, "reference": 9.0}
    with caplog.at_level(logging.INFO, logger="avatar_kernels.select"):
        got = select.fastest_backend("cpu", SHAPE, candidates=["sdpa", "sdpa_ring", "triton"],
                                     timer=_fake_timer(ms, calls), make_case=_named_case, cache_dir=tmp_path)
    assert got == "sdpa_ring" and calls == ["sdpa", "sdpa_ring", "triton"]
    assert "sdpa_ring 0.500 ms" in caplog.text and "sdpa 2.000 ms" in caplog.text and "failed" in caplog.text
    # in-process cache: no second timing, even with other times
    ms.update(sdpa=0.1)
    assert select.fastest_backend("cpu", SHAPE, candidates=["sdpa", "sdpa_ring", "triton"],
                                  timer=_fake_timer(ms, calls), make_case=_named_case) == "sdpa_ring"
    assert len(calls) == 3
    # another shape is timed again and may choose differently
    other = select.AttentionShape(**{**SHAPE.__dict__, "slots": 3})
    assert select.fastest_backend("cpu", other, candidates=["sdpa", "sdpa_ring"],
                                  timer=_fake_timer(ms, calls), make_case=_named_case) == "sdpa"
    # on disk: a fresh process (cleared cache) reads the choice back without timing
    select.clear_cache()
    n = len(calls)
    assert select.fastest_backend("cpu", SHAPE, candidates=["sdpa", "sdpa_ring"], timer=_fake_timer(ms, calls),
                                  make_case=_named_case, cache_dir=tmp_path) == "sdpa_ring"
    assert len(calls) == n
    # a cached choice that is not a candidate here is not used blindly: timed again
    select.clear_cache()
    assert select.fastest_backend("cpu", SHAPE, candidates=["sdpa"], timer=_fake_timer(ms, calls),
                                  make_case=_named_case, cache_dir=tmp_path) == "sdpa"
    select.clear_cache()


def test_selection_fails_clearly_when_nothing_runs():
    select.clear_cache()
    with pytest.raises(RuntimeError, match="no attention backend ran"):
        select.fastest_backend("cpu", SHAPE, candidates=["sdpa"], timer=_fake_timer({"sdpa": None}, []),
                               make_case=_named_case)


def test_selection_cases_compute_the_same_attention():
    """The timed calls are real attention calls on each layout: they agree with each other."""
    dev = torch.device("cpu")
    outs = {n: select.attention_case(n, SHAPE, dev)() for n in ("reference", "sdpa", "sdpa_ring")}
    assert (outs["sdpa"] - outs["reference"]).abs().max() <= 1e-5
    assert (outs["sdpa_ring"] - outs["reference"]).abs().max() <= 1e-5
