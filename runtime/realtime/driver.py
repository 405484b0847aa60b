"""Engine calls and audio-timeline bookkeeping for one session. Runs on the worker thread only.

Timeline rules (why the calls are what they are):
- Audio is fed in pieces that each complete at most one block, with a wait for room in the output
  buffer before each: one engine call never produces more than one block, so backpressure holds.
- Closing a segment (`end_segment`) or idling (`idle`) runs `Engine.idle` blocks until every pushed
  sample is inside a generated block; the engine then holds only silence (the last block's lookahead)
  past the next block boundary: `padding_queued`.
- New speech first drops that padding (`Engine.interrupt`), so it starts exactly at the next block
  boundary instead of after a lookahead's worth of silence.

The stream: an engine with `open()` (many sessions, contract A) gets a session of its own here, closed
with the worker; an engine without it is the stream itself (`reset`). Every call that can complete a
block is followed by `drain()`, so blocks come out in the call that completed them (the engine may
pipeline them; sessions of other threads still share its rounds).
"""
from __future__ import annotations

import time

import numpy as np

from ..audio import Resampler
from ..engine import last_block_to_flush, samples_to_run
from .buffer import FrameItem, OutputBuffer, SegmentEnd
from .spans import SpeechSpans


class EngineDriver:
    def __init__(self, engine, buffer: OutputBuffer, on_block=None):
        self.engine, self.buffer, self.cfg = engine, buffer, engine.config
        self.on_block = on_block
        self.stream = None              # what step/idle/interrupt go to: a session, or the engine
        self.spf = self.cfg.samples_per_video_frame
        self.rate = self.cfg.audio.sample_rate
        self.stage = "not started"     # the engine call under way, for error messages
        self._clear_timeline()

    def _clear_timeline(self) -> None:
        self.next_block = 0
        self.total = 0                  # samples in the engine's stream: speech + added silence
        self.padding_queued = False
        self.spans = SpeechSpans()
        self._pending_ends: dict[int, int] = {}   # segment -> end sample, until its last frame exists
        self._resampler: Resampler | None = None
        self._resampled_segment: int | None = None

    @property
    def covered(self) -> int:
        """Samples already inside generated blocks."""
        return self.cfg.first_video_frame(self.next_block) * self.spf

    # ---- commands -------------------------------------------------------------------------------
    def reset(self, reference_image, seed: int, prompt, prompt_embeds) -> None:
        if hasattr(self.engine, "open"):
            self.stream = self._call("Engine.open", self.engine.open, reference_image, prompt=prompt,
                                     prompt_embeds=prompt_embeds, seed=seed)
        else:
            self._call("Engine.reset", self.engine.reset, reference_image, prompt_embeds, seed, prompt=prompt)
            self.stream = self.engine
        self._clear_timeline()

    def close(self) -> None:
        """Free the engine slot of an opened session (idempotent)."""
        if self.stream is not None and self.stream is not self.engine:
            self.stream.close()
        self.stream = None

    def push(self, samples: np.ndarray, rate: int, segment: int, epoch: int) -> None:
        """Validated float32 mono at `rate`; resampled here when the session allows it."""
        samples = self._to_engine_rate(samples, rate, segment)
        pos = 0
        while pos < len(samples):
            if not self.buffer.wait_for_room(epoch):
                return  # barge-in or close: the rest never reaches the engine
            if self.padding_queued:
                self.total -= self._call("Engine.interrupt", self.stream.interrupt)
                self.padding_queued = False
            n = min(len(samples) - pos, samples_to_run(self.cfg, self.next_block) - self.total)
            self.spans.add(segment, self.total, n)
            self.total += n
            self._emit(self._blocks("Engine.step", self.stream.step, samples[pos:pos + n], self.rate), epoch)
            pos += n

    def end_segment(self, segment: int, epoch: int) -> None:
        tail = self._flush_resampler(segment)
        if len(tail):
            self.push(tail, self.rate, segment, epoch)
        end = self.spans.end_of(segment)
        if end is None or end <= self.covered:  # no speech, or its last frame is already out
            self.buffer.put([SegmentEnd(epoch, segment)], epoch)
            return
        self._pending_ends[segment] = end
        self._pad_out(epoch, at_least_one=False)

    def idle(self, epoch: int) -> None:
        self._pad_out(epoch, at_least_one=True)

    def interrupt(self) -> None:
        """Barge-in: the engine drops audio not yet in a block; so does the bookkeeping."""
        self.total -= self._call("Engine.interrupt", self.stream.interrupt)
        self.spans.truncate(self.total)
        self._pending_ends.clear()
        self.padding_queued = False
        self._resampler = None

    # ---- helpers --------------------------------------------------------------------------------
    def _pad_out(self, epoch: int, at_least_one: bool) -> None:
        """Silence-driven blocks until every pushed sample is in a block (at least one if asked)."""
        last = last_block_to_flush(self.cfg, self.next_block, self.total)
        count = last - self.next_block + 1 if last is not None else int(at_least_one)
        for _ in range(count):
            if not self.buffer.wait_for_room(epoch):
                return
            self._emit(self._blocks("Engine.idle", self.stream.idle, 1), epoch)
            self.total = max(self.total, samples_to_run(self.cfg, self.next_block - 1))
            self.padding_queued = True

    def _emit(self, blocks, epoch: int) -> None:
        for block in blocks:
            self.next_block = block.index + 1
            self.buffer.put(self._items(block, epoch), epoch)
        self.spans.release_before(self.covered)

    def _items(self, block, epoch: int) -> list[FrameItem | SegmentEnd]:
        items: list[FrameItem | SegmentEnd] = []
        spf = self.spf
        for i in range(block.num_frames):
            start = (block.first_frame + i) * spf
            segment, speech = self.spans.speech_in(start, start + spf)
            items.append(FrameItem(epoch, block.index, block.frames[i], block.audio[i * spf:(i + 1) * spf],
                                   segment, speech))
            items += [SegmentEnd(epoch, s) for s in self._ends_within(start, start + spf)]
        return items

    def _ends_within(self, start: int, stop: int) -> list[int]:
        done = [s for s, end in self._pending_ends.items() if start < end <= stop]
        for s in done:
            del self._pending_ends[s]
        return done

    def _to_engine_rate(self, samples: np.ndarray, rate: int, segment: int) -> np.ndarray:
        if rate == self.rate:
            return samples
        if self._resampler is None or self._resampled_segment != segment:
            # One stream per segment: its delay line holds only this segment's audio.
            self._resampler, self._resampled_segment = Resampler(rate, self.rate), segment
        return self._call("Resampler", self._resampler, samples)

    def _flush_resampler(self, segment: int) -> np.ndarray:
        if self._resampler is None or self._resampled_segment != segment:
            return np.zeros(0, np.float32)
        tail, self._resampler = self._resampler.flush(), None
        return tail

    def _blocks(self, stage: str, fn, *args) -> list:
        """A call that may complete a block, then `drain()`: an engine that pipelines blocks (contract A)
        returns a block at a later call, and this timeline needs each block out before the next call."""
        started = time.perf_counter()
        blocks = self._call(stage, fn, *args)
        drain = getattr(self.stream, "drain", None)
        blocks = blocks + self._call("Engine.drain", drain) if drain is not None else blocks
        if blocks and self.on_block is not None:
            seconds = time.perf_counter() - started
            for block in blocks:
                self.on_block(block, seconds)
        return blocks

    def _call(self, stage: str, fn, *args, **kwargs):
        self.stage = stage
        return fn(*args, **kwargs)
