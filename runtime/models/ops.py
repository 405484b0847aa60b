"""The DiT's hot ops behind one small interface, so a kernel backend is a choice, not a rewrite.

`Ops` (the `reference` backend) is eager fp32 math from `avatar_kernels/*_reference`. `ops_for(backend,
device)` resolves the backend by device capability (avatar_kernels.backends.select_backend, which logs the
choice; never by GPU name) and returns the class of ops to use. Every variant has the same signatures.

A ring is written and read by one class, whose KV write and attention agree on the key layout:
`TritonOps` stores keys with their height/width rotation already applied (avatar_kernels/window_attention.py),
the others store them un-roped; both are un-roped in time, so a position shift never rewrites them.
"""
from __future__ import annotations

import torch

from avatar_kernels import backends
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


_BY_NAME = {cls.name: cls for cls in (Ops, SdpaOps, FlashAttnOps, TritonOps)}


def ops_for(backend: str = "auto", device: torch.device | str = "cpu") -> type[Ops]:
    """The ops class for `backend` on `device` ("auto" picks by capability; the choice is logged)."""
    return _BY_NAME[backends.select_backend(device, backend)]
