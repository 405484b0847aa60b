"""FP8 linears (runtime/models/fp8.py) and the FP8 engine.

`torch._scaled_mm` runs on the CPU too, so the numerics are checked here: each Fp8Linear against an
explicit emulation of the same quantized product (tight: only the fp32 summation order differs), and
against the unquantized linear (loose: that is the FP8 error itself, E4M3 keeps 3 mantissa bits, so
a dot product of K random terms lands within a few percent). The engine is checked for determinism
and chunking invariance with FP8 on, and its DiT against the unquantized one. The `gpu` tests repeat
the numerics on CUDA (FP8 tensor cores).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from runtime import Engine
from runtime.config import EngineConfig
from runtime.models import fp8
from runtime.models.dit import build_dit
from runtime.models.fp8 import E4M3_MAX, Fp8Linear, check_fp8_device, quantize_dit_fp8, quantize_e4m3

GRANULARITIES = ["tensor", "row"]


def emulated(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """The same quantized product spelled out in fp32: (x8 * sx) @ (w8 * sw)^T + b."""
    x2 = x.reshape(-1, layer.in_features)
    x8, sx = quantize_e4m3(x2, layer.granularity)
    out = (x8.float() * sx) @ layer.dequantized_weight().t()
    if layer.bias is not None:
        out = out + layer.bias.float()
    return out.reshape(*x.shape[:-1], layer.out_features)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fp8_linear_is_the_quantized_product(granularity):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48)
    nn.init.normal_(linear.weight, generator=g)
    layer = Fp8Linear(linear, granularity)
    x = torch.randn(2, 37, 64, generator=g)           # 74 tokens: not a multiple of 16
    out = layer(x)
    assert out.shape == (2, 37, 48) and out.dtype == x.dtype
    torch.testing.assert_close(out, emulated(layer, x), atol=1e-4, rtol=1e-4)
    # and it is a (lossy) linear layer: within the FP8 error of the unquantized product
    assert rel_err(out, linear(x)) < 0.08


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fp8_linear_with_bias_obeys_the_cuda_scaled_mm_rules(monkeypatch, granularity, dtype):
    """CUDA's `_scaled_mm` refuses a bias with a float32 output and rowwise scales take none (the CPU
    kernel accepts both): with those refusals replayed here, an fp32 or bf16 layer still works and
    equals the emulated product."""
    real = torch._scaled_mm

    def cuda_rules(a, b, *, scale_a, scale_b, bias=None, out_dtype=None, **kw):
        if bias is not None and out_dtype == torch.float32:
            raise RuntimeError("Bias is not supported when out_dtype is set to Float32")
        if bias is not None and scale_a.numel() > 1:
            raise RuntimeError("rowwise scaled_mm takes no bias")
        return real(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", cuda_rules)
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(32, 16)
    nn.init.normal_(linear.bias, std=2.0, generator=g)
    layer = Fp8Linear(linear, granularity)
    x = torch.randn(5, 32, generator=g).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), emulated(layer, x.float()), atol=tol, rtol=tol)
    assert fp8.fuses_bias(granularity, dtype) == (granularity == "tensor" and dtype == torch.bfloat16)


def test_rowwise_scaling_keeps_small_tokens_when_one_token_is_large():
    """Per-tensor scaling shares one scale with an outlier token: 1e5 times louder pushes the others
    into E4M3's subnormals (below 2^-6). Per-token scaling does not care."""
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 64, bias=False)
    x = torch.randn(32, 64, generator=g)
    x[0] *= 1e5                                           # one loud token
    errs = {gr: rel_err(Fp8Linear(linear, gr)(x)[1:], linear(x)[1:]) for gr in GRANULARITIES}
    assert errs["row"] < 0.08 < errs["tensor"], errs


def test_quantize_e4m3_edges():
    q, scale = quantize_e4m3(torch.zeros(4, 16), "tensor")
    assert torch.isfinite(scale) and scale > 0 and not q.float().any()
    x = torch.tensor([[1e6, -1e6] + [1.0] * 14])
    q, scale = quantize_e4m3(x, "row")
    assert scale.shape == (1, 1) and q.float().abs().max() <= E4M3_MAX
    torch.testing.assert_close((q.float() * scale)[0, :2], x[0, :2], rtol=0.07, atol=0)


def test_fp8_linear_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear(nn.Linear(24, 32))
    with pytest.raises(ValueError, match="granularity"):
        Fp8Linear(nn.Linear(32, 32), "block")


