"""AvatarSession: interleaved A/V events, offline-engine equality, segments, barge-in, idle, errors, pacing.

Every session here runs the `micro` preset on CPU without pacing (pace=False) unless pacing is the
subject, and then with an injected clock: no test sleeps to measure time. A hang fails through
`run`'s timeout instead of blocking the suite.
"""
import asyncio
import threading

import numpy as np
import pytest

from runtime import Engine
from runtime.audio import AudioInputError, Resampler
from runtime.media import synth_speech_like
from runtime.realtime import (
    AudioFrame,
    AvatarSession,
    AvatarSessionError,
    Pacer,
    PlaybackFinished,
    VideoFrame,
    float_to_pcm16,
    rgb_to_i420,
)
from tests.stage_hooks import wrap_decodes

SR = 16000
FPS = 16
SPF = SR // FPS       # samples per video frame
TIMEOUT = 60          # seconds; only reached when something hangs


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("micro", device="cpu")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


def pcm(seconds: float, seed: int) -> np.ndarray:
    return np.round(synth_speech_like(seconds, sample_rate=SR, seed=seed) * 32767).astype(np.int16)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def read_frames(session, frames: int) -> list:
    """Events until `frames` video frames and their audio were yielded (acks in between included)."""
    events, done = [], 0
    while done < frames:
        events.append(await anext(session))
        done += isinstance(events[-1], AudioFrame)
    return events


async def push_in_pieces(session, samples: np.ndarray, piece: int = 320) -> None:
    """20 ms PCM16 frames, as a TTS or LiveKit delivers them."""
    for i in range(0, len(samples), piece):
        await session.push_audio(samples[i:i + piece].tobytes(), SR)


async def wait_until_buffered(session, frames: int) -> None:
    """Poll until the worker has generated `frames` unyielded frames (run()'s timeout bounds it)."""
    while session.buffered_frames < frames:
        await asyncio.sleep(0.01)


def split(events):
    video = [e for e in events if isinstance(e, VideoFrame)]
    audio = [e for e in events if isinstance(e, AudioFrame)]
    acks = [e for e in events if isinstance(e, PlaybackFinished)]
    return video, audio, acks


def assert_interleaved(events, first_index: int = 0):
    """Each VideoFrame is followed by exactly its AudioFrame; indices consecutive, pts = index / fps."""
    av = [e for e in events if not isinstance(e, PlaybackFinished)]
    assert len(av) % 2 == 0
    for i, (v, a) in enumerate(zip(av[::2], av[1::2])):
        assert isinstance(v, VideoFrame) and isinstance(a, AudioFrame), (i, v, a)
        assert v.index == a.index == first_index + i
        assert v.pts == a.pts == v.index / FPS
        assert a.pcm.dtype == np.int16 and a.pcm.shape == (SPF,) and a.sample_rate == SR
        assert v.rgb.dtype == np.uint8 and v.rgb.shape == (32, 32, 3)
    for i, e in enumerate(events[:-1]):
        if isinstance(e, VideoFrame):
            assert isinstance(events[i + 1], AudioFrame)
    pts = [v.pts for v in split(events)[0]]
    np.testing.assert_allclose(np.diff(pts), 1 / FPS)


def offline(engine, image, seed: int, script) -> list[np.ndarray]:
    """The plain Engine calls a session should make: frames in order (the oracle)."""
    blocks = []
    with engine.open(image, seed=seed) as stream:   # closed after: no idle session beside the next test's
        for op, arg in script:
            if op == "step":
                blocks += stream.step(arg)
            elif op == "idle":
                blocks += stream.idle(arg)
            else:
                stream.interrupt()
    return [f for b in blocks for f in b.frames]


# ---- speech, end of segment, a second segment: one session, several checks ----------------------
SPEECH_A = pcm(16500 / SR, seed=3)   # ends inside frame 16, so block 1 (frames 9..20) ends in padding
SPEECH_B = pcm(0.5, seed=4)          # 8 frames


