"""Block-causal attention of the current block over a session's KV ring, RoPE applied at read time.

Ring layout (one layer): k_ring / v_ring are [B, S * T, H, D]: S slots of one latent frame each,
T tokens per frame in (row, col) order. `slot_pos[b, s]` is the RoPE frame position of slot s
(INVALID_POS for a slot that holds nothing yet); `q_pos[b, f]` that of query frame f. Every valid slot
is visible to every query (bidirectional within the block; the caller decides which frames the ring
holds).

Two key layouts, one result. The reference takes keys un-roped (`spatial_roped_keys=False`) or, like
the Triton kernel, keys that already carry the height/width part of their rotation
(`avatar_kernels.rope.rotate_spatial`, applied by the KV-write kernel as the key is stored). That part
depends only on a token's place inside its frame, so it is the same wherever the frame later sits in
time; only the frame part moves when positions shift (the sink frames' shift), and it is applied
here, at read time. A position shift is therefore a change of `slot_pos`, never a rewrite of the
cache, and the kernel's inner loop over keys does no rotation at all (see the kernel's comment).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._triton_util import (
    FLOAT_DTYPES,
    FP_FUSION,
    cdiv,
    check_dtype,
    check_last_dim_contiguous,
    check_launchable,
    check_same_device,
    check_shape,
    compiled,
    interpreting,
    next_pow2,
    tl,
    uses,
)
from .rope import apply_rope, device_inv_freqs, frame_only, rope_angles, rope_split

INVALID_POS = -(2 ** 31)


def window_attention_reference(q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                               slot_pos: torch.Tensor, q_pos: torch.Tensor, grid_h: int, grid_w: int,
                               theta: float = 10000.0, scale: float | None = None, *,
                               spatial_roped_keys: bool = False) -> torch.Tensor:
    """fp32 reference. q [B, Fq*T, H, D]; returns [B, Fq*T, H, D] in q.dtype.

    `spatial_roped_keys`: the ring's keys already carry their height/width rotation (the layout the
    Triton kernel reads), so only the frame part of their rotation is applied here.

    Empty slots are masked out of the softmax, but their (zero-weighted) values still enter the
    product, so they must hold finite numbers (a ring allocated with zeros); the Triton kernel never
    reads them. A query row with no valid slot at all gets NaN (softmax over nothing).
    """
    B, Lq, H, D = q.shape
    T = grid_h * grid_w
    S = slot_pos.shape[1]
    assert k_ring.shape == v_ring.shape == (B, S * T, H, D), (k_ring.shape, (B, S * T, H, D))
    assert Lq == q_pos.shape[1] * T
    valid = slot_pos != INVALID_POS                                                   # [B, S]
    safe_pos = torch.where(valid, slot_pos, torch.zeros_like(slot_pos))
    qr = apply_rope(q, rope_angles(q_pos, grid_h, grid_w, D, theta))
    k_angles = rope_angles(safe_pos, grid_h, grid_w, D, theta)
    kr = apply_rope(k_ring, frame_only(k_angles, D) if spatial_roped_keys else k_angles)
    scale = D ** -0.5 if scale is None else scale
    logits = torch.einsum("bqhd,bkhd->bhqk", qr, kr) * scale
    key_valid = valid.repeat_interleave(T, dim=1)                                     # [B, S*T]
    logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(dim=-1), v_ring.float())
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel
#
# One program owns BLOCK_M query rows of one (batch, head) and walks the ring in place: an outer loop
# over the S slots (empty ones skipped by a branch), an inner loop over BLOCK_N-token tiles of the
# slot's frame, so key n = s * T + t is read at its own ring row (wrap-around is just the slot order;
# nothing is gathered or concatenated).
#
# RoPE costs nothing in the inner loop. Keys arrive with their height/width rotation (written so by
# the KV-write kernel); what is left is the slot's frame rotation R(theta_s), the same for every key of
# the slot. Since (R_q q) . (R(theta_s) k) = (R(-theta_s) R_q q) . k, it is applied to the query tile
# instead, once per slot: BLOCK_M rows per slot instead of T rows per slot, and the inner loop is a
# plain FlashAttention-2 step. Only the frame pairs turn with the slot, and they all lie in the low
# half of the head dim (rope_split: 44 of 128 channels), so q is kept in two halves: the high half
# rotated once and kept as an MMA operand, the low half kept as fp32 (even, odd) pairs and re-rotated
# per slot. QK^T is two MMAs of K = D/2 (the same MMA work as one of K = D). Angles are pos * inv_freq
# in fp32 from the same `[D/2]` inverse frequencies as the reference, and R(-theta_s) R_q is two
# rotations with the reference's own cos/sin (not one of the angle difference), so nothing drifts at
# large positions.
# Softmax is the FlashAttention-2 online form in base 2 with fp32 statistics and accumulator.
# --------------------------------------------------------------------------------------------------
def _attend_key_tile(acc, m_i, l_i, q_lo, q_hi, k_base, v_base, first_row, n_left, stride_kl, stride_vl,
                     qk_scale, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     MASK_TOKENS: tl.constexpr, DOT_PRECISION: tl.constexpr, MMA_DTYPE: tl.constexpr):
    """One FlashAttention-2 step over ring rows first_row .. first_row + BLOCK_N (the first n_left
    of them are keys of this slot: only read when MASK_TOKENS). QK^T is two MMAs of K = D/2."""
    HALF: tl.constexpr = BLOCK_D // 2
    j = tl.arange(0, BLOCK_N)
    key_rows = (first_row + j)[:, None]
    dim_lo = tl.arange(0, HALF)
    dim_hi = HALF + dim_lo
    dim = tl.arange(0, BLOCK_D)
    k_lo_ptrs = k_base + key_rows * stride_kl + dim_lo[None, :]
    k_hi_ptrs = k_base + key_rows * stride_kl + dim_hi[None, :]
    v_ptrs = v_base + key_rows * stride_vl + dim[None, :]
    if MASK_TOKENS or D != BLOCK_D:
        if MASK_TOKENS:
            tok_ok = (j < n_left)[:, None]
        else:
            tok_ok = tl.full((BLOCK_N, 1), True, tl.int1)
        k_lo = tl.load(k_lo_ptrs, mask=tok_ok & (dim_lo < D)[None, :], other=0.0)
        k_hi = tl.load(k_hi_ptrs, mask=tok_ok & (dim_hi < D)[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=tok_ok & (dim < D)[None, :], other=0.0)
    else:
        k_lo = tl.load(k_lo_ptrs)
        k_hi = tl.load(k_hi_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q_lo, tl.trans(k_lo.to(MMA_DTYPE)), input_precision=DOT_PRECISION)
    qk = tl.dot(q_hi, tl.trans(k_hi.to(MMA_DTYPE)), qk, input_precision=DOT_PRECISION)
    if MASK_TOKENS:
        qk = tl.where((j < n_left)[None, :], qk, float("-inf"))

    # online softmax in base 2; qk_scale > 0 commutes with max, so the scale folds into one FMA.
    # Every tile holds a valid key, so m_new is finite from the first tile on (where alpha =
    # exp2(-inf) = 0).
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p_mma = p.to(v_base.dtype.element_ty).to(MMA_DTYPE)
    acc = tl.dot(p_mma, v.to(MMA_DTYPE), acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@uses(_attend_key_tile)
def _window_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, slot_pos_ptr, q_pos_ptr, inv_freq_ptr,
        stride_qb, stride_ql, stride_qh,
        stride_kb, stride_kl, stride_kh,
        stride_vb, stride_vl, stride_vh,
        stride_ob, stride_ol, stride_oh,
        stride_sb, stride_ss, stride_pb, stride_pf,
        Lq, S, T, grid_w, qk_scale,
        H: tl.constexpr, D: tl.constexpr, N_FRAME: tl.constexpr, N_HEIGHT: tl.constexpr,
        INVALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EVEN_T: tl.constexpr, DOT_PRECISION: tl.constexpr, MMA_DTYPE: tl.constexpr):
    HALF: tl.constexpr = BLOCK_D // 2          # channels per half of the head dim
    PAIRS: tl.constexpr = BLOCK_D // 4         # rotation pairs per half
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)          # int64: batch offsets of a large ring overflow int32
    h = pid_bh % H

    # ---- queries: rotate by their full 3-D angles, once, in fp32
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    q_tok = rows % T
    q_frame = tl.load(q_pos_ptr + b * stride_pb + (rows // T) * stride_pf, mask=row_ok, other=0)
    q_frame = q_frame.to(tl.float32)[:, None]
    q_row = (q_tok // grid_w).to(tl.float32)[:, None]
    q_col = (q_tok % grid_w).to(tl.float32)[:, None]
    q_base = q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql
    pair_lo = tl.arange(0, PAIRS)
    pair_hi = PAIRS + pair_lo
    inv_lo = tl.load(inv_freq_ptr + pair_lo, mask=pair_lo < D // 2, other=0.0)
    inv_hi = tl.load(inv_freq_ptr + pair_hi, mask=pair_hi < D // 2, other=0.0)
    dim_lo = tl.arange(0, HALF)
    dim_hi = HALF + dim_lo
    ang_lo = tl.where(pair_lo[None, :] < N_FRAME, q_frame,
                      tl.where(pair_lo[None, :] < N_FRAME + N_HEIGHT, q_row, q_col)) * inv_lo[None, :]
    ang_hi = tl.where(pair_hi[None, :] < N_FRAME + N_HEIGHT, q_row, q_col) * inv_hi[None, :]
    q = tl.load(q_base + dim_lo[None, :], mask=row_ok[:, None] & (dim_lo < D)[None, :], other=0.0)
    e, o = tl.split(tl.reshape(q.to(tl.float32), (BLOCK_M, PAIRS, 2)))
    c_lo = tl.cos(ang_lo)
    s_lo = tl.sin(ang_lo)
    q_lo_even = e * c_lo - o * s_lo            # kept in fp32: re-rotated per slot
    q_lo_odd = e * s_lo + o * c_lo
    q = tl.load(q_base + dim_hi[None, :], mask=row_ok[:, None] & (dim_hi < D)[None, :], other=0.0)
    e, o = tl.split(tl.reshape(q.to(tl.float32), (BLOCK_M, PAIRS, 2)))
    c_hi = tl.cos(ang_hi)
    s_hi = tl.sin(ang_hi)
    # rounded to the input dtype like every MMA operand (MMA_DTYPE only differs in the interpreter)
    q_hi = tl.reshape(tl.join(e * c_hi - o * s_hi, e * s_hi + o * c_hi),
                      (BLOCK_M, HALF)).to(q_ptr.dtype.element_ty).to(MMA_DTYPE)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dim = tl.arange(0, BLOCK_D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    is_frame = pair_lo < N_FRAME

    for s in range(S):
        pos = tl.load(slot_pos_ptr + b * stride_sb + s * stride_ss)
        if pos != INVALID:                   # an empty slot is skipped, never read (it may hold NaN)
            # R(-theta_s) on the frame pairs (angle 0, the identity, on the others)
            ang = tl.where(is_frame, pos.to(tl.float32) * inv_lo, 0.0)
            c = tl.cos(ang)[None, :]
            sn = tl.sin(ang)[None, :]
            q_lo = tl.reshape(tl.join(q_lo_even * c + q_lo_odd * sn, q_lo_odd * c - q_lo_even * sn),
                              (BLOCK_M, HALF)).to(q_ptr.dtype.element_ty).to(MMA_DTYPE)
            # whole key tiles without token masks (pipelined), then the partial last one, if any
            for tile_start in range(0, T - T % BLOCK_N, BLOCK_N):
                acc, m_i, l_i = _attend_key_tile(
                    acc, m_i, l_i, q_lo, q_hi, k_base, v_base, s * T + tile_start, T - tile_start,
                    stride_kl, stride_vl, qk_scale, D, BLOCK_N, BLOCK_D, False, DOT_PRECISION, MMA_DTYPE)
            if not EVEN_T:
                tail = T - T % BLOCK_N
                acc, m_i, l_i = _attend_key_tile(
                    acc, m_i, l_i, q_lo, q_hi, k_base, v_base, s * T + tail, T - tail,
                    stride_kl, stride_vl, qk_scale, D, BLOCK_N, BLOCK_D, True, DOT_PRECISION, MMA_DTYPE)

    # a row that saw no valid slot has l = 0 and gets NaN, like the reference
    out = acc / l_i[:, None]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + dim[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (dim < D)[None, :])


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch shape of the Triton window attention."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"AttentionConfig.{name} must be a power of two >= 16 (MMA tile), got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"AttentionConfig.num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"AttentionConfig.num_stages must be >= 1, got {self.num_stages}")


# Interpreter: numpy runs a whole tile per op, so the smallest MMA-legal tiles keep CPU tests quick
# while still giving several query tiles and partial key tiles at tiny shapes.
_INTERPRETER_CONFIG = AttentionConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
# GPU, 16-bit inputs, head_dim <= 128 (the real shape is 128). Chosen offline from sm_90 SASS (no GPU
# was available; reproduce with `python -m benchmarks.sass_report`): 128 query rows over 8 warps
# (two warpgroups of m64 wgmma) keep the fp32 accumulator at 64 registers a thread. With no rotation
# left in the key loop, BLOCK_N 128 fits too: 255 registers, no spills in the loop, ~550 SASS
# instructions a thread per 128 keys against ~365 per 64 keys at BLOCK_N 64 (the loop's fixed cost -
# barriers, pipeline bookkeeping, the alpha rescale of the accumulator - is paid half as often).
# Both run one CTA per SM. Two stages of 128-key K/V tiles take 160 KB of shared memory.
# benchmarks/bench_kernels.py sweeps the alternatives on a GPU; its numbers overrule this choice.
_GPU_CONFIG = AttentionConfig(block_m=128, block_n=128, num_warps=8, num_stages=2)
# GPU, head_dim above 128 or fp32 inputs: tiles twice as wide in bytes, so halve them.
_GPU_CONFIG_WIDE = AttentionConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)

_OP = "window_attention_triton"


def default_attention_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> AttentionConfig:
    if device.type == "cpu":
        return _INTERPRETER_CONFIG
    if dtype == torch.float32 or head_dim > 128:
        return _GPU_CONFIG_WIDE
    return _GPU_CONFIG


def _mma_dtype(dtype: torch.dtype):
    """The dtype of the MMA operands: the input dtype, except that Triton's interpreter multiplies
    bf16 as raw 16-bit integers, so there bf16 operands are widened to fp32 (exactly: every bf16 is an
    fp32, and the GPU's bf16 MMA accumulates exact products in fp32 too)."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def _check_attention_inputs(q, k_ring, v_ring, slot_pos, q_pos, grid_h, grid_w) -> None:
    if q.dim() != 4:
        raise ValueError(f"{_OP}: q must be [B, Lq, H, D], got shape {tuple(q.shape)}")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"{_OP}: grid_h and grid_w must be >= 1, got {grid_h} x {grid_w}")
    B, Lq, H, D = q.shape
    T = grid_h * grid_w
    if slot_pos.dim() != 2 or slot_pos.shape[0] != B or slot_pos.shape[1] < 1:
        raise ValueError(f"{_OP}: slot_pos must be [B={B}, S>=1], got shape {tuple(slot_pos.shape)}")
    S = slot_pos.shape[1]
    check_shape(_OP, "k_ring", k_ring, (B, S * T, H, D))
    check_shape(_OP, "v_ring", v_ring, (B, S * T, H, D))
    if q_pos.dim() != 2 or q_pos.shape[0] != B or q_pos.shape[1] * T != Lq:
        raise ValueError(f"{_OP}: q_pos must be [B={B}, Fq] with Fq * T = Lq ({Lq} queries, T = {T} "
                         f"tokens per frame), got shape {tuple(q_pos.shape)}")
    if D % 2 or D < 2 or D > 256:
        raise ValueError(f"{_OP}: head_dim must be even and in [2, 256], got {D}")
    check_dtype(_OP, "q", q, FLOAT_DTYPES)
    for name, t in (("k_ring", k_ring), ("v_ring", v_ring)):
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
    check_dtype(_OP, "slot_pos", slot_pos, (torch.int32,))
    check_dtype(_OP, "q_pos", q_pos, (torch.int32,))
    for name, t in (("q", q), ("k_ring", k_ring), ("v_ring", v_ring)):
        check_last_dim_contiguous(_OP, name, t)


