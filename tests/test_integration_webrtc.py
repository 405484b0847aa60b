"""An aiortc loopback call with `avatar serve`'s /offer endpoint: a client peer sends speech as its
microphone track (Opus, so the server gets 48 kHz stereo and resamples it) and receives the avatar's
video (VP8) and audio (Opus, sent as 20 ms frames). Checked: frames and audio arrive, the avatar's
audio carries the speech, and audio and video arrive in sync (skew within 40 ms).

Real time (the server paces at 16 fps): ~6 s.
"""
import asyncio
import fractions
import time

import numpy as np
import pytest

aiortc = pytest.importorskip("aiortc", reason="needs aiortc: pip install -e '.[webrtc]' (in the test extra: "
                             "bash scripts/setup.sh)")
import av
from aiohttp import ClientSession

from runtime import Engine
from runtime.media import synth_speech_like
from runtime.server.app import AvatarServer

from .server_client import running

SR = 16000
pytestmark = pytest.mark.wallclock  # a real-time call (pyproject: markers)


class SpeechTrack(aiortc.MediaStreamTrack):
    """A microphone: `speech` then silence, in real-time 20 ms frames."""

    kind = "audio"

    def __init__(self, speech: np.ndarray):
        super().__init__()
        self.speech, self.sent, self.start = speech, 0, None

    async def recv(self):
        n = SR // 50
        if self.start is None:
            self.start = time.monotonic()
        await asyncio.sleep(max(0.0, self.start + self.sent / SR - time.monotonic()))
        chunk = np.zeros(n, np.int16)
        part = self.speech[self.sent:self.sent + n]
        chunk[:len(part)] = part
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SR, self.sent, fractions.Fraction(1, SR)
        self.sent += n
        return frame


async def collect(track, out: list, seconds: float):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            frame = await asyncio.wait_for(track.recv(), max(0.01, end - time.monotonic()))
        except (TimeoutError, aiortc.mediastreams.MediaStreamError):
            return
        out.append((time.monotonic(), float(frame.pts * frame.time_base), frame))


def test_loopback_call_receives_synced_audio_and_video():
    engine = Engine.from_pretrained("micro", device="cpu")
    face = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    speech = np.round(synth_speech_like(1.5, sample_rate=SR, seed=6) * 32767).astype(np.int16)

    async def call():
        video, audio = [], []
        async with running(AvatarServer(engine, face)) as url, ClientSession() as http:
            pc = aiortc.RTCPeerConnection()
            pc.addTrack(SpeechTrack(speech))
            pc.addTransceiver("video", direction="recvonly")
            received = {}
            pc.on("track", lambda track: received.__setitem__(track.kind, track))
            await pc.setLocalDescription(await pc.createOffer())
            reply = await http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
            answer = await reply.json()
            await pc.setRemoteDescription(aiortc.RTCSessionDescription(answer["sdp"], answer["type"]))
            while len(received) < 2:
                await asyncio.sleep(0.01)
            await asyncio.gather(collect(received["video"], video, 5.0), collect(received["audio"], audio, 5.0))
            await pc.close()
        return video, audio

    video, audio = asyncio.run(asyncio.wait_for(call(), 60))
    assert len(video) >= 3 * 16                                          # ~16 fps for most of 5 s
    assert all(f.to_ndarray(format="rgb24").any() for _, _, f in video[-5:])
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for _, _, f in audio]).astype(np.float32) / 32768
    assert len(audio) >= 100 and np.abs(pcm).max() > 0.05                 # the avatar's audio is the speech
    # Offsets arrival - pts: the receiver starts both clocks at 0 at their first frames, which are the
    # session's frame 0 and sample 0; the first second is skipped (jitter buffers filling).
    v_off = np.median([t - pts for t, pts, _ in video if pts > 1.0])
    a_off = np.median([t - pts for t, pts, _ in audio if pts > 1.0])
    assert abs(v_off - a_off) < 0.040