@pytest.fixture(scope="module")
def two_segments(engine, image):
    async def session_run():
        async with AvatarSession(engine, image, seed=5) as avatar:
            await push_in_pieces(avatar, SPEECH_A)
            avatar.end_of_segment()
            await push_in_pieces(avatar, SPEECH_B)
            avatar.end_of_segment()
            return await read_frames(avatar, 33)    # blocks 0, 1 (A) and 2 (B): 9 + 12 + 12 frames

    events = run(session_run())
    # After A's end the engine holds silence past block 1; B's push drops it (interrupt) first.
    oracle = offline(engine, image, 5, [("step", SPEECH_A.astype(np.float32) / 32768), ("idle", 1),
                                        ("interrupt", None), ("step", SPEECH_B.astype(np.float32) / 32768),
                                        ("idle", 1)])
    return events, oracle


def test_every_frame_is_followed_by_its_audio(two_segments):
    events, _ = two_segments
    assert_interleaved(events)
    assert len(split(events)[0]) == 33


def test_frames_equal_the_offline_engine(two_segments):
    events, oracle = two_segments
    video = split(events)[0]
    assert len(video) == len(oracle) == 33
    for v, expected in zip(video, oracle):
        np.testing.assert_array_equal(v.rgb, expected)


def test_audio_is_the_pushed_pcm_plus_padding(two_segments):
    events, _ = two_segments
    audio = np.concatenate([a.pcm for a in split(events)[1]])
    b_start = 21 * SPF                                   # B starts at block 2's first frame
    np.testing.assert_array_equal(audio[:len(SPEECH_A)], SPEECH_A)
    assert not audio[len(SPEECH_A):b_start].any()
    np.testing.assert_array_equal(audio[b_start:b_start + len(SPEECH_B)], SPEECH_B)
    assert not audio[b_start + len(SPEECH_B):].any()
    assert len(audio) == 33 * SPF


def test_frames_say_whose_speech_they_carry(two_segments):
    video = split(two_segments[0])[0]
    assert [v.segment for v in video] == [0] * 17 + [None] * 4 + [1] * 8 + [None] * 4
    assert [v.idle for v in video] == [v.segment is None for v in video]
    assert [v.block for v in video] == [0] * 9 + [1] * 12 + [2] * 12


def test_end_of_segment_acks_right_after_the_last_speech_frame(two_segments):
    events, _ = two_segments
    acks = [(i, e) for i, e in enumerate(events) if isinstance(e, PlaybackFinished)]
    assert [e for _, e in acks] == [PlaybackFinished(0, len(SPEECH_A) / SR, interrupted=False),
                                    PlaybackFinished(1, len(SPEECH_B) / SR, interrupted=False)]
    # the ack follows the audio of the frame holding the segment's last sample, before the padding
    assert [events[i - 1].index for i, _ in acks] == [16, 28]


# ---- idle ------------------------------------------------------------------------------------------
def test_idle_frames_flow_without_audio(engine, image):
    async def session_run():
        async with AvatarSession(engine, image, seed=2) as avatar:
            return await read_frames(avatar, 33)

    events = run(session_run())
    assert_interleaved(events)
    video, audio, acks = split(events)
    assert not acks and all(v.idle and v.segment is None for v in video)
    assert not np.concatenate([a.pcm for a in audio]).any()
    for v, expected in zip(video, offline(engine, image, 2, [("idle", 3)]), strict=True):
        np.testing.assert_array_equal(v.rgb, expected)
    assert not [t for t in threading.enumerate() if t.name == "avatar-engine"]  # async with closed it


def test_speech_after_idle_starts_at_the_next_block(engine, image):
    speech = pcm(0.5, seed=6)

    async def session_run():
        async with AvatarSession(engine, image, seed=3) as avatar:
            idle = await read_frames(avatar, 9)         # idle block 0; nothing else was asked for yet
            await push_in_pieces(avatar, speech)
            avatar.end_of_segment()
            return idle, await read_frames(avatar, 12)

    idle, talk = run(session_run())
    assert_interleaved(idle + talk)
    assert all(v.idle for v in split(idle)[0])
    first = split(talk)[0][0]
    assert (first.index, first.block, first.idle, first.segment) == (9, 1, False, 0)
    np.testing.assert_array_equal(split(talk)[1][0].pcm, speech[:SPF])   # no silence before the speech
    oracle = offline(engine, image, 3, [("idle", 1), ("interrupt", None),
                                        ("step", speech.astype(np.float32) / 32768), ("idle", 1)])
    for v, expected in zip(split(idle + talk)[0], oracle, strict=True):
        np.testing.assert_array_equal(v.rgb, expected)


