"""Attention/kernel backends: what a device can run, which one to use, and one dispatch per op.

Backends:
- `reference`: the eager fp32 references beside each kernel (always available; the numerical truth).
- `sdpa`: RoPE the ring with avatar_kernels.rope, mask empty slots, `F.scaled_dot_product_attention`
  (always available; torch picks its own fused kernel on a GPU). Other ops use the references.
- `triton`: the fused Triton kernels of this package. Needs triton and either a CUDA device of
  compute capability >= 8.0 (bf16 MMA and asynchronous copies) or, on the CPU, TRITON_INTERPRET=1.
- `flash_attn`: the flash-attn package (when importable) on a CUDA device of capability >= 8.0.
  The ring is roped into a copy with valid slots first, then `flash_attn_with_kvcache` reads the
  first `valid slots x T` keys of each row. Other ops use the references.
- `sdpa_ring`: keys stored fully roped (`qk_norm_kv_write(..., rope_grid=, frame_pos=)`), so
  `F.scaled_dot_product_attention` reads the ring itself: a transposed view, empty slots masked, no
  copy. When slot positions move, `follow_positions_` turns the keys in place first
  (avatar_kernels/rerotate.py; sink/anchor slots are rebuilt from a copy so rounding never piles up).
  On CUDA it needs the Triton re-rotation kernel (capability >= 8.0); on the CPU the reference.

The choice is made from capabilities, never from a GPU's name, and is logged. On CUDA, `auto` can be
settled by timing the capable backends on the real shapes (avatar_kernels/select.py).
"""
from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton_util import interpreting, triton_available
from .kv_write import qk_norm_kv_write_reference, qk_norm_kv_write_triton
from .norm_modulate import (
    gated_residual_reference,
    gated_residual_triton,
    layernorm_modulate_reference,
    layernorm_modulate_triton,
)
from .rerotate import rerotate_frames_reference, rerotate_frames_triton
from .rope import apply_rope, frame_only, rope_angles
from .window_attention import INVALID_POS, window_attention_reference, window_attention_triton

log = logging.getLogger(__name__)

BACKENDS = ("reference", "sdpa", "triton", "flash_attn", "sdpa_ring")
_MIN_CAPABILITY = (8, 0)   # bf16 tensor-core MMA and cp.async, used by the Triton kernels and flash-attn


# --------------------------------------------------------------------------------------------------
# Capabilities
# --------------------------------------------------------------------------------------------------
def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA (not ROCm) device, None for anything else."""
    if device.type != "cuda" or torch.version.hip is not None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


@functools.cache
def _flash_attn_module():
    try:
        return importlib.import_module("flash_attn")
    except Exception:  # noqa: BLE001 - ImportError, or a broken build failing to load its CUDA extension
        return None


def triton_supported(device_type: str, capability: tuple[int, int] | None, interpret: bool,
                     have_triton: bool = True) -> bool:
    """Whether the Triton kernels can run: a pure function of capabilities, for tests and logs."""
    if not have_triton:
        return False
    if device_type == "cpu":
        return interpret
    return device_type == "cuda" and capability is not None and capability >= _MIN_CAPABILITY


def flash_attn_supported(device_type: str, capability: tuple[int, int] | None, importable: bool) -> bool:
    return importable and device_type == "cuda" and capability is not None and capability >= _MIN_CAPABILITY


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device`, in BACKENDS order."""
    device = torch.device(device)
    cap = _cuda_capability(device)
    names = ["reference", "sdpa"]
    if triton_supported(device.type, cap, interpreting(), triton_available()):
        names.append("triton")
    if flash_attn_supported(device.type, cap, _flash_attn_module() is not None):
        names.append("flash_attn")
    if sdpa_ring_supported(device.type, cap, triton_available()):
        names.append("sdpa_ring")
    return names


def sdpa_ring_supported(device_type: str, capability: tuple[int, int] | None, have_triton: bool) -> bool:
    """The re-rotation runs as the Triton kernel on CUDA (the reference would sync the host), as the
    reference on the CPU."""
    if device_type == "cpu":
        return True
    return have_triton and device_type == "cuda" and capability is not None and capability >= _MIN_CAPABILITY


