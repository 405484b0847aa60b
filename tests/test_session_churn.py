"""Session create/destroy loops keep memory flat (spec/integration.md: failure isolation and memory).

Many short sessions on one engine, with barge-in and the odd bad input, as a server sees them: the
process's resident memory and the number of live tensors stop growing after a few warm-up sessions
(a cache keyed by something that changes per session, a ring reallocated on reset or a decoder cache
kept alive would each show up here).
"""
import gc
import warnings

import numpy as np
import pytest
import torch

from runtime import Engine
from runtime.config import EngineConfig
from runtime.media import synth_speech_like


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():   # isinstance on torch.distributed's deprecated proxies warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _one_session(eng: Engine, i: int, rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    eng.reset(image, seed=i)
    audio = (rng.standard_normal(eng.config.audio.sample_rate) * 0.1).clip(-1, 1).astype(np.float32)
    blocks = eng.step(audio[: len(audio) // 2])
    if i % 3 == 0:
        eng.interrupt()                              # barge-in mid-session
    if i % 4 == 0:
        with pytest.raises(ValueError):
            eng.step(np.full(100, np.nan, np.float32))  # a bad chunk fails that call only
    blocks += eng.step(audio[len(audio) // 2:]) + eng.flush()
    assert blocks and all(b.frames.dtype == np.uint8 for b in blocks)


@pytest.mark.slow
def test_many_sessions_on_one_engine_keep_memory_flat():
    eng = Engine.random(EngineConfig.from_preset("micro"), device="cpu", seed=0)
    rng = np.random.default_rng(0)
    for i in range(6):                               # warm-up: allocator, caches, first-session setup
        _one_session(eng, i, rng)
    ring = eng._session.ring.k.data_ptr()
    rss0, tensors0 = _rss_bytes(), _live_tensors()
    for i in range(6, 26):
        _one_session(eng, i, rng)
    assert eng._session.ring.k.data_ptr() == ring, "the KV ring was reallocated by reset()"
    assert _live_tensors() <= tensors0, (tensors0, _live_tensors())
    assert _rss_bytes() - rss0 < 32 * 2 ** 20, (rss0, _rss_bytes())


# Family 1's 1000 open/close cycles are tests/test_engine_batching.py's. Family 2's open() runs the
# condition pass through the trunk and allocates a ring per step (the reference latents come from the
# engine's cache after the first open of an image), so it runs 25 cycles, every 5th streaming.
# Its warm-up is short and glibc's per-thread arenas (the round runner's lane threads) still grow by up
# to ~60 MB then, so the resident-memory bound is coarse: the live-tensor count is the exact leak check.
def test_liveavatar_open_close_cycles_keep_memory_flat():
    with Engine.from_pretrained("liveavatar-tiny", device="cpu", dtype=torch.float32,
                                config="liveavatar-tiny") as eng:
        image = np.random.default_rng(0).integers(0, 256, (*eng.size, 3), dtype=np.uint8)
        audio = synth_speech_like(1.0, eng.sample_rate)

        def cycle(i: int) -> None:
            session = eng.open(image, seed=i)
            if i % 5 == 0:
                assert session.step(audio) + session.flush()
            session.close()

        for i in range(5):  # warm-up: allocator, caches, first-session setup
            cycle(i)
        rss0, tensors0 = _rss_bytes(), _live_tensors()
        for i in range(5, 30):
            cycle(i)
        assert eng.num_sessions == 0
        assert _live_tensors() <= tensors0, (tensors0, _live_tensors())
        assert _rss_bytes() - rss0 < 128 * 2 ** 20, (rss0, _rss_bytes())
