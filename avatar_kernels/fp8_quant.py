"""Dynamic E4M3 quantisation of an activation x [M, K] with its scale, fused into one or two passes.

The reference is `runtime.models.fp8.quantize_e4m3` (eager PyTorch): scale = (amax / 448) floored at
1e-12, q = (x / scale) clamped to +-448 and cast to E4M3 with round-to-nearest-even. In eager that is
about six elementwise passes with a full fp32 copy of x; here:
- `row` (one scale per row): one pass, one program per block of rows: each row's amax, its scale
  and the cast, x read once from memory (x2 from L1/L2 when a row is wider than one tile);
- `tensor` (one scale): two passes: the amax of each block of rows goes into a one-word device
  buffer by an atomic max, then a second pass scales and casts (the scale is written by program 0).
No host sync, no fp32 copy; the scale stays on the device.

Bit for bit the reference (tests/test_kernels_fp8_quant.py): the same fp32 operations in the same
order, both divisions correctly rounded (`div_rn`: Triton's `/` on fp32 is an approximate division
on GPUs), the amax taken as an integer max over the bit patterns of |x| (exact, and a NaN, whose
pattern with the sign cleared is above +inf's, propagates as torch's amax does). The cast is the GPU's
`cvt.rn.satfinite` (round to nearest even; the clamp comes first, so saturation never acts) on a
GPU, and in the interpreter a bit-level copy of c10's fp32 -> e4m3fn conversion (the interpreter's
own fp8 cast rounds ties away from zero and mishandles carries).
NaN and inf: any NaN in a row (tensor: anywhere) makes that row's (the tensor's) scale and every
q NaN, and an inf makes the scale inf, so its q is NaN (inf/inf) and the finite entries 0, as in
the reference. E4M3 has one NaN pattern per sign; the reference on x86 gets the sign of the CPU's
default NaN, so NaN outputs are equal as NaN, not always as bytes.
"""
from __future__ import annotations

import torch

from ._triton_util import (
    FLOAT_DTYPES,
    cdiv,
    check_dtype,
    check_last_dim_contiguous,
    check_launchable,
    compiled,
    interpreting,
    next_pow2,
    tl,
    uses,
)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALE_FLOOR = 1e-12          # as the reference: an all-zero row must not divide by zero
GRANULARITIES = ("tensor", "row")
# A whole row in one register tile up to this width (LiveTalk's 1536 and 8960, Wan-14B's 5120 and
# 13824 all fit), so x is read from memory once; wider rows loop over tiles and re-read (from cache).
MAX_BLOCK_K = 16384
# Elements per program tile: 8192 = 16 fp32 values a thread at 16 warps (two 16-byte bf16 loads),
# enough bytes in flight per SM for a memory-bound pass without spilling; rows are stacked up to it.
TILE_ELEMS = 8192


# --------------------------------------------------------------------------------------------------
# Device helpers (jitted with the kernels that `uses` them).
# --------------------------------------------------------------------------------------------------
def _abs_bits(x):
    """|x| as int32 bit patterns: ordered like the floats for x >= 0, a NaN above +inf."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


def _scale_of(amax_bits):
    amax = amax_bits.to(tl.float32, bitcast=True)
    return tl.maximum(tl.div_rn(amax, 448.0), 1e-12, propagate_nan=tl.PropagateNan.ALL)


def _e4m3_bits_soft(y):
    """fp32 y (|y| <= 448 or NaN) -> e4m3fn bits as int32: c10's fp8e4m3fn_from_fp32_value."""
    u = y.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    nan = a >= (1087 << 20)                          # >= 480 (or inf/NaN): NaN, as c10
    small = a < (121 << 23)                          # below 2^-6: a subnormal (or zero) e4m3
    # subnormal: adding 2^14 rounds to a multiple of 2^-9 (nearest even) and leaves the count in the bits
    sub = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    a_n = tl.where(nan | small, 0, a)
    normal = (a_n - (120 << 23) + 0x7FFFF + ((a_n >> 20) & 1)) >> 20   # rebias, round to nearest even
    return tl.where(nan, 0x7F, tl.where(small, sub, normal)) | sign


@uses(_e4m3_bits_soft)
def _to_e4m3(x, scale, SOFT_CAST: tl.constexpr):
    y = tl.clamp(tl.div_rn(x, scale), -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    if SOFT_CAST:
        return _e4m3_bits_soft(y).to(tl.uint8)
    return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


def _tile(x_ptr, rows, row_ok, cols, K, stride_xm):
    ok = row_ok[:, None] & (cols[None, :] < K)
    return tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32), ok


@uses(_tile, _abs_bits)
def _rows_amax_bits(x_ptr, rows, row_ok, K, stride_xm, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr):
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros([rows.shape[0]], dtype=tl.int32)
    for t in range(K_TILES):
        x, _ = _tile(x_ptr, rows, row_ok, t * BLOCK_K + cols, K, stride_xm)
        amax = tl.maximum(amax, tl.max(_abs_bits(x), axis=1))
    return amax


