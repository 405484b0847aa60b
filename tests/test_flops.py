"""FLOP counter against hand counts and the table of spec/performance-floor.md.

The hand counts below are written out layer by layer with literal widths for the 1.3B release,
independently of runtime/flops.py's generic code. The spec table is rounded, so comparisons with
it use half a unit of its last digit.
"""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from runtime.config import EngineConfig, VAEConfig
from runtime.flops import (
    BlockFlops,
    achieved,
    block_flops,
    floor_ms,
    taehv_decoder_layers,
    wan_decoder_layers,
)

T = 1e12
D, LAYERS, FFN, TEXT = 1536, 30, 8960, 512


def release(height=512, width=512) -> EngineConfig:
    return EngineConfig.from_preset("livetalk-1.3b").replace(height=height, width=width)


# ---- hand counts -----------------------------------------------------------------------------------

def hand_dit(tokens_per_frame: int) -> dict:
    lq, lk = 3 * tokens_per_frame, 15 * tokens_per_frame  # 3-frame block, 15-frame window
    per_token = 2 * LAYERS * (4 * D * D + 2 * D * D + 2 * D * FFN)  # QKVO, cross Q/O, FFN; 2 FLOP/MAC
    small = (2 * (33 * 2 * 2) * D * lq                            # patch embedding, Conv3d (1,2,2)
             + 2 * D * (16 * 2 * 2) * lq                          # head, Linear(dim -> 64)
             + 3 * 2 * (256 * D + D * D + D * 6 * D)              # time embedding + projection, per frame
             + 3 * 2 * (4 * 10752 * 32 + 14 * 32 * D))            # audio_proj + 14 audio_cond_projs
    return {"linears": per_token * lq, "small": small,
            "self_attn": 4 * lq * lk * D * LAYERS, "cross_attn": 4 * lq * TEXT * D * LAYERS}


def conv(cin, cout, taps, t, h, w):
    return 2 * cin * cout * taps * t * h * w


def hand_wan_vae(h: int, w: int) -> float:
    """Wan2.1 decoder (base 96, mult 1,2,4,4), one steady-state latent frame at latent h x w."""
    n = h * w
    f = conv(16, 16, 1, 1, h, w) + conv(16, 384, 27, 1, h, w)             # conv2, conv1
    f += 4 * conv(384, 384, 27, 1, h, w)                                  # middle: 2 res blocks
    f += conv(384, 1152, 1, 1, h, w) + 4 * n * n * 384 + conv(384, 384, 1, 1, h, w)  # middle attn
    f += 6 * conv(384, 384, 27, 1, h, w)                                  # stage 0: 3 res blocks
    f += conv(384, 768, 3, 1, h, w)                                       # time_conv: 1 -> 2 frames
    f += conv(384, 192, 9, 2, 2 * h, 2 * w)                               # upsample + Conv2d
    f += conv(192, 384, 27, 2, 2 * h, 2 * w) + conv(192, 384, 1, 2, 2 * h, 2 * w)  # stage 1 res 0 + shortcut
    f += 5 * conv(384, 384, 27, 2, 2 * h, 2 * w)                          # rest of stage 1
    f += conv(384, 768, 3, 2, 2 * h, 2 * w)                               # time_conv: 2 -> 4 frames
    f += conv(384, 192, 9, 4, 4 * h, 4 * w)
    f += 6 * conv(192, 192, 27, 4, 4 * h, 4 * w)                          # stage 2
    f += conv(192, 96, 9, 4, 8 * h, 8 * w)                                # upsample2d
    f += 6 * conv(96, 96, 27, 4, 8 * h, 8 * w)                            # stage 3
    f += conv(96, 3, 27, 4, 8 * h, 8 * w)                                 # head
    return f


