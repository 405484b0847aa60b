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

The choice is made from capabilities, never from a GPU's name, and is logged.
"""
from __future__ import annotations

import functools
import importlib
import logging

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
from .rope import apply_rope, frame_only, rope_angles
from .window_attention import INVALID_POS, window_attention_reference, window_attention_triton

log = logging.getLogger(__name__)

BACKENDS = ("reference", "sdpa", "triton", "flash_attn")
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
    return names


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
                     backend: str = "auto") -> torch.Tensor:
    """Window attention (see avatar_kernels/window_attention.py) on the chosen backend. `spatial_roped_keys`
    says how the ring was written (qk_norm_kv_write with or without rope_grid); `triton` needs True."""
    impl = _ATTENTION[_resolve(q.device, backend)]
    return impl(q, k_ring, v_ring, slot_pos, q_pos, grid_h, grid_w, theta, scale,
                spatial_roped_keys=spatial_roped_keys)


def qk_norm_kv_write(q, k, v, q_weight, k_weight, eps, k_ring, v_ring, write_slots, *,
                     rope_grid: tuple[int, int] | None = None, rope_theta: float = 10000.0,
                     backend: str = "auto") -> torch.Tensor:
    """q/k RMSNorm + KV ring write: the Triton kernel on `triton`, the reference otherwise."""
    fn = qk_norm_kv_write_triton if _resolve(q.device, backend) == "triton" else qk_norm_kv_write_reference
    return fn(q, k, v, q_weight, k_weight, eps, k_ring, v_ring, write_slots, rope_grid=rope_grid,
              rope_theta=rope_theta)


def layernorm_modulate(x, shift, scale, tokens_per_frame, eps, *, backend: str = "auto") -> torch.Tensor:
    """LayerNorm + per-frame modulation: the Triton kernel on `triton`, the reference otherwise."""
    if _resolve(x.device, backend) == "triton":
        return layernorm_modulate_triton(x, shift, scale, tokens_per_frame, eps)
    return layernorm_modulate_reference(x, shift, scale, tokens_per_frame, eps)


def gated_residual(x, y, gate, tokens_per_frame, *, backend: str = "auto") -> torch.Tensor:
    """x + y * gate per frame: the Triton kernel on `triton`, the reference otherwise."""
    fn = gated_residual_triton if _resolve(x.device, backend) == "triton" else gated_residual_reference
    return fn(x, y, gate, tokens_per_frame)
