"""Multi-process timestep-forcing pipeline (gloo on CPU) against the one-process engine, bit for bit.

Every rank runs one torch thread, and so does the reference engine here: the comparison is exact.
The first pipeline run of the module starts the forkserver (imports once); later runs take ~1 s.
"""
import itertools
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.families.livetalk.pipeline import (
    ACK_LAG,
    KIND_CANCELLED,
    KIND_FAILED,
    KIND_OK,
    Header,
    Layout,
    Status,
    StreamSpec,
    parse_header,
    run_pipeline,
    run_pipeline_streams,
)
from runtime.media import synth_speech_like
from runtime.parallel import FAIL_ENV, FailSpec, PipelineError
from runtime.parallel.procs import wait_for

SR = 16000
PRESET = "micro"


@pytest.fixture(scope="module")
def config():
    return EngineConfig.from_preset(PRESET)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def image(seed):
    return np.random.default_rng(seed).integers(0, 256, size=(40, 36, 3), dtype=np.uint8)


def speech(seconds, seed):
    return synth_speech_like(seconds, sample_rate=SR, seed=seed).astype(np.float32)


def reference(config, audio, img, seed, quantize=None):
    """The one-process engine on the same weights (weights seed 0), audio and noise seed."""
    engine = Engine.random(config, "cpu", torch.float32, seed=0, quantize=quantize)
    engine.reset(img, seed=seed)
    return engine.step(audio) + engine.flush()


def assert_same_blocks(got, want):
    assert [b.index for b in got] == [b.index for b in want]
    for g, w in zip(got, want):
        assert (g.first_frame, g.pts) == (w.first_frame, w.pts)
        np.testing.assert_array_equal(g.frames, w.frames)
        np.testing.assert_array_equal(g.audio, w.audio)


def overlaps(a, b):
    return a.start < b.end and b.start < a.end


# ---- layout and wire format --------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_layout_gives_every_step_to_exactly_one_rank(world):
    lay = Layout(world, 4)
    owned = [s for r in range(lay.step_ranks) for s in lay.steps_of(r)]
    assert owned == [0, 1, 2, 3]  # contiguous, in rank order
    assert all(len(lay.steps_of(r)) >= 1 for r in range(lay.step_ranks))
    assert len(lay.steps_of(0)) == min(len(lay.steps_of(r)) for r in range(lay.step_ranks))  # rank 0 also does audio
    assert lay.decode_rank == world - 1 and lay.role(world - 1) == "decode"


@pytest.mark.parametrize("world", [1, 6])
def test_layout_rejects_world_sizes(world):
    with pytest.raises(ValueError, match="world_size must be 2..5"):
        Layout(world, 4)


def test_header_round_trip_and_corruption():
    h = Header(1, session=2, block=7, first_frame=81, num_frames=12, num_samples=12000)
    assert Header.of(h.tensor()) == h
    with pytest.raises(RuntimeError, match="corrupt pipeline header"):
        Header.of(torch.zeros(8, dtype=torch.int64))


def test_status_round_trip_and_corruption():
    for st in (Status(KIND_OK, 1, 4), Status(KIND_FAILED, 2, 5, rank=3, stage="decode", origin=4),
               Status(KIND_CANCELLED, 0, 2, rank=0, stage="cancel", origin=2)):
        assert Status.of(st.tensor()) == st and st.tensor().shape == (8,)
    failed = Status(KIND_FAILED, 1, 2, rank=2, stage="refresh", origin=2)
    assert failed.at(3) == Status(KIND_FAILED, 1, 3, rank=2, stage="refresh", origin=2)
    assert parse_header(failed.tensor()) == failed  # rank 0's last word on a session, on the header channel
    assert parse_header(Header(1, session=1, block=3).tensor()) == Header(1, session=1, block=3)
    with pytest.raises(RuntimeError, match="corrupt pipeline status"):
        Status.of(torch.tensor([KIND_FAILED, 1, 2, 0, 99, 0, 0, 0]))
    with pytest.raises(RuntimeError, match="corrupt pipeline header"):
        parse_header(torch.tensor([42, 0, 0, 0, 0, 0, 0, 0]))


