"""pipecat's own run_test pipeline around `runtime.integrations.pipecat.AvatarProcessor`: 24 kHz TTS
audio in, image + audio frames out, TTSStoppedFrame held until the utterance played, a barge-in drops
owed audio. pipecat-ai pins protobuf 6 (livekit-agents needs 7), so it has its own environment:
`bash scripts/integration_env.sh pipecat`.
"""
import asyncio

import numpy as np
import pytest

pipecat_frames = pytest.importorskip("pipecat.frames.frames",
                                     reason="needs pipecat-ai: bash scripts/integration_env.sh pipecat")
from pipecat.tests.utils import SleepFrame, run_test

from runtime import Engine
from runtime.audio import Resampler
from runtime.integrations.pipecat import AvatarProcessor
from runtime.media import synth_speech_like

F = pipecat_frames
TTS_RATE = 24000


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("micro", device="cpu")


def tts_frames(seconds: float, seed: int):
    pcm = np.round(synth_speech_like(seconds, sample_rate=TTS_RATE, seed=seed) * 32767).astype(np.int16)
    piece = TTS_RATE // 50
    return pcm, [F.TTSAudioRawFrame(audio=pcm[i:i + piece].tobytes(), sample_rate=TTS_RATE, num_channels=1)
                 for i in range(0, len(pcm), piece)]


def run(processor, frames):
    down, _ = asyncio.run(asyncio.wait_for(run_test(processor, frames_to_send=frames, start_timeout=30), 120))
    return down


def test_tts_audio_becomes_images_and_audio_with_the_stop_held(engine):
    face = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pcm, audio = tts_frames(0.75, seed=1)
    down = run(AvatarProcessor(engine, face, pace=False, idle_prefetch_frames=0),
               [F.TTSStartedFrame(), *audio, F.TTSStoppedFrame(), SleepFrame(sleep=4.0)])
    images = [f for f in down if isinstance(f, F.OutputImageRawFrame)]
    sounds = [f for f in down if isinstance(f, F.OutputAudioRawFrame)]
    assert images and len(images) == len(sounds)
    assert all(f.size == (32, 32) and f.format == "RGB" and len(f.image) == 32 * 32 * 3 for f in images)
    assert np.diff([f.pts for f in images]).tolist() == [62_500_000] * (len(images) - 1)   # 1/16 s in ns
    speech = [f for f in sounds if isinstance(f, F.TTSAudioRawFrame)]
    stream = Resampler(TTS_RATE, 16000)
    expected = np.concatenate([stream(pcm.astype(np.float32) / 32768), stream.flush()])
    got = np.concatenate([np.frombuffer(f.audio, np.int16) for f in speech]).astype(np.float32) / 32768
    assert abs(len(got) - len(expected)) < 1000 and np.abs(got[:len(expected)] - expected[:len(got)]).max() < 1e-3
    # the TTSStoppedFrame comes right after the last speech audio frame, not when it was sent
    stop = next(i for i, f in enumerate(down) if isinstance(f, F.TTSStoppedFrame))
    last_speech = max(i for i, f in enumerate(down) if isinstance(f, F.TTSAudioRawFrame))
    assert stop == last_speech + 1
    # idle audio is plain (non-speech) output audio, silent
    idle = [f for f in sounds if not isinstance(f, F.TTSAudioRawFrame)]
    assert idle and not any(np.frombuffer(f.audio, np.int16).any() for f in idle)


def test_interruption_drops_owed_audio(engine):
    face = np.zeros((32, 32, 3), np.uint8)
    _, audio = tts_frames(3.0, seed=2)
    down = run(AvatarProcessor(engine, face, pace=False, idle_prefetch_frames=0, max_buffered_frames=12),
               [F.TTSStartedFrame(), *audio, SleepFrame(sleep=1.0), F.InterruptionFrame(), SleepFrame(sleep=2.0)])
    cut = next(i for i, f in enumerate(down) if isinstance(f, F.InterruptionFrame))
    speech = [f for f in down if isinstance(f, F.TTSAudioRawFrame)]
    assert len(speech) < 3.0 * 16                                       # not all of the 3 s
    assert not any(isinstance(f, F.TTSAudioRawFrame) for f in down[cut + 2:])  # nothing owed after it
