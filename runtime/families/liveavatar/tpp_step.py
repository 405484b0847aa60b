"""One denoising step of a Live Avatar stream, as a timestep-forcing (TPP) step rank holds it.

Rank i of the pipeline always runs step i, so it needs exactly what `LiveAvatarStream` keeps for
that step: its own KV ring, the step's modulation and sigma delta, plus the per-session text K/V and
condition cache (every rank keeps a copy). Building a whole `LiveAvatarStream` per rank would
allocate every step's ring on every GPU (~10 GB each at 14B), hence this class.
"""
from __future__ import annotations

import torch

from .model import AudioTokens, LiveAvatarDiT
from .stream import DenoiseStep, LiveAvatarStream, StreamSettings, draw_noise


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
        self.model, self.cfg, self.settings, self.step = model, cfg, settings, step
        B, C, _, lh, lw = ref_latent.shape
        self.latent_shape = (B, C, cfg.block_frames, lh, lw)
        self.text_kv = model.text_kv(prompt_embeds)
        self.motion_latents = motion_latents.clone()
        self.cond = model.encode_condition(ref_latent, motion_latents, self.text_kv)
        self.denoise = DenoiseStep(model, step, B, self.cond.token_hw)   # the stream's step `step`, exactly

    @property
    def ring(self):
        return self.denoise.ring

    @torch.no_grad()
    def run(self, x: torch.Tensor, audio: AudioTokens, counter: int) -> torch.Tensor:
        """x_t of the session's `counter`-th block -> x after this step (ring written on the noisy x)."""
        block = self.settings.start_block + counter
        row = self.denoise.row_inputs(self.text_kv, self.cond, counter, block, self.ref_frame(block, self.step))
        return self.denoise.update(x, self.model.forward_rows(x, self.denoise.mod, audio, [row]))


class NoiseSource:
    """Rank 0's per-block noise: the stream's generator, seed and draw, in the same order."""

    def __init__(self, seed: int, shape: tuple[int, ...], model: LiveAvatarDiT):
        self.gen = torch.Generator().manual_seed(seed)
        self.shape, self.model = shape, model

    def next(self) -> torch.Tensor:
        return draw_noise(self.gen, self.shape, self.model)
