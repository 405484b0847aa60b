"""The fused E4M3 quantiser (avatar_kernels/fp8_quant.py) equals `quantize_e4m3` bit for bit.

CPU runs use Triton's interpreter (TRITON_INTERPRET=1: tests/triton_kernels.py), where the
cast is the kernel's bit-level copy of c10's conversion; on a GPU it is the hardware's
`cvt.rn.satfinite` (the `gpu` test, and the compile test that checks the instructions are there).
"Equal" is `torch.equal` on the E4M3 bytes and on the fp32 scales, except where the input holds a
NaN or inf: there NaN positions must match and everything else must be equal (an E4M3 NaN has a sign
bit, and the reference's depends on the CPU's default NaN).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from avatar_kernels.fp8_quant import E4M3_MAX, quantize_e4m3_triton, tiles
from runtime.models.fp8 import Fp8Linear, quantize_e4m3
from tests.triton_kernels import DEVICE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRANULARITIES = ["tensor", "row"]
ROOT = Path(__file__).resolve().parents[1]


def assert_bitwise(x: torch.Tensor, granularity: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_e4m3_triton(x, granularity, **kw)
    want_q, want_scale = quantize_e4m3(x, granularity)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == want_scale.shape
    got, want = q.view(torch.uint8), want_q.view(torch.uint8)
    nan = want_q.float().isnan()
    assert torch.equal(q.float().isnan(), nan), "NaN in different places"
    mismatch = (got != want) & ~nan
    assert not mismatch.any(), (f"{int(mismatch.sum())} bytes differ, first at {mismatch.nonzero()[0].tolist()}: "
                                f"{got[mismatch][:4].tolist()} vs {want[mismatch][:4].tolist()}")
    assert torch.equal(scale.isnan(), want_scale.isnan())
    assert torch.equal(scale.nan_to_num(), want_scale.nan_to_num()), (scale, want_scale)
    return q, scale


def awkward(M: int, K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian rows at very different magnitudes, an all-zero row, a row of tiny values (its
    scale hits the 1e-12 floor in fp32), a row of huge finite values (1e30; fp16: 6e4), and rows whose scale rounds so that amax / scale > 448
    (the clamp acts; 234 and 964 do that in bf16 and fp32 alike)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, M)[:, None]
    big = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 6e4}[dtype]
    tiny = {torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 1e-7}[dtype]
    signs = torch.randint(0, 2, (K,), generator=g) * 2 - 1
    special = [torch.zeros(K), torch.randn(K, generator=g) * tiny, torch.rand(K, generator=g) * signs * big]
    for amax in (234.0, 964.0):
        row = torch.rand(K, generator=g) * amax
        row[K // 2] = -amax
        special.append(row)
    for i, row in enumerate(special[:M]):
        x[(i * 7) % M] = row
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 100), (6, 129), (70, 48), (9, 2050)])
def test_equals_the_unfused_quantiser_bit_for_bit(shape, granularity, dtype):
    """(9, 2050): 2 rows a program, so 5 programs, the last one partial; the largest row (5) is in
    program 2, so the per-tensor amax must cross programs."""
    x = awkward(*shape, dtype, seed=sum(shape))
    assert x.isfinite().all()
    assert_bitwise(x, granularity)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_rows_wider_than_one_tile(granularity):
    """max_block_k 32: 100 columns are 4 tiles (the last partial), amax and cast in two sweeps."""
    assert tiles(100, 32)[1:] == (32, 4) and tiles(2050) == (2, 4096, 1)
    for dtype in DTYPES:
        assert_bitwise(awkward(37, 100, dtype, seed=3), granularity, max_block_k=32)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_strided_rows(granularity):
    """A column slice of a wider matrix: row stride 96, 80 columns read."""
    wide = awkward(21, 96, torch.bfloat16, seed=4)
    x = wide[:, 8:88]
    assert x.stride() == (96, 1)
    q, _ = assert_bitwise(x, granularity)
    assert q.stride() == (80, 1)


def test_every_e4m3_value_midpoint_and_neighbour_rounds_as_torch():
    """With a 448 in the row the scale is exactly 1, so the kernel's cast sees the values themselves:
    every E4M3 value (subnormals included), every midpoint between neighbours (ties go to the even
    one) and the fp32 numbers one ulp either side of each midpoint."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()   # 0 .. 448
    mid = (codes[1:] + codes[:-1]) / 2
    ulp = torch.nextafter(mid, torch.full_like(mid, 1e9)), torch.nextafter(mid, torch.zeros_like(mid))
    vals = torch.cat([codes, mid, *ulp, torch.tensor([2.0 ** -10, 2.0 ** -12, 1e-30, 447.9, 448.0])])
    row = torch.cat([vals, -vals])
    x = row[None].to(DEVICE)
    assert quantize_e4m3(x.cpu(), "row")[1].item() == 1.0
    assert_bitwise(x, "row")
    assert_bitwise(x, "tensor")


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")   # inf / inf, in numpy
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nan_and_inf(granularity):
    """A NaN makes its row's (row) or the whole tensor's (tensor) scale NaN and every q there NaN;
    an inf makes the scale inf: q NaN at the inf (inf / inf), 0 for the finite entries."""
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(5))
    x[1, 3] = float("nan")
    x[4, 7] = float("inf")
    x[4, 9] = -float("inf")
    q, scale = assert_bitwise(x.to(DEVICE), granularity)
    qf = q.float().cpu()
    if granularity == "row":
        assert qf[1].isnan().all() and scale[1].isnan()
        assert scale[4].isinf() and qf[4].isnan().sum() == 2 and (qf[4].nan_to_num() == 0).all()
        assert not qf[[0, 2, 3, 5]].isnan().any()
    else:
        assert qf.isnan().all() and scale.isnan()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fp8_linear_with_the_kernel_equals_the_torch_quantiser(granularity):
    """Fp8Linear(kernel="triton") runs the fused quantiser (here in the interpreter): same output."""
    g = torch.Generator().manual_seed(6)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 13, 64, generator=g)
    fused, plain = Fp8Linear(linear, granularity, kernel="triton"), Fp8Linear(linear, granularity, kernel="torch")
    assert torch.equal(fused(x), plain(x))


