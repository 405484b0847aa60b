"""One denoising step of a Live Avatar stream, as a timestep-forcing (TPP) step rank holds it.

Rank i of the pipeline always runs step i, so it needs exactly what `LiveAvatarStream` keeps for
that step: its own KV ring, the step's modulation and sigma delta, plus the per-session text K/V and
condition cache (every rank keeps a copy). Building a whole `LiveAvatarStream` per rank would
allocate every step's ring on every GPU (~10 GB each at 14B), hence this class.
"""
from __future__ import annotations

import torch

from .kv_ring import KVRing
from .model import AudioTokens, LiveAvatarDiT
from .stream import LiveAvatarStream, StreamSettings


class StepState:
    """Step `step` of one session: `run(x, audio, counter)` is the stream's inner loop body for that step."""

    # Borrowed from the stream rather than copied, so TPP can never drift from it: ref_frame is a pure
    # function of (cfg, settings, block, step) and the re-fill uses model, motion_latents, text_kv and
    # cond, which this class holds under the same names and with the same meaning.
    ref_frame = LiveAvatarStream.ref_frame
    refill_condition = LiveAvatarStream._refill_condition

    def __init__(self, model: LiveAvatarDiT, step: int, ref_latent: torch.Tensor, motion_latents: torch.Tensor,
                 prompt_embeds: torch.Tensor, settings: StreamSettings):
        cfg = model.cfg
        if not 0 <= step < cfg.num_steps:
            raise ValueError(f"step must be 0..{cfg.num_steps - 1}, got {step}")
        self.model, self.cfg, self.settings, self.step = model, cfg, settings, step
        B, C, _, lh, lw = ref_latent.shape
        self.latent_shape = (B, C, cfg.block_frames, lh, lw)
        self.text_kv = model.text_kv(prompt_embeds)
        self.motion_latents = motion_latents.clone()
        self.cond = model.encode_condition(ref_latent, motion_latents, self.text_kv)
        self.ring = KVRing(cfg, B, self.cond.token_hw, model.patch_embedding.weight.device, model.dtype)
        # The same fp32 numbers as the stream's per-step tables (one entry of each).
        t = torch.tensor(cfg.timesteps, dtype=torch.float32)
        self.mod = model.time_mod(t[step].expand(B, cfg.block_frames))
        sigmas = torch.tensor(cfg.sigmas, dtype=torch.float32)
        self.sigma_delta = sigmas[step + 1] - sigmas[step]

    @torch.no_grad()
    def run(self, x: torch.Tensor, audio: AudioTokens, counter: int) -> torch.Tensor:
        """x_t of the session's `counter`-th block -> x after this step (ring written on the noisy x)."""
        F = self.cfg.block_frames
        block = self.settings.start_block + counter
        f0 = block * F
        read = self.ring.begin_block(counter, f0, F)
        v = self.model.forward_block(x, self.mod, audio, self.text_kv, self.cond, first_frame=f0,
                                     ref_frame=self.ref_frame(block, self.step), history=read)
        return (x.float() + self.sigma_delta * v.float()).to(self.model.dtype)  # diffusers' fp32 Euler step


class NoiseSource:
    """Rank 0's per-block noise: the stream's generator, seed and draw, in the same order."""

    def __init__(self, seed: int, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.shape, self.device, self.dtype = shape, device, dtype

    def next(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.gen).to(self.device, self.dtype)
