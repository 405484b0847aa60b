"""Continuous batching: each round runs the next block of every ready session, padded to 1/2/4/8 rows."""
import resource
import threading
import time

import numpy as np
import pytest

from runtime import Engine
from runtime.media import synth_speech_like
from tests.oracle import assert_frames_close, random_images
from tests.stage_hooks import wrap_decodes

SR = 16000


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("micro", device="cpu", max_sessions=3, mode="eager")


@pytest.fixture(scope="module")
def images():
    return random_images(3, seed=4)


@pytest.fixture(scope="module")
def speech():
    return [synth_speech_like(1.6 + 0.3 * i, sample_rate=SR, seed=20 + i).astype(np.float32) for i in range(3)]


def alone(engine, image, audio, seed):
    with engine.open(image, seed=seed) as s:
        return np.concatenate([b.frames for b in s.step(audio) + s.flush()])


def test_three_sessions_joining_late_and_silent_equal_each_alone(engine, images, speech):
    seeds = (3, 4, 5)
    want = [alone(engine, images[i], speech[i], seeds[i]) for i in range(3)]
    rows0 = engine.rows_run
    got = [[], [], []]
    a = engine.open(images[0], seed=seeds[0])
    b = engine.open(images[1], seed=seeds[1])           # silent for a while: a runs on without it
    chunks = {0: 1100, 1: 2900, 2: 700}
    pos = [0, 0, 0]

    def feed(i, s, n_calls):
        for _ in range(n_calls):
            got[i] += s.step(speech[i][pos[i]:pos[i] + chunks[i]])
            pos[i] += chunks[i]

    feed(0, a, 12)
    assert a.next_block >= 1 and b.next_block == 0      # a was never held back by b
    c = engine.open(images[2], seed=seeds[2])           # joins late, at a's block boundary
    while any(pos[i] < len(speech[i]) for i in range(3)):
        for i, s in ((0, a), (1, b), (2, c)):
            if pos[i] < len(speech[i]):
                feed(i, s, 1)
    for i, s in ((0, a), (1, b), (2, c)):
        got[i] += s.flush()
        s.close()
    for i in range(3):
        assert [blk.index for blk in got[i]] == list(range(len(got[i])))
        assert_frames_close(np.concatenate([blk.frames for blk in got[i]]), want[i])
    assert engine.rows_run - rows0 == sum(len(g) for g in got)


def test_sessions_ready_together_share_rounds(engine, images, speech):
    """Audio of b and c arrives while a's round runs (slow decode): the next round batches b and c."""
    want = [alone(engine, images[i], speech[i], 7 + i) for i in range(3)]
    sessions = [engine.open(images[i], seed=7 + i) for i in range(3)]
    a = sessions[0]
    started = threading.Event()

    def slow(name, body):
        def run():
            started.set()
            time.sleep(0.5)
            body()
        return run

    undo = wrap_decodes(engine, a.slot, slow)
    first = engine.timeline.samples_to_run(0)
    got = [[], [], []]
    t = threading.Thread(target=lambda: got[0].extend(a.step(speech[0][:first])))
    t.start()
    assert started.wait(30)
    pushers = [threading.Thread(target=lambda i=i: got[i].extend(sessions[i].step(speech[i][:first])))
               for i in (1, 2)]
    rounds, rows = engine.rounds, engine.rows_run
    for p in [*pushers]:
        p.start()
    for p in [t, *pushers]:
        p.join(60)
    # eager: a's round is counted once it ran; then one round for b and c together
    assert (engine.rounds - rounds, engine.rows_run - rows) == (2, 3)
    undo()
    for i, s in enumerate(sessions):
        got[i] += s.step(speech[i][first:]) + s.flush()
        s.close()
        assert_frames_close(np.concatenate([b.frames for b in got[i]]), want[i])


def test_a_padded_row_keeps_its_session_unchanged(engine, images, speech):
    """Slot 0 waits (no audio) while slot 1 runs rounds of batch 2: slot 0's ring must be untouched."""
    want = alone(engine, images[0], speech[0], 9)
    waiting = engine.open(images[0], seed=9)
    first = waiting.step(speech[0][:12000])              # some blocks in the ring already
    with engine.open(images[1], seed=1) as other:
        ring = waiting.state.ring.k.clone()
        other.step(speech[1])                            # rounds of batch 2, row 0 padded
        np.testing.assert_array_equal(waiting.state.ring.k.numpy(), ring.numpy())
    rest = waiting.step(speech[0][12000:]) + waiting.flush()
    waiting.close()
    assert_frames_close(np.concatenate([b.frames for b in first + rest]), want)


def test_batch_sizes_are_padded(engine):
    fam = engine.family
    assert [fam.padded(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]


def test_open_close_cycles_keep_memory_flat(engine, images):
    def cycle(n):
        for i in range(n):
            engine.open(images[i % 3], seed=i).close()

    cycle(50)  # warm-up: allocator pools, caches
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cycle(1000)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert engine.num_sessions == 0
    assert grown_kb < 20_000, f"peak RSS grew by {grown_kb} kB over 1000 open/close cycles"
