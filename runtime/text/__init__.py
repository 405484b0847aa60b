"""Prompt text encoder: Wan2.1's umT5-XXL encoder and tokenizer, turning a string into the [L, 4096]
embedding the DiT's text cross-attention reads (see encoder.py)."""
from runtime.text.config import TEXT_PRESETS, TextEncoderConfig
from runtime.text.embeds import load_prompt_embeds, save_prompt_embeds
from runtime.text.encoder import PromptEncoder, find_text_files

__all__ = ["TEXT_PRESETS", "PromptEncoder", "TextEncoderConfig", "find_text_files", "load_prompt_embeds",
           "save_prompt_embeds"]
