"""Re-rotate the keys of some ring slots by a RoPE frame-position delta (old_pos -> new_pos).

For rings whose keys are stored fully roped (the `sdpa_ring` backend: spatial + frame rotation applied
at write time, so torch SDPA reads the ring as it is). When a slot's frame position changes (the
sink shift, the per-block rebasing of positions) its keys must turn by R(new - old) on the frame
pairs; the height/width pairs depend only on the token's place in its frame and never move.

    dst[b, dst_slots[b, i]] = R_frame(new_pos[b, i] - old_pos[b, i]) . src[b, src_slots[b, i]]

`src` defaults to `dst` (in place, `src_slots` = `dst_slots`). A separate `src` (e.g. a copy of the
sink keys stored at frame position 0) lets a caller rebuild keys from one stored version instead of
turning the same bf16 keys again and again: every in-place turn rounds once more, and that error
grows with the number of shifts (tests/test_kernels_sdpa_ring.py measures it), a rebuild from the
copy does not. A negative `dst_slots` entry skips that entry (fixed-shape schedules, no host sync).

Angles are (new - old) * inv_freq in fp32 with the reference's inverse frequencies
(avatar_kernels.rope.inv_freqs): the delta is an exact int32 difference, so positions past 1e5 cost no
precision beyond that of the delta itself. Positions must fit in int32 with their difference.
"""
from __future__ import annotations

import torch

from ._triton_util import (
    FLOAT_DTYPES,
    FP_FUSION,
    cdiv,
    check_dtype,
    check_last_dim_contiguous,
    check_launchable,
    check_same_device,
    compiled,
    next_pow2,
    tl,
)
from .rope import apply_rope, device_inv_freqs, inv_freqs, rope_split

_OP = "rerotate_frames_triton"


