"""LiveKit Agents: the avatar as a `VideoGenerator` for livekit-agents' `AvatarRunner`.

In the agent's process (as the local-mode avatar plugins do):

    avatar = await start_in_process(agent_session, ctx.room, engine, face)   # before agent_session.start
    ...
    await avatar.aclose()

As a remote avatar worker (one per room; the agent uses DataStreamAudioOutput to send it audio):

    await run_avatar_worker(ctx.room, engine, face)

Playback semantics, as LiveKit defines them: the runner counts every AudioFrame it is given as played
and reports `playback_started` at the first one of an utterance. So the generator yields audio only for
the pushed speech (`AudioFrame.speech_pcm`): idle frames go out as video alone and the silence padding
an utterance's last block carries is cut off. `playback_started` then comes when the utterance's speech
starts, once per utterance, and `playback_finished` reports the speech actually yielded (interrupted on
a barge-in, which drops every frame not yet yielded and all owed speech).

Input rates: TTS audio at any rate is accepted (resampled with soxr; the session logs each new rate).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ..realtime import AudioFrame, AvatarSession, PlaybackFinished, VideoFrame

log = logging.getLogger(__name__)


def _livekit():
    try:
        from livekit import rtc
        from livekit.agents.voice import avatar
    except ImportError as exc:
        raise ImportError("runtime.integrations.livekit needs livekit-agents: pip install -e '.[livekit]'") from exc
    return rtc, avatar


def avatar_options(session: AvatarSession):
    """The AvatarOptions an AvatarRunner needs for this session's video and audio."""
    _, lk = _livekit()
    height, width = session.size
    return lk.AvatarOptions(video_width=width, video_height=height, video_fps=session.fps,
                            audio_sample_rate=session.sample_rate, audio_channels=1)


class AvatarVideoGenerator:
    """livekit-agents `VideoGenerator` over a started `AvatarSession` (see the module doc)."""

    def __init__(self, session: AvatarSession):
        self.session = session
        self._rtc, lk = _livekit()
        self._segment_end = lk.AudioSegmentEnd

    async def push_audio(self, frame) -> None:
        if isinstance(frame, self._segment_end):
            self.session.end_of_segment()
            return
        await self.session.push_audio(bytes(frame.data), frame.sample_rate, channels=frame.num_channels)

    def clear_buffer(self) -> None:
        self.session.clear_buffer()

    def __aiter__(self) -> AsyncIterator:
        return self._frames()

    async def _frames(self):
        rtc = self._rtc
        async for event in self.session:
            if isinstance(event, VideoFrame):
                yield rtc.VideoFrame(event.width, event.height, rtc.VideoBufferType.RGB24, event.rgb.tobytes())
            elif isinstance(event, AudioFrame):
                if event.speech_samples:
                    speech = event.speech_pcm
                    yield rtc.AudioFrame(speech.astype("<i2").tobytes(), event.sample_rate, 1, len(speech))
            elif isinstance(event, PlaybackFinished) and not event.interrupted:
                yield self._segment_end()   # interrupted ones the runner reports itself on clear


def livekit_session(engine, reference_image, **options) -> AvatarSession:
    """An AvatarSession set up for AvatarRunner: the runner's synchronizer paces the video (its queue's
    backpressure), any TTS rate is resampled, and a TTS stall of 0.25 s gets idle frames."""
    defaults = {"resample": True, "pace": False, "stall_timeout": 0.25,
                "idle_prefetch_frames": engine.config.video_frames_in_block(1)}
    return AvatarSession(engine, reference_image, **{**defaults, **options})


class LiveKitAvatar:
    """A started AvatarRunner with its session; `aclose()` stops both."""

    def __init__(self, runner, session: AvatarSession, generator: AvatarVideoGenerator):
        self.runner, self.session, self.generator = runner, session, generator

    async def aclose(self) -> None:
        await self.runner.aclose()
        await self.session.aclose()


async def start_runner(room, audio_receiver, engine, reference_image, **options) -> LiveKitAvatar:
    """Start an AvatarRunner that reads `audio_receiver` and publishes the avatar into `room`."""
    _, lk = _livekit()
    session = await livekit_session(engine, reference_image, **options).start()
    generator = AvatarVideoGenerator(session)
    runner = lk.AvatarRunner(room, audio_recv=audio_receiver, video_gen=generator, options=avatar_options(session))
    try:
        await runner.start()
    except BaseException:
        await session.aclose()
        raise
    return LiveKitAvatar(runner, session, generator)


async def start_in_process(agent_session, room, engine, reference_image, **options) -> LiveKitAvatar:
    """Plugin-style local mode: the agent's audio output becomes a QueueAudioOutput read by an
    AvatarRunner in this process. Call before `agent_session.start()`."""
    _, lk = _livekit()
    queue = lk.QueueAudioOutput(sample_rate=None)
    agent_session.output.audio = queue
    return await start_runner(room, queue, engine, reference_image, **options)


async def run_avatar_worker(room, engine, reference_image, *, sender_identity: str | None = None,
                            **options) -> None:
    """Remote avatar worker: receive the agent's audio over LiveKit data streams in `room` and publish
    the avatar there until the runner ends. One worker (and one engine session) per room."""
    _, lk = _livekit()
    receiver = lk.DataStreamAudioReceiver(room, sender_identity=sender_identity)
    avatar = await start_runner(room, receiver, engine, reference_image, **options)
    try:
        await avatar.runner.wait_for_complete()
    finally:
        await avatar.aclose()