def _auto_choice(device: torch.device, available: list[str]) -> str:
    # On a GPU the fused kernels; on the CPU the interpreter is for tests only, so torch's SDPA.
    if device.type == "cuda" and "triton" in available:
        return "triton"
    return "sdpa"


def select_backend(device: torch.device | str, requested: str = "auto") -> str:
    """The backend to use on `device`: `requested` if it can run there, or the best one for `auto`.

    Raises ValueError for an unknown name or a backend the device cannot run. Logs the choice.
    """
    device = torch.device(device)
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {('auto',) + BACKENDS}")
    available = available_backends(device)
    cap = _cuda_capability(device)
    if requested == "auto":
        choice = _auto_choice(device, available)
    elif requested in available:
        choice = requested
    else:
        raise ValueError(f"backend {requested!r} cannot run on {device} (compute capability {cap}, "
                         f"triton {'present' if triton_available() else 'missing'}, TRITON_INTERPRET "
                         f"{'set' if interpreting() else 'unset'}); available: {available}")
    log.info("kernel backend %r on %s (requested %r, capability %s, available %s)",
             choice, device, requested, cap, available)
    return choice


_resolved: dict[tuple[str, str, bool], str] = {}


def _resolve(device: torch.device, requested: str) -> str:
    """select_backend, remembered per (device, request, interpreter mode) so it logs once."""
    key = (str(device), requested, interpreting())
    if key not in _resolved:
        _resolved[key] = select_backend(device, requested)
    return _resolved[key]


# --------------------------------------------------------------------------------------------------
# Window attention: sdpa and flash_attn implementations (same signature as the reference)
# --------------------------------------------------------------------------------------------------
def _rope_inputs(q, k_ring, slot_pos, q_pos, grid_h, grid_w, theta, spatial_roped_keys):
    """q and the whole ring rotated in fp32 (avatar_kernels.rope) and rounded to q's dtype; the slot mask.
    Keys that already carry their height/width rotation get only the frame part."""
    D = q.shape[-1]
    valid = slot_pos != INVALID_POS
    safe_pos = torch.where(valid, slot_pos, torch.zeros_like(slot_pos))
    q_rot = apply_rope(q, rope_angles(q_pos, grid_h, grid_w, D, theta)).to(q.dtype)
    k_angles = rope_angles(safe_pos, grid_h, grid_w, D, theta)
    k_rot = apply_rope(k_ring, frame_only(k_angles, D) if spatial_roped_keys else k_angles).to(q.dtype)
    return q_rot, k_rot, valid


def window_attention_sdpa(q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                          slot_pos: torch.Tensor, q_pos: torch.Tensor, grid_h: int, grid_w: int,
                          theta: float = 10000.0, scale: float | None = None, *,
                          spatial_roped_keys: bool = False) -> torch.Tensor:
    """`window_attention_reference` through torch SDPA: ring read in place (no gather), empty slots
    masked with a boolean mask. Like the reference, empty slots must hold finite values."""
    B, Lq, H, D = q.shape
    T = grid_h * grid_w
    if k_ring.shape != (B, slot_pos.shape[1] * T, H, D) or q_pos.shape[1] * T != Lq:
        raise ValueError(f"window_attention_sdpa: shapes do not match: q {tuple(q.shape)}, "
                         f"ring {tuple(k_ring.shape)}, slot_pos {tuple(slot_pos.shape)}, "
                         f"q_pos {tuple(q_pos.shape)}, grid {grid_h}x{grid_w}")
    q_rot, k_rot, valid = _rope_inputs(q, k_ring, slot_pos, q_pos, grid_h, grid_w, theta, spatial_roped_keys)
    key_mask = valid.repeat_interleave(T, dim=1)[:, None, None, :]          # [B, 1, 1, S*T]
    out = F.scaled_dot_product_attention(q_rot.transpose(1, 2), k_rot.transpose(1, 2),
                                         v_ring.to(q.dtype).transpose(1, 2), attn_mask=key_mask,
                                         scale=scale)
    return out.transpose(1, 2).to(q.dtype)


