"""One denoising step's KV cache: a fixed ring of latent frames holding roped keys and values.

Live Avatar keeps one cache per denoising step, written by that step's forward on the still-noisy
latents (no clean re-run). Each is a ring of `ring_frames` = 12 latent frames: the current block and
the 3 before it.

Layout: k, v [layers, B, slots, T, H, D] with slots = ring_frames and T tokens per latent frame,
allocated once. The k-th block of a stream (k counted from the stream's first block) writes its F
frames to slots (k * F) mod slots .. + F - 1: the oldest block is overwritten in place, so eviction is
slot arithmetic and nothing moves. `slot_frame` (host) is the absolute frame index each slot holds,
-1 while empty; empty slots stay in the attention with a False key mask, so shapes never change.

Keys are stored roped, at their absolute frame index, as upstream writes them: the model ropes a
block's keys for its own queries anyway (`forward_block`) and hands them to the ring, so a read
ropes nothing (the ring is 4x a block: roping it per layer and forward was most of the attention's
elementwise traffic, and its cos/sin tables a per-forward host upload). A frame's index never moves
(only the reference's does, the rolling sink, and the condition keys are roped per forward), so
nothing is ever rewritten. Angles are computed in float64 from the integer indices (rope.py), so
large indices lose nothing. The mask is planned on the host once per block (no device sync).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtime.transfer import copy_into

from .config import LiveAvatarConfig


@dataclass
class RingRead:
    """One block's view of a ring: `forward_block(history=...)` calls it once per layer."""

    ring: KVRing
    first_slot: int
    key_mask: torch.Tensor  # [slots * T] bool

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the block's roped k and its v [B, F*T, H, D]; return every ring key, value and the mask."""
        ring = self.ring
        B, T = k.shape[0], ring.tokens_per_frame
        nf = k.shape[1] // T
        at = slice(self.first_slot, self.first_slot + nf)
        ring.k[layer, :, at] = k.view(B, nf, T, *k.shape[2:])
        ring.v[layer, :, at] = v.view(B, nf, T, *v.shape[2:])
        return ring.k[layer].flatten(1, 2), ring.v[layer].flatten(1, 2), self.key_mask


class KVRing:
    """The per-step cache of earlier blocks (the condition K/V live in the stream's `Condition`)."""

    def __init__(self, cfg: LiveAvatarConfig, batch: int, token_hw: tuple[int, int], device, dtype):
        self.cfg, self.token_hw = cfg, token_hw
        self.slots = cfg.ring_frames
        self.tokens_per_frame = token_hw[0] * token_hw[1]
        shape = (cfg.num_layers, batch, self.slots, self.tokens_per_frame, cfg.num_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(self.slots * self.tokens_per_frame, dtype=torch.bool, device=device)
        self.slot_frame = np.full(self.slots, -1, dtype=np.int64)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.key_mask.zero_()
        self.slot_frame.fill(-1)

    def first_slot(self, block_counter: int, frames: int) -> int:
        """Slot of the block's first frame; blocks tile the ring since ring_frames % frames == 0."""
        return (block_counter * frames) % self.slots

    def begin_block(self, block_counter: int, first_frame: int, frames: int) -> RingRead:
        """Plan the block: claim its slots (evicting the oldest block) and mask the empty ones.

        block_counter: the block's index counted from the stream's first block (slot arithmetic);
        first_frame: its absolute first latent frame (the index its keys are roped at).
        """
        if frames > self.slots or self.slots % frames:
            raise ValueError(f"a block of {frames} frames does not tile a ring of {self.slots}")
        first = self.first_slot(block_counter, frames)
        self.slot_frame[first:first + frames] = first_frame + np.arange(frames)
        mask = torch.from_numpy(np.repeat(self.slot_frame >= 0, self.tokens_per_frame))
        copy_into(self.key_mask, mask)  # in place (a captured graph keeps the address), pinned: no host wait
        return RingRead(self, first, self.key_mask)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