def test_bad_inputs():
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="granularity"):
        quantize_e4m3_triton(x, "block")
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        quantize_e4m3_triton(x[None], "row")
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        quantize_e4m3_triton(x[:0], "row")
    with pytest.raises(TypeError, match="dtype"):
        quantize_e4m3_triton(x.to(torch.float64), "row")
    with pytest.raises(ValueError, match="contiguous"):
        quantize_e4m3_triton(x.t(), "tensor")


def test_scale_never_leaves_the_device_and_q_is_bounded():
    x = awkward(9, 32, torch.bfloat16, seed=7)
    q, scale = quantize_e4m3_triton(x, "tensor")
    assert scale.device == x.device and q.float().abs().max() <= E4M3_MAX


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("K", [1536, 8960])
def test_gpu_real_shapes_bit_for_bit(granularity, K):
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU")
    x = awkward(3072, K, torch.bfloat16, seed=8)
    assert_bitwise(x, granularity)


# ----------------------------------------------------------------- compiled for sm_90 (no GPU)
# Run in a fresh process without the interpreter (Triton 3.9 cannot compile where it has run).
HOPPER_CHECK = """
import re
from avatar_kernels import fp8_quant as fq
from benchmarks.sass_report import HOPPER, compile_for
bm, bk, kt = fq.tiles(1536)
meta = {"BLOCK_M": bm, "BLOCK_K": bk, "K_TILES": kt}
ptrs = {"x_ptr": "*bf16", "q_ptr": "*u8", "scale_ptr": "*fp32", "amax_ptr": "*i32"}
for kernel in (fq._quant_rows_kernel, fq._quant_tensor_kernel):
    ptx = compile_for(kernel, HOPPER, ptrs, {**meta, "SOFT_CAST": False}, num_warps=fq._warps(bm, bk)).asm["ptx"]
    assert re.search(r"div\\.rn\\.f32", ptx) and not re.search(r"div\\.(full|approx)", ptx), kernel
    assert re.search(r"cvt\\.rn\\.satfinite\\.e4m3x2\\.f32", ptx), kernel
ptx = compile_for(fq._amax_kernel, HOPPER, ptrs, meta, num_warps=fq._warps(bm, bk)).asm["ptx"]
assert re.search(r"atom\\.global\\.[\\w.]*max\\.s32", ptx), "expected an integer atomic max"
"""


@pytest.mark.slow
def test_compiles_for_hopper_with_exact_division_and_the_hardware_cast():
    """The GPU build divides with correct rounding (no approximate div.full), casts with the
    hardware's round-to-nearest-even e4m3 conversion, and takes the tensor amax by an integer atomic."""
    pytest.importorskip("triton.compiler", reason="no ahead-of-time compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", HOPPER_CHECK], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-6000:]