def _frame_angles(delta: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """[..., D/2] fp32: delta * inv_freq on the frame pairs, 0 (the identity) on the others."""
    freqs = inv_freqs(head_dim, theta, device=delta.device)
    nf = rope_split(head_dim)[0] // 2
    keep = torch.arange(freqs.numel(), device=delta.device) < nf
    return delta.to(torch.float32)[..., None] * freqs * keep


def rerotate_frames_reference(dst: torch.Tensor, dst_slots: torch.Tensor, old_pos: torch.Tensor,
                              new_pos: torch.Tensor, tokens_per_frame: int, theta: float = 10000.0, *,
                              src: torch.Tensor | None = None,
                              src_slots: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 reference (updates and returns `dst`). dst/src [B, S*T, H, D]; slots and positions
    [B, n] (int). Entries are applied in order; a dst slot outside [0, S) is skipped."""
    src, src_slots = (dst, dst_slots) if src is None else (src, dst_slots if src_slots is None else src_slots)
    T = tokens_per_frame
    B, _, H, D = dst.shape
    d_rows = dst.view(B, -1, T, H, D)
    s_rows = src.view(B, -1, T, H, D)
    delta = new_pos.long() - old_pos.long()
    for b in range(B):
        for i in range(dst_slots.shape[1]):
            slot = int(dst_slots[b, i])
            if not 0 <= slot < d_rows.shape[1]:
                continue
            keys = s_rows[b, int(src_slots[b, i])][None]                               # [1, T, H, D]
            angles = _frame_angles(delta[b, i], D, theta).expand(1, T, D // 2)
            d_rows[b, slot] = apply_rope(keys, angles)[0].to(dst.dtype)
    return dst


# --------------------------------------------------------------------------------------------------
# Triton kernel: program (entry, tile) turns BLOCK_R rows of (token, head) of one slot, BLOCK_D
# channels each. In place only the frame channels are read and written (2 * N_FRAME of D: 44 of 128),
# the others stay as they are; from a separate source every channel is copied (the non-frame pairs
# with angle 0, an exact identity: cos 0 = 1, sin 0 = 0). An in-place entry with delta 0 returns
# at once, so a fixed schedule costs almost nothing in blocks where nothing shifts.
# --------------------------------------------------------------------------------------------------
def _kernel(dst_ptr, src_ptr, dst_slots_ptr, src_slots_ptr, old_ptr, new_ptr, inv_freq_ptr,
            stride_db, stride_dl, stride_dh, stride_sb, stride_sl, stride_sh,
            stride_ib, stride_ii, stride_jb, stride_ji, stride_ob, stride_oi, stride_nb, stride_ni,
            n, T, S_dst, S_src,
            H: tl.constexpr, D: tl.constexpr, N_FRAME: tl.constexpr, IN_PLACE: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    entry = tl.program_id(0)
    b = (entry // n).to(tl.int64)            # int64: batch offsets of a large ring overflow int32
    i = entry % n
    dst_slot = tl.load(dst_slots_ptr + b * stride_ib + i * stride_ii).to(tl.int64)
    src_slot = tl.load(src_slots_ptr + b * stride_jb + i * stride_ji).to(tl.int64)
    delta = (tl.load(new_ptr + b * stride_nb + i * stride_ni)
             - tl.load(old_ptr + b * stride_ob + i * stride_oi))
    skip = (dst_slot < 0) | (dst_slot >= S_dst) | (src_slot < 0) | (src_slot >= S_src)
    if IN_PLACE:
        skip = skip | (delta == 0)
    if not skip:
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        tok = rows // H
        head = rows % H
        row_ok = rows < T * H
        pair = tl.arange(0, BLOCK_D // 2)
        inv = tl.load(inv_freq_ptr + pair, mask=pair < N_FRAME, other=0.0)
        ang = tl.where(pair < N_FRAME, delta.to(tl.float32) * inv, 0.0)
        c = tl.cos(ang)[None, :]
        s = tl.sin(ang)[None, :]
        ch = tl.arange(0, BLOCK_D)
        if IN_PLACE:
            ch_ok = ch < 2 * N_FRAME
        else:
            ch_ok = ch < D
        ok = row_ok[:, None] & ch_ok[None, :]
        src = (src_ptr + b * stride_sb + (src_slot * T + tok)[:, None] * stride_sl
               + head[:, None] * stride_sh + ch[None, :])
        x = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        e, o = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_D // 2, 2)))
        y = tl.reshape(tl.join(e * c - o * s, e * s + o * c), (BLOCK_R, BLOCK_D))
        dst = (dst_ptr + b * stride_db + (dst_slot * T + tok)[:, None] * stride_dl
               + head[:, None] * stride_dh + ch[None, :])
        tl.store(dst, y.to(dst_ptr.dtype.element_ty), mask=ok)


def _check(dst, dst_slots, old_pos, new_pos, T, src, src_slots) -> None:
    if dst.dim() != 4 or src.dim() != 4:
        raise ValueError(f"{_OP}: dst and src must be [B, S*T, H, D], got {tuple(dst.shape)}, {tuple(src.shape)}")
    B, D = dst.shape[0], dst.shape[3]
    if src.shape[0] != B or src.shape[2:] != dst.shape[2:]:
        raise ValueError(f"{_OP}: src {tuple(src.shape)} must match dst {tuple(dst.shape)} but for its length")
    if T < 1 or dst.shape[1] % T or src.shape[1] % T:
        raise ValueError(f"{_OP}: ring lengths {dst.shape[1]}, {src.shape[1]} are not whole {T}-token slots")
    if D % 2:
        raise ValueError(f"{_OP}: head_dim must be even, got {D}")
    if dst_slots.dim() != 2 or dst_slots.shape[0] != B:
        raise ValueError(f"{_OP}: dst_slots must be [B={B}, n], got {tuple(dst_slots.shape)}")
    for name, t in (("src_slots", src_slots), ("old_pos", old_pos), ("new_pos", new_pos)):
        if tuple(t.shape) != tuple(dst_slots.shape):
            raise ValueError(f"{_OP}: {name} must have shape {tuple(dst_slots.shape)}, got {tuple(t.shape)}")
    check_dtype(_OP, "dst", dst, FLOAT_DTYPES)
    check_dtype(_OP, "src", src, FLOAT_DTYPES)
    for name, t in (("dst_slots", dst_slots), ("src_slots", src_slots)):
        check_dtype(_OP, name, t, (torch.int32, torch.int64))
    for name, t in (("old_pos", old_pos), ("new_pos", new_pos)):
        check_dtype(_OP, name, t, (torch.int32,))
    check_last_dim_contiguous(_OP, "dst", dst)
    check_last_dim_contiguous(_OP, "src", src)


def rerotate_frames_triton(dst: torch.Tensor, dst_slots: torch.Tensor, old_pos: torch.Tensor,
                           new_pos: torch.Tensor, tokens_per_frame: int, theta: float = 10000.0, *,
                           src: torch.Tensor | None = None,
                           src_slots: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `rerotate_frames_reference` (updates and returns `dst`).

    dst/src: [B, S*T, H, D] bf16/fp16/fp32, any strides with a contiguous last dim. Slots: int32/int64
    [B, n]; positions int32 [B, n]; all on one device. Slots outside the ring are skipped (no host
    sync on CUDA). In place, no slot may appear twice in a row (that is a race; rejected on the CPU).
    A separate `src` must not overlap `dst`.
    """
    in_place = src is None or src is dst
    if in_place:
        if src_slots is not None and src_slots is not dst_slots:
            raise ValueError(f"{_OP}: in place, src_slots must be dst_slots (pass src to read elsewhere)")
        src, src_slots = dst, dst_slots
    elif src_slots is None:
        src_slots = dst_slots
    T = tokens_per_frame
    _check(dst, dst_slots, old_pos, new_pos, T, src, src_slots)
    device = check_same_device(_OP, dst=dst, src=src, dst_slots=dst_slots, src_slots=src_slots,
                               old_pos=old_pos, new_pos=new_pos)
    check_launchable(_OP, device)
    if device.type == "cpu":
        for row in dst_slots.tolist():
            kept = [s for s in row if s >= 0]
            if len(set(kept)) != len(kept):
                raise ValueError(f"{_OP}: dst_slots row names a slot twice: {row}")
    B, _, H, D = dst.shape
    n = dst_slots.shape[1]
    if B * n == 0:
        return dst
    block_d = next_pow2(D)
    block_r = 16 if device.type == "cpu" else max(1, 4096 // block_d)   # ~4K elements a program
    grid = (B * n, cdiv(T * H, block_r))
    compiled(_kernel)[grid](
        dst, src, dst_slots, src_slots, old_pos, new_pos, device_inv_freqs(D, theta, device),
        dst.stride(0), dst.stride(1), dst.stride(2), src.stride(0), src.stride(1), src.stride(2),
        dst_slots.stride(0), dst_slots.stride(1), src_slots.stride(0), src_slots.stride(1),
        old_pos.stride(0), old_pos.stride(1), new_pos.stride(0), new_pos.stride(1),
        n, T, dst.shape[1] // T, src.shape[1] // T,
        H=H, D=D, N_FRAME=rope_split(D)[0] // 2, IN_PLACE=in_place, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4, enable_fp_fusion=FP_FUSION)
    return dst
