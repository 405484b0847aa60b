"""FP8 for family 2, Live Avatar's own selection (spec/liveavatar-family.md, "FP8").

Upstream swaps EVERY Linear of the DiT for an E4M3 one except text_embedding, time_embedding,
time_projection, head.head and the audio encoder's final linear: attention and FFN of every block,
the text cross-attention's k/v, the audio injector's attention and its AdaLayerNorm linear. That is
more than family 1's per-token selection (runtime/models/fp8.HOT_LINEARS), hence its own patterns; the
FP8 linear itself (scales, `_scaled_mm`, capability checks, the fused quantiser) is shared.

q/k/v of each block's self-attention become one GEMM with one activation quantisation
(runtime/models/qkv.py; the model reads them through `Attention.query_key_value`). Upstream keeps
three per-tensor-scaled linears; with `tensor` scaling the stacked weight gets one scale (the
largest of the three, see `quantize_dit_fp8`), with `row` scaling the product is the three exactly.
`fuse_qkv=False` gives upstream's three.
"""
from __future__ import annotations

import re

from torch import nn

from ...models.fp8 import FAST_ACCUM, QuantizeReport, quantize_dit_fp8
from ...models.qkv import QKV_OF_SELF_ATTENTION

ALL_LINEARS = re.compile(r".+")
KEPT_IN_BF16 = re.compile(
    r"text_embedding\.\d+|time_embedding\.\d+|time_projection\.\d+|head\.head"
    r"|casual_audio_encoder\.encoder\.final_linear")


def quantize_liveavatar_fp8(model: nn.Module, granularity: str = "tensor", *, fuse_qkv: bool = True,
                            fast_accum: bool = FAST_ACCUM) -> QuantizeReport:
    """Upstream's FP8 selection on a LiveAvatarDiT, in place (before any condition cache is built)."""
    return quantize_dit_fp8(model, granularity, include=ALL_LINEARS, exclude=KEPT_IN_BF16,
                            fuse=QKV_OF_SELF_ATTENTION if fuse_qkv else None, fast_accum=fast_accum)
