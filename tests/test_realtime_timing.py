"""Adapter-core fixes of issue 12: idle frames after a TTS stall, no stale speech after a clear, the
20 ms rechunker and the 90 kHz video clock (micro preset on CPU, no pacing)."""
import asyncio
import logging

import numpy as np
import pytest

from runtime.realtime import AudioFrame, AvatarSession, PlaybackFinished, VideoFrame
from runtime.realtime.timebase import AudioRechunker, video_pts

from . import test_realtime as realtime

engine, image = realtime.engine, realtime.image     # the same module-scoped fixtures
pcm, run = realtime.pcm, realtime.run

SR, SPF = 16000, 1000
pytestmark = pytest.mark.wallclock  # real-time pacing (pyproject: markers)


def test_a_stalled_segment_gets_idle_frames_equal_to_the_engine(engine, image):
    """0.3 s of speech (less than block 0 needs), then nothing: after stall_timeout the speech comes out
    padded with silence, then idle blocks; the segment stays open and is acked at its end."""
    speech = pcm(0.3, seed=1)

    async def session_run():
        async with AvatarSession(engine, image, seed=2, stall_timeout=0.05) as avatar:
            await avatar.push_audio(speech, SR)
            events = [await anext(avatar) for _ in range(2 * 21)]    # blocks 0 and 1
            avatar.end_of_segment()
            events.append(await anext(avatar))
            return events

    events = run(session_run())
    video = [e for e in events if isinstance(e, VideoFrame)]
    assert [v.idle for v in video] == [False] * 5 + [True] * 16     # 0.3 s = 4.8 frames of speech
    assert events[-1] == PlaybackFinished(0, len(speech) / SR, interrupted=False)
    with engine.open(image, seed=2) as stream:
        blocks = stream.step(speech.astype(np.float32) / 32768) + stream.idle(2)
    oracle = [f for b in blocks for f in b.frames]
    for v, expected in zip(video, oracle, strict=True):
        np.testing.assert_array_equal(v.rgb, expected)


def test_without_stall_timeout_an_open_segment_waits_for_its_audio(engine, image):
    async def session_run():
        async with AvatarSession(engine, image) as avatar:
            await avatar.push_audio(pcm(0.3, seed=1), SR)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(avatar), 1.0)

    run(session_run())


def test_clear_between_a_frame_and_its_audio_yields_silence_not_stale_speech(engine, image):
    speech = pcm(1.0, seed=3)

    async def session_run():
        async with AvatarSession(engine, image, seed=1) as avatar:
            await avatar.push_audio(speech, SR)
            first_video = await anext(avatar)
            avatar.clear_buffer()
            return first_video, await anext(avatar), await anext(avatar)

    video, audio, ack = run(session_run())
    assert isinstance(video, VideoFrame) and not video.idle
    assert isinstance(audio, AudioFrame) and audio.index == video.index
    assert audio.speech_samples == 0 and not audio.pcm.any() and len(audio.pcm) == SPF
    assert ack == PlaybackFinished(0, 0.0, interrupted=True)        # nothing of it was heard


def test_audio_frames_say_how_much_is_speech(engine, image):
    speech = pcm(1500 / SR, seed=4)   # 1.5 frames

    async def session_run():
        async with AvatarSession(engine, image) as avatar:
            await avatar.push_audio(speech, SR)
            avatar.end_of_segment()
            audio = []
            while len(audio) < 9:
                event = await anext(avatar)
                audio += [event] if isinstance(event, AudioFrame) else []
            return audio

    audio = run(session_run())
    assert [a.speech_samples for a in audio] == [1000, 500] + [0] * 7
    np.testing.assert_array_equal(np.concatenate([a.speech_pcm for a in audio]), speech)


def test_a_new_input_rate_is_logged(engine, image, caplog):
    async def session_run():
        async with AvatarSession(engine, image, resample=True) as avatar:
            await avatar.push_audio(np.zeros(480, np.int16), 24000)

    with caplog.at_level(logging.INFO, logger="runtime.realtime.session"):
        run(session_run())
    assert "24000 Hz" in caplog.text and "resampled" in caplog.text


def test_rechunker_cuts_exact_20ms_frames_and_keeps_the_clock_across_a_clear():
    chunker = AudioRechunker(16000)
    out = chunker.push(np.arange(1000, dtype=np.int16)) + chunker.push(np.arange(1000, 2000, dtype=np.int16))
    assert [pts for pts, _ in out] == [0, 320, 640, 960, 1280, 1600]
    np.testing.assert_array_equal(np.concatenate([f for _, f in out]), np.arange(1920))
    chunker.push(np.full(100, 7, np.int16))
    chunker.clear()
    (pts, frame), = chunker.push(np.full(200, 9, np.int16))
    assert pts == 1920 and not frame[:180].any() and (frame[180:] == 9).all()
    with pytest.raises(ValueError, match="whole number"):
        AudioRechunker(11025, frame_ms=20)
    with pytest.raises(ValueError, match="int16"):
        chunker.push(np.zeros(10, np.float32))


def test_video_pts_on_the_90khz_clock():
    assert [video_pts(i, 16) for i in range(3)] == [0, 5625, 11250]
    assert video_pts(25, 25) == 90000
    with pytest.raises(ValueError, match="drift"):
        video_pts(1, 7)
