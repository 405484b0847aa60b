"""FP8 for family 2 (runtime/families/liveavatar/fp8.py): upstream's selection, and the forward stays close."""
import pytest
import torch
from torch import nn

from runtime.families.liveavatar import LiveAvatarConfig, build_liveavatar, randomize_weights
from runtime.families.liveavatar.fp8 import quantize_liveavatar_fp8
from runtime.models.fp8 import Fp8Linear
from runtime.models.qkv import FusedQKV

TINY = LiveAvatarConfig.from_preset("tiny")
NF, LH, LW = 3, 8, 8


def _model():
    return randomize_weights(build_liveavatar(TINY, dtype=torch.float32), seed=0)


def _inputs():
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    return {"x": r(1, 16, NF, LH, LW), "t": 600.0, "ref_latent": r(1, 16, 1, LH, LW),
            "motion_latents": r(1, 16, 19, LH, LW), "prompt_embeds": r(1, 5, TINY.text_dim),
            "audio_features": r(1, TINY.audio_layers, TINY.audio_dim, 4 * NF)}


def test_upstream_selection_every_linear_but_the_embeddings_time_head_and_audio_final():
    model = _model()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = quantize_liveavatar_fp8(model)
    kept = {"text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
            "time_projection.1", "head.head", "casual_audio_encoder.encoder.final_linear"}
    assert set(report.kept) == kept and set(report.converted) == linears - kept
    # the ones family 1's selection would skip are in: text k/v, the audio injector's attention and AdaLN
    for name in ("blocks.0.cross_attn.k", "audio_injector.injector.0.q",
                 "audio_injector.injector_adain_layers.0.linear"):
        assert isinstance(model.get_submodule(name), Fp8Linear), name


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_fp8_forward_tracks_fp32(granularity):
    """Observed on the tiny preset: 0.030 (row) and 0.035 (tensor) with three q/k/v GEMMs; fused
    (the default) 0.030 (row: the same product) and 0.033 (tensor: one scale for the stacked weight)."""
    ref = _model()
    inp = _inputs()
    want = ref(**inp)
    errs = {}
    for fuse in (False, True):
        quant = _model()
        quantize_liveavatar_fp8(quant, granularity, fuse_qkv=fuse)
        got = quant(**inp)
        errs[fuse] = ((got.float() - want).norm() / want.norm()).item()
    assert all(0 < e < 0.06 for e in errs.values()), errs
    assert errs[True] < 1.15 * errs[False], errs


def test_query_key_value_is_query_and_key_value_fused_or_not():
    """`Attention.query_key_value` (what self-attention calls once q/k/v are fused) equals `query` and
    `key_value`: unfused in fp32 exactly, and as one FP8 GEMM with row scaling exactly the three
    FP8 linears (a scale per output channel and per token either way)."""
    model = _model()
    attn = model.blocks[0].self_attn
    x = torch.randn(2, 24, TINY.dim, generator=torch.Generator().manual_seed(2))
    want = (attn.query(x), *attn.key_value(x))
    got = attn.query_key_value(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    three, one = _model(), _model()
    quantize_liveavatar_fp8(three, "row", fuse_qkv=False)
    report = quantize_liveavatar_fp8(one, "row")
    assert report.fused == [f"blocks.{i}.self_attn" for i in range(TINY.num_layers)]
    a3, a1 = three.blocks[0].self_attn, one.blocks[0].self_attn
    assert isinstance(a1.qkv, FusedQKV) and not hasattr(a1, "q")
    want = (a3.query(x), *a3.key_value(x))
    assert all(torch.equal(a, b) for a, b in zip(a1.query_key_value(x), want, strict=True))
    # cross-attention and the audio injector read k/v from another input: never fused
    assert isinstance(one.blocks[0].cross_attn.q, Fp8Linear)
    assert isinstance(one.get_submodule("audio_injector.injector.0.q"), Fp8Linear)
