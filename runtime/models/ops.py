"""The DiT's hot ops behind one small interface, so an attention/kernel backend is a choice, not a rewrite.

`Ops` (the `reference` backend) is eager fp32 math from `kernels/*_reference`; `ops_for(backend)`
returns the variant for `sdpa`, `triton` or `flash_attn`. Every variant has the same signatures.
"""
from __future__ import annotations

import logging

import torch

from kernels.kv_write import qk_norm_kv_write_reference, rms_norm_reference
from kernels.norm_modulate import gated_residual_reference, layernorm_modulate_reference
from kernels.window_attention import window_attention_reference

log = logging.getLogger(__name__)


class Ops:
    name = "reference"

    @staticmethod
    def rms_norm(x, weight, eps):
        return rms_norm_reference(x, weight, eps)

    @staticmethod
    def qk_norm_kv_write(q, k, v, q_weight, k_weight, eps, ring_k, ring_v, write_slots):
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


def ops_for(backend: str = "reference", device: torch.device | str = "cpu") -> type[Ops]:
    """The ops class for a backend name (`reference` for now; kernels/backends.py adds the others)."""
    if backend in ("reference", "auto"):
        log.info("DiT ops backend: reference (eager fp32) on %s", device)
        return Ops
    raise ValueError(f"unknown ops backend {backend!r}")