def window_attention_flash_attn(q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                                slot_pos: torch.Tensor, q_pos: torch.Tensor, grid_h: int, grid_w: int,
                                theta: float = 10000.0, scale: float | None = None, *,
                                spatial_roped_keys: bool = False) -> torch.Tensor:
    """`window_attention_reference` through flash-attn (fp16/bf16 on CUDA). flash-attn has no mask,
    so valid slots are moved first (stable device argsort, no host sync) in a roped copy of the
    ring and `cache_seqlens` = valid slots x T limits each row to them."""
    module = _flash_attn_module()
    if module is None:
        raise RuntimeError("window_attention_flash_attn: the flash_attn package is not importable")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"window_attention_flash_attn: flash-attn needs fp16 or bf16, got {q.dtype}")
    B, _, H, D = q.shape
    S = slot_pos.shape[1]
    T = grid_h * grid_w
    valid = slot_pos != INVALID_POS
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)       # valid slots first
    rows = (order[:, :, None] * T + torch.arange(T, device=q.device)).reshape(B, S * T)
    index = rows[:, :, None, None].expand(B, S * T, H, D)
    k_sorted = torch.gather(k_ring, 1, index)
    v_sorted = torch.gather(v_ring, 1, index).to(q.dtype).contiguous()
    pos_sorted = torch.gather(slot_pos, 1, order)
    q_rot, k_rot, _ = _rope_inputs(q, k_sorted, pos_sorted, q_pos, grid_h, grid_w, theta, spatial_roped_keys)
    seqlens = (valid.sum(dim=1) * T).to(torch.int32)
    return module.flash_attn_with_kvcache(q_rot.contiguous(), k_rot.contiguous(), v_sorted,
                                          cache_seqlens=seqlens, softmax_scale=scale, causal=False)


