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

from benchmarks import fp8_traffic
from runtime import Engine
from runtime.config import EngineConfig
from runtime.models import fp8
from runtime.models.dit import build_dit
from runtime.models.fp8 import E4M3_MAX, Fp8Linear, check_fp8_device, quantize_dit_fp8, quantize_e4m3
from runtime.models.qkv import FusedQKV, concat_linears, fuse_model_qkv, fuse_qkv, project_qkv

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
    # self-attention q/k/v: one Fp8Linear over the stacked weight; the others one each
    assert report.fused == [f"blocks.{i}.self_attn" for i in range(cfg.dit.num_layers)]
    for i in range(cfg.dit.num_layers):
        fused = dit.get_submodule(f"blocks.{i}.self_attn.qkv")
        assert isinstance(fused, FusedQKV) and isinstance(fused.proj, Fp8Linear)
        assert fused.proj.out_features == 3 * cfg.dit.dim and fused.widths == (cfg.dit.dim,) * 3
        assert not hasattr(dit.get_submodule(f"blocks.{i}.self_attn"), "q")
    assert all(isinstance(dit.get_submodule(n), Fp8Linear) for n in expected if n[-2:] not in (".q", ".k", ".v")
               or "cross_attn" in n)
    assert report.bytes_after * 3.5 < report.bytes_before            # fp32 -> e4m3 (+ scales)


