"""Every Triton kernel compiles for real GPUs, checked without one.

Triton compiles ahead of time for a named target (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the
ptxas it ships), so the GPU code path (MMA layouts of the split/join RoPE, async copies, shared
memory) is checked here even on a CPU-only machine, at the real shapes' constexprs and with the
divisibility Triton infers at launch (16-aligned pointers and strides). Whether it is fast, and
numerically right on silicon, is for the `gpu` tests and benchmarks/bench_kernels.py.

Each check runs in a fresh Python process: after Triton's interpreter has run in a process (the
other kernel tests use it on CPU-only machines), compiling the same kernels there fails inside
Triton 3.9's code generator.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kernels import kv_write, norm_modulate, window_attention
from kernels._triton_util import next_pow2
from kernels.rope import rope_split

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
except ImportError as exc:  # pragma: no cover - other triton layouts
    pytest.skip(f"this triton has no ahead-of-time compile API: {exc}", allow_module_level=True)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
HOPPER, AMPERE = GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)
_NOT_ALIGNED = {"stride_ss", "stride_pf", "stride_wf", "S", "eps", "qk_scale"}


def compile_for(fn, target, pointer_types, constexprs, num_warps, num_stages=3):
    """Compile plain kernel `fn` for `target`; pointers typed by name, other runtime args i32/fp32."""
    jit = JITFunction(fn)
    signature, attrs = {}, {}
    for i, name in enumerate(jit.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = pointer_types[name]
        else:
            signature[name] = "fp32" if name in ("eps", "qk_scale") else "i32"
        if name not in _NOT_ALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages,
                                                         "enable_fp_fusion": True})


def _attention(target, dtype_name, tl_dtype, head_dim, torch_dtype):
    cfg = window_attention.default_attention_config(head_dim, torch_dtype, torch.device("cuda"))
    n_frame, n_height, _ = (p // 2 for p in rope_split(head_dim))
    ptrs = {n: f"*{dtype_name}" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    ptrs.update(slot_pos_ptr="*i32", q_pos_ptr="*i32", inv_freq_ptr="*fp32")
    constexprs = {"H": 12, "D": head_dim, "N_FRAME": n_frame, "N_HEIGHT": n_height,
                      "INVALID": window_attention.INVALID_POS, "S_POW2": 16, "BLOCK_M": cfg.block_m,
                      "BLOCK_N": cfg.block_n, "BLOCK_D": next_pow2(head_dim),
                      "DOT_PRECISION": "ieee" if dtype_name == "fp32" else "tf32", "MMA_DTYPE": tl_dtype}
    return compile_for(window_attention._window_attention_kernel, target, ptrs, constexprs,
                       cfg.num_warps, cfg.num_stages)


def check_attention_real_shape():
    kernel = _attention(HOPPER, "bf16", triton.language.bfloat16, 128, torch.bfloat16)
    assert "wgmma" in kernel.asm["ptx"], "expected Hopper warpgroup MMA in the attention kernel"
    assert kernel.metadata.shared > 0


def check_attention_other_dtypes():
    _attention(AMPERE, "fp16", triton.language.float16, 64, torch.float16)
    _attention(HOPPER, "fp32", triton.language.float32, 64, torch.float32)


def check_row_kernels():
    ptrs = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_ring_ptr", "v_ring_ptr")}
    ptrs.update(q_weight_ptr="*fp32", k_weight_ptr="*fp32", slots_ptr="*i32")
    compile_for(kv_write._qk_norm_kv_write_kernel, HOPPER, ptrs,
                {"DIM": 1536, "HEAD_DIM": 128, "BLOCK": 2048},
                num_warps=kv_write._row_warps(2048))
    ptrs = {"x_ptr": "*bf16", "shift_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*bf16"}
    compile_for(norm_modulate._layernorm_modulate_kernel, HOPPER, ptrs, {"DIM": 1536, "BLOCK": 2048},
                num_warps=norm_modulate._row_warps(2048))
    ptrs = {"x_ptr": "*bf16", "y_ptr": "*bf16", "gate_ptr": "*fp32", "out_ptr": "*bf16"}
    compile_for(norm_modulate._gated_residual_kernel, HOPPER, ptrs, {"DIM": 1536, "BLOCK": 2048},
                num_warps=norm_modulate._row_warps(2048))


def run_isolated(check: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import tests.test_kernels_gpu_compile as m; m.{check}()"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, f"{check} failed:\n{done.stderr[-6000:]}"


def test_window_attention_compiles_for_hopper_at_the_real_shape():
    run_isolated("check_attention_real_shape")


def test_window_attention_compiles_fp16_for_ampere_and_fp32_for_hopper():
    run_isolated("check_attention_other_dtypes")


def test_kv_write_and_norm_kernels_compile_for_hopper():
    run_isolated("check_row_kernels")