def test_quantize_dit_converts_exactly_the_per_token_linears():
    cfg = EngineConfig.from_preset("tiny")
    dit = build_dit(cfg)
    report = quantize_dit_fp8(dit, "tensor")
    per_block = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
                 "ffn.0", "ffn.2"}
    expected = {f"blocks.{i}.{n}" for i in range(cfg.dit.num_layers) for n in per_block}
    assert set(report.converted) == expected
    for kept in ("text_embedding.0", "time_projection.1", "head.head", "blocks.0.cross_attn.k",
                 "blocks.0.cross_attn.v"):
        assert kept in report.kept and isinstance(dit.get_submodule(kept), nn.Linear)
    assert all(isinstance(dit.get_submodule(n), Fp8Linear) for n in expected)
    assert report.bytes_after * 3.5 < report.bytes_before            # fp32 -> e4m3 (+ scales)


def test_capability_rules(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    check_fp8_device(torch.device("cuda"), "tensor")
    with pytest.raises(RuntimeError, match=r"9\.0"):
        check_fp8_device(torch.device("cuda"), "row")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match=r"8\.9.*8\.0"):
        check_fp8_device(torch.device("cuda"), "tensor")
    check_fp8_device(torch.device("cpu"), "row")


# ---------------------------------------------------------------------------------------- engine
AUDIO = np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 2).astype(np.float32)
IMAGE = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)


# E4M3 keeps 3 mantissa bits; measured on the tiny preset: 0.12 grey levels mean difference,
# correlation 0.99998 (both scalings). The bounds leave ~8x room, not a different picture.
MAX_MEAN_GREY_DIFF = 1.0
MIN_CORRELATION = 0.9995


def run_engine(engine: Engine, chunks: list[np.ndarray]) -> np.ndarray:
    engine.reset(IMAGE, seed=3)
    blocks = [b for c in chunks for b in engine.step(c, 16000)] + engine.flush()
    return np.concatenate([b.frames for b in blocks])


def tiny(quantize=None) -> Engine:
    return Engine.random(EngineConfig.from_preset("tiny"), device="cpu", seed=0, quantize=quantize)


def test_fp8_engine_is_deterministic_and_chunking_invariant():
    whole = run_engine(tiny("fp8"), [AUDIO])
    pieces = run_engine(tiny("fp8"), np.array_split(AUDIO, 7))
    assert whole.shape[0] > 0 and np.array_equal(whole, pieces)


@pytest.mark.parametrize("mode", ["fp8", "fp8-row"])
def test_fp8_engine_tracks_the_unquantized_engine(mode):
    """Same weights, audio and noise: the FP8 engine's frames stay close to the fp32 engine's (as
    tests/test_engine_dtype.py does for bf16), and the quantization really happened (not equal)."""
    quant = tiny(mode)
    assert quant.quantization.granularity == ("row" if mode == "fp8-row" else "tensor")
    ref, low = (run_engine(eng, [AUDIO]).astype(int) for eng in (tiny(), quant))
    diff = np.abs(ref - low)
    assert 0 < diff.mean() < MAX_MEAN_GREY_DIFF, diff.mean()
    assert np.corrcoef(ref.ravel(), low.ravel())[0, 1] > MIN_CORRELATION


def test_quantize_errors():
    with pytest.raises(ValueError, match="quantize"):
        tiny("int4")
    eng = tiny("fp8")
    with pytest.raises(RuntimeError, match="already quantized"):
        eng.quantize("fp8")
    eng = tiny()
    eng.reset(IMAGE)
    with pytest.raises(RuntimeError, match="before the first reset"):
        eng.quantize("fp8")


# ------------------------------------------------------------------------------------------- GPU
def _fp8_gpu(granularity: str) -> bool:
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= fp8.MIN_CAPABILITY[granularity]


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gpu_fp8_linear_real_shape(granularity):
    if not _fp8_gpu(granularity):
        pytest.skip("needs a CUDA GPU with FP8 tensor cores")
    g = torch.Generator(device="cuda").manual_seed(0)
    linear = nn.Linear(1536, 8960, device="cuda", dtype=torch.bfloat16)
    layer = Fp8Linear(linear, granularity)
    x = torch.randn(1, 3072, 1536, device="cuda", dtype=torch.bfloat16, generator=g)
    out = layer(x)
    torch.testing.assert_close(out.float(), emulated(layer, x), atol=2e-2, rtol=2e-2)
    assert rel_err(out, linear(x)) < 0.08
