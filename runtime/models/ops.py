"""The DiT's hot ops behind one small interface, so a kernel backend is a choice, not a rewrite.

`Ops` (the `reference` backend) is eager fp32 math from `avatar_kernels/*_reference`. `ops_for(backend,
device)` resolves the backend by device capability (avatar_kernels.backends.select_backend, which logs the
choice; never by GPU name) and returns the class of ops to use. Every variant has the same signatures.

A ring is written and read by one class, whose KV write and attention agree on the key layout:
`TritonOps` stores keys with their height/width rotation already applied (avatar_kernels/window_attention.py),
`SdpaRingOps` fully roped (so SDPA reads the ring as it lies; the ring then follows each block's
positions: `runtime.session.KVRing.follow`, and is allocated with `roped=SdpaRingOps.roped_ring`), the
others un-roped. Only the fully roped ring is rewritten when positions shift.

On CUDA, `auto` with the engine's attention shape times the capable backends once and keeps the
fastest (avatar_kernels/select.py); on the CPU it stays `sdpa`.
"""
from __future__ import annotations

import torch

from avatar_kernels import backends, select
from avatar_kernels.kv_write import qk_norm_kv_write_reference, qk_norm_kv_write_triton, rms_norm_reference
from avatar_kernels.norm_modulate import (
    gated_residual_reference,
    gated_residual_triton,
    layernorm_modulate_reference,
    layernorm_modulate_triton,
)
from avatar_kernels.window_attention import window_attention_reference, window_attention_triton


class Ops:
    name = "reference"
    roped_ring = False       # the ring's keys carry their frame rotation (KVRing.allocate(roped=...))

    @staticmethod
    def rms_norm(x, weight, eps):
        return rms_norm_reference(x, weight, eps)

    @staticmethod
    def qk_norm_kv_write(q, k, v, q_weight, k_weight, eps, ring_k, ring_v, write_slots, grid, theta):
        return qk_norm_kv_write_reference(q, k, v, q_weight, k_weight, eps, ring_k, ring_v, write_slots)

    @staticmethod
    def window_attention(q, ring_k, ring_v, slot_pos, q_pos, grid, theta):
        return window_attention_reference(q, ring_k, ring_v, slot_pos, q_pos, grid[0], grid[1], theta)

    @staticmethod
    def layernorm_modulate(x, shift, scale, tokens_per_frame, eps):
        return layernorm_modulate_reference(x, shift, scale, tokens_per_frame, eps)

    @staticmethod
    def gated_residual(x, y, gate, tokens_per_frame):
        return gated_residual_reference(x, y, gate, tokens_per_frame)


class SdpaOps(Ops):
    """torch SDPA over the roped ring (torch picks its fused kernel); the other ops eager."""
    name = "sdpa"

    @staticmethod
    def window_attention(q, ring_k, ring_v, slot_pos, q_pos, grid, theta):
        return backends.window_attention_sdpa(q, ring_k, ring_v, slot_pos, q_pos, grid[0], grid[1], theta)


_block_positions: dict[tuple, torch.Tensor] = {}


def block_positions(batch: int, frames: int, device: torch.device) -> torch.Tensor:
    """[batch, frames] int32 0..frames-1: where runtime.session.plan_block puts a block's own frames
    (positions are rebased to the block every block), so a block's keys are stored at these. Built on
    the device once per shape (no upload; warm up before graph capture)."""
    key = (batch, frames, torch.device(device))
    if key not in _block_positions:
        _block_positions[key] = torch.arange(frames, dtype=torch.int32, device=device).expand(batch, -1).contiguous()
    return _block_positions[key]


class SdpaRingOps(Ops):
    """torch SDPA straight over a ring of fully roped keys (no roped copy of the ring per call); the KV
    write stores keys fully roped (Triton on CUDA / under the interpreter); other ops eager."""
    name = "sdpa_ring"
    roped_ring = True

    @staticmethod
    def qk_norm_kv_write(q, k, v, q_weight, k_weight, eps, ring_k, ring_v, write_slots, grid, theta):
        pos = block_positions(write_slots.shape[0], write_slots.shape[1], q.device)
        return backends.qk_norm_kv_write(q, k, v, q_weight, k_weight, eps, ring_k, ring_v, write_slots,
                                         rope_grid=grid, rope_theta=theta, frame_pos=pos, backend="sdpa_ring")

    @staticmethod
    def window_attention(q, ring_k, ring_v, slot_pos, q_pos, grid, theta):
        return backends.window_attention_sdpa_ring(q, ring_k, ring_v, slot_pos, q_pos, grid[0], grid[1], theta)


class FlashAttnOps(Ops):
    name = "flash_attn"

    @staticmethod
    def window_attention(q, ring_k, ring_v, slot_pos, q_pos, grid, theta):
        return backends.window_attention_flash_attn(q, ring_k, ring_v, slot_pos, q_pos, grid[0], grid[1], theta)


class TritonOps(Ops):
    """The fused Triton kernels: in-kernel RoPE over the ring, fused qk-norm + KV write, fused norms."""
    name = "triton"

    @staticmethod
    def qk_norm_kv_write(q, k, v, q_weight, k_weight, eps, ring_k, ring_v, write_slots, grid, theta):
        return qk_norm_kv_write_triton(q, k, v, q_weight, k_weight, eps, ring_k, ring_v, write_slots,
                                       rope_grid=grid, rope_theta=theta)

    @staticmethod
    def window_attention(q, ring_k, ring_v, slot_pos, q_pos, grid, theta):
        return window_attention_triton(q, ring_k, ring_v, slot_pos, q_pos, grid[0], grid[1], theta)

    @staticmethod
    def layernorm_modulate(x, shift, scale, tokens_per_frame, eps):
        return layernorm_modulate_triton(x, shift, scale, tokens_per_frame, eps)

    @staticmethod
    def gated_residual(x, y, gate, tokens_per_frame):
        return gated_residual_triton(x, y, gate, tokens_per_frame)


_BY_NAME = {cls.name: cls for cls in (Ops, SdpaOps, FlashAttnOps, TritonOps, SdpaRingOps)}


def ops_for(backend: str = "auto", device: torch.device | str = "cpu",
            shape: select.AttentionShape | None = None) -> type[Ops]:
    """The ops class for `backend` on `device` ("auto" picks by capability; the choice is logged).
    With `shape` (the engine's attention), `auto` on CUDA times the capable backends there once and
    keeps the fastest (avatar_kernels.select.fastest_backend; cached per device and shape)."""
    device = torch.device(device)
    if backend == "auto" and shape is not None and device.type == "cuda":
        return _BY_NAME[select.fastest_backend(device, shape)]
    return _BY_NAME[backends.select_backend(device, backend)]