# ---- barge-in ----------------------------------------------------------------------------------------
def test_clear_buffer_drops_queued_output_and_acks_interrupted(engine, image):
    speech = pcm(3.0, seed=7)

    async def session_run():
        async with AvatarSession(engine, image, seed=4, max_buffered_frames=12) as avatar:
            await avatar.push_audio(speech, SR)
            await wait_until_buffered(avatar, 12)       # the worker now waits for room after block 1
            before = await read_frames(avatar, 5)
            avatar.clear_buffer()
            after = [await anext(avatar)] + await read_frames(avatar, 12)
            return before, after

    before, after = run(session_run())
    assert after[0] == PlaybackFinished(0, 5 * SPF / SR, interrupted=True)
    assert_interleaved(before + after)                 # no gap in indices or pts across the barge-in
    video = split(after)[0]
    assert video[0].index == 5
    # Backpressure held the worker after blocks 0 and 1 (9 + 12 frames >= 12), so the barge-in dropped
    # the rest of block 0 and all of block 1; block 2 is idle, driven by silence after the truncation.
    assert all(v.idle and v.block == 2 for v in video)
    assert not np.concatenate([a.pcm for a in split(after)[1]]).any()
    speech_f = speech.astype(np.float32) / 32768
    oracle = offline(engine, image, 4, [("step", speech_f[:25000]), ("interrupt", None), ("idle", 1)])
    for v, expected in zip(video, oracle[21:], strict=True):
        np.testing.assert_array_equal(v.rgb, expected)


# ---- input checks ------------------------------------------------------------------------------------
BAD_PUSHES = [
    (b"\x00\x01\x02", SR, {}, "even length"),
    (np.zeros(800, np.float64), SR, {}, "float64"),
    (np.zeros((400, 2), np.int16), SR, {}, "channels=N"),
    (np.zeros(801, np.int16), SR, {"channels": 2}, "whole number of 2-channel"),
    (np.zeros(800, np.int16), SR, {"channels": 0}, "channels must be"),
    (np.full(800, np.nan, np.float32), SR, {}, "NaN"),
    (np.full(800, 1.5, np.float32), SR, {}, r"\[-1, 1\]"),
    (np.zeros(800, np.int16), 24000, {}, "resample=True"),
    (np.zeros(800, np.int16), 0, {}, "positive integer"),
    ([0] * 800, SR, {}, "bytes or a numpy array"),
]


def test_bad_input_raises_at_push_and_changes_nothing(engine, image):
    async def session_run():
        async with AvatarSession(engine, image, seed=1) as avatar:
            for chunk, rate, kwargs, pattern in BAD_PUSHES:
                with pytest.raises(AudioInputError, match=pattern):
                    await avatar.push_audio(chunk, rate, **kwargs)
            await avatar.push_audio(b"", SR)              # empty: no-op, opens no segment
            await avatar.push_audio(np.zeros(0, np.float32), SR)
            avatar.end_of_segment()                      # nothing open: no ack
            return await read_frames(avatar, 9)

    video, _, acks = split(run(session_run()))
    assert not acks and all(v.idle for v in video)       # idle flows: no segment was opened


def test_stereo_is_downmixed_only_when_asked(engine, image):
    left, right = pcm(0.25, seed=8), pcm(0.25, seed=9)
    stereo = np.stack([left, right], axis=1).reshape(-1)

    async def session_run():
        async with AvatarSession(engine, image) as avatar:
            await avatar.push_audio(stereo.tobytes(), SR, channels=2)
            avatar.end_of_segment()
            return await read_frames(avatar, 9)

    audio = np.concatenate([a.pcm for a in split(run(session_run()))[1]])
    mono = (left.astype(np.float32) / 32768 + right.astype(np.float32) / 32768) / 2
    np.testing.assert_array_equal(audio[:len(left)], float_to_pcm16(mono.astype(np.float32)))


