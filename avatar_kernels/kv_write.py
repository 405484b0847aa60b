"""q/k RMSNorm over the full model width, fused with writing k and v into the KV ring.

The norm is the release's: x * rsqrt(mean(x^2) + eps) in fp32, cast to the activation dtype, then
times the weight. k is stored un-roped, or (with `rope_grid`, the layout the Triton attention reads)
rotated by the height/width part of RoPE only: that part depends only on the token's place in its
frame, so it is applied once here; the frame part, the one that moves when positions shift, is applied
when attention reads the key (see avatar_kernels/window_attention.py). With `frame_pos` as well, k is
stored fully roped (height/width and frame at the given positions): the layout the `sdpa_ring` backend
hands to torch SDPA as it is; a later position change is then a re-rotation (avatar_kernels/rerotate.py).
"""
from __future__ import annotations

import torch

from ._triton_util import (
    FLOAT_DTYPES,
    FP_FUSION,
    check_dtype,
    check_last_dim_contiguous,
    check_launchable,
    check_same_device,
    check_shape,
    compiled,
    next_pow2,
    row_warps,
    tl,
)
from .rope import (
    apply_rope,
    device_inv_freqs,
    device_spatial_cos_sin,
    rope_angles,
    rope_split,
    rotate_spatial,
)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return normed * weight.to(x.dtype)


