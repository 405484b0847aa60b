"""TAEHV decoder: release key layout, streaming == whole-clip oracle == upstream's frame-by-frame
work queue, frame counts, range, strict loading, FLOPs vs runtime.flops."""
import copy
import math
from collections import deque

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from runtime.checkpoint import CheckpointError
from runtime.config import EngineConfig
from runtime.flops import TAEHV_WIDTHS, taehv_decoder_layers
from runtime.models.taehv import RELEASE_WIDTHS, MemBlock, StreamingTAEHVDecoder, TAEHVDecoder, TGrow

WIDTHS = (12, 8, 6, 4)  # tiny and all different, so an index or width mix-up cannot line up
Z = 16
TOL = 1e-5  # fp32: streaming vs offline differ only by how frames are batched in the convs


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared; tiny convs are faster on one thread
    yield
    torch.set_num_threads(before)


def _randomize(dec: TAEHVDecoder, seed: int) -> TAEHVDecoder:
    """Unit-gain random weights; the output conv is scaled so most pixels land inside (0, 1)
    (a saturated clamp would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.startswith("decoder.22."):
                p.copy_(0.5 + 0.05 * noise if p.dim() == 1 else 0.2 * noise / math.sqrt(p[0].numel()))
            elif p.dim() == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return dec.eval()


@pytest.fixture(scope="module")
def tiny():
    return _randomize(TAEHVDecoder(Z, WIDTHS), seed=0)


def _latents(frames: int, h: int = 3, w: int = 2, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, Z, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _stream(dec, z, sizes):
    s = StreamingTAEHVDecoder(dec, batch=z.shape[0])
    out, start = [], 0
    for n in sizes:
        out.append(s.decode(z[:, :, start:start + n]))
        start += n
    assert start == z.shape[2]
    return torch.cat(out, 2), s


@torch.no_grad()
def _upstream_sequential(dec: TAEHVDecoder, z: torch.Tensor) -> torch.Tensor:
    """Independent reference: upstream's `apply_model_with_memblocks_sequential` work queue (one time
    step at a time, depth first, per-layer memory), then clamp [0, 1], trim 3 frames, map to [-1, 1]."""
    layers = list(dec.decoder)
    memory = [None] * len(layers)
    queue = deque((zt, 0) for zt in z.unbind(2))
    out = []
    while queue:
        xt, i = queue.popleft()
        if i == len(layers):
            out.append(xt)
            continue
        layer = layers[i]
        if isinstance(layer, MemBlock):
            past = torch.zeros_like(xt) if memory[i] is None else memory[i]
            memory[i] = xt
            queue.appendleft((layer(xt, past), i + 1))
        elif isinstance(layer, TGrow):
            parts = layer.conv(xt).chunk(layer.stride, 1)  # channel group j is sub-frame j
            queue.extendleft((p, i + 1) for p in reversed(parts))
        else:
            queue.appendleft((layer(xt), i + 1))
    return torch.stack(out, 2).clamp(0, 1)[:, :, 3:] * 2 - 1


# ---- release layout ---------------------------------------------------------------------------

def test_release_state_dict_layout_on_meta():
    # Facts: madebyollin/taehv taehv.py `TAEHV.decoder` (Sequential: 0 Clamp, 1 conv z->256 +bias,
    # 2 ReLU, per stage 3 MemBlocks, Upsample, TGrow (bias-free 1x1, n -> n*stride), bias-free conv
    # to the next width; 21 ReLU, 22 conv 64->3 +bias; MemBlock.conv = conv(2n,n),ReLU,conv,ReLU,conv
    # with biases, identity skip); decoder_time_upscale (False, True, True); taew2_1 has 16 latent
    # channels, patch size 1. Third-party readers of the released safetensors headers agree:
    # 64 decoder tensors, decoder.7.conv.weight [256, 256, 1, 1], decoder.22.weight [3, 64, 3, 3].
    with torch.device("meta"):
        dec = TAEHVDecoder()
    sd = dec.state_dict()
    expected = {"decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,),
                "decoder.7.conv.weight": (256, 256, 1, 1), "decoder.8.weight": (128, 256, 3, 3),
                "decoder.13.conv.weight": (256, 128, 1, 1), "decoder.14.weight": (64, 128, 3, 3),
                "decoder.19.conv.weight": (128, 64, 1, 1), "decoder.20.weight": (64, 64, 3, 3),
                "decoder.22.weight": (3, 64, 3, 3), "decoder.22.bias": (3,)}
    for idx, n in [(3, 256), (4, 256), (5, 256), (9, 128), (10, 128), (11, 128), (15, 64), (16, 64), (17, 64)]:
        expected[f"decoder.{idx}.conv.0.weight"] = (n, 2 * n, 3, 3)
        for c in (0, 2, 4):
            expected[f"decoder.{idx}.conv.{c}.bias"] = (n,)
        for c in (2, 4):
            expected[f"decoder.{idx}.conv.{c}.weight"] = (n, n, 3, 3)
    assert len(expected) == 64
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert RELEASE_WIDTHS == TAEHV_WIDTHS  # the widths runtime.flops counts with
    assert [dec.decoder[i].stride for i in (7, 13, 19)] == [1, 2, 2]
    assert dec.decode_cache_layout(64, 64) == [(256, 64, 64)] * 3 + [(128, 128, 128)] * 3 + [(64, 256, 256)] * 3


# ---- oracle and streaming ---------------------------------------------------------------------

def test_offline_equals_upstream_sequential_work_queue(tiny):
    z = _latents(4, batch=2, seed=3)
    video = tiny.decode_offline(z)
    assert video.shape == (2, 3, 13, 24, 16)
    torch.testing.assert_close(video, _upstream_sequential(tiny, z), rtol=0, atol=TOL)
    inside = ((video > -1) & (video < 1)).float().mean()
    assert inside > 0.5, f"only {inside:.0%} of pixels unclamped: the comparison would be weak"


@pytest.mark.parametrize("sizes", [[3, 3, 3], [1] * 7, [1, 2, 3, 1], [7]])
def test_streaming_equals_offline(tiny, sizes):
    z = _latents(sum(sizes), seed=sum(sizes) + len(sizes))
    streamed, s = _stream(tiny, z, sizes)
    torch.testing.assert_close(streamed, tiny.decode_offline(z), rtol=0, atol=TOL)
    assert s.flush().shape == (1, 3, 0, 24, 16)


def test_frame_counts(tiny):
    z = _latents(6, seed=5)
    s = StreamingTAEHVDecoder(tiny)
    assert s.flush().shape == (1, 3, 0, 0, 0)
    assert s.decode(z[:, :, :3]).shape[2] == 1 + 4 * 2  # first block: 1 + 4(n-1)
    assert s.decode(z[:, :, 3:5]).shape[2] == 4 * 2  # later blocks: 4n
    assert s.decode(z[:, :, 5:]).shape[2] == 4
    assert s.decode(z[:, :, :1]).shape == (1, 3, 4, 24, 16)
    s.reset()
    assert s.decode(z[:, :, :1]).shape[2] == 1
    for f in (1, 2, 5):
        assert tiny.decode_offline(z[:, :, :f]).shape[2] == 1 + 4 * (f - 1)


def test_output_range(tiny):
    z = 20 * _latents(3, seed=7)  # far outside the latent range: the soft clamp and the output clamp hold
    for video in (tiny.decode_offline(z), _stream(tiny, z, [1, 2])[0]):
        assert video.min() >= -1 and video.max() <= 1


def test_decode_step_pure_and_static_form(tiny):
    z = _latents(3, seed=9)
    frames0, cache = tiny.decode_step(z[:, :, :1], None, first=True)
    garbage = [torch.randn_like(c) for c in cache]
    # first=True ignores the contents of a given cache; zero memory + first=False + trim is the same step
    torch.testing.assert_close(tiny.decode_step(z[:, :, :1], garbage, first=True)[0], frames0, rtol=0, atol=0)
    static, _ = tiny.decode_step(z[:, :, :1], tiny.init_decode_cache(1, 3, 2), first=False)
    torch.testing.assert_close(static[:, :, 3:], frames0, rtol=0, atol=TOL)
    before = [c.clone() for c in cache]
    _, new = tiny.decode_step(z[:, :, 1:], cache, first=False)
    assert all(torch.equal(a, b) for a, b in zip(cache, before)), "decode_step modified its input cache"
    assert [tuple(c.shape) for c in new] == [(1, *s) for s in tiny.decode_cache_layout(3, 2)]
    assert not any(n.data_ptr() == c.data_ptr() for n, c in zip(new, cache))


def test_batch_rows_equal_rows_alone(tiny):
    z = _latents(3, batch=2, seed=11)
    both = _stream(tiny, z, [1, 2])[0]
    for row in range(2):
        torch.testing.assert_close(both[row:row + 1], _stream(tiny, z[row:row + 1], [1, 2])[0], rtol=0, atol=TOL)


def test_bf16_tracks_fp32(tiny):
    z = _latents(4, seed=19)
    half = copy.deepcopy(tiny).to(torch.bfloat16)
    streamed = _stream(half, z.to(torch.bfloat16), [1, 3])[0]
    assert streamed.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits; over ~20 layers the error stays about 1e-2 on a [-1, 1] range.
    torch.testing.assert_close(streamed.float(), tiny.decode_offline(z), rtol=0, atol=0.03)


def test_bad_input_is_named(tiny):
    z = _latents(2, seed=13)
    with pytest.raises(ValueError, match="expected a latent"):
        tiny.decode_offline(z[:, :8])
    with pytest.raises(ValueError, match="first=False needs the cache"):
        tiny.decode_step(z, None, first=False)
    _, cache = tiny.decode_step(z[:, :, :1], None, first=True)
    with pytest.raises(ValueError, match="entry 3 has shape"):
        tiny.decode_step(z[:, :, 1:], cache[:3] + [cache[3][:, :1]] + cache[4:], first=False)
    with pytest.raises(ValueError, match="cache has 8 entries"):
        tiny.decode_step(z[:, :, 1:], cache[:8], first=False)
    s = StreamingTAEHVDecoder(tiny)
    with pytest.raises(ValueError, match=r"expected \[1, z"):
        s.decode(_latents(1, batch=2))
    s.decode(z[:, :, :1])
    with pytest.raises(ValueError, match="latent size changed"):
        s.decode(_latents(1, h=4))
    with pytest.raises(ValueError, match="batch must be"):
        StreamingTAEHVDecoder(tiny, batch=0)


# ---- loading ----------------------------------------------------------------------------------

def _full_checkpoint(dec: TAEHVDecoder) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in dec.state_dict().items()}
    sd["encoder.0.weight"] = torch.zeros(64, 3, 3, 3)  # encoder keys are present in real files
    sd["encoder.17.bias"] = torch.zeros(Z)
    return sd


def test_from_state_dict_keeps_decoder(tiny):
    loaded = TAEHVDecoder.from_state_dict(_full_checkpoint(tiny))
    assert loaded.widths == WIDTHS and loaded.latent_channels == Z and not loaded.training
    z = _latents(2, seed=17)
    torch.testing.assert_close(loaded.decode_offline(z), tiny.decode_offline(z), rtol=0, atol=0)
    half = TAEHVDecoder.from_state_dict(_full_checkpoint(tiny), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("decoder.10.conv.2.weight"), r"missing: decoder\.10\.conv\.2\.weight"),
    (lambda sd: sd.update({"decoder.7.conv.bias": torch.zeros(12)}), r"unexpected: decoder\.7\.conv\.bias"),
    (lambda sd: sd.update({"decoder.13.conv.weight": torch.zeros(8, 8, 1, 1)}),
     r"mis-shaped: decoder\.13\.conv\.weight: checkpoint \(8, 8, 1, 1\)"),
    (lambda sd: sd.update({"decoder.22.weight": torch.zeros(12, 4, 3, 3)}), "only patch size 1"),
    (lambda sd: sd.pop("decoder.14.weight"), r"lacks 4-d conv weights \['decoder\.14\.weight'\]"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("decoder.")], "no 'decoder.\\*' keys"),
])
def test_from_state_dict_is_strict(tiny, edit, message):
    sd = _full_checkpoint(tiny)
    edit(sd)
    with pytest.raises(CheckpointError, match=message):
        TAEHVDecoder.from_state_dict(sd)


# ---- FLOPs ------------------------------------------------------------------------------------

def test_flops_of_one_latent_frame_match_runtime_flops():
    # The release decoder on the meta device: FlopCounterMode counts from shapes, nothing is computed.
    cfg = EngineConfig.from_preset("livetalk-1.3b")
    h, w = cfg.latent_hw
    with torch.device("meta"):
        dec = TAEHVDecoder()
        z = torch.zeros(1, 16, 1, h, w)
        cache = dec.init_decode_cache(1, h, w)
    with FlopCounterMode(display=False) as counter:
        frames, _ = dec.decode_step(z, cache, first=False)
    assert frames.shape == (1, 3, 4, cfg.height, cfg.width)
    counted = counter.get_flop_counts()
    expected = taehv_decoder_layers(cfg)
    assert counter.get_total_flops() == sum(layer.flops for layer in expected)
    # Per kind as well (the counter names modules by class here: decode_step calls the layers, not
    # the root forward), so two compensating errors cannot pass.
    kinds = {"MemBlock": ".mem", "TGrow": ".tgrow", "Conv2d": ("conv_in", ".proj", "conv_out")}
    for module, names in kinds.items():
        names = (names,) if isinstance(names, str) else names
        want = sum(layer.flops for layer in expected if any(n in layer.name for n in names))
        assert sum(counted[module].values()) == want, module
