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

try:
    from triton.compiler import ASTSource  # noqa: F401 - the ahead-of-time compile API

    from benchmarks import sass_report
except ImportError as exc:  # pragma: no cover - other triton layouts
    pytest.skip(f"this triton has no ahead-of-time compile API: {exc}", allow_module_level=True)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def check_attention_real_shape():
    """bf16 D 128 at 512x512 and 480x832: wgmma, and no spill in the key loop."""
    for tokens in (1024, 1560):
        kernel = sass_report.compile_attention(sass_report.HOPPER, "bf16", triton.language.bfloat16, 128,
                                               torch.bfloat16, tokens)
        assert "wgmma" in kernel.asm["ptx"], "expected Hopper warpgroup MMA in the attention kernel"
        r = sass_report.report("attention", kernel)
        assert r.loop_instructions and r.loop_hgmma > 0, r
        assert r.loop_local_memory == 0, f"the key loop spills to local memory: {r}"


def check_attention_other_dtypes():
    sass_report.compile_attention(sass_report.AMPERE, "fp16", triton.language.float16, 64, torch.float16)
    sass_report.compile_attention(sass_report.HOPPER, "fp32", triton.language.float32, 64, torch.float32)


def check_row_kernels():
    sass_report.compile_kv_write(rope=False)
    sass_report.compile_kv_write(rope=True)
    sass_report.compile_norms()


def check_sass_report_runs():
    assert sass_report.main([]) == 0


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


def test_sass_report_runs():
    run_isolated("check_sass_report_runs")
