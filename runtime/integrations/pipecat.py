"""Pipecat: the avatar as a FrameProcessor between a TTS service and the output transport.

    pipeline = Pipeline([..., tts, AvatarProcessor(engine, face), transport.output()])

In: TTSAudioRawFrame (PCM16 at any rate: resampled, the session logs it); TTSStartedFrame /
TTSStoppedFrame bracket an utterance. Out, in order: per video frame an OutputImageRawFrame (RGB, size
(w, h), pts in ns) and its audio: TTSAudioRawFrame for speech, OutputAudioRawFrame (silence) for idle
frames. A TTSStoppedFrame is held until the utterance's last frame has gone out (playback finished),
so downstream sees it when the speech really ends. InterruptionFrame: barge-in; owed audio and unsent
frames are dropped, held TTSStoppedFrames go out at once. Other frames pass through.
"""
from __future__ import annotations

import asyncio
from collections import deque

from ..realtime import AudioFrame, AvatarSession, PlaybackFinished, VideoFrame


def _pipecat():
    try:
        from pipecat.frames import frames
        from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    except ImportError as exc:
        raise ImportError("runtime.integrations.pipecat needs pipecat-ai: bash scripts/integration_env.sh pipecat "
                          "(or pip install -e '.[pipecat]')") from exc
    return frames, FrameDirection, FrameProcessor


def AvatarProcessor(engine, reference_image, **session_options):
    """A pipecat FrameProcessor driving an AvatarSession (pace=True and resample=True by default)."""
    frames, direction, base = _pipecat()
    return _processor_class(frames, direction, base)(engine, reference_image, **session_options)


def _processor_class(frames, FrameDirection, FrameProcessor):
    class _AvatarProcessor(FrameProcessor):
        def __init__(self, engine, reference_image, **session_options):
            super().__init__()
            self._session_args = (engine, reference_image, {"pace": True, "resample": True, **session_options})
            self._session: AvatarSession | None = None
            self._output: asyncio.Task | None = None
            self._held: deque = deque()      # TTSStoppedFrames waiting for their playback to finish

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, frames.StartFrame):
                await self.push_frame(frame, direction)
                await self._start()
            elif isinstance(frame, frames.TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
                await self._session.push_audio(frame.audio, frame.sample_rate, channels=frame.num_channels)
            elif isinstance(frame, frames.TTSStoppedFrame):
                self._held.append(frame)
                self._session.end_of_segment()
            elif isinstance(frame, frames.InterruptionFrame):
                self._session.clear_buffer()
                await self.push_frame(frame, direction)
            elif isinstance(frame, (frames.EndFrame, frames.CancelFrame)):
                await self._stop()
                await self.push_frame(frame, direction)
            else:
                await self.push_frame(frame, direction)

        async def _start(self) -> None:
            engine, image, options = self._session_args
            self._session = await AvatarSession(engine, image, **options).start()
            self._output = asyncio.create_task(self._forward())

        async def _stop(self) -> None:
            if self._session is not None:
                await self._session.aclose()
            if self._output is not None:
                await self._output
            while self._held:
                await self.push_frame(self._held.popleft())

        async def _forward(self) -> None:
            session = self._session
            async for event in session:
                if isinstance(event, VideoFrame):
                    image = frames.OutputImageRawFrame(image=event.rgb.tobytes(), size=(event.width, event.height),
                                                       format="RGB")
                    image.pts = round(event.pts * 1e9)
                    await self.push_frame(image)
                elif isinstance(event, AudioFrame):
                    kind = frames.TTSAudioRawFrame if event.speech_samples else frames.OutputAudioRawFrame
                    audio = kind(audio=event.data, sample_rate=event.sample_rate, num_channels=1)
                    audio.pts = round(event.pts * 1e9)
                    await self.push_frame(audio)
                elif isinstance(event, PlaybackFinished) and self._held:
                    await self.push_frame(self._held.popleft())

    return _AvatarProcessor
