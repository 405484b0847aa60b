"""ScheduledEngine (host backend): the same blocks as the sequential Engine, real overlap, errors, cancel.

The reference is the plain `Engine` (eager, sequential) with the same weights, seed and audio: every
comparison is bitwise (frames, audio, timestamps), and per call (the same blocks from the same call).
Overlap is read off the engine's stage trace, with a decode made slow on purpose.
"""
from __future__ import annotations

import dataclasses
import gc
import threading
import time
import weakref

import numpy as np
import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.media import synth_speech_like
from runtime.scheduled import Cancelled, ScheduledEngine, StageError, compare_pipelined_sequential
from runtime.scheduler import extension_available

pytestmark = pytest.mark.skipif(not extension_available(), reason="runtime._scheduler is not built")

SR = 16000
SEED = 5
WAIT = 20.0  # bound on any wait, so that a broken pipeline fails instead of hanging


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: one intra-op thread per lane avoids OpenMP spinning against the other lane.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def seq():
    return Engine.random(EngineConfig.from_preset("micro"), device="cpu", seed=1)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def speech():
    return synth_speech_like(5.0, sample_rate=SR, seed=2).astype(np.float32)  # 7 blocks after flush


@pytest.fixture(scope="module")
def references(seq, image, speech):
    """references(n): the sequential engine's blocks, by index, for the stream speech[:n] + flush()
    (the last blocks of a shorter stream see its silence padding, so each length has its own)."""
    cache = {}

    def get(n):
        if n not in cache:
            seq.reset(image, seed=SEED)
            cache[n] = {b.index: b for b in seq.step(speech[:n]) + seq.flush()}
        return cache[n]
    return get


@pytest.fixture(scope="module")
def reference(references, speech):
    return references(len(speech))


def make(seq, **options) -> ScheduledEngine:
    return ScheduledEngine.from_engine(seq, trace=10_000, **options)


def assert_same_blocks(got, reference):
    assert got, "no blocks"
    for b in got:
        ref = reference[b.index]
        assert (b.first_frame, b.pts, b.frames.shape) == (ref.first_frame, ref.pts, ref.frames.shape)
        np.testing.assert_array_equal(b.frames, ref.frames)
        np.testing.assert_array_equal(b.audio, ref.audio)


def run_stream(eng, image, audio, chunk=None):
    eng.reset(image, seed=SEED)
    out, size = [], chunk or len(audio)
    for p in range(0, len(audio), size):
        out += eng.step(audio[p:p + size])
    return out + eng.flush()


def spans(eng, stage):
    """{block: (start, end)} of a stage, from the trace."""
    return {s.block: (s.start, s.end) for s in eng.trace if s.stage == stage}


# ---------------------------------------------------------------- equality with the sequential engine

def test_same_blocks_call_by_call_as_the_sequential_engine(seq, image, speech, reference):
    rng = np.random.default_rng(3)
    with make(seq) as eng:
        chunk = int(rng.integers(2500, 7000))
        timing = compare_pipelined_sequential(seq, eng, image, speech, chunk_samples=chunk, seed=SEED,
                                              warmup_samples=0)
    assert len(timing.pipelined_blocks) == len(reference) >= 6
    assert timing.pipelined_calls == timing.sequential_calls  # the same blocks from the same calls
    assert [b.index for b in timing.pipelined_blocks] == list(range(len(reference)))
    assert timing.pipelined_blocks[0].num_frames == 9  # block 0 keeps its 9 frames (1 + 4 + 4)
    assert_same_blocks(timing.pipelined_blocks, reference)
    assert_same_blocks(timing.sequential_blocks, reference)  # chunking changed nothing either
    s = timing.summary()
    assert s["blocks"] == len(reference) and s["pipelined_wall_s"] > 0
    assert "| block latency, median |" in timing.as_markdown()
    for b in timing.pipelined_blocks:
        assert set(b.timings) == {"audio", "denoise", "decode", "total"}
        assert b.timings["total"] >= b.timings["audio"]


def test_uneven_chunks_and_a_single_block_in_flight(seq, image, speech, reference):
    rng = np.random.default_rng(4)
    with make(seq, max_in_flight=1) as eng:
        eng.reset(image, seed=SEED)
        got, pos = [], 0
        while pos < len(speech):
            n = int(rng.integers(1, 9000))
            got += eng.step(speech[pos:pos + n])
            pos += n
        got += eng.flush()
    assert [b.index for b in got] == sorted(reference)
    assert_same_blocks(got, reference)


# ---------------------------------------------------------------- overlap

def test_decode_of_block_b_overlaps_denoising_of_block_b_plus_1(seq, image, speech, references):
    eng = make(seq)
    slow = eng.stage_decode

    def slow_decode(s, w):
        time.sleep(0.4)  # a decode much longer than a denoising step: it must not hold the dit lane
        slow(s, w)

    eng.stage_decode = slow_decode
    try:
        got = run_stream(eng, image, speech[:SR * 3])  # blocks 0-2 in one step() call, then flush
    finally:
        eng.close()
    assert_same_blocks(got, references(SR * 3))
    n = eng.config.sampler.num_steps
    decode, step0, last, refresh = (spans(eng, name) for name in ("decode", "step0", f"step{n - 1}",
                                                                  "refresh"))
    overlapped = [b for b in decode if b + 1 in step0 and decode[b][0] < step0[b + 1][0] < decode[b][1]]
    # Block 1's decode is the slow one (block 0 decodes its rest through the decoder directly).
    assert 1 in overlapped, f"step0(2) did not start while decode(1) ran: decode {decode}, step0 {step0}"
    for b in decode:  # and every dependency still held
        assert decode[b][0] >= last[b][1]
        if b > 0:
            assert decode[b][0] >= decode[b - 1][1]
            assert step0[b][0] >= refresh[b - 1][1]


