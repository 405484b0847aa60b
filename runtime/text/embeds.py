"""Precomputed prompt embeddings on disk (`avatar encode-prompt`), so a deployment can run without T5.

One safetensors file holding a single tensor `prompt_embeds` [L, dim] in the encoder's dtype, with
the prompt and the encoder preset as metadata (for people reading the file; loading ignores them).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

KEY = "prompt_embeds"


def save_prompt_embeds(path: str | Path, embeds: torch.Tensor, prompt: str = "", encoder: str = "") -> None:
    if embeds.ndim != 2:
        raise ValueError(f"prompt embeddings must be [L, dim], got shape {tuple(embeds.shape)}")
    save_file({KEY: embeds.detach().contiguous().cpu()}, str(path), metadata={"prompt": prompt, "encoder": encoder})


def load_prompt_embeds(path: str | Path) -> torch.Tensor:
    """The [L, dim] tensor of a file written by `save_prompt_embeds` (or any safetensors with that key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt embeddings file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if KEY not in keys:
            raise ValueError(f"{path}: no tensor named {KEY!r} (found {keys}); write it with avatar encode-prompt")
        return f.get_tensor(KEY)