def test_other_rates_are_resampled_per_segment_when_asked(engine, image):
    audio24 = synth_speech_like(0.5, sample_rate=24000, seed=10).astype(np.float32)

    async def session_run():
        async with AvatarSession(engine, image, resample=True) as avatar:
            for i in range(0, len(audio24), 480):
                await avatar.push_audio(audio24[i:i + 480], 24000)
            with pytest.raises(AudioInputError, match="within a segment"):
                await avatar.push_audio(np.zeros(441, np.float32), 22050)
            avatar.end_of_segment()
            return await read_frames(avatar, 9)

    events = run(session_run())
    stream = Resampler(24000, SR)
    expected = np.concatenate([stream(audio24[i:i + 480]) for i in range(0, len(audio24), 480)] + [stream.flush()])
    audio = np.concatenate([a.pcm for a in split(events)[1]])
    np.testing.assert_array_equal(audio[:len(expected)], float_to_pcm16(expected))
    assert split(events)[2] == [PlaybackFinished(0, len(expected) / SR, interrupted=False)]


# ---- failures and shutdown ----------------------------------------------------------------------------
def test_worker_error_reaches_the_consumer_and_the_next_push(engine, image):
    def block_1_fails(name, body):
        if name != "decode/later1":  # blocks 1, 3, ... decode from the slot's input 1
            return body

        def decode():
            raise RuntimeError("CUDA out of memory (simulated)")
        return decode

    undos = [wrap_decodes(engine, slot, block_1_fails) for slot in range(engine.max_sessions)]

    async def session_run():
        async with AvatarSession(engine, image) as avatar:
            await avatar.push_audio(pcm(2.0, seed=11), SR)
            with pytest.raises(AvatarSessionError, match=r"Engine\.\w+ \(block 1\).*out of memory") as raised:
                async for _ in avatar:
                    pass
            assert isinstance(raised.value.__cause__, RuntimeError)
            with pytest.raises(AvatarSessionError, match="out of memory"):
                await avatar.push_audio(np.zeros(320, np.int16), SR)

    try:
        run(session_run())
    finally:
        for undo in undos:
            undo()


def test_backpressure_bounds_output_and_aclose_drops_pending_work(engine, image):
    calls = []

    class CountingSession:               # a real session, with its block count recorded
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def step(self, *args, **kwargs):
            blocks = self.session.step(*args, **kwargs)
            calls.extend(b.index for b in blocks)
            return blocks

        def drain(self):
            blocks = self.session.drain()
            calls.extend(b.index for b in blocks)
            return blocks

    class CountingEngine:                 # the real engine, whose sessions count
        config = engine.config

        def open(self, *args, **kwargs):
            return CountingSession(engine.open(*args, **kwargs))

    async def session_run():
        avatar = await AvatarSession(CountingEngine(), image, max_buffered_frames=12).start()
        await avatar.push_audio(pcm(5.0, seed=12), SR)      # enough for 6 blocks
        await wait_until_buffered(avatar, 12)
        await asyncio.sleep(0.3)                             # room for a worker that ignored the bound
        held = avatar.buffered_frames
        await avatar.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(avatar)
        with pytest.raises(RuntimeError, match="closed"):
            await avatar.push_audio(np.zeros(320, np.int16), SR)
        return held

    assert run(session_run()) == 9 + 12   # blocks 0 and 1, then the worker waited for room
    assert calls == [0, 1]                # aclose dropped the queued audio instead of generating it
    assert not [t for t in threading.enumerate() if t.name == "avatar-engine"]


def test_bad_reference_image_raises_at_start(engine):
    async def session_run():
        with pytest.raises(TypeError, match="uint8"):
            await AvatarSession(engine, np.zeros((8, 8, 3), np.float32)).start()

    run(session_run())
    assert not [t for t in threading.enumerate() if t.name == "avatar-engine"]


