"""Per-session state allocated once, and the host-side plan of where each block sits in the KV ring.

KV ring: `window_frames` slots of one latent frame each, per layer: k and v of shape
[layers, B, window_frames * T, H, D]. Slots 0..sink-1 hold the first `sink_frames` latent frames for
the whole stream (identity anchors; frame 0 is the reference). Later frames go to the rolling region,
slot = sink + (frame - sink) mod (window - sink), so the newest block overwrites the oldest frames.

After block b (frames f0..f_end-1) is written, its queries see the sink frames present so far plus
the newest `window - sink` frames (including the block itself):
    visible(b) = [0, min(sink, f_end))  U  [max(sink, f_end - rolling), f_end)

RoPE frame positions are rebased so the block's own frames sit at 0..F-1 (rotations are relative,
so only differences matter and fp32 angles stay small on infinite streams):
- `absolute` (upstream semantics): key frame f sits at f - f0; sink keys drift ever further back.
- `rolling`: rolling-region frames as in `absolute`, but the sink frames are placed directly before
  the oldest visible rolling frame, so every query-key distance stays below `window_frames`.
Both modes agree until eviction starts. Planning is pure host arithmetic: no device sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from avatar_kernels.backends import RopedRingState, follow_positions_
from avatar_kernels.window_attention import INVALID_POS

from .config import CacheConfig, EngineConfig
from .models.dit import BlockPlan
from .transfer import copy_into


def frame_slot(frame: int, cache: CacheConfig) -> int:
    if frame < cache.sink_frames:
        return frame
    return cache.sink_frames + (frame - cache.sink_frames) % cache.rolling_frames


def visible_frames(block_index: int, cache: CacheConfig) -> list[int]:
    """Latent frames a block attends to (itself included), in temporal order."""
    f_end = (block_index + 1) * cache.block_frames
    sink = list(range(min(cache.sink_frames, f_end)))
    rolling = list(range(max(cache.sink_frames, f_end - cache.rolling_frames), f_end))
    return sink + rolling


def frame_positions(block_index: int, cache: CacheConfig) -> dict[int, int]:
    """RoPE frame position of every visible frame, rebased so the block starts at 0."""
    f0 = block_index * cache.block_frames
    frames = visible_frames(block_index, cache)
    pos = {f: f - f0 for f in frames}
    if cache.rope_mode == "rolling":
        oldest_rolling = min((f for f in frames if f >= cache.sink_frames), default=cache.sink_frames)
        shift = oldest_rolling - cache.sink_frames
        for f in frames:
            if f < cache.sink_frames:
                pos[f] += shift
    return pos


def plan_block(block_index: int, cache: CacheConfig, batch: int = 1) -> BlockPlan:
    """CPU int32 tensors describing block `block_index` (same plan for every batch row)."""
    f0 = block_index * cache.block_frames
    block = range(f0, f0 + cache.block_frames)
    slot_pos = [INVALID_POS] * cache.window_frames
    for f, p in frame_positions(block_index, cache).items():
        slot_pos[frame_slot(f, cache)] = p
    write = [frame_slot(f, cache) for f in block]
    q_pos = [f - f0 for f in block]

    def rows(values):
        return torch.tensor(values, dtype=torch.int32).expand(batch, -1).contiguous()

    return BlockPlan(write_slots=rows(write), slot_pos=rows(slot_pos), q_pos=rows(q_pos))


@dataclass
class KVRing:
    k: torch.Tensor  # [layers, B, S*T, H, D]
    v: torch.Tensor
    # With fully roped keys (the sdpa_ring backend): the positions they carry and the sink's copy
    roped: RopedRingState | None = None

    @classmethod
    def allocate(cls, cfg: EngineConfig, batch: int, device, dtype, *, roped: bool = False) -> KVRing:
        d = cfg.dit
        shape = (d.num_layers, batch, cfg.cache.window_frames * cfg.tokens_per_frame, d.num_heads, d.head_dim)
        k = torch.zeros(shape, device=device, dtype=dtype)
        state = RopedRingState.allocate(k, cfg.cache.window_frames, cfg.cache.sink_frames) if roped else None
        return cls(k, torch.zeros(shape, device=device, dtype=dtype), state)

    def rows(self, start: int, stop: int) -> KVRing:
        """Batch rows start..stop-1 (views)."""
        roped = self.roped.rows(start, stop) if self.roped is not None else None
        return KVRing(self.k[:, start:stop], self.v[:, start:stop], roped)

    def clear(self) -> None:
        self.k.zero_()
        self.v.zero_()
        if self.roped is not None:
            self.roped.reset()

    def follow(self, plan: BlockPlan, tokens_per_frame: int, theta: float, block_index: int) -> None:
        """Before every block's first forward: keys stored fully roped turn to the block's positions
        (`avatar_kernels.backends.follow_positions_`; the plan rebases positions every block, so every
        visible frame moves, except in block 0, where nothing is stored yet and no kernel is launched:
        only the positions are recorded). A no-op for rings of un-roped keys. `plan` on the ring's device."""
        if self.roped is not None:
            follow_positions_(self.k, self.roped, plan.slot_pos, plan.write_slots, tokens_per_frame, theta,
                              moved=block_index > 0)

    @property
    def nbytes(self) -> int:
        extra = self.roped.anchors.numel() * self.roped.anchors.element_size() if self.roped is not None else 0
        return 2 * self.k.numel() * self.k.element_size() + extra


@dataclass
class StaticPlan:
    """Device-resident copy of a BlockPlan, filled in place every block (graph-safe addresses)."""

    plan: BlockPlan

    @classmethod
    def allocate(cls, cache: CacheConfig, batch: int, device) -> StaticPlan:
        return cls(plan_to(plan_block(0, cache, batch), device))

    def update(self, plan: BlockPlan) -> BlockPlan:
        for name in ("write_slots", "slot_pos", "q_pos"):
            copy_into(getattr(self.plan, name), getattr(plan, name))
        return self.plan


def plan_to(plan: BlockPlan, device) -> BlockPlan:
    return BlockPlan(*(t.to(device) for t in (plan.write_slots, plan.slot_pos, plan.q_pos)))