def hand_taehv(h: int, w: int) -> float:
    """TAEHV decoder (widths 256,128,64,64; time grows at stages 1, 2), one latent frame."""
    f = conv(16, 256, 9, 1, h, w)
    f += 3 * (conv(512, 256, 9, 1, h, w) + 2 * conv(256, 256, 9, 1, h, w))           # MemBlocks
    f += conv(256, 256, 1, 1, 2 * h, 2 * w) + conv(256, 128, 9, 1, 2 * h, 2 * w)    # TGrow(1), proj
    f += 3 * (conv(256, 128, 9, 1, 2 * h, 2 * w) + 2 * conv(128, 128, 9, 1, 2 * h, 2 * w))
    f += conv(128, 256, 1, 1, 4 * h, 4 * w) + conv(128, 64, 9, 2, 4 * h, 4 * w)    # TGrow(2) -> 2 frames
    f += 3 * (conv(128, 64, 9, 2, 4 * h, 4 * w) + 2 * conv(64, 64, 9, 2, 4 * h, 4 * w))
    f += conv(64, 128, 1, 2, 8 * h, 8 * w) + conv(64, 64, 9, 4, 8 * h, 8 * w)       # TGrow(2) -> 4 frames
    f += conv(64, 3, 9, 4, 8 * h, 8 * w)
    return f


# ---- the spec table ---------------------------------------------------------------------------------

# (height, width, tokens/frame, latent h, w, spec: linears, self, cross, forward, block, vae, taehv)
SPEC = [(512, 512, 1024, 64, 64, 7.68, 8.70, 0.29, 16.7, 83.4, 26.6, 1.07),
        (480, 832, 1560, 60, 104, 11.71, 20.19, 0.44, 32.3, 161.7, 40.6, 1.63)]


def near(value_tflop: float, table: float) -> bool:
    """Within half a unit of the table's last digit."""
    digits = len(f"{table}".split(".")[1])
    return abs(value_tflop - table) <= 0.5 * 10 ** -digits + 1e-9


@pytest.mark.parametrize("row", SPEC, ids=["512x512", "480x832"])
def test_dit_matches_hand_count_and_table(row):
    height, width, tpf, _, _, lin, sa, ca, fwd, block, _, _ = row
    cfg = release(height, width)
    assert cfg.tokens_per_frame == tpf
    b, hand = block_flops(cfg), hand_dit(tpf)
    assert b.linears == hand["linears"] and b.small_linears == pytest.approx(hand["small"], rel=1e-12)
    assert b.self_attn == hand["self_attn"] and b.cross_attn == hand["cross_attn"]
    assert b.forwards == 5 and b.q_tokens == 3 * tpf and b.kv_tokens == 15 * tpf
    one = hand["linears"] + hand["small"] + hand["self_attn"] + hand["cross_attn"]
    assert b.forward == pytest.approx(one, rel=1e-12) and b.dit == pytest.approx(5 * one, rel=1e-12)
    assert near(b.linears_total / T, lin), b.linears_total / T
    assert near(b.self_attn / T, sa) and near(b.cross_attn / T, ca)
    assert near(b.forward / T, fwd) and near(b.dit / T, block)
    # 2.50 GFLOP per token for the core linears, as the spec's header says.
    assert near(b.linears / b.q_tokens / 1e9, 2.50)


@pytest.mark.parametrize("row", SPEC, ids=["512x512", "480x832"])
def test_decoders_match_hand_count_and_table(row):
    height, width, _, lh, lw, *_, vae, taehv = row
    cfg = release(height, width)
    assert cfg.latent_hw == (lh, lw)
    wan, tae = block_flops(cfg, "wan"), block_flops(cfg, "taehv")
    assert wan.decoder == pytest.approx(3 * hand_wan_vae(lh, lw), rel=1e-12)
    assert tae.decoder == pytest.approx(3 * hand_taehv(lh, lw), rel=1e-12)
    assert wan.video_frames == tae.video_frames == 12
    assert near(tae.decoder / T, taehv)
    # 480x832: 40.65 against the table's 40.6, which scaled the 512^2 count by pixels (see flops.py).
    assert wan.decoder / T == pytest.approx(vae, rel=2e-3)
    assert wan.decoder_attn == 3 * 4 * (lh * lw) ** 2 * 384  # the middle block's per-frame attention
    assert tae.decoder_attn == 0


