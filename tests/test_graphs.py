"""runtime/graphs.py: the batch-1 block stages of one session over static buffers, captured as CUDA graphs
on a GPU, run as eager bodies elsewhere. Not on the engine's path (docs/engine.md); driven here by
`graph_stream`, which runs one session's blocks stage by stage and is compared with the eager engine."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.families.livetalk import LiveTalk
from runtime.graphs import StageGraphs, variant
from runtime.media import resize_cover_center_crop, synth_speech_like
from runtime.session import plan_block

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

def family(device="cpu", dtype=torch.float32, preset="micro") -> LiveTalk:
    return LiveTalk.random(EngineConfig.from_preset(preset), device=device, dtype=dtype, seed=3, max_sessions=1)


def graph_stream(fam: LiveTalk, image, audio, graphs_cls=StageGraphs, **options):
    """One session's stream through StageGraphs: (blocks, graphs)."""
    state = fam.open_state(0, image, None, None, SEED)
    g = graphs_cls(fam, state, **options)
    t, n = fam.timeline, fam.config.sampler.num_steps
    last = t.last_block_to_flush(0, len(audio))
    audio = np.concatenate([audio, np.zeros(t.samples_to_run(last) - len(audio), np.float32)])
    blocks, pos = [], 0
    while state.block <= last:
        room = min(len(audio) - pos, state.audio.free_samples)
        state.audio.push(audio[pos:pos + room])
        pos += room
        if state.audio.total_samples < t.samples_to_run(state.block):
            continue
        w = fam.plan_block(state)
        b, v = w.index, variant(w.index)
        g.load_block(state, w)
        for i in range(n):
            g.run(f"step{i}/{v}")
        g.handoff(b)
        g.run(f"refresh/{v}")
        w.x = g.buffers.handoff[b % 2].clone()
        if b == 0:
            first = g.decode_first()
            w.video = torch.cat([first, g.decode(0)], dim=2) if fam.config.cache.block_frames > 1 else first
        else:
            w.video = g.decode(b)
        blocks.append(fam.finish(state, w))
    return blocks, g


def eager_stream(device, dtype, image, audio, preset="micro"):
    with Engine(family(device, dtype, preset), mode="eager") as eng, eng.open(image, seed=SEED) as s:
        return s.step(audio) + s.flush()


def test_without_a_gpu_every_stage_runs_eagerly_and_one_line_says_so(image, speech, caplog):
    fam = family()
    with caplog.at_level(logging.INFO, logger="runtime.graphs"):
        _, g = graph_stream(fam, image, speech[:SR])
    lines = [r.getMessage() for r in caplog.records if r.name == "runtime.graphs"]
    assert len(lines) == 1, lines
    names = stage_names(fam.config.sampler.num_steps)
    assert "no CUDA device" in lines[0] and all(n in lines[0] for n in names)
    assert g.captured == () and set(g.fallbacks) == names
    state = fam.open_state(0, image, None, None, SEED)
    with pytest.raises(ValueError, match="CUDA"):
        StageGraphs(fam, state, capture=True)
    with pytest.raises(ValueError, match="warmup"):
        StageGraphs(fam, state, warmup=0)


def test_static_buffer_stages_equal_the_eager_engine(image, speech):
    got, _ = graph_stream(family(), image, speech)
    assert_same_streams(got, eager_stream("cpu", torch.float32, image, speech))


def test_variant_is_first_only_for_block_0():
    assert [variant(b) for b in range(3)] == ["first", "later", "later"]


# ---------------------------------------------------------------- GPU

def randomize(g: StageGraphs, block: int) -> None:
    """Fresh inputs in every buffer a stage reads (the ring too), and a real ring plan."""
    S, gen = g.buffers, torch.Generator("cuda").manual_seed(block)
    for t in (S.noise, S.audio, S.x, S.z, g.ring.k, g.ring.v, *S.cache):
        t.copy_(torch.randn(t.shape, generator=gen, device="cuda", dtype=torch.float32) * 0.5)
    g.plan.update(plan_block(block, g.engine.config.cache, 1))
    torch.cuda.synchronize()


def state(g: StageGraphs) -> list[torch.Tensor]:
    """Every buffer a stage may write, besides the decode outputs."""
    return [g.buffers.x, g.ring.k, g.ring.v, *g.buffers.cache]


@needs_gpu
def test_graph_replay_equals_eager_per_stage():
    fam = family("cuda", preset="tiny")
    g = StageGraphs(fam, fam.open_state(0, np.full((64, 64, 3), 100, np.uint8), None, None, SEED))
    if True:
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


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_stream_on_cuda_equals_the_eager_engine(image, speech, dtype):
    # Graphs replay exactly the kernels the eager bodies launch, on the same shapes: bit for bit.
    image = resize_cover_center_crop(image, 64, 64)
    got, g = graph_stream(family("cuda", dtype, "tiny"), image, speech)
    assert set(g.captured) == set(g.bodies), g.fallbacks
    assert_same_streams(got, eager_stream("cuda", dtype, image, speech, "tiny"))


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
    image = resize_cover_center_crop(image, 64, 64)
    with caplog.at_level(logging.INFO, logger="runtime.graphs"):
        got, g = graph_stream(family("cuda", preset="tiny"), image, speech, graphs_cls=_SyncInRefresh)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "runtime.graphs" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "refresh/later" in warnings[0] and "eager" in warnings[0], warnings
    assert set(g.fallbacks) == {"refresh/later"} and "refresh/later" not in g.captured
    assert_same_streams(got, eager_stream("cuda", torch.float32, image, speech, "tiny"))