# ---- pacing (injected clock: nothing sleeps for real) ---------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.sleeps = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def pace(clock: FakeClock, pacer: Pacer, frames, stalls=None) -> list[float]:
    """Wall-clock times at which `frames` (indices) go out; stalls[i] = generation delay before frame i."""
    out = []

    async def go():
        for i in frames:
            clock.now += (stalls or {}).get(i, 0.0)
            await pacer.wait(i / FPS)
            out.append(clock.now)

    asyncio.run(go())
    return out


def test_pacer_holds_frames_to_their_pts():
    clock = FakeClock()
    times = pace(clock, Pacer(clock=clock, sleep=clock.sleep), range(5))
    np.testing.assert_allclose(np.diff(times), 1 / FPS)
    assert clock.sleeps == pytest.approx([1 / FPS] * 4)


def test_pacer_catches_up_a_short_stall_without_reset():
    clock = FakeClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    times = pace(clock, pacer, range(10), stalls={5: 0.2})
    start = times[0]
    # frames 5..7 are late by less than 300 ms: out at once; frame 8 is back on the original schedule
    assert times[5] == times[6] == times[7] == pytest.approx(start + 4 / FPS + 0.2)
    assert times[8] == pytest.approx(start + 8 / FPS)
    assert pacer.resets == 0


def test_pacer_resets_the_schedule_after_a_long_stall():
    clock = FakeClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    times = pace(clock, pacer, range(8), stalls={4: 1.0})
    assert times[4] == pytest.approx(times[3] + 1.0)                 # out as soon as it exists
    np.testing.assert_allclose(np.diff(times[4:]), 1 / FPS)          # then real spacing, no burst
    assert pacer.resets == 1


def test_paced_session_yields_frames_on_the_injected_clock(engine, image):
    clock = FakeClock()

    async def session_run():
        async with AvatarSession(engine, image, pace=True, clock=clock, sleep=clock.sleep) as avatar:
            return await read_frames(avatar, 12)

    events = run(session_run())
    assert_interleaved(events)
    # generation takes no time on the fake clock, so each frame after the first waits exactly 1 / fps
    assert clock.sleeps == pytest.approx([1 / FPS] * 11)


# ---- formats ---------------------------------------------------------------------------------------------
def test_i420_matches_bt601_and_pyav():
    import av

    # Linear ramps: swscale filters chroma with a wider kernel than the 2x2 mean, but on a linear
    # image every symmetric filter gives the same value; fixed-point rounding and the filter's clamped
    # image edges leave differences of up to 2 levels.
    y, x = np.mgrid[0:16, 0:12]
    rgb = np.stack([x * 20, y * 16, 255 - (x + y) * 9], axis=-1).astype(np.uint8)
    yuv = rgb_to_i420(rgb)
    assert yuv.shape == (24, 12) and yuv.dtype == np.uint8
    pyav = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()
    assert np.abs(yuv.astype(int) - pyav.astype(int)).max() <= 2
    grey = rgb_to_i420(np.full((2, 2, 3), 255, np.uint8)).reshape(-1)
    assert list(grey) == [235, 235, 235, 235, 128, 128]    # limited-range white, neutral chroma
    red = rgb_to_i420(np.tile(np.array([255, 0, 0], np.uint8), (2, 2, 1))).reshape(-1)
    assert list(red) == [81, 81, 81, 81, 90, 240]           # BT.601: 16 + 65.481, 128 - 37.797, 128 + 112
    with pytest.raises(ValueError, match="even"):
        rgb_to_i420(np.zeros((3, 4, 3), np.uint8))


def test_video_frame_offers_i420_and_pcm16_bytes(engine, image):
    async def session_run():
        async with AvatarSession(engine, image) as avatar:
            return await read_frames(avatar, 1)

    video, audio = run(session_run())
    assert video.to_i420().shape == (48, 32)
    assert audio.data == audio.pcm.astype("<i2").tobytes() and len(audio.data) == 2 * SPF
