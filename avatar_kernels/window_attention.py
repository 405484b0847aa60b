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
cache, and the kernel does no rotation per key (it turns the query tile, once per slot; see the
kernel's comment).
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
from .rope import apply_rope, device_inv_freqs, device_spatial_cos_sin, frame_only, rope_angles, rope_split

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - no triton, or one without host-side tensor descriptors
    TensorDescriptor = None

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
# Triton kernels
#
# One program owns BLOCK_M query rows of one (batch, head) and one share of the ring's key tiles. The
# ring is read in place: key n = s * T + t sits at its own ring row (wrap-around is just the slot
# order; nothing is gathered or concatenated).
#
# RoPE costs nothing per key. Keys arrive with their height/width rotation (written so by the KV-write
# kernel); what is left is the slot's frame rotation R(theta_s), the same for every key of the slot.
# Since (R_q q) . (R(theta_s) k) = (R(theta_s)^T R_q q) . k, it is applied to the query tile instead,
# once per slot. The frame pairs all lie in the low half of the head dim (rope_split: 44 of 128
# channels), so the high half of q is rotated once (height/width only) and the low half is re-read
# and rotated whenever the slot changes, by cos/sin from tables (no sin/cos in this kernel): the
# height/width pairs from the `[T, D/2]` spatial table, the frame pairs from a per-call
# `[B, Fq, S, N_FRAME]` table of R(theta_s)^T R(theta_f) built by `_slot_table_kernel` as products of
# the reference's own cos/sin (not the cos of an angle difference, so nothing drifts at large
# positions). The two halves are joined into one natural-layout q tile: QK^T is one MMA, K = head_dim.
#
# One loop over every key tile of every valid slot. `_slot_table_kernel` lists the valid slots
# first (`order`, `count`), so iteration `it` is tile it % tiles of slot order[it // tiles], empty
# slots cost nothing and are never read, and Triton's software pipeline (num_stages) runs across slot
# boundaries instead of restarting cold per slot. The query re-rotation for the next slot is a branch
# taken on the last tile of each slot, placed between the two MMAs (see the loop). The partial last tile of a frame (T = 1560 at 480x832) is masked to -inf in
# a branch taken only on that tile; its K/V rows past the frame are zero-filled by TMA (the descriptor
# is [B, S, T, H, D], so they are out of bounds) or masked off in the pointer path.
#
# Split over keys (flash-decoding): grid axis 2 cuts the flattened iteration range into SPLIT equal
# shares so that the grid fills the GPU (see `plan_splits`); each share writes its unnormalised
# (acc, m, l) and `_merge_splits_kernel` combines them. With SPLIT == 1 the kernel writes the output.
#
# Softmax: FlashAttention-2 online form in base 2 with fp32 statistics and accumulator; the scale
# D^-0.5 * log2(e) is folded into q before its rounding to the MMA dtype, so the logits come out of the
# MMA already in base 2.
# --------------------------------------------------------------------------------------------------
def _slot_table_kernel(slot_pos_ptr, q_pos_ptr, inv_freq_ptr, order_ptr, count_ptr, fcos_ptr, fsin_ptr,
                       stride_sb, stride_ss, stride_pb, stride_pf, S, Fq,
                       INVALID: tl.constexpr, N_FRAME: tl.constexpr, S_BLOCK: tl.constexpr,
                       F_BLOCK: tl.constexpr):
    """Per batch row b: order[b, :count[b]] = the valid slots in slot order, then S (no slot) up to
    S entries; fcos/fsin[b, f, c, p] = cos/sin of (theta_{q frame f} - theta_{slot order[c]}) on frame
    pair p, as cos a cos b + sin a sin b and sin a cos b - cos a sin b of the reference's own angles
    (the identity for c >= count, so every entry is finite)."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, S_BLOCK)
    pos = tl.load(slot_pos_ptr + b * stride_sb + s * stride_ss, mask=s < S, other=INVALID)
    valid = pos != INVALID
    count = tl.sum(valid.to(tl.int32), 0)
    # valid slots to ranks 0 .. count-1 in slot order, the others after them
    rank = tl.where(valid, tl.cumsum(valid.to(tl.int32), 0) - 1,
                    count + tl.cumsum((~valid).to(tl.int32), 0) - 1)
    in_ring = s < S
    tl.store(order_ptr + b * S + rank, tl.where(valid, s, S), mask=in_ring)
    tl.store(count_ptr + b, count)
    p = tl.arange(0, F_BLOCK)
    inv = tl.load(inv_freq_ptr + p, mask=p < N_FRAME, other=0.0)
    ang_s = tl.where(valid, pos, 0).to(tl.float32)[:, None] * inv[None, :]          # [S_BLOCK, F_BLOCK]
    cs = tl.cos(ang_s)
    ss = tl.sin(ang_s)
    ok = in_ring[:, None] & (p < N_FRAME)[None, :]
    valid2 = valid[:, None]
    for f in range(Fq):
        ang_f = tl.load(q_pos_ptr + b * stride_pb + f * stride_pf).to(tl.float32) * inv[None, :]
        cf = tl.cos(ang_f)
        sf = tl.sin(ang_f)
        at = ((b * Fq + f) * S + rank[:, None]) * N_FRAME + p[None, :]
        tl.store(fcos_ptr + at, tl.where(valid2, cf * cs + sf * ss, 1.0), mask=ok)
        tl.store(fsin_ptr + at, tl.where(valid2, sf * cs - cf * ss, 0.0), mask=ok)


def _rotate_pairs(x, c, s, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """x [BLOCK_M, WIDTH] fp32 with (even, odd) pairs interleaved, each pair turned by cos c / sin s
    [BLOCK_M, WIDTH // 2]."""
    e, o = tl.split(tl.reshape(x, (BLOCK_M, WIDTH // 2, 2)))
    return tl.reshape(tl.join(e * c - o * s, e * s + o * c), (BLOCK_M, WIDTH))


def _load_kv_tile(ptr, desc, b32, b, h, s, t0, S, T, stride_b, stride_l, stride_h,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  EVEN_T: tl.constexpr, USE_TMA: tl.constexpr):
    """Ring rows s * T + t0 .. + BLOCK_N of head h as [BLOCK_N, BLOCK_D]; rows past the frame,
    columns past D and all of slot s == S read as zero (TMA: out of the descriptor's bounds; pointers:
    masked)."""
    if USE_TMA:
        return tl.reshape(desc.load([b32, s, t0, h, 0]), (BLOCK_N, BLOCK_D))
    j = tl.arange(0, BLOCK_N)
    dim = tl.arange(0, BLOCK_D)
    ptrs = ptr + b * stride_b + h * stride_h + (s * T + t0 + j)[:, None] * stride_l + dim[None, :]
    # s == S is the out-of-range slot of a share with no work: nothing is read
    tok_ok = t0 + j < tl.where(s < S, T, 0)
    return tl.load(ptrs, mask=tok_ok[:, None] & (dim < D)[None, :], other=0.0)


@uses(_rotate_pairs)
def _rotated_channels(q_base, row_ok, q_frame, q_tok, scos_ptr, ssin_ptr, fcos_ptr, fsin_ptr, b, c, S, Fq,
                      qk_scale, D: tl.constexpr, N_FRAME: tl.constexpr, BLOCK_M: tl.constexpr,
                      FIRST: tl.constexpr, WIDTH: tl.constexpr):
    """Channels FIRST .. FIRST + WIDTH of q for slot order[c], scaled and rounded to q's dtype: frame
    pairs turned by R(theta_s)^T R(theta_f) from the slot table, height/width pairs by the spatial
    table."""
    pair = FIRST // 2 + tl.arange(0, WIDTH // 2)
    fr_ok = row_ok[:, None] & (pair < N_FRAME)[None, :]
    sp_ok = row_ok[:, None] & ((pair >= N_FRAME) & (pair < D // 2))[None, :]
    f_at = ((b * Fq + q_frame[:, None]) * S + c) * N_FRAME + pair[None, :]
    s_at = q_tok[:, None] * (D // 2) + pair[None, :]
    # each pair is in exactly one table: the other load gives 0 and the sum picks it
    cos = tl.load(fcos_ptr + f_at, mask=fr_ok, other=0.0) + tl.load(scos_ptr + s_at, mask=sp_ok, other=0.0)
    sin = tl.load(fsin_ptr + f_at, mask=fr_ok, other=0.0) + tl.load(ssin_ptr + s_at, mask=sp_ok, other=0.0)
    dim = FIRST + tl.arange(0, WIDTH)
    x = tl.load(q_base + dim[None, :], mask=row_ok[:, None] & (dim < D)[None, :], other=0.0)
    rotated = _rotate_pairs(x.to(tl.float32), cos, sin, BLOCK_M, WIDTH) * qk_scale
    return rotated.to(q_base.dtype.element_ty)


def _concat(a, b, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """[a | b] along dim 1, both [BLOCK_M, WIDTH]."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (BLOCK_M, 2 * WIDTH))


@uses(_rotated_channels, _concat)
def _query_for_slot(q_base, row_ok, q_frame, q_tok, q_hi, scos_ptr, ssin_ptr, fcos_ptr, fsin_ptr,
                    b, c, S, Fq, qk_scale, D: tl.constexpr, N_FRAME: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr, MMA_DTYPE: tl.constexpr):
    """The MMA operand q for slot order[c]: the low half turned to the slot's frame, in two quarters
    (fewer live registers), joined to the high half (MMA_DTYPE differs from q's dtype only in the
    interpreter)."""
    Q: tl.constexpr = BLOCK_D // 4
    lo = _concat(_rotated_channels(q_base, row_ok, q_frame, q_tok, scos_ptr, ssin_ptr, fcos_ptr, fsin_ptr,
                                   b, c, S, Fq, qk_scale, D, N_FRAME, BLOCK_M, 0, Q),
                 _rotated_channels(q_base, row_ok, q_frame, q_tok, scos_ptr, ssin_ptr, fcos_ptr, fsin_ptr,
                                   b, c, S, Fq, qk_scale, D, N_FRAME, BLOCK_M, Q, Q), BLOCK_M, Q)
    return _concat(lo, q_hi, BLOCK_M, 2 * Q).to(MMA_DTYPE)


@uses(_rotated_channels, _load_kv_tile, _query_for_slot)
def _window_attention_kernel(
        q_ptr, k_ptr, v_ptr, k_desc, v_desc, o_ptr, m_ptr, l_ptr,
        order_ptr, count_ptr, fcos_ptr, fsin_ptr, scos_ptr, ssin_ptr,
        stride_qb, stride_ql, stride_qh,
        stride_kb, stride_kl, stride_kh,
        stride_vb, stride_vl, stride_vh,
        stride_os, stride_ob, stride_ol, stride_oh,
        Lq, S, T, Fq, qk_scale,
        H: tl.constexpr, D: tl.constexpr, N_FRAME: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EVEN_T: tl.constexpr, SPLIT: tl.constexpr, USE_TMA: tl.constexpr,
        DOT_PRECISION: tl.constexpr, MMA_DTYPE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b32 = pid_bh // H
    b = b32.to(tl.int64)                    # int64: batch offsets of a large ring overflow int32
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    q_tok = rows % T
    q_frame = rows // T
    q_base = q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql

    # ---- high half of q: height/width pairs only, the same for every slot: rotated once
    q_hi = _rotated_channels(q_base, row_ok, q_frame, q_tok, scos_ptr, ssin_ptr, fcos_ptr, fsin_ptr, b, 0, S,
                             Fq, qk_scale, D, N_FRAME, BLOCK_M, BLOCK_D // 2, BLOCK_D // 2)

    # ---- this program's share of the flattened (valid slot, key tile) iterations
    tiles = tl.cdiv(T, BLOCK_N)
    n_iter = tl.load(count_ptr + b) * tiles
    share = tl.cdiv(n_iter, SPLIT)
    it_start = pid_s * share
    # At least one iteration, always: a loop that may run zero times makes ptxas serialise every
    # wgmma in it (the zero-trip path defines the accumulators by moves while the last MMA is in
    # flight). A share with no work runs one iteration on an out-of-range slot (zeros, nothing read)
    # and its (m, l, acc) are reset after the loop.
    has_work = it_start < n_iter
    it_end = tl.maximum(tl.minimum(it_start + share, n_iter), it_start + 1)
    tl.assume(it_end > it_start)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    q = _query_for_slot(q_base, row_ok, q_frame, q_tok, q_hi, scos_ptr, ssin_ptr, fcos_ptr, fsin_ptr,
                        b, tl.minimum(it_start // tiles, S - 1), S, Fq, qk_scale,
                        D, N_FRAME, BLOCK_M, BLOCK_D, MMA_DTYPE)
    j = tl.arange(0, BLOCK_N)
    for it in range(it_start, it_end):
        c = tl.minimum(it // tiles, S - 1)   # clamped: only a no-work share goes past the last slot
        t0 = (it - (it // tiles) * tiles) * BLOCK_N
        s = tl.where(it < n_iter, tl.load(order_ptr + b * S + c), S)   # S: out of range, reads zeros
        k = _load_kv_tile(k_ptr, k_desc, b32, b, h, s, t0, S, T, stride_kb, stride_kl, stride_kh,
                          D, BLOCK_N, BLOCK_D, EVEN_T, USE_TMA)
        v = _load_kv_tile(v_ptr, v_desc, b32, b, h, s, t0, S, T, stride_vb, stride_vl, stride_vh,
                          D, BLOCK_N, BLOCK_D, EVEN_T, USE_TMA)
        qk = tl.dot(q, tl.trans(k.to(MMA_DTYPE)), input_precision=DOT_PRECISION)   # base-2 logits
        if not EVEN_T:  # noqa: SIM102 - a compile-time branch around a run-time one
            if t0 + BLOCK_N > T:             # the frame's partial last tile: keys past T are not keys
                qk = tl.where((t0 + j < T)[None, :], qk, float("-inf"))
        # every tile holds a valid key, so m_new is finite from the first tile on (alpha = 0 there)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p_mma = p.to(q_ptr.dtype.element_ty).to(MMA_DTYPE)
        # the next tile starts a new slot: turn q to its frame now, between the QK^T MMA (done) and the
        # PV one (not yet issued), where no MMA is in flight (a q update while one is would make ptxas
        # serialise every wgmma of the loop)
        if (t0 + BLOCK_N >= T) & (it + 1 < it_end):
            q = _query_for_slot(q_base, row_ok, q_frame, q_tok, q_hi, scos_ptr, ssin_ptr, fcos_ptr,
                                fsin_ptr, b, tl.minimum(c + 1, S - 1), S, Fq, qk_scale,
                                D, N_FRAME, BLOCK_M, BLOCK_D, MMA_DTYPE)
        acc = tl.dot(p_mma, v.to(MMA_DTYPE), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    m_i = tl.where(has_work, m_i, float("-inf"))
    l_i = tl.where(has_work, l_i, 0.0)
    acc = tl.where(has_work, acc, 0.0)

    dim = tl.arange(0, BLOCK_D)
    o_ptrs = (o_ptr + pid_s * stride_os + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol
              + dim[None, :])
    o_ok = row_ok[:, None] & (dim < D)[None, :]
    if SPLIT == 1:
        # a row that saw no valid slot has l = 0 and gets NaN, like the reference
        tl.store(o_ptrs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=o_ok)
    else:
        tl.store(o_ptrs, acc, mask=o_ok)
        stat = (pid_s * tl.num_programs(1) + pid_bh).to(tl.int64) * Lq + rows
        tl.store(m_ptr + stat, m_i, mask=row_ok)
        tl.store(l_ptr + stat, l_i, mask=row_ok)


def _merge_splits_kernel(part_ptr, m_ptr, l_ptr, o_ptr,
                         stride_ps, stride_pb, stride_pl, stride_ph, stride_ob, stride_ol, stride_oh, Lq,
                         H: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i over the splits, M = max_i m_i. A row
    with no valid key anywhere has M = -inf and gets NaN (2^(-inf - -inf)), like the reference."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    dim = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (dim < D)[None, :]
    bh_rows = pid_bh.to(tl.int64) * Lq + rows
    split_stride = tl.num_programs(1).to(tl.int64) * Lq
    m_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for i in range(SPLIT):
        m_max = tl.maximum(m_max, tl.load(m_ptr + i * split_stride + bh_rows, mask=row_ok, other=0.0))
    l_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    part = part_ptr + b * stride_pb + h * stride_ph + rows[:, None] * stride_pl + dim[None, :]
    for i in range(SPLIT):
        w = tl.math.exp2(tl.load(m_ptr + i * split_stride + bh_rows, mask=row_ok, other=0.0) - m_max)
        l_sum += w * tl.load(l_ptr + i * split_stride + bh_rows, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(part + i * stride_ps, mask=ok, other=0.0)
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + dim[None, :]
    tl.store(o_ptrs, (acc / l_sum[:, None]).to(o_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------
# Resident CTAs per SM of the default GPU tiles (registers and shared memory, from sm_90 SASS; see
# benchmarks.sass_report, which recomputes it). Used only to size the split.
CTAS_PER_SM = 1
MAX_SPLITS = 8


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch shape of the Triton window attention. `splits`: key-range shares per
    query tile (0: chosen from the SM count, `plan_splits`); `tma`: K/V through TMA tensor descriptors
    where the inputs allow (16-byte aligned base and strides), else pointer loads."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    splits: int = 0
    tma: bool = True

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"AttentionConfig.{name} must be a power of two >= 16 (MMA tile), got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"AttentionConfig.num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"AttentionConfig.num_stages must be >= 1, got {self.num_stages}")
        if not 0 <= self.splits <= MAX_SPLITS:
            raise ValueError(f"AttentionConfig.splits must be in [0, {MAX_SPLITS}] (0: auto), got {self.splits}")


# Interpreter: numpy runs a whole tile per op, so the smallest MMA-legal tiles keep CPU tests quick
# while still giving several query tiles and partial key tiles at tiny shapes.
_INTERPRETER_CONFIG = AttentionConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
# GPU, 16-bit inputs, head_dim <= 128 (the real shape is 128). Chosen offline from sm_90 SASS (no GPU
# was available; reproduce with `python -m benchmarks.sass_report`): 128 query rows over 8 warps
# (two warpgroups of m64 wgmma) keep the fp32 accumulator at 64 registers a thread; 128-key tiles
# pay the loop's fixed cost (barriers, TMA issue, the alpha rescale) at 588 SASS instructions a
# thread per 128 keys against 430 per 64 keys at BLOCK_N 64. Two stages of 128-key K/V tiles (128 KB)
# plus the q tile's 32 KB staging are 160 KB of shared memory, and 255 registers a thread use all
# 65536 of an SM at 8 warps: one CTA per SM (`CTAS_PER_SM`), which is why the grid is split over
# keys. benchmarks/bench_kernels.py sweeps the alternatives on a GPU; its numbers overrule this
# choice.
_GPU_CONFIG = AttentionConfig(block_m=128, block_n=128, num_warps=8, num_stages=2)
# GPU, head_dim above 128 or fp32 inputs: tiles twice as wide in bytes, so halve them.
_GPU_CONFIG_WIDE = AttentionConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
# A split costs an fp32 round trip of the partial outputs (about 3 % of the kernel's time per extra
# share at the real shape) and buys a fuller last wave; stop at the first split this efficient.
_GOOD_WAVES = 0.9

_OP = "window_attention_triton"


def wave_efficiency(ctas: int, slots: int) -> float:
    """Busy fraction of the GPU over the waves a grid of `ctas` equal CTAs takes on `slots`
    (= SMs x resident CTAs per SM) CTA slots."""
    return ctas / (cdiv(ctas, slots) * slots)


def plan_splits(query_tiles: int, n_sm: int, ctas_per_sm: int = CTAS_PER_SM, max_splits: int = MAX_SPLITS) -> int:
    """The smallest key split whose grid (query_tiles x splits CTAs) runs at >= 90 % wave efficiency,
    else the most efficient one up to `max_splits`."""
    slots = n_sm * ctas_per_sm
    best = max(range(1, max_splits + 1), key=lambda s: (wave_efficiency(query_tiles * s, slots), -s))
    for s in range(1, max_splits + 1):
        if wave_efficiency(query_tiles * s, slots) >= _GOOD_WAVES:
            return s
    return best


def default_attention_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> AttentionConfig:
    if device.type == "cpu":
        return _INTERPRETER_CONFIG
    if dtype == torch.float32 or head_dim > 128:
        return _GPU_CONFIG_WIDE
    return _GPU_CONFIG


_sm_counts: dict[torch.device, int] = {}


def _sm_count(device: torch.device) -> int:
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]


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


def _kv_descriptor(ring: torch.Tensor, S: int, T: int, cfg: AttentionConfig, block_d: int):
    """A TMA descriptor of the ring as [B, S, T, H, D] (rows past a frame's T tokens are out of
    bounds and read as zero), or None where TMA cannot take it: not wanted, a Triton without
    descriptors, a GPU before sm_90 (no TMA), a base or stride that is not 16-byte aligned. The
    interpreter runs descriptors too (tests cover both paths)."""
    if not cfg.tma or TensorDescriptor is None:
        return None
    if ring.device.type == "cuda" and torch.cuda.get_device_capability(ring.device)[0] < 9:
        return None
    B, _, H, D = ring.shape
    sb, sl, sh, _ = ring.stride()
    strides = [sb, T * sl, sl, sh, 1]
    if ring.data_ptr() % 16 or any(st * ring.element_size() % 16 for st in strides[:-1]):
        return None
    return TensorDescriptor(ring, [B, S, T, H, D], strides, [1, 1, cfg.block_n, 1, block_d])


def _slot_tables(slot_pos, q_pos, D, theta, n_frame):
    """order [B, S] int32 (valid slots first), count [B] int32, and the frame cos/sin tables
    [B, Fq, S, n_frame] fp32, from one launch of `_slot_table_kernel`."""
    B, S = slot_pos.shape
    Fq = q_pos.shape[1]
    dev = slot_pos.device
    order = torch.empty(B, S, dtype=torch.int32, device=dev)
    count = torch.empty(B, dtype=torch.int32, device=dev)
    fcos = torch.empty(B, Fq, S, n_frame, dtype=torch.float32, device=dev)
    fsin = torch.empty_like(fcos)
    compiled(_slot_table_kernel)[(B,)](
        slot_pos, q_pos, device_inv_freqs(D, theta, dev), order, count, fcos, fsin,
        slot_pos.stride(0), slot_pos.stride(1), q_pos.stride(0), q_pos.stride(1), S, Fq,
        INVALID=INVALID_POS, N_FRAME=n_frame, S_BLOCK=max(16, next_pow2(S)),
        F_BLOCK=max(16, next_pow2(n_frame)), num_warps=1)
    return order, count, fcos, fsin


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
                         "half of q is built with K >= 16)")
    n_frame = rope_split(D)[0] // 2
    if n_frame > block_d // 4:  # pragma: no cover - rope_split keeps the frame part below D/2
        raise ValueError(f"{_OP}: the frame part of RoPE at head_dim {D} does not fit the low half")
    qk_scale = (D ** -0.5 if scale is None else float(scale)) * math.log2(math.e)
    query_tiles = cdiv(Lq, cfg.block_m)
    splits = cfg.splits or (plan_splits(query_tiles * B * H, _sm_count(device)) if device.type == "cuda" else 1)

    order, count, fcos, fsin = _slot_tables(slot_pos, q_pos, D, theta, n_frame)
    scos, ssin = device_spatial_cos_sin(grid_h, grid_w, D, theta, device)
    k_desc, v_desc = (_kv_descriptor(r, S, T, cfg, block_d) for r in (k_ring, v_ring))
    use_tma = k_desc is not None and v_desc is not None
    if splits == 1:
        dest, m_part, l_part = out, out, out          # m/l unused with one share
        dest_strides = (0, out.stride(0), out.stride(1), out.stride(2))
    else:
        dest = torch.empty(splits, B, H, Lq, D, dtype=torch.float32, device=device)
        m_part = torch.empty(splits, B * H, Lq, dtype=torch.float32, device=device)
        l_part = torch.empty_like(m_part)
        dest_strides = (dest.stride(0), dest.stride(1), dest.stride(3), dest.stride(2))
    compiled(_window_attention_kernel)[(query_tiles, B * H, splits)](
        q, k_ring, v_ring, k_desc if use_tma else None, v_desc if use_tma else None, dest, m_part, l_part,
        order, count, fcos, fsin, scos, ssin,
        q.stride(0), q.stride(1), q.stride(2),
        k_ring.stride(0), k_ring.stride(1), k_ring.stride(2),
        v_ring.stride(0), v_ring.stride(1), v_ring.stride(2),
        *dest_strides, Lq, S, T, q_pos.shape[1], qk_scale,
        H=H, D=D, N_FRAME=n_frame, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        EVEN_T=T % cfg.block_n == 0, SPLIT=splits, USE_TMA=use_tma,
        # fp32 inputs get true fp32 products (tf32 would cost ~3 decimal digits)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        MMA_DTYPE=_mma_dtype(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)
    if splits > 1:
        compiled(_merge_splits_kernel)[(query_tiles, B * H)](
            dest, m_part, l_part, out, *(dest.stride(i) for i in (0, 1, 3, 2)),
            out.stride(0), out.stride(1), out.stride(2), Lq,
            H=H, D=D, SPLIT=splits, BLOCK_M=cfg.block_m, BLOCK_D=block_d, num_warps=cfg.num_warps)
    return out