# Floors table: (tflops_gemm, tflops_attn, tflops_conv) -> ((ms, fps) DiT, + Wan VAE, + TAEHV).
FLOORS = [((790.0, None, None), ((106, 114), (139, 86), (107, 112))),
          ((1500.0, None, None), ((56, 216), (73, 164), (56, 213))),
          ((700.0, 600.0, 450.0), ((130, 92), (189, 63), (133, 90)))]
# Two cells of the table are not what its own rates give (see flops.py's docstring): the realistic
# "+ Wan VAE" FPS is 12 / 189 ms rounded (63.5 unrounded) and "+ TAEHV" is 132.2 ms / 90.8 FPS.
LOOSE = {(2, 1, "fps"): 0.6, (2, 2, "ms"): 1.0, (2, 2, "fps"): 0.9}


@pytest.mark.parametrize("i", range(len(FLOORS)), ids=["ideal-bf16", "ideal-fp8", "realistic-bf16"])
def test_floors_table(i):
    rates, cells = FLOORS[i]
    floor = floor_ms(release(), *rates)
    for j, (ms, (want_ms, want_fps)) in enumerate(zip((floor.dit_ms, floor.wan_ms, floor.taehv_ms), cells)):
        assert abs(ms - want_ms) <= LOOSE.get((i, j, "ms"), 0.5), (j, ms)
        assert abs(floor.fps(ms) - want_fps) <= LOOSE.get((i, j, "fps"), 0.5), (j, floor.fps(ms))


def test_floor_by_hand_and_first_block():
    floor, b = floor_ms(release(), 700.0, 600.0, 450.0), block_flops(release())
    dit_ms = 5 * b.linears_total / 700e12 * 1e3 + 5 * (b.self_attn + b.cross_attn) / 600e12 * 1e3
    assert floor.dit_ms == pytest.approx(dit_ms, rel=1e-12)
    vae_ms = b.decoder_conv / 450e12 * 1e3 + b.decoder_attn / 600e12 * 1e3
    assert floor.wan_ms == pytest.approx(dit_ms + vae_ms, rel=1e-12)
    # Spec: first block (4 forwards, short window) about 50 ms at 512^2 and 790 TFLOP/s.
    hand = hand_dit(1024)
    first_fwd = hand["linears"] + hand["small"] + 4 * 3072 * 3072 * D * LAYERS + hand["cross_attn"]
    assert floor_ms(release()).first_block_ms == pytest.approx(4 * first_fwd / 790e12 * 1e3, rel=1e-12)
    assert 45 < floor_ms(release()).first_block_ms < 55


# ---- other resolutions, presets, warm-up blocks --------------------------------------------------------

def test_scaling_with_resolution():
    small, big = block_flops(release(512, 512)), block_flops(release(1024, 1024))  # 4x the tokens
    assert big.linears == 4 * small.linears and big.cross_attn == 4 * small.cross_attn
    assert big.self_attn == 16 * small.self_attn
    # Convolutions scale with pixels, the VAE's per-frame attention with pixels squared.
    assert big.decoder_conv == pytest.approx(4 * small.decoder_conv, rel=1e-12)
    assert big.decoder_attn == pytest.approx(16 * small.decoder_attn, rel=1e-12)