def test_fail_spec_parsing():
    assert FailSpec.parse("2:decode:1") == FailSpec(2, "decode", 1)
    assert FailSpec.parse("1:denoise").matches(1, "denoise", 5)
    spec = FailSpec.parse("1:refresh:2:1")
    assert spec == FailSpec(1, "refresh", 2, 1) and str(spec) == "1:refresh:2:1"
    assert spec.matches(1, "refresh", 2, 1) and not spec.matches(1, "refresh", 2, 0)
    assert FailSpec.parse(spec) is spec and str(FailSpec(2, "decode")) == "2:decode"
    for bad in ("1", "x:denoise", "1:nope", "1:denoise:x", "1:denoise:1:x", "1:denoise:1:1:1"):
        with pytest.raises(ValueError, match="RANK:STAGE"):
            FailSpec.parse(bad)


# ---- bitwise equality with the one-process engine -------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 5])
def test_single_stream_equals_engine(config, one_thread, world):
    audio, img = speech(4.4, seed=3), image(0)
    want = reference(config, audio, img, seed=7)
    assert len(want) >= 6 and len(want) * config.cache.block_frames > config.cache.window_frames  # eviction
    run = run_pipeline_streams(PRESET, world, [StreamSpec(audio, img, seed=7)], timeout_s=240)
    assert_same_blocks(run.blocks[0], want)

    # Refresh(b) -> step 0(b+1): one stream never denoises on two ranks at once.
    denoise = sorted((e for e in run.trace if e.stage == "denoise"), key=lambda e: e.start)
    assert len(denoise) == len(want) * config.sampler.num_steps
    assert not any(overlaps(a, b) for a, b in itertools.pairwise(denoise))  # sorted by start
    # Every step rank refreshed every block but the last, itself.
    refreshed = {(e.rank, e.block) for e in run.trace if e.stage == "refresh"}
    assert refreshed == {(r, b) for r in range(world - 1) for b in range(len(want) - 1)}


def test_fp8_pipeline_equals_fp8_engine(config, one_thread):
    """Every rank quantizes the same weights the same way: bitwise the one-process FP8 engine."""
    audio, img = speech(1.6, seed=6), image(6)
    want = reference(config, audio, img, seed=4, quantize="fp8")
    run = run_pipeline_streams(PRESET, 2, [StreamSpec(audio, img, seed=4)], timeout_s=240, quantize="fp8")
    assert_same_blocks(run.blocks[0], want)
    with pytest.raises(ValueError, match="quantize"):
        run_pipeline_streams(PRESET, 2, [StreamSpec(audio, img)], quantize="int8")


def test_run_pipeline_returns_the_blocks(config, one_thread):
    audio, img = speech(1.6, seed=5), image(4)
    want = reference(config, audio, img, seed=2)
    assert_same_blocks(run_pipeline(PRESET, 3, audio, img, seed=2, timeout_s=240), want)


def test_interleaved_streams_equal_engine(config, one_thread):
    streams = [StreamSpec(speech(2.2, seed=1), image(1), seed=11),
               StreamSpec(speech(1.4, seed=2), image(2), seed=12),
               StreamSpec(speech(2.9, seed=3), image(3), seed=13)]
    wants = [reference(config, s.audio, s.image, s.seed) for s in streams]
    # Slow denoise steps (sleep, no CPU) make the schedule visible on 2 shared cores.
    run = run_pipeline_streams(PRESET, 5, streams, timeout_s=240, stage_sleep_s={"denoise": 0.08})
    for got, want in zip(run.blocks, wants):
        assert_same_blocks(got, want)
    assert len({len(w) for w in wants}) > 1  # streams of different lengths end at different times

    denoise = [e for e in run.trace if e.stage == "denoise"]
    assert any(overlaps(a, b) and a.rank != b.rank and a.session != b.session for a in denoise for b in denoise)
    # Rank 0 takes the streams round-robin.
    order = [(e.session, e.block) for e in sorted(denoise, key=lambda e: e.start) if e.rank == 0]
    assert order[:3] == [(0, 0), (1, 0), (2, 0)]


