"""Kernel benchmarks at the real shape (needs a CUDA GPU; skipped without one).

Run:  .venv/bin/python -m pytest -q benchmarks/bench_kernels.py -s --benchmark-enable
 or:  .venv/bin/python benchmarks/bench_kernels.py            (prints one JSON object)

Shape: one 3-frame block of 32 x 32 tokens (Lq 3072) against a full 15-slot ring (Lk 15360),
12 heads x 128, bf16, batch 1; the script also measures 480x832 (30 x 52 tokens: Lq 4680, Lk 23400). The Triton kernel gets the ring as its KV write stores it (keys with
their height/width rotation) and is checked against SDPA on fully rotated q/k before it is timed. Attention TFLOP/s = 4 * Lq * Lk * H * D / t. Baselines run on
q and k already rotated (their RoPE is not timed, which favours them): torch SDPA with its flash
and cuDNN backends, and flash-attn when importable. The sdpa *backend* of avatar_kernels/backends.py
(RoPE of the ring in torch + masked SDPA) is timed too, as the fallback it is.
KV write and norm+modulate report GB/s of the bytes they must move, and that as a fraction of
the device's copy bandwidth measured here (a device-to-device copy), not of a datasheet number.
Timing: CUDA events around each call, warm-up excluded, L2 flushed before memory-bound calls,
median of the repetitions. Everything lands in `benchmark.extra_info`.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")]

B, H, D, GRID, FQ, S = 1, 12, 128, (32, 32), 3, 15
T = GRID[0] * GRID[1]
LQ, LK = FQ * T, S * T
DIM = H * D
TARGET_TFLOPS = 550.0
# Attention tile shapes tried by the sweep (block_m, block_n, num_warps, num_stages).
SWEEP = [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 4, 3),
         (128, 128, 8, 3)]


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
_flush_buffer: torch.Tensor | None = None


def _flush_l2() -> None:
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    _flush_buffer.zero_()


def median_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 30, flush: bool = False) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush:
            _flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(2 ** 30, dtype=torch.int8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=3, reps=10)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


GRID_480x832 = (30, 52)     # 1560 tokens a frame: the partial last key tile is exercised too


def attention_tflops(ms: float, grid: tuple[int, int] = GRID) -> float:
    tokens = grid[0] * grid[1]
    return 4 * (FQ * tokens) * (S * tokens) * H * D / (ms * 1e-3) / 1e12


def _device_info() -> dict:
    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__}


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
def attention_inputs(grid: tuple[int, int] = GRID):
    from avatar_kernels.rope import apply_rope, rope_angles, rotate_spatial
    tokens = grid[0] * grid[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, FQ * tokens, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, S * tokens, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, S * tokens, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    # block 10 in absolute mode: sink slots keep -30..-22, the rolling slots wrap around
    slot_pos = torch.tensor([[-30, -29, -28, -27, -26, -25, -24, -23, -22, 0, 1, 2, -3, -2, -1]],
                            dtype=torch.int32, device="cuda")
    q_pos = torch.tensor([[0, 1, 2]], dtype=torch.int32, device="cuda")
    q_rot = apply_rope(q, rope_angles(q_pos, *grid, D)).to(torch.bfloat16)
    k_rot = apply_rope(k, rope_angles(slot_pos, *grid, D)).to(torch.bfloat16)
    # the Triton kernel reads the ring as its KV write stores it: keys with their height/width rotation
    k_spatial = rotate_spatial(k, *grid).to(torch.bfloat16)
    return q, k_spatial, v, slot_pos, q_pos, q_rot, k_rot


def _sdpa_runner(q_rot, k_rot, v, backend):
    from torch.nn.attention import sdpa_kernel
    qh, kh, vh = q_rot.transpose(1, 2), k_rot.transpose(1, 2), v.transpose(1, 2)

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qh, kh, vh)
    return run


def measure_attention(grid: tuple[int, int] = GRID) -> dict:
    from torch.nn.attention import SDPBackend

    from avatar_kernels.backends import _flash_attn_module, window_attention_sdpa, window_attention_sdpa_ring
    from avatar_kernels.window_attention import window_attention_triton
    q, k, v, slot_pos, q_pos, q_rot, k_rot = attention_inputs(grid)
    out = window_attention_triton(q, k, v, slot_pos, q_pos, *grid)
    reference = F.scaled_dot_product_attention(q_rot.transpose(1, 2), k_rot.transpose(1, 2),
                                               v.transpose(1, 2)).transpose(1, 2)
    max_err = (out.float() - reference.float()).abs().max().item()
    # a wrong kernel is never timed as a result (bf16 tolerance of tests/test_kernels_window_attention)
    torch.testing.assert_close(out.float(), reference.float(), atol=4e-2, rtol=4e-2)
    results = {"shape": {"B": B, "grid": list(grid), "Lq": q.shape[1], "Lk": k.shape[1], "H": H, "D": D,
                         "dtype": "bf16"},
               "triton_vs_sdpa_max_abs_err": max_err, **_device_info()}
    runners = {"triton": lambda: window_attention_triton(q, k, v, slot_pos, q_pos, *grid, out=out),
               "sdpa_backend_with_rope": lambda: window_attention_sdpa(q, k, v, slot_pos, q_pos, *grid),
               # the sdpa_ring backend reads the fully roped ring (k_rot) itself: masked as the engine runs
               # it, and without the mask (a full ring: torch may take its flash kernel)
               "sdpa_ring": lambda: window_attention_sdpa_ring(q, k_rot, v, slot_pos, q_pos, *grid),
               "sdpa_ring_all_valid": lambda: window_attention_sdpa_ring(q, k_rot, v, slot_pos, q_pos, *grid,
                                                                         all_valid=True)}
    ring_out = window_attention_sdpa_ring(q, k_rot, v, slot_pos, q_pos, *grid)
    torch.testing.assert_close(ring_out.float(), reference.float(), atol=4e-2, rtol=4e-2)
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        runner = _sdpa_runner(q_rot, k_rot, v, backend)
        try:
            runner()
            runners[name] = runner
        except RuntimeError as exc:          # backend not supported on this device / build
            results[f"{name}_error"] = str(exc).splitlines()[0]
    flash_attn = _flash_attn_module()
    if flash_attn is not None:
        runners["flash_attn"] = lambda: flash_attn.flash_attn_func(q_rot, k_rot, v)
    for name, run in runners.items():
        ms = median_ms(run)
        results[f"{name}_ms"] = ms
        results[f"{name}_tflops"] = attention_tflops(ms, grid)
    results["meets_target"] = results["triton_tflops"] >= TARGET_TFLOPS
    baselines = [results[f"{n}_tflops"] for n in ("sdpa_flash", "sdpa_cudnn") if f"{n}_tflops" in results]
    results["not_slower_than_sdpa"] = all(results["triton_tflops"] >= b for b in baselines)
    return results


def measure_attention_sweep() -> dict:
    from avatar_kernels.window_attention import AttentionConfig, window_attention_triton
    q, k, v, slot_pos, q_pos, _, _ = attention_inputs()
    expected = window_attention_triton(q, k, v, slot_pos, q_pos, *GRID)
    results = {}
    for cfg_tuple in SWEEP:
        cfg = AttentionConfig(*cfg_tuple)
        key = "bm{}_bn{}_w{}_s{}".format(*cfg_tuple)
        try:
            out = window_attention_triton(q, k, v, slot_pos, q_pos, *GRID, config=cfg)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this tile shape
            results[key] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        err = (out.float() - expected.float()).abs().max().item()
        def run(out=out, cfg=cfg):
            return window_attention_triton(q, k, v, slot_pos, q_pos, *GRID, out=out, config=cfg)
        ms = median_ms(run)
        results[key] = {"ms": ms, "tflops": attention_tflops(ms), "max_abs_diff_vs_default": err}
    return results


# --------------------------------------------------------------------------------------------------
# Memory-bound kernels
# --------------------------------------------------------------------------------------------------
def _kv_write_call():
    from avatar_kernels.kv_write import qk_norm_kv_write_triton
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, LQ, DIM, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    q_w, k_w = torch.ones(DIM, device="cuda"), torch.ones(DIM, device="cuda")
    k_ring = torch.zeros(B, LK, H, D, device="cuda", dtype=torch.bfloat16)
    v_ring = torch.zeros_like(k_ring)
    slots = torch.tensor([[12, 13, 14]], dtype=torch.int32, device="cuda")
    out = torch.empty(B, LQ, H, D, device="cuda", dtype=torch.bfloat16)
    # with the spatial RoPE the engine's Triton ops use (its [T, D/2] cos/sin table stays in L2)
    return lambda: qk_norm_kv_write_triton(q, k, v, q_w, k_w, 1e-6, k_ring, v_ring, slots, rope_grid=GRID, out=out)


def _norm_inputs():
    g = torch.Generator(device="cuda").manual_seed(2)
    x, y = (torch.randn(B, LQ, DIM, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    mod = torch.randn(B, FQ, 6, DIM, device="cuda", generator=g)       # fp32, sliced like the model
    return x, y, mod[:, :, 0], mod[:, :, 1], mod[:, :, 2], torch.empty_like(x)


def _norm_modulate_call():
    from avatar_kernels.norm_modulate import layernorm_modulate_triton
    x, _, shift, scale, _, out = _norm_inputs()
    return lambda: layernorm_modulate_triton(x, shift, scale, T, 1e-6, out=out)


def _gated_residual_call():
    from avatar_kernels.norm_modulate import gated_residual_triton
    x, y, _, _, gate, out = _norm_inputs()
    return lambda: gated_residual_triton(x, y, gate, T, out=out)


def _bandwidth(call, moved: int, copy_gbs: float) -> dict:
    ms = median_ms(call, flush=True)
    gbs = moved / (ms * 1e-3) / 1e9
    return {"ms": ms, "bytes": moved, "gbs": gbs, "fraction_of_copy_bandwidth": gbs / copy_gbs}


def measure_kv_write(copy_gbs: float) -> dict:
    # q, k, v read; q out, k and v into the ring written; two fp32 weights read
    return _bandwidth(_kv_write_call(), 6 * B * LQ * DIM * 2 + 2 * DIM * 4, copy_gbs)


def measure_norm_modulate(copy_gbs: float) -> dict:
    row_bytes = B * LQ * DIM * 2
    modulation_bytes = B * FQ * DIM * 4
    return {"layernorm_modulate": _bandwidth(_norm_modulate_call(), 2 * row_bytes + 2 * modulation_bytes,
                                             copy_gbs),
            "gated_residual": _bandwidth(_gated_residual_call(), 3 * row_bytes + modulation_bytes, copy_gbs)}


# --------------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# --------------------------------------------------------------------------------------------------
def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def test_bench_window_attention(benchmark):
    from avatar_kernels.window_attention import window_attention_triton
    results = measure_attention()
    benchmark.extra_info.update(results)
    q, k, v, slot_pos, q_pos, _, _ = attention_inputs()
    benchmark.pedantic(_synced(lambda: window_attention_triton(q, k, v, slot_pos, q_pos, *GRID)),
                       rounds=10, warmup_rounds=2)
    print(json.dumps(results, indent=1))
    assert results["triton_vs_sdpa_max_abs_err"] < 5e-2, "the kernel disagrees with SDPA"


def test_bench_window_attention_configs(benchmark):
    if getattr(benchmark, "disabled", False):     # the default addopts: keep the smoke run short
        pytest.skip("the tile sweep compiles six kernels; run it with --benchmark-enable")
    results = measure_attention_sweep()
    benchmark.extra_info.update(results)
    benchmark.pedantic(lambda: None, rounds=1)         # the sweep times itself (CUDA events)
    print(json.dumps(results, indent=1))


def test_bench_kv_write(benchmark):
    results = measure_kv_write(copy_bandwidth_gbs())
    benchmark.extra_info.update(results)
    benchmark.pedantic(_synced(_kv_write_call()), rounds=10, warmup_rounds=2)
    print(json.dumps(results, indent=1))


def test_bench_norm_modulate(benchmark):
    results = measure_norm_modulate(copy_bandwidth_gbs())
    benchmark.extra_info.update(results)
    benchmark.pedantic(_synced(_norm_modulate_call()), rounds=10, warmup_rounds=2)
    print(json.dumps(results, indent=1))


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels: needs a CUDA GPU")
    copy_gbs = copy_bandwidth_gbs()
    report = {"copy_bandwidth_gbs": copy_gbs, "attention": measure_attention(),
              "attention_480x832": measure_attention(GRID_480x832),
              "attention_sweep": measure_attention_sweep(), "kv_write": measure_kv_write(copy_gbs),
              "norm_modulate": measure_norm_modulate(copy_gbs)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # run as a script from anywhere
    main()
