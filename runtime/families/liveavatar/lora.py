"""The release LoRA (`liveavatar.safetensors`), merged once into the trunk's weights at load time.

How upstream applies it (liveavatar/models/wan/causal_s2v_pipeline_tpp.py, `add_lora_to_model`): PEFT
`inject_adapter_in_model(LoraConfig(r=128, lora_alpha=64, target_modules=[q, k, v, o, ffn.0, ffn.2]))`,
then `model.load_state_dict(file, strict=False)`. The injected parameters are named
`<module>.lora_A.default.weight` and `<module>.lora_B.default.weight` (PEFT's default adapter), so
those are the names the file must carry for that load to do anything; forks that wrap the model with
`get_peft_model` add `base_model.model.` to file keys that lack it. Accepted here: both spellings,
and PEFT's save_pretrained form without the adapter name. PEFT's forward adds
scale * B(A(x)) with scale = alpha / r; merging W += scale * B @ A gives the same product.
Upstream's strict=False silently drops a key that matches nothing; here that is an error naming it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...checkpoint import CheckpointError
from .config import LoraConfig

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[A-Za-z0-9_]+))?\.weight$")


@dataclass
class LoraFactors:
    down: torch.Tensor  # lora_A [r, in_features]
    up: torch.Tensor    # lora_B [out_features, r]


def _fail(title: str, items: list[str]) -> None:
    if items:
        shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
        raise CheckpointError(f"LoRA: {title} ({len(items)}): " + ", ".join(shown))


def parse_lora(state: dict[str, torch.Tensor]) -> dict[str, LoraFactors]:
    """Group a LoRA state dict by target module; every key must be a lora_A/lora_B weight."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    not_lora, twice, adapters = [], [], set()
    for key, tensor in state.items():
        m = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if m is None:
            not_lora.append(key)
            continue
        adapters.add(m["adapter"])
        factors = found.setdefault(m["module"], {})
        if m["factor"] in factors:
            twice.append(key)
        factors[m["factor"]] = tensor
    _fail("keys that are not lora_A/lora_B weights", not_lora)
    _fail("factors given twice (with and without the PEFT prefix?)", twice)
    if len(adapters) > 1:
        raise CheckpointError(f"LoRA: several adapters in one file: {sorted(a or '<none>' for a in adapters)}")
    _fail("modules missing lora_A or lora_B", sorted(m for m, f in found.items() if set(f) != {"A", "B"}))
    return {m: LoraFactors(f["A"], f["B"]) for m, f in found.items()}


def is_target(module: str, targets: tuple[str, ...]) -> bool:
    """PEFT's list matching: the module name equals a target or ends with '.' + target."""
    return any(module == t or module.endswith("." + t) for t in targets)


def _shape_errors(module: str, f: LoraFactors, weight: torch.Tensor, rank: int) -> list[str]:
    out_f, in_f = weight.shape
    want_a, want_b = (rank, in_f), (out_f, rank)
    if tuple(f.down.shape) != want_a or tuple(f.up.shape) != want_b:
        return [(f"{module}: lora_A {tuple(f.down.shape)} / lora_B {tuple(f.up.shape)}, "
                f"want {want_a} / {want_b} for weight {tuple(weight.shape)} at r={rank}")]
    return []


def merge_lora(state: dict[str, torch.Tensor], factors: dict[str, LoraFactors], lora: LoraConfig,
               require_all_targets: bool = True) -> list[str]:
    """W += (alpha / r) * B @ A for every module, in fp32, stored back in W's dtype. Returns merged keys.

    Checked first, nothing merged on failure: every module has a base weight, is a PEFT target, and
    has factors of rank r matching the weight; with require_all_targets, every target weight of the
    trunk has factors (the release covers all 448 targets).
    """
    _fail("modules with no base weight in the trunk",
          sorted(m for m in factors if f"{m}.weight" not in state))
    _fail(f"modules outside the target modules {lora.targets}",
          sorted(m for m in factors if not is_target(m, lora.targets)))
    _fail("factors whose shapes do not match", sorted(
        e for m, f in factors.items() for e in _shape_errors(m, f, state[f"{m}.weight"], lora.rank)))
    if require_all_targets:
        targets = {k.removesuffix(".weight") for k, v in state.items()
                   if k.endswith(".weight") and v.dim() == 2 and is_target(k.removesuffix(".weight"), lora.targets)}
        _fail("target modules the file has no factors for", sorted(targets - set(factors)))
    merged = []
    for module, f in factors.items():
        key = f"{module}.weight"
        w = state[key]
        delta = f.up.to(w.device, torch.float32) @ f.down.to(w.device, torch.float32)
        state[key] = (w.float() + lora.scale * delta).to(w.dtype)
        merged.append(key)
    return merged
