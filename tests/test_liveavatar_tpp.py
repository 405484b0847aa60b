"""Live Avatar timestep-forcing pipeline (gloo on CPU, one torch thread per rank) against the one-process
`LiveAvatarStream`, bit for bit: 7 blocks, so every ring wraps and the adaptive sink swaps at block 4.

The first run of the module starts the forkserver (imports once); later runs take about a second.
"""
import multiprocessing
import time

import numpy as np
import pytest
import torch

from runtime.engine import Engine
from runtime.families.liveavatar import LiveAvatarStream, StreamSettings, build_liveavatar, randomize_weights
from runtime.families.liveavatar.tpp import PipelineError, TppLayout, run_liveavatar_tpp
from runtime.families.liveavatar.tpp_engine import run_liveavatar_tpp_audio
from runtime.families.liveavatar.tpp_step import NoiseSource, StepState
from tests.test_liveavatar_forward import TINY, _one_thread  # noqa: F401 - autouse

LH, LW, BLOCKS, WEIGHTS_SEED = 8, 8, 7, 3
SETTINGS = StreamSettings(seed=5, adaptive_sink_block=4)  # rd drawn per (block, step): the rolling sink moves



@pytest.fixture(scope="module")
def model():
    return randomize_weights(build_liveavatar(TINY, dtype=torch.float32), seed=WEIGHTS_SEED)


@pytest.fixture(scope="module")
def session():
    g = torch.Generator().manual_seed(11)
    return {"ref_latent": torch.randn(1, 16, 1, LH, LW, generator=g),
            "motion_latents": torch.randn(1, 16, 19, LH, LW, generator=g),
            "prompt_embeds": torch.randn(1, 5, TINY.text_dim, generator=g),
            "features_per_block": [torch.randn(1, TINY.audio_layers, TINY.audio_dim, 4 * TINY.block_frames,
                                               generator=g) for _ in range(BLOCKS)]}


@pytest.fixture(scope="module")
def reference(model, session):
    s = LiveAvatarStream(model, session["ref_latent"], session["motion_latents"], session["prompt_embeds"], SETTINGS)
    return [s.generate_block(f) for f in session["features_per_block"]]


def _run(session, world, **kwargs):
    return run_liveavatar_tpp(TINY, settings=SETTINGS, world_size=world, weights_seed=WEIGHTS_SEED,
                              timeout_s=120, **session, **kwargs)


def _assert_same(got, want):
    assert len(got) == len(want)
    for b, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"block {b}: max |diff| {(g - w).abs().max().item()}"


def no_rank_left():
    return not [p for p in multiprocessing.active_children() if p.name.startswith("tpp-rank")]


# ---- one process: the per-step state chained by hand equals the stream --------------------------------

def test_step_states_chained_equal_stream(model, session, reference):
    """The pipeline's building blocks without processes: a bug here is not a transport bug."""
    args = (session["ref_latent"], session["motion_latents"], session["prompt_embeds"], SETTINGS)
    states = [StepState(model, i, *args) for i in range(TINY.num_steps)]
    noise = NoiseSource(SETTINGS.seed, states[0].latent_shape, model)
    got, sink = [], None
    for k, features in enumerate(session["features_per_block"]):
        audio, x = model.encode_audio(features), noise.next()
        for st in states:
            if k == SETTINGS.adaptive_sink_block:
                st.refill_condition(sink)
            x = st.run(x, audio, k)
        sink = x[:, :, :1].clone() if k == 0 else sink
        got.append(x)
    _assert_same(got, reference)


def test_adaptive_sink_changes_the_result(model, session, reference):
    """Guards the test above: without the re-fill, blocks from 4 on differ (so the swap is exercised)."""
    s = LiveAvatarStream(model, session["ref_latent"], session["motion_latents"], session["prompt_embeds"],
                         StreamSettings(seed=SETTINGS.seed, adaptive_sink_block=None))
    off = [s.generate_block(f) for f in session["features_per_block"]]
    assert all(torch.equal(a, b) for a, b in zip(off[:4], reference[:4]))
    assert not any(torch.equal(a, b) for a, b in zip(off[4:], reference[4:]))


# ---- processes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [TINY.num_steps, TINY.num_steps + 1])
def test_tpp_equals_one_process_stream(session, reference, world):
    run = _run(session, world)
    _assert_same(run.latents, reference)
    denoise = [e for e in run.trace if e.stage == "denoise"]
    # rank i ran step i of every block, and nothing else denoised
    assert sorted((e.rank, e.step, e.block) for e in denoise) == sorted(
        (i, i, b) for i in range(TINY.num_steps) for b in range(BLOCKS))
    assert sorted(e.rank for e in run.trace if e.stage == "refill") == list(range(TINY.num_steps))
    assert no_rank_left()


def test_rank_i_minus_1_works_on_the_next_block(session, reference):
    """Slow steps (a sleep, no CPU) make the schedule visible on 2 shared cores."""
    run = _run(session, TINY.num_steps, step_sleep_s=0.15)
    _assert_same(run.latents, reference)
    steps = {(e.rank, e.block): e for e in run.trace if e.stage == "denoise"}
    overlapping = [(i, b) for (i, b), e in steps.items() if i > 0 and (i - 1, b + 1) in steps
                   and _overlap(e, steps[(i - 1, b + 1)])]
    assert len(overlapping) >= BLOCKS  # not one lucky pair: the pipeline is full most of the time
    # 28 sequential sleeps would take 4.2 s; a full pipeline about (7 + 3) * 0.15 s
    first = min(e.start for e in steps.values())
    last = max(e.end for e in steps.values())
    assert last - first < 0.6 * BLOCKS * TINY.num_steps * 0.15


