"""WebRTC with aiortc: the avatar as an audio and a video MediaStreamTrack, and a peer's microphone
track as its input.

    tracks = AvatarTracks(avatar)                 # a started AvatarSession, pace=True for live use
    pc.addTrack(tracks.audio); pc.addTrack(tracks.video)
    pump = asyncio.create_task(tracks.run())       # moves the session's frames into the tracks
    feed = asyncio.create_task(feed_track(peer_audio_track, avatar))

Timing: video frames carry pts on the 90 kHz RTP clock (index * 90000 / fps, exact for 16 and 25 fps);
audio goes out as 20 ms frames (aiortc's Opus encoder takes 20 ms and loses most of longer frames),
pts counted in samples, both from the session's own timeline, so the peer sees them in sync. The
tracks' queues are bounded: a peer that stops reading holds the session back (its backpressure)
instead of growing memory.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np

from ..realtime import AudioFrame, AvatarSession, PlaybackFinished, VideoFrame
from ..realtime.timebase import VIDEO_CLOCK_RATE, AudioRechunker, video_pts


def _aiortc():
    try:
        import aiortc
    except ImportError as exc:
        raise ImportError("runtime.integrations.webrtc needs aiortc: pip install -e '.[webrtc]'") from exc
    return aiortc


def _queue_track_class():
    aiortc = _aiortc()

    class QueueTrack(aiortc.MediaStreamTrack):
        """A track whose frames are put into a bounded queue; `recv` waits for the next one."""

        def __init__(self, kind: str, maxsize: int):
            super().__init__()
            self.kind = kind
            self.queue: asyncio.Queue = asyncio.Queue(maxsize)

        async def recv(self):
            if self.readyState != "live":
                raise aiortc.mediastreams.MediaStreamError
            frame = await self.queue.get()
            if frame is None:
                self.stop()
                raise aiortc.mediastreams.MediaStreamError
            return frame

    return QueueTrack


class AvatarTracks:
    def __init__(self, session: AvatarSession, *, frame_ms: int = 20, queued_frames: int = 8,
                 on_playback: Callable[[PlaybackFinished], None] | None = None):
        track = _queue_track_class()
        self.session = session
        self.video = track("video", queued_frames)
        self.audio = track("audio", queued_frames * max(1, 1000 // (session.fps * frame_ms)) + 4)
        self._chunker = AudioRechunker(session.sample_rate, frame_ms)
        self._video_base = Fraction(1, VIDEO_CLOCK_RATE)
        self._audio_base = Fraction(1, session.sample_rate)
        self._on_playback = on_playback

    async def run(self) -> None:
        """Move the session's events into the tracks until it ends; then end the tracks."""
        try:
            async for event in self.session:
                if isinstance(event, VideoFrame):
                    await self.video.queue.put(self._video_frame(event))
                elif isinstance(event, AudioFrame):
                    for frame in self._audio_frames(event.pcm):
                        await self.audio.queue.put(frame)
                elif self._on_playback is not None:
                    self._on_playback(event)
        finally:
            for track in (self.video, self.audio):
                if track.queue.full():
                    track.queue.get_nowait()
                track.queue.put_nowait(None)

    def clear(self) -> None:
        """Barge-in on the session, and the 20 ms part-frame held back is silenced too."""
        self.session.clear_buffer()
        self._chunker.clear()

    def _video_frame(self, event: VideoFrame) -> av.VideoFrame:
        frame = av.VideoFrame.from_ndarray(event.rgb, format="rgb24")
        frame.pts, frame.time_base = video_pts(event.index, self.session.fps), self._video_base
        return frame

    def _audio_frames(self, pcm: np.ndarray) -> list[av.AudioFrame]:
        frames = []
        for pts, chunk in self._chunker.push(pcm):
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = self.session.sample_rate, pts, self._audio_base
            frames.append(frame)
        return frames


async def feed_track(track, session: AvatarSession) -> None:
    """Push a peer's audio track (e.g. 48 kHz stereo Opus, decoded by aiortc) into the session until the
    track ends. The session must accept its rate (resample=True; the session logs the rate)."""
    mediastreams = _aiortc().mediastreams
    while True:
        try:
            frame = await track.recv()
        except mediastreams.MediaStreamError:
            return
        channels = len(frame.layout.channels)
        pcm = frame.to_ndarray()
        if pcm.dtype != np.int16:
            raise ValueError(f"expected s16 audio from the peer track, got {frame.format.name}")
        await session.push_audio(pcm.reshape(-1), frame.sample_rate, channels=channels)