def test_first_frame_is_decoded_while_block_0_denoises(seq, image, speech, references):
    eng = make(seq)
    steps = eng.stage_denoise

    def slow_steps(s, w, step):
        time.sleep(0.1)
        steps(s, w, step)

    eng.stage_denoise = slow_steps
    try:
        got = run_stream(eng, image, speech[: SR // 2])
    finally:
        eng.close()
    assert_same_blocks(got, references(SR // 2))
    n = eng.config.sampler.num_steps
    first, last = spans(eng, "decode_first")[0], spans(eng, f"step{n - 1}")[0]
    decode = spans(eng, "decode")[0]
    assert first[0] < last[1], "the first latent frame was not decoded during block 0's denoising"
    assert first[1] <= decode[0]


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("stage, method", [("refresh", "stage_refresh"), ("decode", "stage_decode"),
                                           ("audio", "stage_audio")])
def test_a_failing_stage_fails_the_stream_with_its_name_and_reset_recovers(seq, image, speech, references,
                                                                           stage, method):
    eng = make(seq)
    original = getattr(eng, method)

    def failing(s, w, *args):
        if w.index == 1:
            raise ValueError(f"boom in {method}")
        return original(s, w, *args)

    setattr(eng, method, failing)
    try:
        eng.reset(image, seed=SEED)
        with pytest.raises(StageError) as info:
            eng.step(speech[: SR * 2])
        assert (info.value.stage, info.value.block) == (stage, 1)
        assert isinstance(info.value.__cause__, ValueError) and "boom" in str(info.value.__cause__)
        assert f"stage '{stage}' of block 1" in str(info.value)
        with pytest.raises(RuntimeError, match="stream ended.*reset"):
            eng.step(speech[:100])
        setattr(eng, method, original)
        assert_same_blocks(run_stream(eng, image, speech[:SR]), references(SR))  # same engine, new stream
    finally:
        eng.close()


# ---------------------------------------------------------------- cancel / reset mid-pipeline

def test_cancel_mid_pipeline_then_reset_and_reuse(seq, image, speech, references):
    eng = make(seq)
    entered, release = threading.Event(), threading.Event()
    steps = eng.stage_denoise

    def gated(s, w, step):
        if (w.index, step) == (1, 1):
            entered.set()
            release.wait(WAIT)
        steps(s, w, step)

    eng.stage_denoise = gated
    outcome = {}

    def stream():
        try:
            outcome["blocks"] = eng.step(speech[: SR * 2])
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            outcome["error"] = err

    try:
        eng.reset(image, seed=SEED)
        caller = threading.Thread(target=stream)
        caller.start()
        assert entered.wait(WAIT), "the gated stage never started"
        eng.cancel()
        caller.join(WAIT)
        assert not caller.is_alive(), "step() did not return after cancel()"
        assert isinstance(outcome.get("error"), Cancelled), outcome
        assert not release.is_set()  # step() returned while the stage was still running
        with pytest.raises(RuntimeError, match="cancelled"):
            eng.step(speech[:100])
        # reset() mid-pipeline: waits for the running stage (released a bit later), then starts over.
        threading.Timer(0.2, release.set).start()
        eng.reset(image, seed=SEED)
        assert release.is_set()
        assert_same_blocks(run_stream(eng, image, speech[:SR]), references(SR))
    finally:
        release.set()
        eng.close()


# ---------------------------------------------------------------- construction, lifetime

def test_bad_options_are_rejected(seq):
    with pytest.raises(ValueError, match="max_in_flight"):
        ScheduledEngine.from_engine(seq, max_in_flight=0)
    with pytest.raises(ValueError, match="CUDA"):
        ScheduledEngine.from_engine(seq, scheduler_backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ScheduledEngine.from_engine(seq, scheduler_backend="threads")


def test_a_dropped_engine_is_collected_with_its_workers(seq, image, speech):
    eng = make(seq)
    eng.reset(image, seed=SEED)
    eng.step(speech[: SR // 2])
    ref = weakref.ref(eng)
    del eng
    gc.collect()
    assert ref() is None  # the scheduler holds its stages weakly: no cycle through C++


@pytest.mark.parametrize("graphs", [False, True])
def test_one_latent_frame_per_block(image, speech, graphs):
    # Block 0 is then the first latent frame alone: decode_first is its whole decode.
    base = EngineConfig.from_preset("micro")
    cfg = base.replace(cache=dataclasses.replace(base.cache, block_frames=1))
    seq1 = Engine.random(cfg, device="cpu", seed=2)
    audio = speech[: SR // 2]
    want = run_stream(seq1, image, audio)
    with ScheduledEngine.from_engine(seq1, graphs=graphs) as eng:
        got = run_stream(eng, image, audio)
    assert [b.num_frames for b in got] == [1] + [4] * (len(got) - 1) and len(got) >= 3
    assert_same_blocks(got, {b.index: b for b in want})


def test_interrupt_and_idle_match_the_sequential_engine(seq, image, speech):
    def script(eng):
        eng.reset(image, seed=SEED)
        calls = [eng.step(speech[:15000])]
        dropped = eng.interrupt()                      # barge-in: queued audio of block 1 dropped
        calls += [eng.step(speech[20000:40000]), eng.idle(2), eng.flush()]
        return dropped, calls

    want_dropped, want = script(seq)
    with make(seq) as eng:
        dropped, got = script(eng)
    assert dropped == want_dropped > 0
    assert [[b.index for b in c] for c in got] == [[b.index for b in c] for c in want]
    assert_same_blocks([b for c in got for b in c], {b.index: b for c in want for b in c})