def test_decode_overlaps_denoising(config, one_thread):
    audio, img = speech(2.2, seed=4), image(5)
    run = run_pipeline_streams(PRESET, 2, [StreamSpec(audio, img, seed=1)], timeout_s=240,
                               stage_sleep_s={"decode": 0.3})
    decode = [e for e in run.trace if e.stage == "decode"]
    denoise = [e for e in run.trace if e.stage == "denoise"]
    assert {e.rank for e in decode} == {1} and {e.rank for e in denoise} == {0}
    # Decoding block b runs while the step rank denoises block b + 1.
    assert any(overlaps(d, s) and s.block == d.block + 1 for d in decode for s in denoise)
    assert_same_blocks(run.blocks[0], reference(config, audio, img, seed=1))


# ---- failures: named, and every process ends ---------------------------------------------------------

def no_rank_left():
    return not [p for p in multiprocessing.active_children() if p.name.startswith("pipeline-rank")]


@pytest.mark.parametrize("world,spec,role", [
    (3, "1:denoise:2", "steps 2-3"),
    (3, "2:decode:1", "decode"),
    (5, "0:audio:3", "step 0 + audio"),
    (4, "1:refresh:0", "step 1"),
])
def test_stage_failure_is_named_and_ends_all_ranks(world, spec, role):
    rank, stage, block = spec.split(":")
    start = time.monotonic()
    with pytest.raises(PipelineError) as info:
        run_pipeline(PRESET, world, speech(3.0, seed=3), image(0), timeout_s=120, fail_at=spec)
    e = info.value
    assert (e.rank, e.stage, e.block, e.role) == (int(rank), stage, int(block), role)
    assert f"pipeline rank {rank} ({role}) failed in stage '{stage}'" in str(e)
    assert "InjectedFailure" in str(e)
    assert time.monotonic() - start < 60
    assert no_rank_left()


def test_failure_from_environment_variable(monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "1:denoise")
    with pytest.raises(PipelineError, match=r"rank 1 \(steps 2-3\) failed in stage 'denoise' \(session 0, block 0\)"):
        run_pipeline(PRESET, 3, speech(1.6, seed=3), image(0), timeout_s=120)
    assert no_rank_left()


def test_a_stuck_rank_times_out():
    start = time.monotonic()
    with pytest.raises(PipelineError, match="timed out; ranks still running"):
        run_pipeline(PRESET, 2, speech(1.6, seed=3), image(0), timeout_s=8, stage_sleep_s={"decode": 60})
    assert time.monotonic() - start < 30
    assert no_rank_left()


# ---- bad input fails in the driver, before any process starts ---------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"world_size": 6}, "world_size must be 2..5"),
    ({"fail_at": "2:denoise"}, r"rank 2 \(decode\) runs only decode, emit"),
    ({"fail_at": "7:decode"}, "names rank 7"),
    ({"backend": "mpi"}, "backend must be"),
    ({"start_method": "fork"}, "start_method must be"),
    ({"audio": np.ones((2, 100), np.float32)}, "1-D mono"),
    ({"audio": np.full(100, 2.0, np.float32)}, r"\[-1, 1\]"),
    ({"image": "/nonexistent/face.png"}, "face.png"),
    ({"fail_at": "1:denoise:2:1"}, "names session 1, there are 1 streams"),
    ({"fail_at": FailSpec(1, "denoise", None, 0)}, "needs a block"),
])
def test_bad_arguments_raise_before_spawning(kwargs, match):
    args = {"model": PRESET, "world_size": 3, "audio": speech(0.5, seed=0), "image": image(0)} | kwargs
    with pytest.raises((ValueError, FileNotFoundError, OSError), match=match):
        run_pipeline(**args)
    assert no_rank_left()


