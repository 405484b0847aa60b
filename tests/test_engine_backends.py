"""The engine with each kernel backend equals the engine with the eager reference backend."""
import numpy as np
import pytest

from runtime import Engine
from runtime.config import CacheConfig, EngineConfig
from runtime.models.ops import ops_for


def engine_frames(backend: str, rope_mode: str = "absolute"):
    """Frames of 5 blocks of a micro engine on `backend`, and the engine. Blocks of one latent frame
    and a window that evicts from block 3 on (sink 1, window 3): 5 blocks evict twice. One-frame
    blocks: the interpreter's time is per query and key tile, 2.4x less than blocks of 3 in a window of 9."""
    cache = CacheConfig(block_frames=1, sink_frames=1, window_frames=3, rope_mode=rope_mode)
    cfg = EngineConfig.from_preset("micro").replace(cache=cache)
    eng = Engine.random(cfg, device="cpu", backend=backend)
    eng.reset(np.full((32, 32, 3), 90, np.uint8), seed=5)
    n = eng.family.timeline.samples_to_run(4)
    audio = (np.random.default_rng(0).standard_normal(n) * 0.2).clip(-1, 1).astype(np.float32)
    blocks = eng.step(audio) + eng.drain()
    assert len(blocks) == 5
    return np.concatenate([b.frames for b in blocks]), eng


def test_auto_is_sdpa_on_cpu_and_logged(caplog):
    with caplog.at_level("INFO"):
        assert ops_for("auto", "cpu").name == "sdpa"
    assert "sdpa" in caplog.text


def test_unknown_or_unavailable_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        ops_for("fastest", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="cannot run on cpu"):
        ops_for("triton", "cpu")


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_backend_engine_equals_reference_engine(backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    ref, _ = engine_frames("reference")
    got, eng = engine_frames(backend)
    assert eng.ops.name == backend
    diff = np.abs(ref.astype(int) - got.astype(int))
    # fp32 everywhere: only summation order differs, which moves a few pixels by one grey level
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
