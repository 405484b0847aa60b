"""Several Live Avatar sessions on one engine (issue 10): three liveavatar-tiny sessions with different
images, seeds and chunkings, one joining late and one silent for a while, each equal to the same session
run alone; one with bad audio fails alone. The engine's default mode (the round runner when built)."""
import threading
import time

import numpy as np
import pytest
import torch

from runtime.engine import Engine
from runtime.errors import BlockFailedError, SessionFailedError
from runtime.media import synthetic_face
from tests.oracle import assert_frames_close
from tests.test_liveavatar_forward import _one_thread  # noqa: F401 - autouse: one torch thread

SR = 16000



@pytest.fixture(scope="module")
def engine():
    with Engine.from_pretrained("liveavatar-tiny", device="cpu", dtype=torch.float32, max_sessions=3) as e:
        yield e


def _audio(n, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return (0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _image(seed):
    return np.roll(synthetic_face(64, 64), 7 * seed, axis=1)


def _cuts(n, chunk):
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def _alone(engine, seed, audio, chunk):
    with engine.open(_image(seed), seed=seed) as s:
        return [b for a, z in _cuts(len(audio), chunk) for b in s.step(audio[a:z], SR)] + s.flush()


def _same(a, b) -> bool:
    return len(a) == len(b) and all(p.index == q.index and np.array_equal(p.frames, q.frames)
                                    and np.array_equal(p.audio, q.audio) for p, q in zip(a, b))


def _close(a, b) -> None:
    """Same blocks and audio; frames within the batched-row tolerance (tests/oracle.py): the CPU's
    matmuls round a row of a 2-row batch a little differently from the row alone."""
    assert [p.index for p in a] == [q.index for q in b]
    assert all(np.array_equal(p.audio, q.audio) for p, q in zip(a, b))
    assert_frames_close(np.concatenate([p.frames for p in a]), np.concatenate([q.frames for q in b]))


def test_three_sessions_each_equal_their_single_session_run(engine):
    audio = {1: _audio(30000, 1), 2: _audio(26000, 2), 3: _audio(22000, 3)}
    chunks = {1: 640, 2: 3000, 3: 1777}
    alone = {k: _alone(engine, k, audio[k], chunks[k]) for k in audio}
    got = {k: [] for k in audio}
    sessions = {1: engine.open(_image(1), seed=1), 2: engine.open(_image(2), seed=2)}
    pos = {k: 0 for k in audio}
    for tick in range(60):
        if tick == 8:  # session 3 joins late, while the others are mid-stream
            sessions[3] = engine.open(_image(3), seed=3)
        for k, s in sessions.items():
            if k == 2 and 5 <= tick < 20:
                continue  # session 2 is silent a while: the others go on without it
            a = pos[k]
            z = min(a + chunks[k], len(audio[k]))
            if a < z:
                got[k] += s.step(audio[k][a:z], SR)
                pos[k] = z
    for k, s in sessions.items():
        assert pos[k] == len(audio[k])
        got[k] += s.flush()
        s.close()
    assert engine.num_sessions == 0
    for k in audio:
        assert len(got[k]) >= 3 and _same(got[k], alone[k]), f"session {k}"
    assert not np.array_equal(got[1][1].frames, got[2][1].frames)  # other image and seed, other frames


def test_bad_audio_fails_one_session_alone(engine):
    good = _audio(20000, 4)
    alone = _alone(engine, 4, good, 2000)
    with engine.open(_image(4), seed=4) as ok, engine.open(_image(5), seed=5) as bad:
        out = []
        for i, (a, z) in enumerate(_cuts(len(good), 2000)):
            out += ok.step(good[a:z], SR)
            if i == 3:
                with pytest.raises(ValueError, match="NaN"):
                    bad.step(np.full(800, np.nan, np.float32), SR)
        out += ok.flush()
        assert _same(out, alone)
        assert len(bad.step(good[:1000], SR) + bad.flush()) == 1  # a refused chunk changed nothing there


def test_a_failing_decode_fails_its_session_alone(engine):
    good = _audio(20000, 6)
    alone = _alone(engine, 6, good, 2500)
    with engine.open(_image(6), seed=6) as ok, engine.open(_image(7), seed=7) as broken:
        def boom(latents):
            raise RuntimeError("injected stage fault")

        broken.state.decoder.decode = boom  # this session's decode stage fails
        out, failures = [], []
        for a, z in _cuts(len(good), 2500):
            out += ok.step(good[a:z], SR)
            try:
                broken.step(good[a:z], SR)
            except (BlockFailedError, SessionFailedError) as err:
                failures.append(err)
        out += ok.flush()
    assert _same(out, alone)
    assert failures and isinstance(failures[0], BlockFailedError) and "injected stage fault" in str(failures[0])
    assert failures[0].stage == "decode" and failures[0].block == 0
    assert all(isinstance(f, SessionFailedError) for f in failures[1:])


# ---- batched rounds: sessions ready together run one forward per denoising step -----------------
@pytest.fixture(scope="module")
def eager():
    """Eager mode: a round runs on the caller's thread, so audio arriving meanwhile batches deterministically."""
    with Engine.from_pretrained("liveavatar-tiny", device="cpu", dtype=torch.float32, max_sessions=3,
                                mode="eager") as e:
        yield e


def _batch_b_and_c(engine, sessions, first, audio):
    """a's round runs with a slow decode while b and c push their first block's audio: the next round
    runs b and c together. Returns each session's blocks and (rounds, rows) those three pushes ran."""
    a = sessions[0]
    decode, started = a.state.decoder.decode, threading.Event()

    def slow(z):
        started.set()
        time.sleep(0.5)
        return decode(z)

    a.state.decoder.decode = slow
    got = [[], [], []]
    t = threading.Thread(target=lambda: got[0].extend(_steps(a, audio[0][:first])))
    t.start()
    assert started.wait(60)
    rounds, rows = engine.rounds, engine.rows_run
    pushers = [threading.Thread(target=lambda i=i: got[i].extend(_steps(sessions[i], audio[i][:first])))
               for i in (1, 2)]
    for p in pushers:
        p.start()
    for p in [t, *pushers]:
        p.join(120)
    a.state.decoder.decode = decode
    return got, (engine.rounds - rounds, engine.rows_run - rows)


def _steps(session, audio):
    try:
        return session.step(audio, SR)
    except (BlockFailedError, SessionFailedError) as err:
        return [err]


def test_sessions_ready_together_run_one_batched_forward(eager):
    audio = [_audio(14000, 10 + i) for i in range(3)]
    alone = [_alone(eager, 10 + i, audio[i], 14000) for i in range(3)]
    forwards = []
    model = eager.family.model
    forward = model.forward_rows
    model.forward_rows = lambda x, *a, **k: forwards.append(x.shape[0]) or forward(x, *a, **k)
    try:
        sessions = [eager.open(_image(10 + i), seed=10 + i) for i in range(3)]
        first = eager.timeline.samples_to_run(0)
        got, counted = _batch_b_and_c(eager, sessions, first, audio)
    finally:
        del model.forward_rows
    assert counted == (2, 3)  # eager: a's round is counted once it ran; then one round for b and c
    steps = model.cfg.num_steps
    assert forwards[:2 * steps] == [1] * steps + [2] * steps  # a alone, then one forward of 2 rows a step
    for i, s in enumerate(sessions):
        got[i] += s.step(audio[i][first:], SR) + s.flush()
        s.close()
        _close(got[i], alone[i])


def test_a_failing_batched_step_fails_the_sessions_of_its_round(eager):
    audio = [_audio(14000, 20 + i) for i in range(3)]
    alone_a = _alone(eager, 20, audio[0], 14000)
    sessions = [eager.open(_image(20 + i), seed=20 + i) for i in range(3)]
    ring = sessions[2].state.stream.rings[0]

    def boom(*args, **kwargs):
        raise RuntimeError("injected ring fault")

    ring.begin_block = boom  # c's step 0 fails: the batched forward of b and c cannot run
    first = eager.timeline.samples_to_run(0)
    got, counted = _batch_b_and_c(eager, sessions, first, audio)
    assert counted == (2, 3)
    for i in (1, 2):
        err = got[i][-1] if got[i] else None
        if not isinstance(err, BlockFailedError):  # its thread pushed first: the failure is reported next call
            with pytest.raises(BlockFailedError) as info:
                sessions[i].step(audio[i][first:first + 100], SR)
            err = info.value
        assert err.stage == "step0" and "injected ring fault" in str(err), i
    a = sessions[0]
    out = got[0] + a.step(audio[0][first:], SR) + a.flush()  # the session outside that round goes on
    assert _same(out, alone_a)
    for s in sessions:
        s.close()


def test_reopening_an_image_reuses_its_reference_latents(eager):
    fam, calls = eager.family, []
    encode = fam.vae.encode_image
    fam.vae.encode_image = lambda img: calls.append(1) or encode(img)
    try:
        audio = _audio(8000, 30)
        first = _alone(eager, 30, audio, 8000)
        again = _alone(eager, 30, audio, 8000)           # same image: no encode
        _alone(eager, 31, audio, 8000)                   # another image: encoded
    finally:
        del fam.vae.encode_image
    assert len(calls) == 2 and _same(first, again)
    assert len(fam._reference_cache) <= 8