def test_bad_cancel_raises_before_spawning():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="cancel_after_blocks must be an int >= 0"):
            run_pipeline_streams(PRESET, 3, [StreamSpec(speech(0.5, seed=0), image(0), cancel_after_blocks=bad)])
    assert no_rank_left()


# ---- one session fails or is cancelled: the others finish, bit for bit -------------------------------

@pytest.fixture(scope="module")
def three_streams(config, one_thread):
    """Session 1 is the longest (7 blocks), so it still has blocks to issue when it fails at block 2."""
    streams = [StreamSpec(speech(2.2, seed=1), image(1), seed=11),
               StreamSpec(speech(4.4, seed=2), image(2), seed=12),
               StreamSpec(speech(2.9, seed=3), image(3), seed=13)]
    wants = [reference(config, s.audio, s.image, s.seed) for s in streams]
    assert [len(w) for w in wants] == [4, 7, 5]
    return streams, wants


def issued(run, session):
    """Blocks of the session that rank 0 issued (ran the audio of)."""
    return sorted(e.block for e in run.trace if e.rank == 0 and e.stage == "audio" and e.session == session)


# (world, failing spec for session 1, role, blocks of session 1 decoded before it failed)
ISOLATED_FAILURES = [
    (5, "2:denoise:2:1", "step 2", 2),      # a middle step rank
    (3, "1:denoise:2:1", "steps 2-3", 2),   # the last step rank (sends the FAILED x0 status itself)
    (3, "0:refresh:2:1", "steps 0-1 + audio", 3),
    (5, "1:refresh:2:1", "step 1", 3),      # x0 of block 2 was fine; block 3 is not denoised
    (3, "2:decode:2:1", "decode", 2),       # rank 0 hears of it through the decode rank's status
    (5, "0:audio:2:1", "step 0 + audio", 2),
    (5, "4:emit:2:1", "decode", 2),
]


@pytest.mark.parametrize("world,spec,role,kept", ISOLATED_FAILURES)
def test_a_failing_stage_fails_only_its_session(three_streams, world, spec, role, kept):
    streams, wants = three_streams
    rank, stage, block, _ = spec.split(":")
    run = run_pipeline_streams(PRESET, world, streams, timeout_s=120, fail_at=spec)
    assert set(run.errors) == {1} and not run.cancelled
    e = run.errors[1]
    assert (e.rank, e.role, e.stage, e.session, e.block) == (int(rank), role, stage, 1, int(block))
    assert f"pipeline rank {rank} ({role}) failed in stage '{stage}' (session 1, block 2)" in str(e)
    assert "InjectedFailure" in str(e)
    with pytest.raises(PipelineError, match=f"failed in stage '{stage}'"):
        run.result(1)
    assert_same_blocks(run.result(0), wants[0])
    assert_same_blocks(run.result(2), wants[2])
    assert_same_blocks(run.blocks[1], wants[1][:kept])  # what it produced before failing is right too
    # Rank 0 stopped issuing session 1 soon after: the decode rank's status is read ACK_LAG blocks late.
    assert issued(run, 1)[-1] <= int(block) + ACK_LAG + 1 < len(wants[1]) - 1
    # A step rank's failure reaches every step rank with the block's x0: no refresh of session 1 after
    # the failed block anywhere (the decode rank's failure reaches them only through rank 0).
    if stage not in ("decode", "emit"):
        assert not [ev for ev in run.trace if ev.session == 1 and ev.stage == "refresh" and ev.block > int(block)]
        assert not [ev for ev in run.trace if ev.session == 1 and ev.stage == "denoise" and ev.block > int(block) + 1]
    assert no_rank_left()