def _overlap(a, b):
    return a.start < b.end and b.start < a.end


@pytest.mark.parametrize("world,spec,role", [
    (TINY.num_steps, "2:denoise:3", "step 2"),
    (TINY.num_steps + 1, "0:audio:5", "step 0 + audio"),
    (TINY.num_steps + 1, "4:emit:1", "collect"),
])
def test_failing_rank_is_named_and_ends_all_ranks(session, world, spec, role):
    rank, stage, block = spec.split(":")
    start = time.monotonic()
    with pytest.raises(PipelineError) as info:
        _run(session, world, fail_at=spec)
    e = info.value
    assert (e.rank, e.stage, e.block, e.role) == (int(rank), stage, int(block), role)
    assert f"pipeline rank {rank} ({role}) failed in stage '{stage}' (session 0, block {block})" in str(e)
    assert "InjectedFailure" in str(e)
    assert time.monotonic() - start < 30
    assert no_rank_left()


# ---- bad input fails in the driver, before any process starts -----------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"world_size": 3}, "world_size must be 4"),
    ({"world_size": 6}, "world_size must be 4"),
    ({"fail_at": "1:audio"}, r"rank 1 \(step 1\) runs only denoise"),
    ({"fail_at": "9:denoise"}, "names rank 9, world size is 4"),
    ({"backend": "mpi"}, "backend must be"),
])
def test_bad_arguments_fail_before_spawning(session, kwargs, match):
    args = {"world_size": TINY.num_steps, **kwargs}
    with pytest.raises(ValueError, match=match):
        run_liveavatar_tpp(TINY, **session, **args)
    assert no_rank_left()


def test_bad_features_fail_before_spawning(session):
    bad = dict(session, features_per_block=[torch.zeros(1, TINY.audio_layers, TINY.audio_dim, 8)])
    with pytest.raises(ValueError, match=r"features of block 0 must be \[1, 3, 16, 12\]"):
        run_liveavatar_tpp(TINY, **bad)


def test_layout_roles():
    layout = TppLayout(5, 4)
    assert [layout.role(r) for r in range(5)] == ["step 0 + audio", "step 1", "step 2", "step 3", "collect"]
    assert (layout.output_rank, TppLayout(4, 4).output_rank, TppLayout(4, 4).collect_rank) == (4, 3, None)


# ---- end to end: audio and a reference image in, decoded blocks out (decode rank) ---------------------

AV_SEED, AV_SAMPLES = 5, 49920  # 6.5 blocks of 7680 samples: flush pads the 7th with silence


@pytest.fixture(scope="module")
def av_inputs():
    rng = np.random.default_rng(0)
    return rng.uniform(-0.5, 0.5, AV_SAMPLES).astype(np.float32), rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def engine_blocks(av_inputs):
    audio, image = av_inputs
    with Engine.from_pretrained("liveavatar-tiny", device="cpu", dtype=torch.float32, seed=WEIGHTS_SEED,
                                mode="eager") as eng, eng.open(image, seed=AV_SEED) as s:
        return s.step(audio, 16000) + s.flush()


def test_tpp_audio_to_frames_equals_engine(av_inputs, engine_blocks):
    audio, image = av_inputs
    run = run_liveavatar_tpp_audio("liveavatar-tiny", audio, image, seed=AV_SEED, weights_seed=WEIGHTS_SEED,
                                   timeout_s=120)
    assert len(engine_blocks) == 7 and len(run.blocks) == len(engine_blocks) == len(run.latents)
    for got, want in zip(run.blocks, engine_blocks):
        b = want.index
        assert got.index == b and got.first_frame == want.first_frame and got.pts == want.pts, f"block {b}"
        assert got.frames.dtype == np.uint8 and np.array_equal(got.frames, want.frames), f"block {b} frames"
        assert got.audio.dtype == np.float32 and np.array_equal(got.audio, want.audio), f"block {b} audio"
    decode_rank = TINY.num_steps
    assert sorted(e.block for e in run.trace if e.stage == "decode" and e.rank == decode_rank) == list(range(7))
    assert sorted((e.rank, e.block) for e in run.trace if e.stage == "audio") == [(0, b) for b in range(7)]
    assert no_rank_left()


def test_tpp_audio_decode_failure_names_the_rank(av_inputs):
    audio, image = av_inputs
    with pytest.raises(PipelineError) as info:
        run_liveavatar_tpp_audio("liveavatar-tiny", audio, image, seed=AV_SEED, weights_seed=WEIGHTS_SEED, timeout_s=120,
                                 fail_at="4:decode:2")
    e = info.value
    assert (e.rank, e.stage, e.block, e.role) == (4, "decode", 2, "decode")
    assert "pipeline rank 4 (decode) failed in stage 'decode' (session 0, block 2)" in str(e)
    assert no_rank_left()


@pytest.mark.parametrize("kwargs,match", [
    ({"world_size": 4}, "world_size must be 5"),
    ({"fail_at": "4:emit:0", "world_size": 6}, "world_size must be 4"),
    ({"fail_at": "3:decode"}, r"rank 3 \(step 3\) runs only denoise"),
    ({"sample_rate": 8000}, "sample rate"),
])
def test_tpp_audio_bad_arguments_fail_before_spawning(av_inputs, kwargs, match):
    audio, image = av_inputs
    with pytest.raises(ValueError, match=match):
        run_liveavatar_tpp_audio("liveavatar-tiny", audio, image, **kwargs)
    assert no_rank_left()


def test_decode_layout_roles():
    layout = TppLayout(5, 4, decode=True)
    assert (layout.role(4), layout.stages(4), layout.stages(0)) == ("decode", ("decode", "emit"), ("audio", "denoise"))
