"""Wan2.1 VAE: release key layout, encode, and streaming decode == the upstream-rule offline oracle."""
import math

import pytest
import torch

from runtime.config import EngineConfig, VAEConfig
from runtime.models.vae import CACHE_T, LATENT_MEAN, LATENT_STD, CausalConv3d, StreamingVAEDecoder, WanVAE

TINY = EngineConfig.from_preset("tiny").vae
MICRO = EngineConfig.from_preset("micro").vae
TOL = 1e-5  # fp32, streaming vs offline


def _randomize(vae: WanVAE, seed: int) -> WanVAE:
    """Random weights with unit gain (so fp32 rounding stays small) and a non-zero attention proj."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return vae.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The CPU is shared; one intra-op thread is faster for these tiny convs. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_vae():
    return _randomize(WanVAE(TINY), seed=0)


def _latents(frames: int, h: int = 4, w: int = 4, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _stream(vae, z, block_sizes):
    dec = StreamingVAEDecoder(vae, batch=z.shape[0])
    out, start = [], 0
    for n in block_sizes:
        out.append(dec.decode(z[:, :, start:start + n]))
        start += n
    return torch.cat(out, dim=2), dec


# ---- release layout -----------------------------------------------------------------------------

def test_release_state_dict_layout_on_meta():
    # Facts from Wan-Video/Wan2.1 wan/modules/vae.py (WanVAE_ with dim=96, z_dim=16, dim_mult
    # [1,2,4,4], num_res_blocks=2, temperal_downsample [False,True,True], as `_video_vae` builds it
    # for Wan2.1_VAE.pth): 194 tensors, ~126.9 M parameters, encoder z width 2*16 (mu | log_var).
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    sd = vae.state_dict()
    assert len(sd) == 194
    assert sum(t.numel() for t in sd.values()) == 126_892_531
    expected = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
        "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),        # downsample2d
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),    # downsample3d
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),      # upsample3d
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),        # upsample2d
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    time_convs = [k for k in sd if k.endswith("time_conv.weight")]
    assert time_convs == ["encoder.downsamples.5.time_conv.weight", "encoder.downsamples.8.time_conv.weight",
                          "decoder.upsamples.3.time_conv.weight", "decoder.upsamples.7.time_conv.weight"]
    assert not any("latent_" in k for k in sd)  # mean/std are non-persistent


def test_meta_build_then_assign_load_materialises_latent_stats(tiny_vae):
    with torch.device("meta"):
        vae = WanVAE(TINY)
    vae.load_state_dict(tiny_vae.state_dict(), assign=True)
    assert not vae.latent_mean.is_meta
    assert torch.equal(vae.latent_mean.flatten(), torch.tensor(LATENT_MEAN))
    assert torch.equal(vae.latent_std.flatten(), torch.tensor(LATENT_STD))
    z = _latents(2)
    assert torch.equal(vae.decode_offline(z), tiny_vae.decode_offline(z))


def test_state_dict_save_load_round_trip(tiny_vae, tmp_path):
    path = tmp_path / "vae.pth"
    torch.save(tiny_vae.state_dict(), path)
    fresh = WanVAE(TINY)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    z = _latents(3, seed=5)
    assert torch.equal(fresh.decode_offline(z), tiny_vae.decode_offline(z))
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(fresh.encode_image(img), tiny_vae.encode_image(img))


# ---- causal conv padding (the fact the static cache relies on) ----------------------------------

def test_short_cache_equals_zero_padded_cache():
    torch.manual_seed(0)
    conv = CausalConv3d(4, 5, 3, padding=1)
    x, past = torch.randn(1, 4, 1, 6, 6), torch.randn(1, 4, 1, 6, 6)
    zero = torch.zeros_like(past)
    assert torch.equal(conv(x, past), conv(x, torch.cat([zero, past], 2)))
    assert torch.equal(conv(x), conv(x, torch.cat([zero, zero], 2)))
    with pytest.raises(ValueError, match="past frames"):
        conv(x, torch.randn(1, 4, 3, 6, 6))


# ---- encode -------------------------------------------------------------------------------------

def test_encode_image_shape_determinism_and_causality(tiny_vae):
    g = torch.Generator().manual_seed(3)
    video = torch.rand(2, 3, 5, 32, 32, generator=g) * 2 - 1
    lat = tiny_vae.encode_image(video[:, :, 0])
    assert lat.shape == (2, 16, 1, 4, 4)
    assert torch.equal(lat, tiny_vae.encode_image(video[:, :, 0]))
    assert lat.std() > 0.1  # not degenerate
    full = tiny_vae.encode(video)  # causal: latent frame 0 only sees video frame 0
    assert full.shape == (2, 16, 2, 4, 4)
    torch.testing.assert_close(full[:, :, :1], lat, rtol=0, atol=1e-5)
    # batch items are independent
    torch.testing.assert_close(tiny_vae.encode_image(video[1:, :, 0]), lat[1:], rtol=0, atol=1e-5)


def test_encode_rejects_bad_input(tiny_vae):
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_vae.encode_image(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="3 channels"):
        tiny_vae.encode_image(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"1 \+ 4\*k"):
        tiny_vae.encode(torch.zeros(1, 3, 4, 64, 64))


# ---- streaming decode == offline oracle ---------------------------------------------------------

def test_offline_decode_shape_and_range(tiny_vae):
    out = tiny_vae.decode_offline(_latents(3, h=8, w=8))
    assert out.shape == (1, 3, 9, 64, 64)
    assert out.abs().max() <= 1
    assert (out.abs() < 0.99).float().mean() > 0.5  # mostly unsaturated: the comparisons below bite


@pytest.mark.parametrize("blocks, hw", [((3, 3, 3), 8), ((1,) * 7, 4)])
def test_streaming_equals_offline(tiny_vae, blocks, hw):
    z = _latents(sum(blocks), h=hw, w=hw, seed=2)
    ref = tiny_vae.decode_offline(z)
    got, dec = _stream(tiny_vae, z, blocks)
    assert got.shape == ref.shape == (1, 3, 1 + 4 * (sum(blocks) - 1), 8 * hw, 8 * hw)
    torch.testing.assert_close(got, ref, rtol=0, atol=TOL)
    assert dec.flush().shape == (1, 3, 0, 8 * hw, 8 * hw)


def test_block_frame_counts(tiny_vae):
    dec = StreamingVAEDecoder(tiny_vae)
    assert dec.flush().shape == (1, 3, 0, 0, 0)
    assert dec.decode(_latents(3)).shape[2] == 9
    assert dec.decode(_latents(3, seed=9)).shape[2] == 12
    dec.reset()
    assert dec.decode(_latents(2)).shape[2] == 5


def test_batched_stream_matches_per_item_offline(tiny_vae):
    z = _latents(5, batch=2, seed=4)
    got, _ = _stream(tiny_vae, z, (2, 3))
    for i in range(2):
        torch.testing.assert_close(got[i:i + 1], tiny_vae.decode_offline(z[i:i + 1]), rtol=0, atol=TOL)


def test_micro_config_streams_exactly_in_float64():
    # micro has 2-channel RMS norms (ill-conditioned in fp32); float64 shows the paths agree exactly.
    vae = _randomize(WanVAE(MICRO), seed=7).double()
    z = _latents(7, seed=8).double()
    got, _ = _stream(vae, z, (3, 3, 1))
    assert got.shape == (1, 3, 25, 32, 32)
    torch.testing.assert_close(got, vae.decode_offline(z), rtol=0, atol=1e-12)


# ---- functional core ----------------------------------------------------------------------------

def test_functional_step_equals_class(tiny_vae):
    z = _latents(7, seed=6)
    want, dec = _stream(tiny_vae, z, (3, 3, 1))
    cache = tiny_vae.init_decode_cache(1, 4, 4)
    frames, cache = tiny_vae.decode_step(z[:, :, :1], cache, first=True)
    out = [frames]
    for a, b in [(1, 3), (3, 6), (6, 7)]:
        frames, cache = tiny_vae.decode_step(z[:, :, a:b], cache, first=False)
        out.append(frames)
    assert torch.equal(torch.cat(out, 2), want)
    assert all(torch.equal(a, b) for a, b in zip(cache, dec.cache))


def test_cache_shapes_are_static(tiny_vae):
    layout = tiny_vae.decode_cache_layout(4, 4)
    zeros = tiny_vae.init_decode_cache(2, 4, 4)
    assert [tuple(t.shape) for t in zeros] == [(2, *s) for s in layout]
    assert all(s[1] == CACHE_T for s in layout)
    cache = zeros
    for i, (first, n) in enumerate([(True, 1), (False, 1), (False, 3), (False, 2)]):
        cache_before = [t.clone() for t in cache]
        _, new = tiny_vae.decode_step(_latents(n, batch=2, seed=i), cache, first=first)
        assert [t.shape for t in new] == [t.shape for t in zeros]
        assert all(torch.equal(a, b) for a, b in zip(cache, cache_before))  # input not mutated
        cache = new


def test_first_step_ignores_cache_contents(tiny_vae):
    z0 = _latents(1)
    garbage = [torch.randn_like(t) for t in tiny_vae.init_decode_cache(1, 4, 4)]
    a, cache_a = tiny_vae.decode_step(z0, garbage, first=True)
    b, cache_b = tiny_vae.decode_step(z0, None, first=True)
    assert a.shape == (1, 3, 1, 32, 32) and torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(cache_a, cache_b))


def test_temporal_cache_matters(tiny_vae):
    z = _latents(6, seed=11)
    streamed, _ = _stream(tiny_vae, z, (3, 3))
    block2 = streamed[:, :, 9:]
    cold, _ = tiny_vae.decode_step(z[:, :, 3:], tiny_vae.init_decode_cache(1, 4, 4), first=False)
    assert cold.shape == block2.shape
    assert (cold - block2).abs().max() > 1e-2
    # the influence is local in time: it fades with distance, the first frames differ most
    first_diff = (cold[:, :, :4] - block2[:, :, :4]).abs().mean()
    assert first_diff > 1e-3


def test_decode_rejects_bad_input(tiny_vae):
    cache = tiny_vae.init_decode_cache(1, 4, 4)
    with pytest.raises(ValueError, match="exactly 1 latent frame"):
        tiny_vae.decode_step(_latents(2), None, first=True)
    with pytest.raises(ValueError, match="needs the cache"):
        tiny_vae.decode_step(_latents(1), None, first=False)
    with pytest.raises(ValueError, match="entries"):
        tiny_vae.decode_step(_latents(1), cache[:-1], first=False)
    with pytest.raises(ValueError, match="entry 0 has shape"):
        tiny_vae.decode_step(_latents(1, h=2, w=2), cache, first=False)
    with pytest.raises(ValueError, match="latent"):
        tiny_vae.decode_offline(torch.zeros(1, 8, 2, 4, 4))
    dec = StreamingVAEDecoder(tiny_vae)
    dec.decode(_latents(1))
    with pytest.raises(ValueError, match="mid-stream"):
        dec.decode(_latents(1, h=2, w=2))
    with pytest.raises(ValueError, match=r"expected \[1, z"):
        dec.decode(_latents(1, batch=2))
