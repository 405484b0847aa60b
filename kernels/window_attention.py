"""Block-causal attention of the current block over a session's KV ring, RoPE applied at read time.

Ring layout (one layer): k_ring / v_ring are [B, S * T, H, D]: S slots of one latent frame each,
T tokens per frame in (row, col) order. Keys are stored un-roped. `slot_pos[b, s]` is the RoPE frame
position of slot s (INVALID_POS for a slot that holds nothing yet); `q_pos[b, f]` that of query
frame f. Queries and keys are both rotated here (3-D RoPE, see kernels/rope.py), so the sink frames'
position shift is a change of `slot_pos`, never a rewrite of the cache. Every valid slot is visible
to every query (bidirectional within the block; the caller decides which frames the ring holds).
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
)
from .rope import apply_rope, inv_freqs, rope_angles, rope_split

INVALID_POS = -(2 ** 31)


def window_attention_reference(q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                               slot_pos: torch.Tensor, q_pos: torch.Tensor, grid_h: int, grid_w: int,
                               theta: float = 10000.0, scale: float | None = None) -> torch.Tensor:
    """fp32 reference. q [B, Fq*T, H, D]; returns [B, Fq*T, H, D] in q.dtype.

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
    kr = apply_rope(k_ring, rope_angles(safe_pos, grid_h, grid_w, D, theta))
    scale = D ** -0.5 if scale is None else scale
    logits = torch.einsum("bqhd,bkhd->bhqk", qr, kr) * scale
    key_valid = valid.repeat_interleave(T, dim=1)                                     # [B, S*T]
    logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(dim=-1), v_ring.float())
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel
#
# One program owns BLOCK_M query rows of one (batch, head). It walks the ring in place: an outer loop
# over BLOCK_N-token tiles of a frame and an inner loop over the S slots, so key n = s * T + t is read
# at its own ring row (wrap-around is just the slot order; nothing is gathered or concatenated).
# The loop order is the RoPE cost model. A key's height/width angles depend only on its token t in
# the frame, so their cos/sin are computed once per tile and reused for all S slots; its frame angle
# depends only on the slot, so the [S, D/2] frame cos/sin are computed once per program and row s is
# picked out in the loop (a masked sum: cheaper than recomputing cos/sin of large frame angles).
# q is rotated once per program. Rotation works on (even, odd) channel pairs: a tile is viewed as
# [rows, D/2, 2] and split, rotated in fp32, joined back and rounded to the input dtype for the MMA.
# Softmax is the FlashAttention-2 online form in base 2 with fp32 statistics and accumulator.
# --------------------------------------------------------------------------------------------------
def _window_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, slot_pos_ptr, q_pos_ptr, inv_freq_ptr,
        stride_qb, stride_ql, stride_qh,
        stride_kb, stride_kl, stride_kh,
        stride_vb, stride_vl, stride_vh,
        stride_ob, stride_ol, stride_oh,
        stride_sb, stride_ss, stride_pb, stride_pf,
        Lq, S, T, grid_w, qk_scale,
        H: tl.constexpr, D: tl.constexpr, N_FRAME: tl.constexpr, N_HEIGHT: tl.constexpr,
        INVALID: tl.constexpr, S_POW2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, MMA_DTYPE: tl.constexpr):
    HALF: tl.constexpr = BLOCK_D // 2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)          # int64: batch offsets of a large ring overflow int32
    h = pid_bh % H

    pair = tl.arange(0, HALF)
    inv_freq = tl.load(inv_freq_ptr + pair, mask=pair < D // 2, other=0.0)
    is_frame = pair < N_FRAME
    is_height = (pair >= N_FRAME) & (pair < N_FRAME + N_HEIGHT)
    dim = tl.arange(0, BLOCK_D)
    dim_ok = dim < D

    # queries: load, rotate once in fp32, keep as the MMA's A operand
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    q_tok = rows % T
    q_fpos = tl.load(q_pos_ptr + b * stride_pb + (rows // T) * stride_pf, mask=row_ok, other=0)
    q_coord = tl.where(is_frame[None, :], q_fpos.to(tl.float32)[:, None],
                       tl.where(is_height[None, :], (q_tok // grid_w).to(tl.float32)[:, None],
                                (q_tok % grid_w).to(tl.float32)[:, None]))
    q_ang = q_coord * inv_freq[None, :]
    q_cos = tl.cos(q_ang)
    q_sin = tl.sin(q_ang)
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + dim[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q_even, q_odd = tl.split(tl.reshape(q.to(tl.float32), (BLOCK_M, HALF, 2)))
    # rounded to the input dtype like every MMA operand (MMA_DTYPE only differs in the interpreter)
    q_rot = tl.reshape(tl.join(q_even * q_cos - q_odd * q_sin, q_even * q_sin + q_odd * q_cos),
                       (BLOCK_M, BLOCK_D)).to(q_ptr.dtype.element_ty).to(MMA_DTYPE)

    # frame rotation of every slot: [S_POW2, D/2] cos/sin, computed once; row s is picked per step
    slots = tl.arange(0, S_POW2)
    all_pos = tl.load(slot_pos_ptr + b * stride_sb + slots * stride_ss, mask=slots < S, other=INVALID)
    all_ang = tl.where(all_pos != INVALID, all_pos, 0).to(tl.float32)[:, None] * inv_freq[None, :]
    frame_cos = tl.where(is_frame[None, :], tl.cos(all_ang), 0.0)
    frame_sin = tl.where(is_frame[None, :], tl.sin(all_ang), 0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    for tile_start in range(0, T, BLOCK_N):
        tok = tile_start + tl.arange(0, BLOCK_N)
        tok_ok = tok < T
        # height/width rotation of these key tokens: the same in every slot, so computed once here
        hw_coord = tl.where(is_height[None, :], (tok // grid_w).to(tl.float32)[:, None],
                            (tok % grid_w).to(tl.float32)[:, None])
        hw_ang = hw_coord * inv_freq[None, :]
        hw_cos = tl.cos(hw_ang)
        hw_sin = tl.sin(hw_ang)
        for s in range(S):
            pos = tl.load(slot_pos_ptr + b * stride_sb + s * stride_ss)
            slot_ok = pos != INVALID
            this_slot = slots[:, None] == s
            f_cos = tl.sum(tl.where(this_slot, frame_cos, 0.0), 0)
            f_sin = tl.sum(tl.where(this_slot, frame_sin, 0.0), 0)
            k_cos = tl.where(is_frame[None, :], f_cos[None, :], hw_cos)
            k_sin = tl.where(is_frame[None, :], f_sin[None, :], hw_sin)

            # (a where, not `&`: the interpreter gives scalar & block an int dtype that load rejects)
            key_ok = tl.where(slot_ok, tok_ok, False)
            key_rows = s * T + tok
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            # masked loads (other=0): an empty slot may hold anything, even NaN, and is never read
            k = tl.load(k_base + key_rows[:, None] * stride_kl + dim[None, :], mask=kv_mask, other=0.0)
            k_even, k_odd = tl.split(tl.reshape(k.to(tl.float32), (BLOCK_N, HALF, 2)))
            k_rot = tl.reshape(tl.join(k_even * k_cos - k_odd * k_sin, k_even * k_sin + k_odd * k_cos),
                               (BLOCK_N, BLOCK_D)).to(k_ptr.dtype.element_ty).to(MMA_DTYPE)
            qk = tl.dot(q_rot, tl.trans(k_rot), input_precision=DOT_PRECISION)
            qk = tl.where(key_ok[None, :], qk, float("-inf"))

            # online softmax in base 2 (qk_scale > 0 commutes with max, so the scale folds into one
            # FMA); a row that has seen no valid key yet keeps m = -inf, and subtracting 0 instead
            # keeps exp2 at 0 rather than NaN
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + key_rows[:, None] * stride_vl + dim[None, :], mask=kv_mask, other=0.0)
            p_mma = p.to(v_ptr.dtype.element_ty).to(MMA_DTYPE)
            acc = tl.dot(p_mma, v.to(MMA_DTYPE), acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + dim[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


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
# was available): 128 query rows over 8 warps (two warpgroups of m64 wgmma) keep the fp32
# accumulator at 64 registers a thread; BLOCK_N 64 leaves room for the [BLOCK_N, D/2] cos/sin tiles
# kept across the slot loop (BLOCK_N 128 spills); 3 stages of K/V fit in shared memory. At D 128 the
# slot loop is ~700 SASS instructions a thread per 64 keys, no spills; at D 64, 4 warps spill.
# benchmarks/bench_kernels.py sweeps alternatives on a GPU.
_GPU_CONFIG = AttentionConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
# GPU, head_dim above 128 or fp32 inputs: tiles twice as wide in bytes, so halve them.
_GPU_CONFIG_WIDE = AttentionConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)

_OP = "window_attention_triton"


def default_attention_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> AttentionConfig:
    if device.type == "cpu":
        return _INTERPRETER_CONFIG
    if dtype == torch.float32 or head_dim > 128:
        return _GPU_CONFIG_WIDE
    return _GPU_CONFIG


_inv_freq_cache: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """The [D/2] inverse frequencies, computed by kernels.rope on the device itself, so the kernel's
    angles pos * inv_freq are bit-identical to the reference's. Built once per (D, theta, device):
    warm up before CUDA-graph capture (Triton compiles on the first launch anyway)."""
    key = (head_dim, float(theta), device)
    if key not in _inv_freq_cache:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{_OP}: first call for head_dim {head_dim} during CUDA-graph capture; "
                               "run one warm-up call before capturing")
        _inv_freq_cache[key] = inv_freqs(head_dim, theta, device=device).contiguous()
    return _inv_freq_cache[key]


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
    """Triton window attention; same arguments and result as `window_attention_reference`.

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
    scale = D ** -0.5 if scale is None else float(scale)
    grid = (cdiv(Lq, cfg.block_m), B * H)
    compiled(_window_attention_kernel)[grid](
        q, k_ring, v_ring, out, slot_pos, q_pos, _inv_freq(D, theta, device),
        q.stride(0), q.stride(1), q.stride(2),
        k_ring.stride(0), k_ring.stride(1), k_ring.stride(2),
        v_ring.stride(0), v_ring.stride(1), v_ring.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        slot_pos.stride(0), slot_pos.stride(1), q_pos.stride(0), q_pos.stride(1),
        Lq, S, T, grid_w, scale * math.log2(math.e),
        H=H, D=D, N_FRAME=n_frame, N_HEIGHT=n_height, INVALID=INVALID_POS, S_POW2=next_pow2(S),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        # fp32 inputs get true fp32 products (tf32 would cost ~3 decimal digits)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        MMA_DTYPE=_mma_dtype(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)
    return out
