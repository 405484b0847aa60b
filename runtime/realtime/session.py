"""`AvatarSession`: the asyncio face of an Engine, for LiveKit / Pipecat / WebRTC integrations.

    async with AvatarSession(engine, face, pace=True) as avatar:
        await avatar.push_audio(pcm16_bytes, 16000)    # as audio arrives (validated here)
        avatar.end_of_segment()                       # the utterance is complete: flush its tail
        async for event in avatar:                    # VideoFrame, its AudioFrame, ..., PlaybackFinished
            ...

Threading: every engine call runs on one worker thread (runtime/realtime/worker.py), in the order the
calls were made; this object lives on the event loop and never blocks it.

Idle policy: while no segment is open (nothing pushed yet, or after end_of_segment / clear_buffer) and
the worker has nothing left to do, the session asks for one silence-driven block (Engine.idle) whenever
fewer than `idle_prefetch_frames` frames are waiting, and always when the consumer is waiting on an
empty buffer; so the stream never freezes. While a segment is open the session waits for its audio
(idle blocks would put silence into the middle of the utterance), but only for `stall_timeout` seconds
after the last push: a TTS that stalls longer gets idle blocks as above, prefetch included (its queued
speech comes out first, padded with silence), and its next audio starts at the next block boundary, as
speech after idle does.
Speech that arrives during idle starts at the next block boundary: idle blocks already generated are
yielded first.

Playback: a frame's speech counts as played when its AudioFrame is yielded. A barge-in between a
VideoFrame and its AudioFrame turns that AudioFrame into silence (speech_samples 0): no stale speech
is yielded after clear_buffer(), and the interrupted position excludes it.

Backpressure: the worker stops generating while `max_buffered_frames` frames are unyielded, so memory
is bounded by max_buffered_frames + one block of frames. Pushed audio is queued without a bound (it is
small: 64 KB per second at 16 kHz); a producer far ahead of real time should pace itself.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from .audio_input import check_rate, decode_pcm
from .buffer import FrameItem, OutputBuffer, SegmentEnd
from .convert import float_to_pcm16
from .driver import EngineDriver
from .events import AudioFrame, PlaybackFinished, VideoFrame
from .pacing import Pacer
from .playback import PlaybackLedger
from .worker import Command, EngineWorker

if TYPE_CHECKING:
    from typing_extensions import Self

Event = VideoFrame | AudioFrame | PlaybackFinished
log = logging.getLogger(__name__)


class AvatarSession:
    def __init__(self, engine, reference_image, *, seed: int = 0, prompt: str | None = None,
                 prompt_embeds=None, resample: bool = False, pace: bool = False,
                 max_buffered_frames: int | None = None, idle_prefetch_frames: int | None = None,
                 max_lag: float = 0.3, stall_timeout: float | None = None, on_block=None,
                 clock=time.monotonic, sleep=asyncio.sleep):
        """`engine` is used by this session alone until aclose() (it is not thread-safe).

        resample: accept other input rates (soxr, one stream per segment); otherwise they are an error.
        pace: yield each frame at its pts on the wall clock (`Pacer`, `max_lag`, injectable `clock` and
          `sleep`); False yields as fast as frames exist (tests, offline rendering).
        max_buffered_frames: backpressure bound (default two blocks).
        idle_prefetch_frames: frames to keep generated ahead while idle (default one block when pacing,
          0 otherwise: then an idle block is generated only when the consumer waits for one).
        stall_timeout: seconds without a push, while a segment is open and the consumer waits on an
          empty buffer, after which idle blocks fill the gap (default 0.25 s when pacing: a real-time TTS
          pushes every 20-40 ms; None otherwise: then an open segment always waits for its audio).
        on_block: called as on_block(VideoBlock, seconds) on the worker thread for each block, with the
          wall time of the engine call(s) that produced it (metrics); it must not block.
        """
        cfg = engine.config
        block = cfg.video_frames_in_block(1)
        self.fps, self.sample_rate = cfg.fps, cfg.audio.sample_rate
        self.size = (cfg.height, cfg.width)     # of the video frames
        self.block_frames = block               # frames per block after the first
        self.samples_per_frame = cfg.samples_per_video_frame
        self.max_buffered_frames = 2 * block if max_buffered_frames is None else max_buffered_frames
        if self.max_buffered_frames < 1:
            raise ValueError(f"max_buffered_frames must be >= 1, got {max_buffered_frames}")
        self.idle_prefetch_frames = (block if pace else 0) if idle_prefetch_frames is None else idle_prefetch_frames
        if self.idle_prefetch_frames < 0:
            raise ValueError(f"idle_prefetch_frames must be >= 0, got {idle_prefetch_frames}")
        self.stall_timeout = (0.25 if pace else None) if stall_timeout is None else stall_timeout
        if self.stall_timeout is not None and self.stall_timeout < 0:
            raise ValueError(f"stall_timeout must be >= 0 seconds, got {stall_timeout}")
        self.resample = resample
        self._on_block = on_block
        self._clock = clock
        self._last_push = clock()
        self._logged_rate = self.sample_rate
        self._engine = engine
        self._reset_args = (reference_image, seed, prompt, prompt_embeds)
        self._pacer = Pacer(max_lag, clock, sleep) if pace else None
        self._worker: EngineWorker | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._pending = 0                       # commands submitted and not yet finished by the worker
        self._segment: int | None = None        # the open speech segment
        self._segment_rate: int | None = None
        self._next_segment = 0
        self._playback = PlaybackLedger(self.sample_rate)
        self._acks: deque[PlaybackFinished] = deque()
        self._owed_audio: AudioFrame | None = None   # yielded right after its VideoFrame
        self._next_index = 0

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> Self:
        """Start the worker and reset the engine on it; a bad reference image or prompt raises here."""
        if self._worker is not None:
            raise RuntimeError("this AvatarSession was already started")
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._buffer = OutputBuffer(self.max_buffered_frames, on_put=partial(_soon, loop, self._changed.set))
        self._driver = EngineDriver(self._engine, self._buffer, self._on_block)
        self._worker = EngineWorker(self._driver, on_done=partial(_soon, loop, self._command_done),
                                    on_error=partial(_soon, loop, self._fail))
        self._worker.start()
        done = self._submit(self._driver.reset, *self._reset_args)
        try:
            await asyncio.wrap_future(done)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        """Stop the worker: queued audio is not generated any more, the engine call under way (one block
        at most) finishes, and the iterator ends. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._worker is None:
            return
        self._buffer.close()          # also wakes a worker waiting for room
        self._worker.stop()
        self._changed.set()
        await asyncio.to_thread(self._worker.join)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ---- input ----------------------------------------------------------------------------------
    async def push_audio(self, pcm, sample_rate: int, *, channels: int = 1) -> None:
        """Queue speech: PCM16 bytes or a 1-D int16 / float32 array (interleaved if channels > 1).

        Raises at once on bad input (AudioInputError, a ValueError naming the problem); an empty chunk
        does nothing. The first non-empty push after an end of segment opens a new segment.
        """
        self._check_usable()
        check_rate(sample_rate, self.sample_rate, self.resample, self._segment_rate)
        samples = decode_pcm(pcm, sample_rate, channels)
        if not len(samples):
            return
        if self._segment is None:
            self._open_segment(int(sample_rate))
        self._last_push = self._clock()
        self._submit(self._driver.push, samples, int(sample_rate), self._segment, self._buffer.epoch)

    def end_of_segment(self) -> None:
        """LiveKit's AudioSegmentEnd: pad the segment's last block with silence so its tail comes out now,
        then acknowledge it with PlaybackFinished(interrupted=False). No-op when no segment is open."""
        self._check_usable()
        if self._segment is None:
            return
        self._submit(self._driver.end_segment, self._segment, self._buffer.epoch)
        self._segment, self._segment_rate = None, None

    def clear_buffer(self) -> None:
        """Barge-in: drop queued audio (Engine.interrupt) and every generated frame not yet yielded.

        Each unacknowledged segment is acknowledged at once, interrupted, at the position yielded so far.
        The video timeline goes on without a gap (indices and pts stay consecutive)."""
        self._check_usable()
        self._buffer.clear()
        if self._owed_audio is not None:   # its frame is out; its speech never will be
            owed = self._owed_audio
            self._owed_audio = AudioFrame(owed.index, owed.pts, np.zeros_like(owed.pcm), owed.sample_rate)
        self._acks.extend(self._playback.interrupt_all())
        self._segment, self._segment_rate = None, None
        self._submit(self._driver.interrupt)
        self._changed.set()

    # ---- output ---------------------------------------------------------------------------------
    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if self._worker is None:
            raise RuntimeError("start the session first (await session.start() or `async with`)")
        while True:
            if self._error is not None:
                raise self._error
            if self._owed_audio is not None:
                audio, self._owed_audio = self._owed_audio, None
                self._playback.played(audio.segment, audio.speech_samples)
                return audio
            if self._acks:
                return self._acks.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._changed.clear()   # before pop: a put after the pop sets it again, so no wake-up is lost
            item = self._buffer.pop()
            if item is None:
                self._request_idle(consumer_waiting=True)
                await self._wait_for_change()
                continue
            self._request_idle(consumer_waiting=False)
            event = await self._event_for(item)
            if event is not None:
                return event

    @property
    def buffered_frames(self) -> int:
        """Generated frames not yet yielded (bounded by max_buffered_frames + one block)."""
        return self._buffer.frames if self._worker is not None else 0

    async def _event_for(self, item: FrameItem | SegmentEnd) -> Event | None:
        if isinstance(item, SegmentEnd):
            return self._playback.finished(item.segment)
        pts = self._next_index / self.fps
        if self._pacer is not None:
            await self._pacer.wait(pts)
            if not self._buffer.is_current(item.epoch):
                return None  # a barge-in or close came while this frame waited for its time
        index, self._next_index = self._next_index, self._next_index + 1
        self._owed_audio = AudioFrame(index, pts, float_to_pcm16(item.audio), self.sample_rate,
                                      item.speech_samples, item.segment)
        return VideoFrame(index, pts, item.rgb, idle=item.speech_samples == 0, segment=item.segment,
                          block=item.block)

    # ---- internals ------------------------------------------------------------------------------
    def _request_idle(self, consumer_waiting: bool) -> None:
        """Ask for a silence-driven block when nothing else will produce frames (see module doc)."""
        if self._pending or self._error is not None or self._closed:
            return
        if self._segment is not None and self._stall_left() != 0:
            return   # the segment's audio is still coming: idle blocks would cut into the utterance
        if consumer_waiting or self._buffer.frames < self.idle_prefetch_frames:
            self._submit(self._driver.idle, self._buffer.epoch)

    def _stall_left(self) -> float | None:
        """Seconds until an open segment counts as stalled; None when it never does."""
        if self.stall_timeout is None:
            return None
        return max(0.0, self._last_push + self.stall_timeout - self._clock())

    async def _wait_for_change(self) -> None:
        """Wait for the worker; while a segment is open, no longer than until it counts as stalled."""
        left = self._stall_left() if self._segment is not None and not self._pending else None
        if left is None:
            await self._changed.wait()
            return
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=left)
        except TimeoutError:
            pass

    def _open_segment(self, rate: int) -> None:
        if rate != self._logged_rate:
            how = "resampled with soxr" if rate != self.sample_rate else "no longer resampled"
            log.info("audio arrives at %d Hz, the engine runs at %d Hz: %s", rate, self.sample_rate, how)
            self._logged_rate = rate
        self._segment, self._segment_rate = self._next_segment, rate
        self._next_segment += 1
        self._playback.open(self._segment)

    def _submit(self, fn, *args):
        command = Command(partial(fn, *args))
        self._pending += 1
        self._worker.submit(command)
        return command.done

    def _command_done(self) -> None:
        self._pending -= 1
        self._changed.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._changed.set()

    def _check_usable(self) -> None:
        if self._worker is None:
            raise RuntimeError("start the session first (await session.start() or `async with`)")
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError("this AvatarSession is closed")


def _soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Run fn on the loop from the worker thread; a loop already closed has no one left to tell."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass
