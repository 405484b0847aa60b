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


@torch.no_grad()
def materialize_random(model: nn.Module, device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """Give a meta-built `model` random parameters drawn ON `device`, in `dtype`, from one seeded device
    generator (the same scales as `randomize_weights`, not the same values).

    Each parameter is allocated and filled where it lives, one at a time: no host copy of the weights,
    so the 14B trunk (16.3 B parameters, 32.6 GB in bf16) is ready on a GPU in seconds. The same seed,
    device type and dtype give the same weights. The model must hold no buffers (their values would be lost).
    """
    device = torch.device(device)
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ValueError(f"materialize_random fills parameters only; the model has buffers {buffers[:3]}")
    gen = torch.Generator(device).manual_seed(seed)
    done: dict[int, nn.Parameter] = {}  # shared parameters stay shared
    for module_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                full = f"{module_name}.{name}" if module_name else name
                done[id(p)] = nn.Parameter(_random_tensor(full, p, device, dtype, gen), requires_grad=False)
            module._parameters[name] = done[id(p)]
    return model


def _random_tensor(name: str, p: torch.Tensor, device: torch.device, dtype: torch.dtype,
                   gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(p.shape, device=device, dtype=dtype).normal_(0.0, _std(name, p), generator=gen)
    if p.dim() == 1 and name.endswith("weight"):  # norm weights: 1 + noise
        out += 1.0
    return out
