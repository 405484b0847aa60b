"""Random weights of a useful scale, for tests and benchmarks without the release files.

PyTorch's default init leaves several release tensors at zero or one (padding token, norms, biases) and
upstream zero-initialises others (the injector's `o`, AdaLN linears, cond mask): random tests over such
weights would not notice a branch being skipped. Every tensor here is random and non-trivial.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _std(name: str, p: torch.Tensor) -> float:
    if p.dim() == 1:
        return 0.1  # biases and norm weights (norm weights get 1 + this noise)
    if name.endswith("modulation"):
        return 1.0 / math.sqrt(p.shape[-1])
    if name.endswith(("trainable_cond_mask.weight", "padding_tokens")):
        return 0.5
    if name.endswith("casual_audio_encoder.weights"):
        return 1.0
    fan_in = p[0].numel()
    return 1.0 / math.sqrt(fan_in)


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter of `model` in place from a seeded generator (CPU draw, copied to the device)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * _std(name, p)
        is_norm_weight = p.dim() == 1 and name.endswith("weight")
        p.copy_((noise + 1.0) if is_norm_weight else noise)
    return model