# --------------------------------------------------------------------------------------------------
# sdpa_ring: torch SDPA straight over a ring of fully roped keys, kept there by re-rotation
# --------------------------------------------------------------------------------------------------
def window_attention_sdpa_ring(q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                               slot_pos: torch.Tensor, q_pos: torch.Tensor, grid_h: int, grid_w: int,
                               theta: float = 10000.0, scale: float | None = None, *,
                               all_valid: bool = False) -> torch.Tensor:
    """`window_attention_reference` over a ring whose keys carry their full rotation at `slot_pos`
    (written by qk_norm_kv_write(..., rope_grid=, frame_pos=), kept so by `follow_positions_`).

    Only q is rotated. SDPA reads k_ring / v_ring as [B, H, S*T, D] views of the ring (no copy, any
    slot order: a wrapped ring is read as it lies, the positions live in the keys); empty slots are
    masked with a boolean mask, so like the reference they must hold finite values. `all_valid=True`
    (the caller knows every slot holds keys, as in a full ring) drops the mask, which lets torch use
    its flash kernel; with a mask it picks cuDNN / memory-efficient attention. Rings and q must share
    a dtype (a cast would be the copy this backend exists to avoid).
    """
    B, Lq, H, D = q.shape
    T = grid_h * grid_w
    if k_ring.shape != (B, slot_pos.shape[1] * T, H, D) or v_ring.shape != k_ring.shape \
            or q_pos.shape[1] * T != Lq:
        raise ValueError(f"window_attention_sdpa_ring: shapes do not match: q {tuple(q.shape)}, "
                         f"rings {tuple(k_ring.shape)} / {tuple(v_ring.shape)}, slot_pos "
                         f"{tuple(slot_pos.shape)}, q_pos {tuple(q_pos.shape)}, grid {grid_h}x{grid_w}")
    if k_ring.dtype != q.dtype or v_ring.dtype != q.dtype:
        raise TypeError(f"window_attention_sdpa_ring: rings {k_ring.dtype}/{v_ring.dtype} must have q's "
                        f"dtype {q.dtype}")
    q_rot = apply_rope(q, rope_angles(q_pos, grid_h, grid_w, D, theta)).to(q.dtype)
    mask = None if all_valid else (slot_pos != INVALID_POS).repeat_interleave(T, dim=1)[:, None, None, :]
    out = F.scaled_dot_product_attention(q_rot.transpose(1, 2), k_ring.transpose(1, 2), v_ring.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@dataclass
class RopedRingState:
    """What a ring of fully roped keys needs besides the keys, per batch row (all layers move alike).

    key_pos [B, S] int32: the frame position each slot's keys carry (INVALID_POS: none yet).
    anchors [L, B, A*T, H, D] (ring dtype): the keys of the anchor slots 0..A-1 (the sink) turned back
    to frame position 0, taken once after the slot was written; anchored [B, A] bool: taken.
    """

    key_pos: torch.Tensor
    anchors: torch.Tensor
    anchored: torch.Tensor

    @classmethod
    def allocate(cls, k_ring: torch.Tensor, slots: int, anchor_slots: int) -> RopedRingState:
        """For a ring [L, B, S*T, H, D] of `slots` slots whose first `anchor_slots` are anchors."""
        L, B, ST, H, D = k_ring.shape
        T = ST // slots
        dev = k_ring.device
        return cls(key_pos=torch.full((B, slots), INVALID_POS, dtype=torch.int32, device=dev),
                   anchors=torch.zeros((L, B, anchor_slots * T, H, D), dtype=k_ring.dtype, device=dev),
                   anchored=torch.zeros((B, anchor_slots), dtype=torch.bool, device=dev))

    def rows(self, start: int, stop: int) -> RopedRingState:
        """Batch rows start..stop-1 (views)."""
        return RopedRingState(self.key_pos[start:stop], self.anchors[:, start:stop], self.anchored[start:stop])

    def reset(self) -> None:
        self.key_pos.fill_(INVALID_POS)
        self.anchors.zero_()
        self.anchored.zero_()


def _rerotate(device: torch.device):
    if triton_available() and (device.type == "cuda" or interpreting()):
        return rerotate_frames_triton
    return rerotate_frames_reference


def follow_positions_(k_ring: torch.Tensor, state: RopedRingState, slot_pos: torch.Tensor,
                      write_slots: torch.Tensor, tokens_per_frame: int, theta: float = 10000.0, *,
                      moved: bool = True) -> None:
    """Turn the keys of k_ring [L, B, S*T, H, D] from the positions they carry (`state.key_pos`) to
    `slot_pos` [B, S], before a block that will write `write_slots` [B, Fq] (those slots are left
    alone: the block's writes store them at their new positions). All on the device, no host sync.

    - Anchor slots (0..A-1, the sink, which live for the whole stream and may move every block) are
      rebuilt from `state.anchors`, a copy at frame position 0 taken the first time the slot is seen
      after its write: every rebuild rounds once from the same copy, so the error stays that of two
      roundings however often the sink moves (turning the same bf16 keys by each delta would add one
      rounding per move: tests/test_kernels_sdpa_ring.py measures both).
    - Other slots are turned in place by the delta: they live `window` frames at most, so a key is
      turned a bounded number of times (window / block frames).
    Then `state.key_pos` = `slot_pos` wherever a slot is visible. Call it once per block, before the
    block's first forward (the writes of its later forwards land at the same positions). `moved=False`
    (the caller knows no stored key moves, e.g. a stream's first block) launches nothing and only
    records the positions.
    """
    L, B = k_ring.shape[:2]
    S = slot_pos.shape[1]
    A = state.anchored.shape[1]
    T = tokens_per_frame
    dev = k_ring.device
    s_idx = torch.arange(S, device=dev, dtype=torch.int32).expand(B, S)
    writing = (s_idx[:, :, None] == write_slots[:, None, :]).any(-1)
    has = (state.key_pos != INVALID_POS) & (slot_pos != INVALID_POS) & ~writing
    none = torch.full_like(s_idx, -1)
    zero = torch.zeros_like(s_idx)
    anchor = s_idx < A
    take = (has & anchor)[:, :A] & ~state.anchored
    rebuild = has & anchor & (slot_pos != state.key_pos)
    turn = has & ~anchor
    rerotate = _rerotate(dev)
    for layer in range(L if moved else 0):
        ring, copy = k_ring[layer], state.anchors[layer]
        a_slots = s_idx[:, :A]
        rerotate(copy, torch.where(take, a_slots, none[:, :A]), state.key_pos[:, :A], zero[:, :A], T, theta,
                 src=ring, src_slots=a_slots)
        rerotate(ring, torch.where(rebuild[:, :A], a_slots, none[:, :A]), zero[:, :A], slot_pos[:, :A], T,
                 theta, src=copy, src_slots=a_slots)
        rerotate(ring, torch.where(turn, s_idx, none), state.key_pos, slot_pos, T, theta)
    state.anchored |= take
    state.anchored &= ~writing[:, :A]       # an anchor slot written again needs a fresh copy
    state.key_pos.copy_(torch.where(slot_pos != INVALID_POS, slot_pos, state.key_pos))


def _triton_attention(q, k_ring, v_ring, slot_pos, q_pos, grid_h, grid_w, theta=10000.0, scale=None, *,
                      spatial_roped_keys=False):
    if not spatial_roped_keys:
        raise ValueError("the Triton window attention reads keys stored with their height/width rotation "
                         "(written by qk_norm_kv_write(..., rope_grid=...)): pass spatial_roped_keys=True")
    return window_attention_triton(q, k_ring, v_ring, slot_pos, q_pos, grid_h, grid_w, theta, scale)


_ATTENTION = {
    "reference": window_attention_reference,
    "sdpa": window_attention_sdpa,
    "triton": _triton_attention,
    "flash_attn": window_attention_flash_attn,
}


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------
def window_attention(q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor, slot_pos: torch.Tensor,
                     q_pos: torch.Tensor, grid_h: int, grid_w: int, theta: float = 10000.0,
                     scale: float | None = None, *, spatial_roped_keys: bool = False,
                     fully_roped_keys: bool = False, backend: str = "auto") -> torch.Tensor:
    """Window attention (see avatar_kernels/window_attention.py) on the chosen backend. `spatial_roped_keys`
    says how the ring was written (qk_norm_kv_write with or without rope_grid); `triton` needs True.
    `fully_roped_keys` (written with rope_grid and frame_pos): only `sdpa_ring` reads those, and only those."""
    name = _resolve(q.device, backend)
    if (name == "sdpa_ring") != fully_roped_keys:
        raise ValueError(f"backend {name!r} {'needs' if name == 'sdpa_ring' else 'cannot read'} fully roped "
                         "keys (qk_norm_kv_write(..., rope_grid=, frame_pos=)); pass fully_roped_keys="
                         f"{name == 'sdpa_ring'}")
    if fully_roped_keys:
        return window_attention_sdpa_ring(q, k_ring, v_ring, slot_pos, q_pos, grid_h, grid_w, theta, scale)
    impl = _ATTENTION[name]
    return impl(q, k_ring, v_ring, slot_pos, q_pos, grid_h, grid_w, theta, scale,
                spatial_roped_keys=spatial_roped_keys)


def qk_norm_kv_write(q, k, v, q_weight, k_weight, eps, k_ring, v_ring, write_slots, *,
                     rope_grid: tuple[int, int] | None = None, rope_theta: float = 10000.0,
                     frame_pos: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """q/k RMSNorm + KV ring write: the Triton kernel on `triton` and `sdpa_ring` (on CUDA or under the
    interpreter), the reference otherwise. `frame_pos` stores keys fully roped (for `sdpa_ring`)."""
    name = _resolve(q.device, backend)
    fast = name == "triton" or (name == "sdpa_ring" and _rerotate(q.device) is rerotate_frames_triton)
    fn = qk_norm_kv_write_triton if fast else qk_norm_kv_write_reference
    return fn(q, k, v, q_weight, k_weight, eps, k_ring, v_ring, write_slots, rope_grid=rope_grid,
              rope_theta=rope_theta, frame_pos=frame_pos)


def layernorm_modulate(x, shift, scale, tokens_per_frame, eps, *, backend: str = "auto") -> torch.Tensor:
    """LayerNorm + per-frame modulation: the Triton kernel on `triton`, the reference otherwise."""
    if _resolve(x.device, backend) == "triton":
        return layernorm_modulate_triton(x, shift, scale, tokens_per_frame, eps)
    return layernorm_modulate_reference(x, shift, scale, tokens_per_frame, eps)


def gated_residual(x, y, gate, tokens_per_frame, *, backend: str = "auto") -> torch.Tensor:
    """x + y * gate per frame: the Triton kernel on `triton`, the reference otherwise."""
    fn = gated_residual_triton if _resolve(x.device, backend) == "triton" else gated_residual_reference
    return fn(x, y, gate, tokens_per_frame)