def _qkv_linears(dim: int, seed: int) -> list[nn.Linear]:
    """q, k, v with different weight magnitudes (v's amax ~1/3 of q's), biased."""
    g = torch.Generator().manual_seed(seed)
    linears = [nn.Linear(dim, dim) for _ in range(3)]
    for lin, std in zip(linears, (1.0, 0.8, 0.3), strict=True):
        nn.init.normal_(lin.weight, std=std / dim ** 0.5, generator=g)
        nn.init.normal_(lin.bias, std=0.1, generator=g)
    return linears


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fused_qkv_against_three_fp8_linears_and_fp32(granularity):
    """`row`: a scale per output channel and per token, so the stacked product IS the three (bit for
    bit here). `tensor`: the stacked weight has one scale, the largest of the three, so k and v sit on
    another E4M3 grid: they differ from their own Fp8Linear by about the FP8 error itself (0.04
    measured), but are as close to the fp32 product as the separate ones (0.037 both, measured;
    bound: within 10% of the separate layer's error)."""
    dim = 128
    linears = _qkv_linears(dim, seed=2)
    x = torch.randn(2, 45, dim, generator=torch.Generator().manual_seed(3))
    fused = FusedQKV(Fp8Linear(concat_linears(*linears), granularity), (dim,) * 3)
    outs = fused(x)
    for out, lin in zip(outs, linears, strict=True):
        sep = Fp8Linear(lin, granularity)(x)
        assert out.shape == (2, 45, dim) and out.stride(-1) == 1
        if granularity == "row":
            assert torch.equal(out, sep)
        assert rel_err(out, lin(x)) < 1.1 * rel_err(sep, lin(x)) < 0.08
    assert torch.equal(outs[0], Fp8Linear(linears[0], granularity)(x))   # q holds the largest amax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_unquantized_equals_three_linears(dtype):
    """Without FP8 the stacked GEMM is the same dot products: equal within the GEMM's summation order
    (bit for bit on this CPU; bound 1e-6 fp32, one bf16 ulp)."""
    linears = [lin.to(dtype) for lin in _qkv_linears(64, seed=4)]
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    attn = nn.Module()
    attn.q, attn.k, attn.v = linears
    want = project_qkv(attn, x)
    fuse_qkv(attn)
    assert not hasattr(attn, "q") and isinstance(attn.qkv, FusedQKV)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    for got, ref in zip(project_qkv(attn, x), want, strict=True):
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_fused_dit_block_equals_the_unfused_one():
    """Fusion after strict loading: the release's q/k/v keys load into the unfused DiT, then
    `fuse_model_qkv` stacks them; the block forward is the same (fp32, one GEMM width apart)."""
    cfg = EngineConfig.from_preset("tiny")
    ref = build_dit(cfg)
    dit = build_dit(cfg)
    dit.load_state_dict(ref.state_dict(), strict=True)
    assert fuse_model_qkv(dit) == [f"blocks.{i}.self_attn" for i in range(cfg.dit.num_layers)]
    g = torch.Generator().manual_seed(6)
    blk_ref, blk = ref.blocks[0].self_attn, dit.blocks[0].self_attn
    x = torch.randn(1, 48, cfg.dit.dim, generator=g)
    for got, want in zip(project_qkv(blk, x), project_qkv(blk_ref, x), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_fuse_errors():
    with pytest.raises(ValueError, match="input widths"):
        concat_linears(nn.Linear(16, 16), nn.Linear(32, 16))
    with pytest.raises(ValueError, match="bias"):
        concat_linears(nn.Linear(16, 16), nn.Linear(16, 16, bias=False))
    attn = nn.Module()
    attn.q, attn.k, attn.v = Fp8Linear(nn.Linear(16, 16)), nn.Linear(16, 16), nn.Linear(16, 16)
    with pytest.raises(TypeError, match="nn.Linear"):
        fuse_qkv(attn)


@pytest.mark.parametrize("fast_accum", [True, False])
def test_fast_accum_reaches_scaled_mm(monkeypatch, fast_accum):
    """The option is passed to `_scaled_mm`; the CPU kernel ignores it (bit-identical outputs, so its
    numeric effect on Hopper is not measured here). Default: on (fp8.FAST_ACCUM)."""
    seen = []
    real = torch._scaled_mm

    def spy(*args, **kw):
        seen.append(kw["use_fast_accum"])
        return real(*args, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    layer = Fp8Linear(nn.Linear(32, 16), fast_accum=fast_accum)
    x = torch.randn(4, 32)
    out = layer(x)
    assert seen == [fast_accum] and fp8.FAST_ACCUM is True
    assert out.shape == (4, 16)
    cfg = EngineConfig.from_preset("tiny")
    quantize_dit_fp8(dit := build_dit(cfg), "row", fast_accum=fast_accum)
    assert {m.fast_accum for m in dit.modules() if isinstance(m, Fp8Linear)} == {fast_accum}


def test_cpu_scaled_mm_ignores_fast_accum():
    g = torch.Generator().manual_seed(7)
    linear = nn.Linear(64, 32)
    x = torch.randn(9, 64, generator=g)
    for granularity in GRANULARITIES:
        a, b = (Fp8Linear(linear, granularity, fast_accum=f)(x) for f in (True, False))
        assert torch.equal(a, b)


def test_capability_rules(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    check_fp8_device(torch.device("cuda"), "tensor")
    with pytest.raises(RuntimeError, match=r"9\.0"):
        check_fp8_device(torch.device("cuda"), "row")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match=r"8\.9.*8\.0"):
        check_fp8_device(torch.device("cuda"), "tensor")
    check_fp8_device(torch.device("cpu"), "row")


# ------------------------------------------------------------------------------ bytes per block
def test_quantiser_bytes_match_a_hand_count():
    """x [2, 16] bf16 (N = 32 elements, 2 bytes each), pass by pass as benchmarks/fp8_traffic.py says."""
    eager_tensor = (64 + 64) + (64 + 2) + (2 + 4) + 8 + 8 + (64 + 128) + (128 + 4 + 128) + 256 + (128 + 32)
    assert fp8_traffic.eager_bytes(2, 16, 2, "tensor") == eager_tensor == 1084
    # row: 2 scales; amax writes 2x2, float() 2x(2+4), /448 and clamp 2x8 each, the division reads 2x4
    assert fp8_traffic.eager_bytes(2, 16, 2, "row") == eager_tensor + 2 + 6 + 16 + 4
    # fp32 input: no .float() copies (x itself, and the fp32 amax)
    assert fp8_traffic.eager_bytes(2, 16, 4, "tensor") == (128 + 128) + (128 + 4) + 16 + (128 + 4 + 128) + 256 + 160
    # fused: one program (BLOCK_M 512 >= 2 rows); tensor: zero word, read, atomic, read + amax, write q + scale
    assert fp8_traffic.fused_bytes(2, 16, 2, "row") == 64 + 32 + 8
    assert fp8_traffic.fused_bytes(2, 16, 2, "tensor") == 4 + 64 + 4 + (64 + 4) + (32 + 4)


def test_block_traffic_counts_the_model_s_quantised_linears():
    """Per forward = sum over the quantised linears (walked in the real DiT, q/k/v fused or not) of
    the quantiser's bytes on their [Lq, in_features] input; per block x (steps + KV refresh)."""
    cfg = EngineConfig.from_preset("tiny")
    lq = cfg.cache.block_frames * cfg.tokens_per_frame
    counts = {}
    for fuse in (False, True):
        dit = build_dit(cfg)
        quantize_dit_fp8(dit, "tensor", fuse=fp8.QKV_OF_SELF_ATTENTION if fuse else None)
        counts[fuse] = [m.in_features for m in dit.modules() if isinstance(m, Fp8Linear)]
    assert len(counts[False]) == 8 * cfg.dit.num_layers and len(counts[True]) == 6 * cfg.dit.num_layers
    t = fp8_traffic.block_quant_traffic(cfg, "tensor", elem=2)
    assert t.per_forward_before == sum(fp8_traffic.eager_bytes(lq, k, 2, "tensor") for k in counts[False])
    assert t.per_forward_after == sum(fp8_traffic.fused_bytes(lq, k, 2, "tensor") for k in counts[True])
    assert t.per_block_before == t.per_forward_before * (cfg.sampler.num_steps + 1)


def test_livetalk_512_figures():
    """The figures docs/kernels.md quotes (LiveTalk 1.3B, 512x512, bf16): ~300 GB -> 38 / 23 GB."""
    cfg = EngineConfig.from_preset("livetalk-1.3b")
    tensor, row = (fp8_traffic.block_quant_traffic(cfg, g) for g in GRANULARITIES)
    assert round(tensor.per_block_before / 1e9, 1) == 299.7 and round(tensor.per_block_after / 1e9, 1) == 38.3
    assert round(row.per_block_before / 1e9, 1) == 299.9 and round(row.per_block_after / 1e9, 1) == 23.0


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
