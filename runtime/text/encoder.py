"""`PromptEncoder`: a prompt string -> the [L, dim] embedding the DiT's `text_embedding` takes.

Exactly Wan2.1's `T5EncoderModel.__call__`: clean and tokenize (padded to seq_len, see tokenize.py),
run the encoder with the padding mask, keep the first L rows, L = the prompt's real token count
(`u[:v]`). The engine zero-pads to the DiT's text_len afterwards (`CausalAudioDiT.text_kv`).

Memory: umT5-XXL's encoder has 5.68 B parameters, 11.4 GB in bf16 (Wan's dtype, the default here),
22.7 GB in fp32. Encoding is once per prompt, off the hot path, so `device="cpu"` keeps that memory
off the GPU at the price of a slower (seconds, not milliseconds) encode.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch

from ..checkpoint import read_state_dict
from .config import TextEncoderConfig
from .tokenize import load_tokenizer, tokenize
from .umt5 import load_umt5

log = logging.getLogger(__name__)

CHECKPOINT_STEM = "models_t5_umt5-xxl-enc-bf16"
CHECKPOINT_SUFFIXES = (".safetensors", ".pth")  # a safetensors conversion is preferred: no pickle
TOKENIZER_DIR = "umt5-xxl"                       # Wan2.1 ships it as google/umt5-xxl/
TEXT_FILES_HINT = f"{CHECKPOINT_STEM}.pth or .safetensors, plus the google/{TOKENIZER_DIR}/ tokenizer directory"


class PromptEncoder:
    def __init__(self, model, tokenizer, config: TextEncoderConfig, *, cache_size: int = 8):
        """`model`: a loaded UMT5EncoderModel of `config`; `tokenizer`: its Hugging Face tokenizer.
        The last `cache_size` prompts' embeddings are kept, so encoding a prompt again costs nothing."""
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the encoder's vocabulary is "
                             f"{config.vocab_size}: they do not belong together")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_files(cls, checkpoint: str | Path, tokenizer_dir: str | Path,
                   config: TextEncoderConfig | str = "umt5-xxl", device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.bfloat16, **options) -> PromptEncoder:
        """Wan's encoder file (`.pth`, read with weights_only, or a `.safetensors` conversion) and a local
        tokenizer directory. Loading is strict: every missing, unexpected or mis-shaped key is named."""
        if not isinstance(config, TextEncoderConfig):
            config = TextEncoderConfig.from_preset(config)
        tokenizer = load_tokenizer(tokenizer_dir)  # first: it is quick, and names missing files
        model = load_umt5(read_state_dict(checkpoint), config, dtype=dtype, device=device)
        log.info("loaded text encoder %s (%s) on %s as %s", checkpoint, config.name, device, dtype)
        return cls(model, tokenizer, config, **options)

    @classmethod
    def from_directory(cls, root: str | Path, **kwargs) -> PromptEncoder:
        """Find both files under `root` (see `find_text_files`) and load them."""
        checkpoint, tokenizer_dir = find_text_files(Path(root))
        missing = missing_text_files(checkpoint, tokenizer_dir)
        if missing:
            raise FileNotFoundError(f"{root}: found no {' and no '.join(missing)}")
        return cls.from_files(checkpoint, tokenizer_dir, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.encoder.final_layer_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.encoder.final_layer_norm.weight.dtype

    def count_tokens(self, text: str) -> int:
        """Tokens the prompt takes, end-of-sequence included (raises if over seq_len)."""
        return int(tokenize(self.tokenizer, text, self.config.seq_len)[1].sum())

    def __call__(self, text: str) -> torch.Tensor:
        """[L, dim] on the encoder's device and dtype; a fresh copy (the cache keeps its own)."""
        if text in self._cache:
            self._cache.move_to_end(text)
        else:
            self._cache[text] = self.encode(text)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return self._cache[text].clone()

    @torch.no_grad()
    def encode(self, text: str) -> torch.Tensor:
        """Uncached: tokenize (ValueError over seq_len tokens), encode, keep the real tokens' rows."""
        ids, mask = tokenize(self.tokenizer, text, self.config.seq_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden[0, : int(mask.sum())]


def find_text_files(root: Path) -> tuple[Path | None, Path | None]:
    """(encoder checkpoint, tokenizer directory) under `root` at any depth, None where absent."""
    checkpoint = None
    for suffix in CHECKPOINT_SUFFIXES:
        hits = sorted(root.rglob(CHECKPOINT_STEM + suffix))
        if hits:
            checkpoint = hits[0]
            break
    dirs = sorted(p for p in root.rglob(TOKENIZER_DIR) if p.is_dir())
    return checkpoint, (dirs[0] if dirs else None)


def missing_text_files(checkpoint: Path | None, tokenizer_dir: Path | None) -> list[str]:
    """What `find_text_files` did not find, in words (empty when both were found)."""
    missing = [] if checkpoint is not None else [f"{CHECKPOINT_STEM}.pth (or .safetensors)"]
    return missing + ([] if tokenizer_dir is not None else [f"google/{TOKENIZER_DIR}/ tokenizer directory"])
