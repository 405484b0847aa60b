"""Latent-level streaming of Live Avatar: block after block, 4-step Euler, one KV ring per step.

Per block b (F = block_frames latent frames at absolute frames f0 = b * F ..):
- noise from the session's seeded generator;
- step i = 0..num_steps-1: velocity v = forward_block(x, t_i, ring i, condition), written into ring i
  on the still-noisy x (no clean re-run), then x += (sigma_{i+1} - sigma_i) * v;
- temporal RoPE indices are absolute (float64 angles from the integers), keys roped once when written.
Rolling sink: the reference frame is read at max(ref_rope_frame, f0 + rd) for each (block, step)
forward. rd is a setting: fixed, or drawn from a counter-based hash of (seed, block, step) in
`cfg.sink_offset_range` (upstream: Python's global random per forward, unreproducible).
Adaptive sink: block 0's first denoised latent frame becomes the reference from block
`adaptive_sink_block` on, and the condition cache is re-filled (upstream: captured from block 0, used
from the second clip = block 4 on; the motion latents stay the initial ones, as on upstream's DiT ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_ring import KVRing
from .model import AudioTokens, Condition, LiveAvatarDiT, RowInputs, TimeMod, cat_rows

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def drawn_sink_offset(seed: int, block: int, step: int, lo: int, hi: int) -> int:
    """rd for one (block, step) forward, uniform-ish in [lo, hi]. A pure function of its arguments (not
    a sequence), so the GPU running step i under TPP, or a stream started at block 10^5, gets the
    same value without replaying earlier draws."""
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (block & _MASK64)) ^ step)
    return lo + h % (hi - lo + 1)


@dataclass(frozen=True)
class StreamSettings:
    seed: int = 0
    start_block: int = 0  # stream index of the first block: positions only (tests jump to 10^5)
    sink_offset: int | None = None  # fixed rd; None: drawn per (block, step) from cfg.sink_offset_range
    adaptive_sink_block: int | None = 4  # block from which block 0's first frame is the reference; None: off

    def __post_init__(self):
        if self.start_block < 0:
            raise ValueError(f"start_block must be >= 0, got {self.start_block}")
        if self.sink_offset is not None and self.sink_offset < 0:
            raise ValueError(f"sink_offset must be >= 0, got {self.sink_offset}")
        if self.adaptive_sink_block is not None and self.adaptive_sink_block < 1:
            raise ValueError(f"adaptive_sink_block must be >= 1 (block 0 makes the new reference), "
                             f"got {self.adaptive_sink_block}")


def draw_noise(gen: torch.Generator, shape: tuple[int, ...], model: LiveAvatarDiT) -> torch.Tensor:
    """x_T of a block: drawn on the CPU from the session's generator (the same numbers on every
    device), then moved to the model's device and dtype."""
    return torch.randn(shape, generator=gen).to(model.patch_embedding.weight.device, model.dtype)