def qk_norm_kv_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                               k_ring: torch.Tensor, v_ring: torch.Tensor,
                               write_slots: torch.Tensor, *, rope_grid: tuple[int, int] | None = None,
                               rope_theta: float = 10000.0,
                               frame_pos: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: [B, Fq*T, dim]; rings [B, S*T, H, D]; write_slots [B, Fq] (slot of each block frame).

    Writes RMSNorm(k) and v into the ring slots, cast to the ring dtype (k un-roped, or rotated by
    the height/width part of RoPE when `rope_grid` = (grid_h, grid_w) is given, by the full rotation
    when `frame_pos` [B, Fq] int32, the frame position of each written frame, is given too; returns RMSNorm(q)
    as [B, Fq*T, H, D] in q's dtype. The product with the weight is taken in the activation dtype
    (weight cast to it first), as the release does. Rows of other slots are not touched.
    """
    B, Lq, _ = q.shape
    _, ST, H, D = k_ring.shape
    Fq = write_slots.shape[1]
    T = Lq // Fq
    kn = rms_norm_reference(k, k_weight, eps).view(B, Fq * T, H, D)
    _check_frame_pos(frame_pos, rope_grid, B, Fq)
    if frame_pos is not None:
        kn = apply_rope(kn, rope_angles(frame_pos, *rope_grid, D, rope_theta))   # one rounding, below
    elif rope_grid is not None:
        kn = rotate_spatial(kn, *rope_grid, rope_theta)
    kn = kn.view(B, Fq, T, H, D)
    vv = v.view(B, Fq, T, H, D)
    kr = k_ring.view(B, ST // T, T, H, D)
    vr = v_ring.view(B, ST // T, T, H, D)
    for b in range(B):
        kr[b, write_slots[b].long()] = kn[b].to(k_ring.dtype)
        vr[b, write_slots[b].long()] = vv[b].to(v_ring.dtype)
    return rms_norm_reference(q, q_weight, eps).view(B, Lq, H, D)


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per token row. The row of q and of k (the full model width, H * D) is
# normalised in fp32 in registers; q goes to its output, k and v go straight to ring row
# slot * T + t of the token's frame (slot read from write_slots on the device, so no host sync).
# With ROPE, k is rotated by its height/width angles on the way (adjacent channel pairs: the row is
# viewed as [BLOCK/2, 2], split, rotated in fp32 and joined back). cos/sin come from a [T, D/2] table
# (frame pairs hold angle 0), shared by all heads of a token: computing them here would make this
# memory-bound kernel compute-bound (~2500 SASS instructions a thread with libdevice sin/cos, ~450
# without).
# --------------------------------------------------------------------------------------------------
def _qk_norm_kv_write_kernel(
        q_ptr, k_ptr, v_ptr, q_weight_ptr, k_weight_ptr, q_out_ptr, k_ring_ptr, v_ring_ptr, slots_ptr,
        stride_qb, stride_ql, stride_kb, stride_kl, stride_vb, stride_vl,
        stride_ob, stride_ol, stride_oh,
        stride_krb, stride_krl, stride_krh, stride_vrb, stride_vrl, stride_vrh,
        stride_wb, stride_wf, cos_ptr, sin_ptr, fcos_ptr, fsin_ptr,
        Lq, T, S, eps,
        DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ROPE: tl.constexpr,
        FRAME: tl.constexpr, N_FRAME: tl.constexpr):
    row = tl.program_id(0)
    b = (row // Lq).to(tl.int64)            # int64: batch offsets of a large ring overflow int32
    i = row % Lq
    c = tl.arange(0, BLOCK)
    c_ok = c < DIM
    head = c // HEAD_DIM
    d = c % HEAD_DIM
    act = q_ptr.dtype.element_ty

    # q: RMSNorm in fp32, rounded to the activation dtype, times the weight in that dtype
    q = tl.load(q_ptr + b * stride_qb + i * stride_ql + c, mask=c_ok, other=0.0).to(tl.float32)
    q_w = tl.load(q_weight_ptr + c, mask=c_ok, other=0.0).to(act).to(tl.float32)
    q_n = (q * tl.rsqrt(tl.sum(q * q, 0) / DIM + eps)).to(act).to(tl.float32)
    tl.store(q_out_ptr + b * stride_ob + i * stride_ol + head * stride_oh + d,
             (q_n * q_w).to(act).to(q_out_ptr.dtype.element_ty), mask=c_ok)

    # ring row of this token; a slot outside [0, S) writes nothing (never out of bounds)
    slot = tl.load(slots_ptr + b * stride_wb + (i // T) * stride_wf).to(tl.int64)
    ring_row = slot * T + i % T
    w_ok = tl.where((slot >= 0) & (slot < S), c_ok, False)

    k = tl.load(k_ptr + b * stride_kb + i * stride_kl + c, mask=c_ok, other=0.0).to(tl.float32)
    k_w = tl.load(k_weight_ptr + c, mask=c_ok, other=0.0).to(act).to(tl.float32)
    k_n = (k * tl.rsqrt(tl.sum(k * k, 0) / DIM + eps)).to(act).to(tl.float32)
    k_n = (k_n * k_w).to(act).to(tl.float32)
    if ROPE:
        table = (i % T) * (HEAD_DIM // 2) + tl.arange(0, BLOCK // 2) % (HEAD_DIM // 2)
        cos = tl.load(cos_ptr + table)
        sin = tl.load(sin_ptr + table)
        if FRAME:
            # frame pairs (angle 0 in the spatial table) take the written frame's angle instead
            pair = tl.arange(0, BLOCK // 2) % (HEAD_DIM // 2)
            is_frame = pair < N_FRAME
            fidx = (b * (Lq // T) + i // T) * N_FRAME + tl.where(is_frame, pair, 0)
            cos = tl.where(is_frame, tl.load(fcos_ptr + fidx), cos)
            sin = tl.where(is_frame, tl.load(fsin_ptr + fidx), sin)
        e, o = tl.split(tl.reshape(k_n, (BLOCK // 2, 2)))
        k_n = tl.reshape(tl.join(e * cos - o * sin, e * sin + o * cos), (BLOCK,))
    tl.store(k_ring_ptr + b * stride_krb + ring_row * stride_krl + head * stride_krh + d,
             k_n.to(k_ring_ptr.dtype.element_ty), mask=w_ok)

    v = tl.load(v_ptr + b * stride_vb + i * stride_vl + c, mask=c_ok, other=0.0)
    tl.store(v_ring_ptr + b * stride_vrb + ring_row * stride_vrl + head * stride_vrh + d,
             v.to(v_ring_ptr.dtype.element_ty), mask=w_ok)


_OP = "qk_norm_kv_write_triton"


def _check_kv_write_inputs(q, k, v, q_weight, k_weight, k_ring, v_ring, write_slots) -> tuple[int, int]:
    """Validates and returns (T, S)."""
    if q.dim() != 3:
        raise ValueError(f"{_OP}: q must be [B, Lq, dim], got shape {tuple(q.shape)}")
    B, Lq, dim = q.shape
    check_shape(_OP, "k", k, (B, Lq, dim))
    check_shape(_OP, "v", v, (B, Lq, dim))
    check_shape(_OP, "q_weight", q_weight, (dim,))
    check_shape(_OP, "k_weight", k_weight, (dim,))
    if k_ring.dim() != 4 or k_ring.shape[0] != B or k_ring.shape[2] * k_ring.shape[3] != dim:
        raise ValueError(f"{_OP}: k_ring must be [B={B}, S*T, H, D] with H*D = {dim}, "
                         f"got {tuple(k_ring.shape)}")
    check_shape(_OP, "v_ring", v_ring, tuple(k_ring.shape))
    if write_slots.dim() != 2 or write_slots.shape[0] != B or write_slots.shape[1] < 1:
        raise ValueError(f"{_OP}: write_slots must be [B={B}, Fq], got shape {tuple(write_slots.shape)}")
    Fq = write_slots.shape[1]
    if Lq % Fq:
        raise ValueError(f"{_OP}: Lq = {Lq} tokens is not a whole number of the {Fq} frames in write_slots")
    T = Lq // Fq
    if k_ring.shape[1] % T:
        raise ValueError(f"{_OP}: ring length {k_ring.shape[1]} is not a whole number of {T}-token slots")
    check_dtype(_OP, "q", q, FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
    for name, t in (("q_weight", q_weight), ("k_weight", k_weight), ("k_ring", k_ring), ("v_ring", v_ring)):
        check_dtype(_OP, name, t, FLOAT_DTYPES)
    check_dtype(_OP, "write_slots", write_slots, (torch.int32, torch.int64))
    for name, t in (("q", q), ("k", k), ("v", v), ("q_weight", q_weight), ("k_weight", k_weight),
                    ("k_ring", k_ring), ("v_ring", v_ring)):
        check_last_dim_contiguous(_OP, name, t)
    return T, k_ring.shape[1] // T


def _check_rope_grid(rope_grid: tuple[int, int] | None, T: int) -> None:
    """A (grid_h, grid_w) must tile the T tokens of a frame."""
    if rope_grid is None:
        return
    grid_h, grid_w = rope_grid
    if grid_h < 1 or grid_w < 1 or grid_h * grid_w != T:
        raise ValueError(f"{_OP}: rope_grid {tuple(rope_grid)} does not tile the {T} tokens of a frame")


def _check_frame_pos(frame_pos: torch.Tensor | None, rope_grid, B: int, Fq: int) -> None:
    """Fully roped keys need the grid (the spatial part) and one int32 position per written frame."""
    if frame_pos is None:
        return
    if rope_grid is None:
        raise ValueError(f"{_OP}: frame_pos (fully roped keys) needs rope_grid as well")
    check_shape(_OP, "frame_pos", frame_pos, (B, Fq))
    check_dtype(_OP, "frame_pos", frame_pos, (torch.int32,))


def _frame_cos_sin(frame_pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, Fq, frame pairs] fp32 of the written frames: the reference's angles (pos * inv_freq
    on the same device), computed on the device (no sync) once per call rather than per token."""
    nf = rope_split(head_dim)[0] // 2
    ang = frame_pos.to(torch.float32)[..., None] * device_inv_freqs(head_dim, theta, frame_pos.device)[:nf]
    return torch.cos(ang).contiguous(), torch.sin(ang).contiguous()


def _check_slots_on_host(write_slots: torch.Tensor, S: int) -> None:
    """Slot range and uniqueness, checked only when the slots already live on the host (no sync)."""
    if write_slots.device.type != "cpu":
        return
    if bool(((write_slots < 0) | (write_slots >= S)).any()):
        raise ValueError(f"{_OP}: write_slots must lie in [0, {S}), got {write_slots.tolist()}")
    for b, row in enumerate(write_slots.tolist()):
        if len(set(row)) != len(row):
            raise ValueError(f"{_OP}: write_slots row {b} names a slot twice: {row}")


def qk_norm_kv_write_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                            k_ring: torch.Tensor, v_ring: torch.Tensor, write_slots: torch.Tensor, *,
                            rope_grid: tuple[int, int] | None = None, rope_theta: float = 10000.0,
                            frame_pos: torch.Tensor | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `qk_norm_kv_write_reference` (same arguments, same result and ring writes).
    The Triton window attention reads keys written with `rope_grid`; `sdpa_ring` reads keys written
    with `rope_grid` and `frame_pos` (fully roped).

    On CUDA, write_slots is not inspected on the host (no sync): slots outside [0, S) write nothing,
    and a slot named twice in one row is a race. On the CPU both are rejected with an error.
    `out` ([B, Lq, H, D], q's dtype) receives the normalised q if given.
    """
    T, S = _check_kv_write_inputs(q, k, v, q_weight, k_weight, k_ring, v_ring, write_slots)
    device = check_same_device(_OP, q=q, k=k, v=v, q_weight=q_weight, k_weight=k_weight,
                               k_ring=k_ring, v_ring=v_ring, write_slots=write_slots)
    check_launchable(_OP, device)
    _check_slots_on_host(write_slots, S)
    B, Lq, dim = q.shape
    H, D = k_ring.shape[2], k_ring.shape[3]
    if out is None:
        out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=device)
    else:
        check_shape(_OP, "out", out, (B, Lq, H, D))
        if out.dtype != q.dtype or out.device != device:
            raise ValueError(f"{_OP}: out must be {q.dtype} on {device}, got {out.dtype} on {out.device}")
        check_last_dim_contiguous(_OP, "out", out)
    block = next_pow2(dim)
    _check_rope_grid(rope_grid, T)
    _check_frame_pos(frame_pos, rope_grid, B, write_slots.shape[1])
    if frame_pos is not None:
        check_same_device(_OP, q=q, frame_pos=frame_pos)
    cos, sin = (device_spatial_cos_sin(*rope_grid, D, rope_theta, device) if rope_grid is not None
                else (q_weight, q_weight))    # unused without RoPE: any pointer will do
    fcos, fsin = _frame_cos_sin(frame_pos, D, rope_theta) if frame_pos is not None else (cos, sin)
    compiled(_qk_norm_kv_write_kernel)[(B * Lq,)](
        q, k, v, q_weight, k_weight, out, k_ring, v_ring, write_slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        k_ring.stride(0), k_ring.stride(1), k_ring.stride(2),
        v_ring.stride(0), v_ring.stride(1), v_ring.stride(2),
        write_slots.stride(0), write_slots.stride(1), cos, sin, fcos, fsin,
        Lq, T, S, float(eps),
        DIM=dim, HEAD_DIM=D, BLOCK=block, ROPE=rope_grid is not None,
        FRAME=frame_pos is not None, N_FRAME=rope_split(D)[0] // 2,
        num_warps=row_warps(block), enable_fp_fusion=FP_FUSION)
    return out