def window_attention_triton(q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                            slot_pos: torch.Tensor, q_pos: torch.Tensor, grid_h: int, grid_w: int,
                            theta: float = 10000.0, scale: float | None = None, *,
                            out: torch.Tensor | None = None,
                            config: AttentionConfig | None = None) -> torch.Tensor:
    """Triton window attention: `window_attention_reference(..., spatial_roped_keys=True)`.

    k_ring holds keys rotated by the height/width part of RoPE only (`avatar_kernels.rope.rotate_spatial`;
    the Triton KV write stores them so); the frame part is applied here from `slot_pos`.

    q [B, Lq, H, D] and the rings [B, S*T, H, D] (bf16, fp16 or fp32, one dtype, any strides with a
    contiguous last dim); slot_pos [B, S] and q_pos [B, Fq] int32 on the same device. `out` (same
    shape and dtype as q) receives the result if given. Empty slots are never read.
    """
    _check_attention_inputs(q, k_ring, v_ring, slot_pos, q_pos, grid_h, grid_w)
    device = check_same_device(_OP, q=q, k_ring=k_ring, v_ring=v_ring, slot_pos=slot_pos, q_pos=q_pos)
    check_launchable(_OP, device)
    B, Lq, H, D = q.shape
    S = slot_pos.shape[1]
    T = grid_h * grid_w
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        check_shape(_OP, "out", out, tuple(q.shape))
        if out.dtype != q.dtype or out.device != device:
            raise ValueError(f"{_OP}: out must be {q.dtype} on {device}, got {out.dtype} on {out.device}")
        check_last_dim_contiguous(_OP, "out", out)
    cfg = config or default_attention_config(D, q.dtype, device)
    block_d = next_pow2(D)
    if device.type == "cuda" and block_d < 32:
        raise ValueError(f"{_OP}: head_dim {D} is too small for GPU MMA tiles (need >= 32, each "
                         "even/odd half is an MMA operand with K >= 16)")
    n_frame, n_height, _ = (p // 2 for p in rope_split(D))
    if 2 * n_frame > block_d // 2:  # pragma: no cover - rope_split keeps the frame part below D/2
        raise ValueError(f"{_OP}: the frame part of RoPE at head_dim {D} does not fit the low half")
    scale = D ** -0.5 if scale is None else float(scale)
    grid = (cdiv(Lq, cfg.block_m), B * H)
    compiled(_window_attention_kernel)[grid](
        q, k_ring, v_ring, out, slot_pos, q_pos, device_inv_freqs(D, theta, device),
        q.stride(0), q.stride(1), q.stride(2),
        k_ring.stride(0), k_ring.stride(1), k_ring.stride(2),
        v_ring.stride(0), v_ring.stride(1), v_ring.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        slot_pos.stride(0), slot_pos.stride(1), q_pos.stride(0), q_pos.stride(1),
        Lq, S, T, grid_w, scale * math.log2(math.e),
        H=H, D=D, N_FRAME=n_frame, N_HEIGHT=n_height, INVALID=INVALID_POS,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, EVEN_T=T % cfg.block_n == 0,
        # fp32 inputs get true fp32 products (tf32 would cost ~3 decimal digits)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        MMA_DTYPE=_mma_dtype(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)
    return out