@uses(_tile, _to_e4m3)
def _cast_rows(x_ptr, q_ptr, rows, row_ok, scale, K, stride_xm, stride_qm,
               BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, SOFT_CAST: tl.constexpr):
    cols = tl.arange(0, BLOCK_K)
    for t in range(K_TILES):
        c = t * BLOCK_K + cols
        x, ok = _tile(x_ptr, rows, row_ok, c, K, stride_xm)
        tl.store(q_ptr + rows[:, None] * stride_qm + c[None, :], _to_e4m3(x, scale, SOFT_CAST), mask=ok)


def _row_block(M, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows.to(tl.int64), rows < M


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@uses(_row_block, _tile, _abs_bits, _scale_of, _to_e4m3, _rows_amax_bits, _cast_rows)
def _quant_rows_kernel(x_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
                       SOFT_CAST: tl.constexpr):
    rows, row_ok = _row_block(M, BLOCK_M)
    if K_TILES == 1:      # the row stays in registers between its amax and its cast: one read
        cols = tl.arange(0, BLOCK_K)
        x, ok = _tile(x_ptr, rows, row_ok, cols, K, stride_xm)
        scale = _scale_of(tl.max(_abs_bits(x), axis=1))
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], _to_e4m3(x, scale[:, None], SOFT_CAST),
                 mask=ok)
    else:
        scale = _scale_of(_rows_amax_bits(x_ptr, rows, row_ok, K, stride_xm, BLOCK_K, K_TILES))
        _cast_rows(x_ptr, q_ptr, rows, row_ok, scale[:, None], K, stride_xm, stride_qm, BLOCK_K, K_TILES,
                   SOFT_CAST)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


@uses(_row_block, _rows_amax_bits)
def _amax_kernel(x_ptr, amax_ptr, M, K, stride_xm,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr):
    rows, row_ok = _row_block(M, BLOCK_M)
    block_amax = tl.max(_rows_amax_bits(x_ptr, rows, row_ok, K, stride_xm, BLOCK_K, K_TILES), axis=0)
    tl.atomic_max(amax_ptr, block_amax)      # non-negative int32 patterns: integer max = float max


@uses(_row_block, _scale_of, _cast_rows)
def _quant_tensor_kernel(x_ptr, q_ptr, amax_ptr, scale_ptr, M, K, stride_xm, stride_qm,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
                         SOFT_CAST: tl.constexpr):
    rows, row_ok = _row_block(M, BLOCK_M)
    scale = _scale_of(tl.load(amax_ptr))
    _cast_rows(x_ptr, q_ptr, rows, row_ok, scale, K, stride_xm, stride_qm, BLOCK_K, K_TILES, SOFT_CAST)
    if tl.program_id(0) == 0:
        tl.store(scale_ptr, scale)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------
def tiles(K: int, max_block_k: int = MAX_BLOCK_K) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, K_TILES) for rows of width K: a whole row per tile when it fits."""
    block_k = min(next_pow2(K), next_pow2(max_block_k))
    return max(1, TILE_ELEMS // block_k), block_k, cdiv(K, block_k)


def _warps(block_m: int, block_k: int) -> int:
    return max(1, min(16, block_m * block_k // 512))     # ~16 elements a thread


def quantize_e4m3_triton(x: torch.Tensor, granularity: str, *,
                         max_block_k: int = MAX_BLOCK_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `quantize_e4m3`: x [M, K] (bf16, fp16 or fp32, rows of any stride, contiguous last dim)
    -> (E4M3 [M, K] contiguous, fp32 scale: [] for `tensor`, [M, 1] for `row`), x ~ q * scale.
    `max_block_k` caps the tile width (tests use it to exercise rows wider than one tile)."""
    op = "quantize_e4m3_triton"
    if granularity not in GRANULARITIES:
        raise ValueError(f"{op}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{op}: x must be a non-empty [M, K] matrix, got shape {tuple(x.shape)}")
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_last_dim_contiguous(op, "x", x)
    check_launchable(op, x.device)
    M, K = x.shape
    q = torch.empty((M, K), dtype=E4M3, device=x.device)
    block_m, block_k, k_tiles = tiles(K, max_block_k)
    grid = (cdiv(M, block_m),)
    meta = {"BLOCK_M": block_m, "BLOCK_K": block_k, "K_TILES": k_tiles, "num_warps": _warps(block_m, block_k)}
    soft = interpreting()
    q_bytes = q.view(torch.uint8)
    if granularity == "row":
        scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
        compiled(_quant_rows_kernel)[grid](x, q_bytes, scale, M, K, x.stride(0), q.stride(0),
                                           SOFT_CAST=soft, **meta)
        return q, scale
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x.device)   # the atomic max's identity
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    compiled(_amax_kernel)[grid](x, amax_bits, M, K, x.stride(0), **meta)
    compiled(_quant_tensor_kernel)[grid](x, q_bytes, amax_bits, scale, M, K, x.stride(0), q.stride(0),
                                         SOFT_CAST=soft, **meta)
    return q, scale
