"""Stage graphs over static buffers: eager fallback on CPU, graph replay vs eager on a GPU, timings.

CPU: without a GPU every stage body runs eagerly over the static buffers, logged in one line; the
scheduled engine in that mode gives the sequential engine's frames bit for bit (so the copy-in /
hand-off / copy-out around the bodies is exact), across two sessions (the second reloads them).
GPU (skipped without one): each captured graph replays exactly what its eager body computes on the
same buffers; the scheduled engine with graphs on the cuda backend gives the sequential frames; a
stage whose capture fails runs eagerly with one warning naming it; pipelined vs sequential timing.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.graphs import StageGraphs, variant
from runtime.media import synth_speech_like
from runtime.scheduled import ScheduledEngine, compare_pipelined_sequential
from runtime.scheduler import compiled_backends, extension_available
from runtime.session import plan_block

pytestmark = pytest.mark.skipif(not extension_available(), reason="runtime._scheduler is not built")

SR = 16000
SEED = 9
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: avoid OpenMP spinning between the two lanes
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def speech():
    return synth_speech_like(4.5, sample_rate=SR, seed=4).astype(np.float32)  # 6 blocks after flush


def assert_same_streams(got, want):
    assert [b.index for b in got] == [b.index for b in want] and len(got) >= 6
    assert got[0].num_frames == 9
    for a, b in zip(got, want):
        assert (a.first_frame, a.pts) == (b.first_frame, b.pts)
        np.testing.assert_array_equal(a.audio, b.audio)
        np.testing.assert_array_equal(a.frames, b.frames, err_msg=f"block {a.index}")


def stage_names(num_steps: int) -> set[str]:
    steps = {f"{kind}/{v}" for v in ("first", "later")
             for kind in [*(f"step{i}" for i in range(num_steps)), "refresh"]}
    return steps | {"decode_first", "decode/first", "decode/later"}


# ---------------------------------------------------------------- CPU: eager bodies over static buffers

@pytest.fixture(scope="module")
def cpu_seq():
    return Engine.random(EngineConfig.from_preset("micro"), device="cpu", seed=3)


def test_without_a_gpu_every_stage_runs_eagerly_and_one_line_says_so(cpu_seq, image, caplog):
    with ScheduledEngine.from_engine(cpu_seq, graphs=True) as eng:
        with caplog.at_level(logging.INFO, logger="runtime.graphs"):
            eng.reset(image, seed=SEED)
            eng.reset(image, seed=SEED + 1)  # a second session reloads the buffers, logs nothing new
        lines = [r.getMessage() for r in caplog.records if r.name == "runtime.graphs"]
        assert len(lines) == 1, lines
        names = stage_names(eng.config.sampler.num_steps)
        assert "no CUDA device" in lines[0] and all(n in lines[0] for n in names)
        assert eng.graphs.captured == () and set(eng.graphs.fallbacks) == names
        with pytest.raises(ValueError, match="CUDA"):
            StageGraphs(eng, eng._session, capture=True)
        with pytest.raises(ValueError, match="warmup"):
            StageGraphs(eng, eng._session, warmup=0)


def test_static_buffer_stages_equal_the_sequential_engine(cpu_seq, image, speech):
    with ScheduledEngine.from_engine(cpu_seq, graphs=True) as eng:
        # Warm-up is a first session (graph set-up); the compared stream is a second one.
        timing = compare_pipelined_sequential(cpu_seq, eng, image, speech, chunk_samples=5300, seed=SEED,
                                              warmup_samples=SR // 2)
        assert eng.graphs is not None
    assert timing.pipelined_calls == timing.sequential_calls
    assert_same_streams(timing.pipelined_blocks, timing.sequential_blocks)


def test_variant_is_first_only_for_block_0():
    assert [variant(b) for b in range(3)] == ["first", "later", "later"]


# ---------------------------------------------------------------- GPU

def gpu_engine(dtype=torch.float32):
    return Engine.random(EngineConfig.from_preset("tiny"), device="cuda", dtype=dtype, seed=3)


def randomize(g: StageGraphs, block: int) -> None:
    """Fresh inputs in every buffer a stage reads (the ring too), and a real ring plan."""
    S, gen = g.buffers, torch.Generator("cuda").manual_seed(block)
    for t in (S.noise, S.audio, S.x, S.z, g.ring.k, g.ring.v, *S.cache):
        t.copy_(torch.randn(t.shape, generator=gen, device="cuda", dtype=torch.float32) * 0.5)
    g.plan.update(plan_block(block, g.engine.config.cache, g.engine.batch))
    torch.cuda.synchronize()


def state(g: StageGraphs) -> list[torch.Tensor]:
    """Every buffer a stage may write, besides the decode outputs."""
    return [g.buffers.x, g.ring.k, g.ring.v, *g.buffers.cache]


@needs_gpu
def test_graph_replay_equals_eager_per_stage():
    eng = ScheduledEngine.from_engine(gpu_engine(), graphs=True)
    try:
        eng.reset(np.full((64, 64, 3), 100, np.uint8), seed=SEED)
        g = eng.graphs
        assert set(g.captured) == set(g.bodies), f"stages not captured: {g.fallbacks}"
        for name in g.bodies:
            randomize(g, 1 if name.endswith("later") else 0)
            before = [t.clone() for t in state(g)]
            g.bodies[name]()                                   # eager, on the same buffers
            torch.cuda.synchronize()
            eager = [t.clone() for t in state(g)]
            for t, saved in zip(state(g), before):
                t.copy_(saved)                                 # the same inputs again
            g.graphs[name].replay()                            # graph
            torch.cuda.synchronize()
            replayed = state(g)
            if name.startswith("decode"):
                eager.append(g.eager_out[name])
                replayed.append(g.graph_out[name])
            for i, (a, b) in enumerate(zip(eager, replayed)):
                assert torch.equal(a, b), f"{name}: buffer {i} differs (max {float((a - b).abs().max())})"
            assert any(not torch.equal(a, b) for a, b in zip(before, eager)), f"{name} changed nothing"
    finally:
        eng.close()


@needs_gpu
@pytest.mark.skipif("cuda" not in compiled_backends(), reason="the scheduler was built without CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("graphs", [True, False])
def test_scheduled_engine_on_cuda_streams_equals_sequential(image, speech, dtype, graphs):
    # Same kernels on the same shapes (graphs replay exactly what the eager bodies launch), only on
    # other streams and buffers: the frames are expected bit for bit, in bf16 as in fp32.
    seq = gpu_engine(dtype)
    with ScheduledEngine.from_engine(seq, graphs=graphs) as eng:
        assert eng.scheduler.backend == "cuda"
        timing = compare_pipelined_sequential(seq, eng, image, speech, chunk_samples=4000, seed=SEED)
    assert_same_streams(timing.pipelined_blocks, timing.sequential_blocks)


class _SyncInRefresh(StageGraphs):
    """A refresh body that synchronises: capture must fail for it and only it."""

    def _bodies(self):
        bodies = super()._bodies()
        inner = bodies["refresh/later"]

        def synchronising():
            inner()
            torch.cuda.synchronize()  # not allowed while capturing
        bodies["refresh/later"] = synchronising
        return bodies


@needs_gpu
def test_a_stage_that_cannot_be_captured_runs_eagerly_with_one_warning(image, speech, caplog):
    seq = gpu_engine()
    with ScheduledEngine.from_engine(seq, graphs=True) as eng:
        eng.reset(image, seed=SEED)
        with caplog.at_level(logging.INFO, logger="runtime.graphs"):
            eng.graphs = _SyncInRefresh(eng, eng._session)
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "runtime.graphs" and r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "refresh/later" in warnings[0] and "eager" in warnings[0], warnings
        assert set(eng.graphs.fallbacks) == {"refresh/later"}
        assert "refresh/later" not in eng.graphs.captured
        timing = compare_pipelined_sequential(seq, eng, image, speech, chunk_samples=4000, seed=SEED)
    assert_same_streams(timing.pipelined_blocks, timing.sequential_blocks)


@needs_gpu
@pytest.mark.parametrize("chunk", [None, 12_000])  # the whole stream at once; one block of audio per call
def test_pipelined_vs_sequential_timing(image, chunk, record_property):
    """Numbers for docs/benchmarks.md: run with `-s` to print the table (tiny preset, bf16)."""
    seq = gpu_engine(torch.bfloat16)
    audio = synth_speech_like(12.0, sample_rate=SR, seed=5).astype(np.float32)
    with ScheduledEngine.from_engine(seq, graphs=True) as eng:
        timing = compare_pipelined_sequential(seq, eng, image, audio, chunk_samples=chunk, seed=SEED)
    table = timing.as_markdown()
    print("\n" + table)
    record_property("pipelined_vs_sequential", table)
    s = timing.summary()
    assert s["blocks"] >= 15
    # Overlap and graph replay must not cost throughput (10% slack for a shared machine).
    assert s["pipelined_s_per_block"] <= 1.1 * s["sequential_s_per_block"], table
