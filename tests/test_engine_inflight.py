"""Blocks in flight (mode="auto" on CPU: RoundRunner host lanes) against the eager reference."""
import threading
import time

import numpy as np
import pytest

from runtime import Engine
from runtime.media import synth_speech_like
from tests.stage_hooks import wrap_decodes

SR = 16000


@pytest.fixture(scope="module")
def engines():
    eager = Engine.from_pretrained("micro", device="cpu", max_sessions=2, mode="eager")
    sched = Engine.from_pretrained("micro", device="cpu", max_sessions=2, mode="auto")
    yield eager, sched
    sched.close()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).integers(0, 256, size=(40, 36, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def speech():
    return synth_speech_like(2.2, sample_rate=SR, seed=8).astype(np.float32)


def run(engine, image, audio, chunk, seed=3):
    with engine.open(image, seed=seed) as s:
        blocks = []
        for pos in range(0, len(audio), chunk):
            blocks += s.step(audio[pos:pos + chunk])
        blocks += s.flush()
    return blocks


def test_scheduled_frames_equal_eager_whatever_the_chunking(engines, image, speech):
    eager, sched = engines
    assert sched.runner.backend == "host" and eager.runner.backend == "inline"
    want = np.concatenate([b.frames for b in run(eager, image, speech, len(speech))])
    for chunk in (700, 4000):
        got = run(sched, image, speech, chunk)
        assert [b.index for b in got] == list(range(len(got)))
        np.testing.assert_array_equal(np.concatenate([b.frames for b in got]), want)


def test_step_does_not_wait_and_decode_overlaps_the_next_denoise(engines, image, speech):
    _, sched = engines
    spans, lock = [], threading.Lock()
    fam = sched.family
    forward = fam.dit.forward_block

    def timed(name, fn, pause=0.0):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            time.sleep(pause)
            out = fn(*args, **kw)
            with lock:
                spans.append((name, t0, time.perf_counter()))
            return out
        return wrapper

    fam.dit.forward_block = timed("forward", forward)
    undo = lambda: None
    try:
        with sched.open(image, seed=3) as s:
            undo = wrap_decodes(sched, s.slot, lambda name, body: timed("decode", body, pause=0.4))
            per_block = sched.timeline.samples_to_run(1)   # blocks 0 and 1 ready after this push
            got = s.step(speech[:per_block])
            t_return = time.perf_counter()
            assert len(got) < 2                              # returned while a decode was still running
            got += s.drain()
            assert [b.index for b in got] == [0, 1]
    finally:
        del fam.dit.forward_block
        undo()
    decodes = sorted(sp for sp in spans if sp[0] == "decode")
    forwards = [sp for sp in spans if sp[0] == "forward"]
    assert t_return < decodes[-1][2]
    first_decode = decodes[0]
    # block 1's forwards ran while block 0 was decoding (decode lane || compute lane)
    assert any(first_decode[1] < f[1] < first_decode[2] for f in forwards)


def test_a_failed_stage_on_a_lane_fails_its_session_only(engines, image, speech):
    from runtime.errors import BlockFailedError

    _, sched = engines
    with sched.open(image, seed=1) as a, sched.open(image, seed=2) as b:
        def broken():
            raise RuntimeError("decoder fault")

        undo = wrap_decodes(sched, a.slot, lambda name, body: broken)
        first = sched.timeline.samples_to_run(0)
        try:
            a.step(speech[:first])
            b.step(speech[:first])
            with pytest.raises(BlockFailedError, match="stage 'decode/first' of block 0.*decoder fault"):
                a.drain()
        finally:
            undo()
        assert [blk.index for blk in b.drain()] == [0]