class DenoiseStep:
    """Denoising step `step` of one session's blocks: its KV ring, modulation and sigma delta. A stream
    holds one per step; a TPP step rank holds the one of its step (tpp_step.StepState)."""

    def __init__(self, model: LiveAvatarDiT, step: int, batch: int, token_hw: tuple[int, int]):
        cfg = model.cfg
        if not 0 <= step < cfg.num_steps:
            raise ValueError(f"step must be 0..{cfg.num_steps - 1}, got {step}")
        self.cfg, self.step, self.dtype = cfg, step, model.dtype
        self.ring = KVRing(cfg, batch, token_hw, model.patch_embedding.weight.device, model.dtype)
        # upstream feeds diffusers' fp32 timestep/sigma tensors: cfg gives those exact fp32 values
        t = torch.tensor(cfg.timesteps, dtype=torch.float32)
        self.mod: TimeMod = model.time_mod(t[step].expand(batch, cfg.block_frames))
        sigmas = torch.tensor(cfg.sigmas, dtype=torch.float32)
        self.sigma_delta = sigmas[step + 1] - sigmas[step]

    def row_inputs(self, text_kv, cond: Condition, counter: int, block: int, ref_frame: int) -> RowInputs:
        """Plan this step of the session's `counter`-th block (stream index `block`): claim its ring
        slots; the forward reads the ring's history and writes the block's keys on the noisy x."""
        F = self.cfg.block_frames
        read = self.ring.begin_block(counter, block * F, F)
        return RowInputs(text_kv, cond, first_frame=block * F, ref_frame=ref_frame, history=read)

    def update(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """diffusers' Euler step: fp32 update, back to the latent dtype."""
        return (x.float() + self.sigma_delta * v.float()).to(self.dtype)


class LiveAvatarStream:
    """One session: `generate_block(audio_features)` -> denoised latents [B, C, F, h, w], block after block.

    Everything is allocated here, once: text K/V, the condition cache, the per-step rings, the
    per-step modulation. Nothing held grows with the number of blocks.
    """

    def __init__(self, model: LiveAvatarDiT, ref_latent: torch.Tensor, motion_latents: torch.Tensor,
                 prompt_embeds: torch.Tensor, settings: StreamSettings = StreamSettings()):
        cfg = model.cfg
        self.model, self.cfg, self.settings = model, cfg, settings
        B, C, _, lh, lw = ref_latent.shape
        self.latent_shape = (B, C, cfg.block_frames, lh, lw)
        self.text_kv = model.text_kv(prompt_embeds)
        self.motion_latents = motion_latents.clone()
        self.ref_latent = ref_latent.clone()  # kept for reset(): the adaptive sink replaces it
        self.cond: Condition = model.encode_condition(ref_latent, motion_latents, self.text_kv)
        self.steps = [DenoiseStep(model, i, B, self.cond.token_hw) for i in range(cfg.num_steps)]
        self.noise = torch.Generator()
        self.reset(refill=False)

    def reset(self, refill: bool = True) -> None:
        """Start the stream again (same seed, same reference): the next block is block start_block."""
        self.noise.manual_seed(self.settings.seed)
        self.blocks_done = 0
        self._sink_latent: torch.Tensor | None = None
        for ring in self.rings:
            ring.reset()
        if refill:
            self._refill_condition(self.ref_latent)

    @property
    def rings(self) -> list[KVRing]:
        return [s.ring for s in self.steps]

    @property
    def block_index(self) -> int:
        """Stream index of the next block."""
        return self.settings.start_block + self.blocks_done

    def ref_frame(self, block: int, step: int) -> int:
        """Temporal RoPE index of the reference for one forward: max(ref_rope_frame, f0 + rd)."""
        rd = self.settings.sink_offset
        if rd is None:
            rd = drawn_sink_offset(self.settings.seed, block, step, *self.cfg.sink_offset_range)
        return max(self.cfg.ref_rope_frame, block * self.cfg.block_frames + rd)

    @torch.no_grad()
    def generate_block(self, audio_features: torch.Tensor) -> torch.Tensor:
        """audio_features [B, audio_layers, audio_dim, 4F] of the block's video frames -> latents."""
        return generate_blocks([self], [audio_features])[0]

    def draw_noise(self) -> torch.Tensor:
        """x_T of the next block, from the session's own seeded generator."""
        return draw_noise(self.noise, self.latent_shape, self.model)

    def row_inputs(self, step: int) -> RowInputs:
        """Plan denoising step `step` of the next block: claim its ring slots, place the sink."""
        b = self.block_index
        return self.steps[step].row_inputs(self.text_kv, self.cond, self.blocks_done, b, self.ref_frame(b, step))

    def end_block(self, x: torch.Tensor) -> None:
        """The block's denoised latents are x: the adaptive sink takes its frame, the stream moves on."""
        self._after_block(x)
        self.blocks_done += 1

    def _after_block(self, x: torch.Tensor) -> None:
        at = self.settings.adaptive_sink_block
        if at is None:
            return
        if self.blocks_done == 0:
            self._sink_latent = x[:, :, :1].clone()
        if self.blocks_done + 1 == at:
            self._refill_condition(self._sink_latent)

    def _refill_condition(self, ref_latent: torch.Tensor) -> None:
        """Re-run the condition pass with a new reference, into the existing cache tensors."""
        new = self.model.encode_condition(ref_latent, self.motion_latents, self.text_kv)
        for dst, src in zip(self.cond.keys + self.cond.values, new.keys + new.values):
            dst.copy_(src)


class BlockBatch:
    """The next block of several streams of one model, as the stages a round runs in order:
    `begin()` (audio tokens of every row, noise), `step(i)` for each denoising step (ONE batched
    forward of every row: `LiveAvatarDiT.forward_rows`), `end()` (the adaptive sink; the streams move
    on). `latents[j]` is stream j's block, equal to its `generate_block` alone up to the matmuls'
    rounding at another batch size."""

    def __init__(self, streams: list[LiveAvatarStream], features: list[torch.Tensor]):
        if not streams or len(streams) != len(features):
            raise ValueError(f"{len(streams)} streams for {len(features)} feature blocks")
        model = streams[0].model
        for s, f in zip(streams, features):
            if s.model is not model:
                raise ValueError("the streams of one batch must share one model")
            if f.shape[0] != s.latent_shape[0]:
                raise ValueError(f"audio features are for batch {f.shape[0]}, the stream has {s.latent_shape[0]}")
        self.streams, self.features, self.model = streams, features, model
        self.x: torch.Tensor | None = None
        self.audio: AudioTokens | None = None
        self.latents: list[torch.Tensor] = []

    @property
    def num_steps(self) -> int:
        return len(self.streams[0].steps)

    def begin(self) -> None:
        self.audio = self.model.encode_audio(cat_rows(self.features))
        self.x = cat_rows([s.draw_noise() for s in self.streams])

    def step(self, i: int) -> None:
        streams, model = self.streams, self.model
        rows = [s.row_inputs(i) for s in streams]
        mods = [s.steps[i].mod for s in streams]
        v = model.forward_rows(self.x, mods[0] if len(mods) == 1 else TimeMod.cat(mods), self.audio, rows)
        self.x = streams[0].steps[i].update(self.x, v)

    def end(self) -> list[torch.Tensor]:
        self.latents = list(self.x.split([s.latent_shape[0] for s in self.streams]))
        for s, x in zip(self.streams, self.latents):
            s.end_block(x)
        return self.latents


@torch.no_grad()
def generate_blocks(streams: list[LiveAvatarStream], features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The next block of each stream (see `BlockBatch`), all stages in a row."""
    batch = BlockBatch(streams, features)
    batch.begin()
    for i in range(batch.num_steps):
        batch.step(i)
    return batch.end()

