"""The distilled few-step flow-matching sampler for one block, with the t=0 KV refresh.

Per step i: v = model(x_t, t_i); x0 = x_t - sigma_i * v; x_t' = (1 - sigma_{i+1}) x0 + sigma_{i+1} noise.
After the last step one more forward on the clean x0 at t = 0 writes the block's clean K/V into the
ring (its output is discarded). In block 0 the reference latent replaces latent frame 0 of the
model input at every step and of x0 before the refresh.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.dit import BlockPlan, CausalAudioDiT, TimeMod
from .models.ops import Ops


@dataclass
class BlockInputs:
    noise: torch.Tensor              # [steps, B, C, F, h, w] fp32: noise[0] starts the block, noise[i] re-noises step i
    cond: torch.Tensor               # [B, C + 1, F, h, w] model dtype: reference latent repeated | mask
    audio: torch.Tensor              # [B, F, A, dim] from CausalAudioDiT.audio_cond
    ref_latent: torch.Tensor | None  # [B, C, 1, h, w] fp32 when a row is at block 0, else None
    # [B, 1, 1, 1, 1] bool: the rows pinned to ref_latent (rows of a batch sit at different blocks);
    # None pins every row
    pin: torch.Tensor | None = None


def pin_reference(x: torch.Tensor, ref_latent: torch.Tensor | None, pin: torch.Tensor | None = None) -> torch.Tensor:
    if ref_latent is None:
        return x
    first = ref_latent if pin is None else torch.where(pin, ref_latent, x[:, :, :1])
    return torch.cat([first, x[:, :, 1:]], dim=2)


def model_input(x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    return torch.cat([x.to(inputs.cond.dtype), inputs.cond], dim=1)


def denoise_step(dit: CausalAudioDiT, ops: type[Ops], inputs: BlockInputs, x: torch.Tensor, step: int,
                 mod: TimeMod, sigmas: tuple[float, ...], text_kv, ring_k: torch.Tensor, ring_v: torch.Tensor,
                 plan: BlockPlan) -> torch.Tensor:
    """Step `step` of a block: x_t -> x_t' (the next step's input) or, after the last step, x0."""
    x = pin_reference(x, inputs.ref_latent, inputs.pin)
    v = dit.forward_block(model_input(x, inputs), mod, inputs.audio, text_kv, ring_k, ring_v, plan, ops)
    x0 = x - sigmas[step] * v.float()
    if step + 1 == len(sigmas):
        return pin_reference(x0, inputs.ref_latent, inputs.pin)
    return (1 - sigmas[step + 1]) * x0 + sigmas[step + 1] * inputs.noise[step + 1]


def refresh_kv(dit: CausalAudioDiT, ops: type[Ops], inputs: BlockInputs, x0: torch.Tensor, mod: TimeMod,
               text_kv, ring_k: torch.Tensor, ring_v: torch.Tensor, plan: BlockPlan) -> None:
    """The t=0 forward on the clean block: writes its clean K/V into the ring, output discarded."""
    dit.forward_block(model_input(x0, inputs), mod, inputs.audio, text_kv, ring_k, ring_v, plan, ops)


def sample_block(dit: CausalAudioDiT, ops: type[Ops], inputs: BlockInputs, mods: list[TimeMod],
                 sigmas: tuple[float, ...], text_kv, ring_k: torch.Tensor, ring_v: torch.Tensor,
                 plan: BlockPlan) -> torch.Tensor:
    """Denoise one block; `mods` holds one TimeMod per step plus the refresh's. Returns x0 (fp32)."""
    x = inputs.noise[0]
    for i in range(len(sigmas)):
        x = denoise_step(dit, ops, inputs, x, i, mods[i], sigmas, text_kv, ring_k, ring_v, plan)
    refresh_kv(dit, ops, inputs, x, mods[len(sigmas)], text_kv, ring_k, ring_v, plan)
    return x
