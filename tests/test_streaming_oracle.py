"""Cached block-by-block generation equals the cache-free offline oracle (fp32, tight tolerance)."""
import dataclasses

import pytest
import torch

from runtime import EngineConfig, build_dit
from runtime.config import CacheConfig
from runtime.models.ops import Ops
from runtime.sampler import BlockInputs, sample_block
from runtime.session import KVRing, plan_block

from .oracle import oracle_generate

CACHES = {
    "livetalk-like": CacheConfig(block_frames=3, sink_frames=3, window_frames=9),
    "wrapping": CacheConfig(block_frames=2, sink_frames=1, window_frames=6),  # rolling region of 5: wraps mid-block
}


def _stream(dit, cfg, noises, audios, ref_latent, text_kv, ops=Ops):
    ring = KVRing.allocate(cfg, 1, "cpu", torch.float32)
    steps = list(cfg.sampler.timesteps) + [cfg.sampler.refresh_timestep]
    F = cfg.cache.block_frames
    mods = [dit.time_mod(torch.full((1, F), float(t))) for t in steps]
    h, w = cfg.latent_hw
    out = []
    for b, (noise, audio) in enumerate(zip(noises, audios)):
        mask = torch.ones(1, 1, F, h, w)
        if b == 0:
            mask[:, :, 0] = 0
        cond = torch.cat([ref_latent.expand(-1, -1, F, -1, -1), mask], 1)
        inputs = BlockInputs(noise=noise, cond=cond, audio=audio, ref_latent=ref_latent if b == 0 else None)
        out.append(sample_block(dit, ops, inputs, mods, cfg.sampler.sigmas, text_kv, ring.k, ring.v,
                                plan_block(b, cfg.cache)))
    return out


def _random_inputs(cfg, dit, n_blocks, seed):
    g = torch.Generator().manual_seed(seed)
    d, F = cfg.dit, cfg.cache.block_frames
    h, w = cfg.latent_hw
    noises = [torch.randn(cfg.sampler.num_steps, 1, d.out_dim, F, h, w, generator=g) for _ in range(n_blocks)]
    audios = [dit.audio_cond(torch.randn(1, d.audio_pack * F, d.audio_feature_dim, generator=g))
              for _ in range(n_blocks)]
    ref = torch.randn(1, d.out_dim, 1, h, w, generator=g)
    text_kv = dit.text_kv(torch.randn(1, 7, d.text_dim, generator=g))
    return noises, audios, ref, text_kv


@pytest.mark.parametrize("cache_name", sorted(CACHES))
def test_streaming_equals_offline_oracle(cache_name):
    cfg = dataclasses.replace(EngineConfig.from_preset("tiny"), cache=CACHES[cache_name])
    torch.manual_seed(0)
    dit = build_dit(cfg)
    c = cfg.cache
    n_blocks = (c.window_frames // c.block_frames) + 3  # several blocks past the first eviction
    assert n_blocks * c.block_frames > c.window_frames + c.block_frames
    noises, audios, ref, text_kv = _random_inputs(cfg, dit, max(n_blocks, 6), seed=1)
    streamed = _stream(dit, cfg, noises, audios, ref, text_kv)
    oracle = oracle_generate(dit, cfg, noises, audios, ref, text_kv)
    for b, (s, o) in enumerate(zip(streamed, oracle)):
        assert s.shape == o.shape
        err = (s - o).abs().max().item()
        assert err < 2e-4 * max(1.0, o.abs().max().item()), f"block {b}: max abs error {err}"


def test_oracle_is_sensitive_to_the_window():
    """Guard against a vacuous oracle: a different window must change the result after eviction."""
    cfg = dataclasses.replace(EngineConfig.from_preset("tiny"), cache=CACHES["livetalk-like"])
    torch.manual_seed(0)
    dit = build_dit(cfg)
    noises, audios, ref, text_kv = _random_inputs(cfg, dit, 5, seed=2)
    streamed = _stream(dit, cfg, noises, audios, ref, text_kv)
    wider = dataclasses.replace(cfg, cache=CacheConfig(block_frames=3, sink_frames=3, window_frames=12))
    oracle_wide = oracle_generate(dit, wider, noises, audios, ref, text_kv)
    assert torch.allclose(streamed[2], oracle_wide[2], atol=2e-4)   # before eviction: same
    assert (streamed[4] - oracle_wide[4]).abs().max() > 1e-3       # after: the window matters
