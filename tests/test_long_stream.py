"""Past upstream's 1024-frame RoPE table: > 1100 latent frames with flat memory (micro preset)."""
import numpy as np
import pytest
import torch

from runtime import Engine


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
@pytest.mark.parametrize("rope_mode", ["absolute", "rolling"])
def test_stream_of_1100_latent_frames_has_flat_memory(rope_mode):
    from runtime.config import CacheConfig, EngineConfig

    cfg = EngineConfig.from_preset("micro")
    # blocks of 12 latent frames: 94 blocks pass frame 1100 (a third of the time blocks of 3 take; the
    # per-block overhead dominates at micro), and the 24 rolling frames still wrap the ring 45 times
    cfg = cfg.replace(cache=CacheConfig(block_frames=12, sink_frames=3, window_frames=27, rope_mode=rope_mode))
    eng = Engine.random(cfg, device="cpu")
    eng.reset(np.full((32, 32, 3), 128, np.uint8), seed=0)
    ring_ptr = eng._session.ring.k.data_ptr()
    rng = np.random.default_rng(0)
    chunk = cfg.audio.sample_rate // 2
    target_blocks = 1100 // cfg.cache.block_frames + 2
    blocks, rss = 0, []
    while blocks < target_blocks:
        got = eng.step((rng.standard_normal(chunk) * 0.1).clip(-1, 1).astype(np.float32))
        for b in got:
            assert np.isfinite(b.frames).all()
        blocks += len(got)
        if got:
            rss.append(_rss_bytes())
    assert blocks * cfg.cache.block_frames > 1100
    assert eng._session.ring.k.data_ptr() == ring_ptr          # the ring is never reallocated
    # a leak grows block after block; the allocator's arenas swing by tens of MB around a level with
    # blocks this large, so the medians of the second fifth and the last fifth are compared
    fifth = len(rss) // 5
    early, late = np.median(rss[fifth:2 * fifth]), np.median(rss[-fifth:])
    assert late - early < 32 * 2 ** 20, (early, late)
    assert max(rss[fifth:]) - early < 192 * 2 ** 20, (early, max(rss))
    last = eng.flush()
    assert all(b.frames.shape[1:] == (32, 32, 3) for b in last)
    torch.testing.assert_close(torch.isfinite(eng._session.ring.k).all(), torch.tensor(True))
