"""umT5 encoder: Wan2.1's checkpoint keys loaded into transformers' `UMT5EncoderModel`.

Why transformers' model: its math is Wan's `T5Encoder` (`wan/modules/t5.py`), checked term by term:
- norm (`T5LayerNorm` / `UMT5LayerNorm`): x * rsqrt(mean(x.float()^2) + eps), no mean, no bias, cast to
  the weight's dtype when that is half precision, times the weight;
- self-attention without 1/sqrt(head_dim) scaling, plus a relative-position bias from a table of
  every layer (Wan's `shared_pos=False`; every UMT5 layer has `relative_attention_bias`), bidirectional
  buckets with max distance 128 (same bucket formula), padded keys masked by the dtype's minimum;
- FFN fc2(fc1(x) * gelu_tanh(gate(x))) = wo(wi_1(x) * gelu_new(wi_0(x))) (both tanh GELU);
- pre-norm residual blocks, a final norm, no embedding scaling, dropout only when training.
Remaining differences: Wan takes the softmax of fp32 scores and rounds to the input dtype, transformers
takes it in the input dtype (PyTorch accumulates half-precision softmax in fp32, so the two agree up
to rounding), and the fp16-only overflow clamp is written differently. Attention is forced to the
eager implementation, which adds bias and mask to the scores exactly as Wan does.
"""
from __future__ import annotations

import torch

from ..checkpoint import CheckpointError, check_shapes
from .config import TextEncoderConfig

# Per layer: Wan key under `blocks.N.` -> transformers key under `encoder.block.N.`.
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",     # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
# The token embedding fills both of transformers' tied names (the encoder reads `embed_tokens`).
_TOP_KEYS = {
    "token_embedding.weight": ("shared.weight", "encoder.embed_tokens.weight"),
    "norm.weight": ("encoder.final_layer_norm.weight",),
}


def key_map(cfg: TextEncoderConfig) -> dict[str, tuple[str, ...]]:
    """Every key of Wan's encoder checkpoint -> the transformers parameter name(s) it fills."""
    out = dict(_TOP_KEYS)
    for i in range(cfg.num_layers):
        out.update({f"blocks.{i}.{w}": (f"encoder.block.{i}.{h}",) for w, h in _BLOCK_KEYS.items()})
    return out


def hf_config(cfg: TextEncoderConfig):
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance, layer_norm_epsilon=cfg.eps,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        attn_implementation="eager")


def build_umt5(cfg: TextEncoderConfig, device: str | torch.device = "meta"):
    """An empty UMT5EncoderModel of `cfg` (on the meta device by default: no 22 GB random init)."""
    from transformers import UMT5EncoderModel

    with torch.device(device):
        model = UMT5EncoderModel(hf_config(cfg))
    return model.eval().requires_grad_(False)


def load_umt5(state: dict[str, torch.Tensor], cfg: TextEncoderConfig, *, dtype: torch.dtype,
              device: str | torch.device, what: str = "umT5 text encoder"):
    """Strictly load a Wan-layout state dict (every key once, every parameter filled, shapes checked)."""
    model = build_umt5(cfg)
    expected = model.state_dict()
    mapping = key_map(cfg)
    targets = [t for names in mapping.values() for t in names]
    if sorted(targets) != sorted(expected):
        # Only a transformers release that renamed UMT5's parameters gets here; say what moved.
        raise CheckpointError(f"transformers' UMT5EncoderModel no longer matches the Wan key map: unfilled "
                              f"{sorted(set(expected) - set(targets))}, unknown {sorted(set(targets) - set(expected))}")
    check_shapes({w: expected[names[0]].shape for w, names in mapping.items()}, state, what)
    hf = {}
    for wan, names in mapping.items():
        tensor = state[wan].to(device=device, dtype=dtype)  # cast once: the tied names share it
        hf.update(dict.fromkeys(names, tensor))
    model.load_state_dict(hf, strict=True, assign=True)
    # assign=True wraps each name in its own Parameter; make the tied pair one parameter again.
    model.encoder.embed_tokens.weight = model.shared.weight
    return model
