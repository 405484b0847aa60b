"""Sessions on one engine (contract A): open/close, capacity, the shorthand, isolation, threads, refusals."""
import threading

import numpy as np
import pytest

from runtime import Engine
from runtime.audio import AudioInputError
from runtime.errors import AtCapacityError, BlockFailedError, SessionBusyError, SessionFailedError
from runtime.media import synth_speech_like
from tests.oracle import assert_frames_close, random_images
from tests.stage_hooks import slot_decoder, wrap_decodes

SR = 16000


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("micro", device="cpu", max_sessions=3)


@pytest.fixture(scope="module")
def images():
    return random_images(3, seed=0)


@pytest.fixture(scope="module")
def speech():
    return synth_speech_like(2.0, sample_rate=SR, seed=3).astype(np.float32)


def stream(session, audio, chunk):
    blocks = []
    for pos in range(0, len(audio), chunk):
        blocks += session.step(audio[pos:pos + chunk])
    return blocks + session.flush()


def frames(blocks):
    return [b.frames for b in blocks]


def test_capacity_close_and_reuse(engine, images):
    opened = [engine.open(images[i], seed=i) for i in range(3)]
    assert engine.num_sessions == 3 and engine.max_sessions == 3
    with pytest.raises(AtCapacityError, match="max_sessions=3"):
        engine.open(images[0])
    opened[1].close()
    opened[1].close()  # idempotent
    assert opened[1].closed and engine.num_sessions == 2
    with pytest.raises(RuntimeError, match="closed session"):
        opened[1].step(np.zeros(100, np.float32))
    with engine.open(images[1]) as again:
        assert again.slot == 1
    for s in opened:
        s.close()
    assert engine.num_sessions == 0


def test_session_equals_the_shorthand(engine, images, speech):
    engine.reset(images[0], seed=5)
    alone = frames(stream(engine, speech, 4000))
    engine._session = None  # ends the default session
    with engine.open(images[0], seed=5) as s:
        np.testing.assert_array_equal(np.concatenate(frames(stream(s, speech, 1500))), np.concatenate(alone))


def test_bad_audio_refused_and_failed_block_fail_one_session(engine, images, speech, monkeypatch):
    with engine.open(images[0], seed=1) as a, engine.open(images[1], seed=2) as b:
        with pytest.raises(AudioInputError, match="NaN"):
            a.step(np.full(800, np.nan, np.float32))
        assert a.pending_samples == 0 and a.failed is None  # refused: nothing changed
        real = engine.family.stage_audio

        def broken(s, w):
            if s is a.state:
                raise RuntimeError("injected")
            return real(s, w)

        monkeypatch.setattr(engine.family, "stage_audio", broken)
        with pytest.raises(BlockFailedError, match="stage 'plan' of block 0") as info:
            a.step(speech)
        assert info.value.session == a.slot and isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(SessionFailedError, match="failed earlier"):
            a.step(speech[:100])
        assert b.step(speech) + b.drain()  # the other session goes on
        monkeypatch.undo()


def test_non_finite_output_fails_the_session(engine, images, speech):
    with engine.open(images[0], seed=1) as a, engine.open(images[1], seed=2) as b:
        d = slot_decoder(engine, a.slot)
        undo = wrap_decodes(engine, a.slot, lambda name, body: lambda: (body(), d.out_first.fill_(float("nan"))))
        try:
            with pytest.raises(BlockFailedError, match="stage 'finish' of block 0.*not finite"):
                a.step(speech)
                a.drain()
        finally:
            undo()
        assert a.failed is not None
        assert b.step(speech) + b.drain()


def test_refusals_change_nothing(engine, images, speech):
    with engine.open(images[0], seed=1) as s:
        with pytest.raises(AudioInputError, match="NaN"):
            s.step(np.full(480, np.nan, np.float32), 24000, resample=True)
        assert s.state.resampler is None  # no resampler left behind
        with pytest.raises(TypeError, match="sample_rate must be an int"):
            s.step(speech[:100], sample_rate="16000")
        assert s.pending_samples == 0
    for bad in (-1, 2**63, 1.5, True, "3"):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
            engine.open(images[0], seed=bad)
    assert engine.num_sessions == 0


def test_two_threads_on_one_session_refused(engine, images, speech):
    with engine.open(images[0], seed=1) as s:
        inside, release = threading.Event(), threading.Event()
        real = engine.family.stage_audio

        def slow(state, w):
            inside.set()
            release.wait(10)
            return real(state, w)

        engine.family.stage_audio = slow
        try:
            t = threading.Thread(target=s.step, args=(speech,))
            t.start()
            assert inside.wait(10)
            with pytest.raises(SessionBusyError, match="another thread"):
                s.step(speech[:100])
            release.set()
            t.join(30)
        finally:
            del engine.family.stage_audio


def test_sessions_on_threads_equal_alone(engine, images, speech):
    alone = []
    for i in range(2):
        with engine.open(images[i], seed=10 + i) as s:
            alone.append(np.concatenate(frames(stream(s, speech, 3000))))
    got = [None, None]

    def run(i):
        with engine.open(images[i], seed=10 + i) as s:
            got[i] = np.concatenate(frames(stream(s, speech, 1000 + 700 * i)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(2):
        assert_frames_close(got[i], alone[i])  # batched when both were ready in one round
