"""Prompt text -> token ids, as Wan2.1's `HuggingfaceTokenizer(seq_len=512, clean='whitespace')`.

Wan (`wan/modules/tokenizers.py`): clean each prompt with ftfy + HTML unescaping + whitespace folding,
then call the Hugging Face tokenizer with `padding='max_length', max_length=seq_len, truncation=True`
and `add_special_tokens=True` (umT5 appends `</s>`). Wan silently truncates prompts longer than
seq_len; here a prompt that does not fit is an error that says how many tokens it has.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

import ftfy
import torch

# The Hugging Face tokenizer reads its config plus either the fast tokenizer file or the
# sentencepiece model (converting the latter needs the `sentencepiece` package).
CONFIG_FILE = "tokenizer_config.json"
VOCAB_FILES = ("tokenizer.json", "spiece.model")


def clean_prompt(text: str) -> str:
    """Wan's clean='whitespace': ftfy.fix_text, HTML-unescape twice, strip, fold whitespace runs to ' '.

    Wan folds with the `regex` module, whose `\\s` differs from `re`'s only on U+001C..U+001F; ftfy
    removes those and html.unescape never produces them, so `re` gives the same text.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def missing_tokenizer_files(directory: Path) -> list[str]:
    """Files the tokenizer directory lacks (empty when it can be loaded)."""
    if not directory.is_dir():
        return [f"{directory} (not a directory)"]
    missing = [] if (directory / CONFIG_FILE).is_file() else [CONFIG_FILE]
    if not any((directory / f).is_file() for f in VOCAB_FILES):
        missing.append(" or ".join(VOCAB_FILES))
    return missing


def load_tokenizer(directory: str | Path):
    """A Hugging Face tokenizer from a local directory only: never a hub download at run time."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    missing = missing_tokenizer_files(directory)
    if missing:
        raise FileNotFoundError(f"tokenizer directory {directory} is missing: {', '.join(missing)} "
                                "(the google/umt5-xxl tokenizer files that come with Wan2.1)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # say which directory failed; the cause stays chained
        raise ValueError(f"cannot load the tokenizer in {directory}: {type(err).__name__}: {err}") from err
    # The encoder output is trimmed to the first L rows (Wan: u[:v]): only right padding keeps those real.
    if tokenizer.padding_side != "right":
        raise ValueError(f"{directory}: tokenizer pads on the {tokenizer.padding_side}; the prompt encoder "
                         "needs right padding (as google/umt5-xxl)")
    return tokenizer


def tokenize(tokenizer, text: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cleaned `text` -> (ids, mask), each [1, seq_len] int64, padded on the right as Wan does.

    Raises ValueError when the prompt needs more than seq_len tokens (end-of-sequence included).
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    # truncation=False: a too-long prompt comes back longer than seq_len, so it can be counted.
    out = tokenizer([clean_prompt(text)], padding="max_length", max_length=seq_len, truncation=False,
                    add_special_tokens=True, return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    if ids.shape[1] > seq_len:
        raise ValueError(f"the prompt is {ids.shape[1]} tokens (end-of-sequence token included); the text "
                         f"encoder takes at most {seq_len}. Shorten it (Wan2.1 would silently cut it).")
    return ids.long(), mask.long()