@pytest.mark.parametrize("world", [3, 5])
def test_cancel_one_session_mid_pipeline(three_streams, world):
    streams, wants = three_streams
    streams = [streams[0], StreamSpec(streams[1].audio, streams[1].image, streams[1].seed, cancel_after_blocks=2),
               streams[2]]
    run = run_pipeline_streams(PRESET, world, streams, timeout_s=120)
    assert run.cancelled == {1} and not run.errors
    assert issued(run, 1) == [0, 1]
    assert_same_blocks(run.result(1), wants[1][:2])  # ends cleanly with the blocks issued before
    assert_same_blocks(run.result(0), wants[0])
    assert_same_blocks(run.result(2), wants[2])
    assert no_rank_left()


def test_every_session_can_fail_and_the_run_still_ends(three_streams):
    streams, _ = three_streams
    run = run_pipeline_streams(PRESET, 3, streams, timeout_s=120, fail_at="1:denoise:1")  # block 1 of each
    assert sorted(run.errors) == [0, 1, 2]
    assert {(e.rank, e.stage, e.block) for e in run.errors.values()} == {(1, "denoise", 1)}
    assert [len(b) for b in run.blocks] == [1, 1, 1]
    assert no_rank_left()


def test_cancel_before_any_block(three_streams):
    streams, wants = three_streams
    streams = [StreamSpec(streams[0].audio, streams[0].image, streams[0].seed, cancel_after_blocks=0),
               streams[2]]
    run = run_pipeline_streams(PRESET, 3, streams, timeout_s=120)
    assert run.cancelled == {0} and run.blocks[0] == [] and issued(run, 0) == []
    assert_same_blocks(run.result(1), wants[2])


# ---- a rank that dies without a report (SIGKILL) --------------------------------------------------

def _peer_noticing(root: str) -> None:
    """What a live peer of a killed rank does: fail a wait on it and report that (after it died)."""
    time.sleep(0.3)
    Path(root, "error0.json").write_text(json.dumps({
        "rank": 0, "role": "step 0 + audio", "stage": "setup", "session": -1, "block": -1, "transfer": False,
        "cause": "RuntimeError: Connection closed by peer", "time": time.time(), "traceback": ""}))
    os._exit(1)


def _killed(root: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_driver_names_the_rank_killed_by_a_signal(tmp_path):
    """runtime.parallel.procs.wait_for (both families' drivers) names the killed rank, not its peer's report."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=f, args=(str(tmp_path),)) for f in (_peer_noticing, _killed)]
    for p in procs:
        p.start()
    with pytest.raises(PipelineError) as info:
        wait_for(procs, tmp_path, time.perf_counter() + 30)
    e = info.value
    assert e.rank == 1
    assert str(e).startswith("pipeline rank 1 died without reporting an error: killed by signal 9 (SIGKILL)")
    assert "then rank 0 failed in stage 'setup': RuntimeError: Connection closed by peer" in str(e)


def test_a_killed_pipeline_rank_is_named():
    """End to end: rank 1 of a real pipeline is SIGKILLed while it sets up."""
    import threading

    caught: list[BaseException] = []

    def run() -> None:
        try:
            run_pipeline(PRESET, 2, speech(1.6, seed=3), image(0), timeout_s=120, comm_timeout_s=30)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            caught.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ranks = [p for p in multiprocessing.active_children() if p.name == "pipeline-rank1" and p.pid]
        if ranks:
            os.kill(ranks[0].pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    thread.join(90)
    assert not thread.is_alive() and caught, "the pipeline did not fail"
    assert isinstance(caught[0], PipelineError) and caught[0].rank == 1, caught[0]
    assert "pipeline rank 1 died without reporting an error: killed by signal 9 (SIGKILL)" in str(caught[0])
    assert no_rank_left()