def test_window_fills_over_the_first_blocks():
    cfg = release()
    kv = [block_flops(cfg, block_index=k).kv_tokens // cfg.tokens_per_frame for k in range(6)]
    assert kv == [3, 6, 9, 12, 15, 15]
    assert block_flops(cfg, block_index=7) == block_flops(cfg)
    first = block_flops(cfg, "wan", block_index=0)
    assert first.video_frames == 9
    # The stream's first latent frame skips both time_convs: one video frame, 1/4 of the later work.
    one = sum(layer.flops for layer in wan_decoder_layers(cfg.vae, 64, 64, first_chunk=True))
    assert first.decoder == pytest.approx(one + 2 * hand_wan_vae(64, 64), rel=1e-12)
    assert block_flops(cfg, "taehv", block_index=0).decoder == block_flops(cfg, "taehv").decoder
    with pytest.raises(ValueError, match="block_index"):
        block_flops(cfg, block_index=-1)


@pytest.mark.parametrize("preset", ["tiny", "micro", "livetalk-1.3b"])
def test_every_preset_counts(preset):
    b = block_flops(EngineConfig.from_preset(preset), "taehv")
    assert isinstance(b, BlockFlops) and b.total > b.dit > 0 and b.decoder > 0
    d = b.as_dict()
    assert d["total"] == b.total and d["linears_total"] == b.linears_total and d["decoder_name"] == "taehv"


def test_linear_weights_match_the_model_layout():
    """Per-token linears = 2 x the weights a token meets: read them from the real module layout."""
    from runtime.models.dit import build_dit

    cfg = release()
    model = build_dit(cfg, device="meta")
    blk = model.blocks[0]
    mods = [blk.self_attn.q, blk.self_attn.k, blk.self_attn.v, blk.self_attn.o,
            blk.cross_attn.q, blk.cross_attn.o, blk.ffn[0], blk.ffn[2]]
    per_token_layer = sum(m.weight.numel() for m in mods)
    b = block_flops(cfg)
    assert b.linears == 2 * per_token_layer * len(model.blocks) * b.q_tokens
    assert b.patch_embed == 2 * model.patch_embedding.weight.numel() * b.q_tokens
    assert b.head == 2 * model.head.head.weight.numel() * b.q_tokens


def test_wan_decoder_matches_torch_flop_counter():
    """The real Wan decoder module, counted by torch, on the tiny preset (first + 2 later frames)."""
    vae_mod = pytest.importorskip("runtime.models.vae")
    cfg = EngineConfig.from_preset("tiny")
    vae = vae_mod.WanVAE(cfg.vae).eval()
    h, w = cfg.latent_hw
    with FlopCounterMode(display=False) as counter:
        vae.decode_offline(torch.randn(1, cfg.vae.z_dim, 3, h, w))
    ours = block_flops(cfg, "wan", block_index=0)
    assert counter.get_total_flops() == ours.decoder


def test_conventions_match_torch_flop_counter():
    """2 FLOPs per MAC for convs and linears, 4 * Lq * Lk * d for attention, as torch counts them."""
    x = torch.randn(1, 6, 4, 5, 7)
    with FlopCounterMode(display=False) as counter:
        torch.nn.Conv3d(6, 10, 3)(torch.nn.functional.pad(x, (1, 1, 1, 1, 2, 0)))  # causal 3x3x3
    assert counter.get_total_flops() == conv(6, 10, 27, 4, 5, 7)
    q, k = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 13, 16)  # 2 heads of 16: d = 32
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # the fused CPU
        torch.nn.functional.scaled_dot_product_attention(q, k, k)  # kernel is not counted by torch
    assert counter.get_total_flops() == 4 * 9 * 13 * (2 * 16)


def test_taehv_rejects_configs_it_cannot_decode():
    cfg = EngineConfig.from_preset("tiny")
    # Two downsampling stages: spatial factor 4, which TAEHV's three 2x stages cannot produce.
    bad = cfg.replace(vae=VAEConfig(base_dim=8, dim_mult=(1, 2, 2), temporal_downsample=(True, True)))
    with pytest.raises(ValueError, match="TAEHV"):
        taehv_decoder_layers(bad)
    with pytest.raises(ValueError, match="unknown decoder"):
        block_flops(cfg, "vqgan")


# ---- achieved ------------------------------------------------------------------------------------

def test_achieved():
    b = block_flops(release())
    r = achieved(b, 0.2)
    assert r["flops"] == b.total and r["tflops"] == pytest.approx(b.total / 0.2 / 1e12)
    assert r["fraction_of_floor"] == pytest.approx(r["tflops"] / 790.0)
    assert r["floor_seconds"] == pytest.approx(b.total / 790e12)
    assert achieved(395e12, 1.0, peak_tflops=790.0)["fraction_of_floor"] == pytest.approx(0.5)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="seconds"):
            achieved(1e12, bad)
    with pytest.raises(ValueError, match="peak_tflops"):
        achieved(1e12, 1.0, peak_tflops=0)
    with pytest.raises(ValueError, match="tflops_conv"):
        floor_ms(release(), 700.0, 600.0, 0.0)
