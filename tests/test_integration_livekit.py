"""The real livekit-agents AvatarRunner (its AVSynchronizer, AudioSource, VideoSource and
QueueAudioOutput) driving `runtime.integrations.livekit` over four utterances: a 24 kHz TTS, a 2 s TTS
stall, a barge-in, and one more utterance. Only the Room is a stub (nothing leaves the process).

Runs in real time (the runner's synchronizer paces video at the engine's fps): ~10 s on 2 cores.
"""
import asyncio
import itertools

import numpy as np
import pytest

from runtime import Engine
from runtime.media import synth_speech_like

rtc = pytest.importorskip("livekit.rtc", reason="needs livekit-agents: pip install -e '.[livekit]' "
                          "(in the test extra: bash scripts/setup.sh)")
lk_avatar = pytest.importorskip("livekit.agents.voice.avatar")
from runtime.integrations import livekit as lk

pytestmark = pytest.mark.wallclock  # real-time pacing and LiveKit's own timers (pyproject: markers)

TTS_RATE = 24000       # a common TTS rate: resampled to the engine's 16 kHz
SR, FPS = 16000, 16
FRAME = 1 / FPS


class StubPublication:
    async def wait_for_subscription(self):
        return None


class StubParticipant:
    def __init__(self):
        self.tracks = []

    async def publish_track(self, track, options):
        self.tracks.append(track)
        return StubPublication()


class StubRoom:
    """What AvatarRunner uses of rtc.Room: connected, events, a local participant that publishes."""

    def __init__(self):
        self.local_participant = StubParticipant()

    def isconnected(self):
        return True

    def on(self, *_):
        return None

    def off(self, *_):
        return None


class Recorder:
    """Every frame the runner hands to the real audio and video sources, with its arrival time."""

    def __init__(self, runner):
        self.audio, self.video = [], []   # (time, samples) and (time, rgb)
        loop = asyncio.get_running_loop()
        audio_capture = runner._audio_source.capture_frame
        video_capture = runner._video_source.capture_frame

        async def capture_audio(frame):
            self.audio.append((loop.time(), np.frombuffer(frame.data, np.int16).copy()))
            await audio_capture(frame)

        def capture_video(frame):
            self.video.append((loop.time(), np.frombuffer(frame.data, np.uint8).copy()))
            video_capture(frame)

        runner._audio_source.capture_frame = capture_audio
        runner._video_source.capture_frame = capture_video


def tts(seconds: float, seed: int) -> np.ndarray:
    return np.round(synth_speech_like(seconds, sample_rate=TTS_RATE, seed=seed) * 32767).astype(np.int16)


async def say(queue, pcm: np.ndarray, stall_at: float | None = None, stall: float = 0.0):
    """20 ms frames as a TTS delivers them, faster than real time, with an optional stall."""
    piece = TTS_RATE // 50
    for i in range(0, len(pcm), piece):
        if stall_at is not None and i == int(stall_at * TTS_RATE) // piece * piece:
            await asyncio.sleep(stall)
        chunk = pcm[i:i + piece]
        await queue.capture_frame(rtc.AudioFrame(chunk.tobytes(), TTS_RATE, 1, len(chunk)))


@pytest.fixture(scope="module")
def conversation():
    engine = Engine.from_pretrained("micro", device="cpu")
    face = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    utterances = [tts(0.75, 1), tts(1.0, 2), tts(2.0, 3), tts(0.5, 4)]

    async def talk():
        queue = lk_avatar.QueueAudioOutput(sample_rate=None, wait_playback_start=True)
        started, finished, marks = [], [], {}
        queue.on("playback_started", lambda ev: started.append(asyncio.get_running_loop().time()))
        queue.on("playback_finished", lambda ev: finished.append(ev))
        avatar = await lk.start_runner(StubRoom(), queue, engine, face, seed=3)
        rec = Recorder(avatar.runner)

        async def until_finished(n):
            while len(finished) < n:
                await asyncio.sleep(0.02)

        await say(queue, utterances[0])
        queue.flush()
        await until_finished(1)
        marks["stall_start"] = asyncio.get_running_loop().time() + 0.0
        await say(queue, utterances[1], stall_at=0.5, stall=2.0)
        marks["stall_end"] = asyncio.get_running_loop().time()
        queue.flush()
        await until_finished(2)
        await say(queue, utterances[2])
        queue.flush()
        while len(started) < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        marks["clear"] = asyncio.get_running_loop().time()
        queue.clear_buffer()
        await until_finished(3)
        await asyncio.sleep(0.5)
        marks["before_4"] = asyncio.get_running_loop().time()
        await say(queue, utterances[3])
        queue.flush()
        await until_finished(4)
        await avatar.aclose()
        return started, finished, marks, rec

    result = asyncio.run(asyncio.wait_for(talk(), 120))
    return (*result, [len(u) * SR / TTS_RATE / SR for u in utterances])


def played_per_utterance(started, rec) -> list[float]:
    """Seconds of audio the source received from each utterance's playback_started to the next one's."""
    bounds = [t - 0.05 for t in started] + [np.inf]
    return [sum(len(s) for t, s in rec.audio if lo <= t < hi) / SR for lo, hi in itertools.pairwise(bounds)]


def test_one_playback_started_per_utterance(conversation):
    started, finished, marks, *_ = conversation
    assert len(started) == 4 and len(finished) == 4
    assert started[1] > marks["stall_start"] and started[3] > marks["before_4"]   # when its speech starts


def test_positions_equal_the_played_speech(conversation):
    started, finished, _, rec, lengths = conversation
    assert [f.interrupted for f in finished] == [False, False, True, False]
    played = played_per_utterance(started, rec)
    for position, at_source in zip([f.playback_position for f in finished], played, strict=True):
        assert position == pytest.approx(at_source, abs=FRAME)
    for i in (0, 1, 3):   # complete utterances: all of their speech and nothing else
        assert finished[i].playback_position == pytest.approx(lengths[i], abs=FRAME)
    assert 0.3 < finished[2].playback_position < lengths[2] - 0.5   # the barge-in cut it short


def test_no_audio_after_a_clear(conversation):
    _, _, marks, rec, _ = conversation
    # 0.1 s: the frame under way when clear_buffer() came may still reach the source
    assert not [t for t, _ in rec.audio if marks["clear"] + 0.1 < t < marks["before_4"]]


def test_a_tts_stall_shows_idle_frames(conversation):
    """During the 2 s stall the video keeps flowing at the frame rate (idle frames), it never freezes
    for longer than LiveKit's 300 ms tolerance."""
    _, _, marks, rec, _ = conversation
    times = np.array([t for t, _ in rec.video])
    during = times[(times > marks["stall_start"]) & (times < marks["stall_end"])]
    assert len(during) >= 1.5 * FPS
    assert np.diff(during).max() < 0.3
