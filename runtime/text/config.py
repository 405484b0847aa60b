"""Shapes of the umT5 text encoder, validated on construction, with named presets.

`umt5-xxl` is the encoder of Wan2.1's `models_t5_umt5-xxl-enc-bf16.pth` (Wan2.1 `wan/modules/t5.py`,
`umt5_xxl(encoder_only=True)`; `T5EncoderModel(text_len=512)`). `tiny` has the same structure at test
size; its `dim` and `seq_len` equal the `tiny` engine preset's DiT `text_dim` and `text_len`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextEncoderConfig:
    name: str = "custom"
    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096       # width of q, k, v (num_heads * head_dim); may differ from dim
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32      # relative-position buckets, one table per layer (Wan: shared_pos=False)
    max_distance: int = 128    # T5RelativeEmbedding(max_dist=128): distances beyond share the last bucket
    eps: float = 1e-6
    seq_len: int = 512         # tokens per prompt, end-of-sequence token included (Wan: text_len)

    def __post_init__(self):
        checks = [
            (min(self.vocab_size, self.dim, self.dim_attn, self.dim_ffn, self.num_heads, self.num_layers,
                 self.seq_len) >= 1, "every size must be >= 1"),
            (self.dim_attn % self.num_heads == 0,
             f"dim_attn {self.dim_attn} not divisible by num_heads {self.num_heads}"),
            # Bidirectional bucketing halves the buckets, then half of those are exact distances.
            (self.num_buckets >= 4 and self.num_buckets % 2 == 0,
             f"num_buckets must be even and >= 4, got {self.num_buckets}"),
            (self.max_distance > self.num_buckets // 4,
             f"max_distance {self.max_distance} must exceed num_buckets // 4 = {self.num_buckets // 4}"),
            (self.eps > 0, "eps must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"text encoder config {self.name!r}: {msg}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def from_preset(cls, name: str) -> TextEncoderConfig:
        try:
            return TEXT_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown text encoder preset {name!r}; known: {', '.join(TEXT_PRESETS)}") from None


TEXT_PRESETS = {
    "umt5-xxl": TextEncoderConfig(name="umt5-xxl"),
    # dim_attn != dim so a transposed q/k/v/o would not load; max_distance 8 so that at seq_len 16 the
    # logarithmic buckets are used too, not only the exact ones.
    "tiny": TextEncoderConfig(name="tiny", vocab_size=64, dim=48, dim_attn=32, dim_ffn=80, num_heads=4,
                              num_layers=2, num_buckets=8, max_distance=8, seq_len=16),
}
