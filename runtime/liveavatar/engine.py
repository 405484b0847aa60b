"""`LiveAvatarEngine`: audio chunks in, video blocks out (family 2's face, shaped like family 1's `Engine`).

    eng = LiveAvatarEngine.random("tiny")        # or .from_pretrained(trunk, lora, vae, wav2vec)
    eng.reset(reference_image, seed=0)
    for chunk in audio_chunks:
        for block in eng.step(chunk, 16000):      # zero or more LiveAvatarBlocks per call
            show(block.frames)
    tail = eng.flush()                            # pads with silence, ends the stream

step(chunk, sample_rate) validates the chunk (nothing changes on bad input), appends it to a bounded
ring on the absolute sample timeline and returns every block whose audio window (audio_front.py) is
now complete. Block b is driven by video frames 12b .. 12b + 11 (25 fps) of the audio timeline; its
latents come from `LiveAvatarStream.generate_block`. A chunk larger than the ring is taken in pieces,
generating blocks in between, so memory stays bounded for any chunk.

With a decoder (runtime.models.streaming.StreamingDecoder over the Wan2.1 VAE, z 16: the one S2V
uses) every block is also decoded, causally with the decoder's carried cache: 1 + 2 * 4 = 9 frames
for the first block, 12 after (upstream drops the first 3 of its first 12 and with them 120 ms of
audio). Here no input audio is lost: block 0 starts with 3 lead frames, the VAE decode of the
reference latent held still (the 120 ms before the first latent frame, driven by audio 0..1919 that
no latent frame shows), then its 9 decoded frames (driving frames 3..11). So block b is output
frames 12b .. 12b + 11 and carries exactly the 12 * 640 samples that drove them: lips in sync, and
the output audio is the input audio. `flush()` trims its last block's frames and audio to the input
rounded up to whole frames (the silence padding past it is dropped): N input samples give
ceil(N / 640) frames and as many samples rounded up to 640.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from runtime.audio.validate import Resampler, check_chunk
from runtime.engine import frames_uint8
from runtime.models.streaming import StreamingDecoder

from .audio_front import SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME, VIDEO_FPS, Wav2VecFrontEnd
from .reference import encode_reference, prompt_tensor, reference_pixels
from .stream import LiveAvatarStream, StreamSettings


@dataclass
class LiveAvatarBlock:
    index: int               # block counter of this engine (0 = first block)
    latents: torch.Tensor    # [B, 16, 3, h, w] denoised
    audio_span: tuple[int, int]  # absolute samples of the 12 video frames that drove the block
    frames: np.ndarray | None = None  # uint8 [N, H, W, 3] host copy (as family 1's VideoBlock) when decoding
    first_frame: int = 0     # output frame index of its first frame
    pts: float = 0.0         # time of its first frame, seconds
    audio: np.ndarray | None = None  # float32 16 kHz mono samples its N frames cover
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class BlockPlace(NamedTuple):
    span: tuple[int, int]     # absolute samples of the video frames that drive the block = that its frames cover
    first_frame: int          # output frame index of its first frame
    pts: float                # time of its first frame, seconds


def trim_to_input(block: LiveAvatarBlock, total_samples: int) -> LiveAvatarBlock:
    """The block cut to the frames that cover the first `total_samples` input samples (rounded up to a
    whole frame): what `flush()` does to its last block so no silence padding leaves the engine."""
    keep = -(-total_samples // SAMPLES_PER_VIDEO_FRAME) - block.first_frame
    if keep >= len(block.audio) // SAMPLES_PER_VIDEO_FRAME:
        return block
    if keep < 1:
        raise ValueError(f"block {block.index} starts at frame {block.first_frame}, after the input's end")
    frames = None if block.frames is None else block.frames[:keep].copy()
    return dataclasses.replace(block, frames=frames, audio=block.audio[:keep * SAMPLES_PER_VIDEO_FRAME].copy())


def _samples(audio: np.ndarray, start: int, stop: int) -> np.ndarray:
    """audio[start:stop] as a new float32 array, zeros outside [0, len(audio)) (as SampleRing.read + padding)."""
    out = np.zeros(stop - start, dtype=np.float32)
    lo, hi = max(start, 0), min(stop, len(audio))
    if hi > lo:
        out[lo - start:hi - start] = audio[lo:hi]
    return out


class SampleRing:
    """Absolute samples [floor, total) in a fixed numpy buffer; before time 0 reads as zeros."""

    def __init__(self, capacity: int):
        self.buf = np.zeros(capacity, dtype=np.float32)
        self.floor = self.total = 0

    @property
    def free(self) -> int:
        return len(self.buf) - (self.total - self.floor)

    def push(self, x: np.ndarray) -> None:
        assert len(x) <= self.free
        at = (self.total + np.arange(len(x))) % len(self.buf)
        self.buf[at] = x
        self.total += len(x)

    def read(self, start: int, stop: int) -> np.ndarray:
        """A new array of samples [start, stop); stop <= total and start >= floor or < 0 (zeros)."""
        out = np.zeros(stop - start, dtype=np.float32)
        lo = max(start, 0)
        if lo < self.floor:
            raise RuntimeError(f"samples from {lo} were released (held from {self.floor})")
        out[lo - start:] = self.buf[np.arange(lo, stop) % len(self.buf)]
        return out

    def release(self, before: int) -> None:
        self.floor = max(self.floor, min(before, self.total))

    def truncate(self, total: int) -> int:
        """Forget samples from `total` on (never below floor); returns how many were dropped."""
        keep = max(self.floor, min(total, self.total))
        dropped, self.total = self.total - keep, keep
        return dropped

    def clear(self) -> None:
        self.buf.fill(0.0)
        self.floor = self.total = 0


class LiveAvatarEngine:
    fps = VIDEO_FPS
    sample_rate = SAMPLE_RATE
    # the clock of LiveAvatarBlock.timings: host stamps; benchmarks swap in one that syncs the device first
    stage_clock = staticmethod(time.perf_counter)

    def __init__(self, stream: LiveAvatarStream | None, front: Wav2VecFrontEnd,
                 decoder: StreamingDecoder | None = None, *, model=None, vae=None,
                 size: tuple[int, int] | None = None, settings: StreamSettings | None = None):
        """`stream`: a ready stream, or None for an engine whose sessions start at `reset(image)`.
        `model`: the trunk when there is no stream yet. `vae` (default: the decoder's) encodes reference
        images at `size` (H, W; default: the stream's latent size times the VAE's factor)."""
        self.model = stream.model if stream is not None else model
        if self.model is None:
            raise ValueError("give a stream or the model its sessions will run")
        if front.settings.block_video_frames != 4 * self.model.cfg.block_frames:
            raise ValueError(f"front end makes blocks of {front.settings.block_video_frames} video frames, "
                             f"the stream takes {4 * self.model.cfg.block_frames}")
        self.stream, self.front, self.decoder = stream, front, decoder
        self.vae = vae if vae is not None else (decoder.model if decoder is not None else None)
        self.size = size or self._size_of(stream)
        self.settings = stream.settings if stream is not None else (settings or StreamSettings())
        self.quantization = None  # a QuantizeReport when built with quantize=
        hop = front.settings.block_video_frames * SAMPLES_PER_VIDEO_FRAME
        self.ring = SampleRing(front.window_samples + 2 * hop)  # one window + room to push into
        self.blocks, self.flushed, self.resampler = 0, False, None

    def _size_of(self, stream: LiveAvatarStream | None) -> tuple[int, int] | None:
        if stream is None or self.vae is None:
            return None
        s = self.vae.config.spatial_factor
        return stream.latent_shape[3] * s, stream.latent_shape[4] * s

    # ---- construction (runtime/liveavatar/build.py) -----------------------------------------------
    @classmethod
    def random(cls, preset: str = "tiny", device=None, dtype=None, seed: int = 0, quantize: str | None = None,
               decoder: bool = True, device_init: bool = False) -> LiveAvatarEngine:
        """Random weights of a preset's shapes (tiny: tests and demos; liveavatar-14b: benchmarks).
        `device_init`: draw the trunk's weights on the device (random_weights.materialize_random), not
        on the host: what makes the 14B trunk buildable in seconds on one GPU."""
        from .build import random_parts
        return cls._of(random_parts(preset, device, dtype, seed, quantize, device_init), decoder)

    @classmethod
    def from_pretrained(cls, trunk_dir, lora_path, vae_path, wav2vec_dir, device=None, dtype=None,
                        quantize: str | None = None, preset: str = "liveavatar-14b") -> LiveAvatarEngine:
        """The release files: Wan2.2-S2V-14B shards, liveavatar.safetensors, Wan2.1_VAE.pth and a
        wav2vec2-large-xlsr-53-english Hugging Face directory. Strict; missing files are named first."""
        from .build import pretrained_from_paths
        return cls._of(pretrained_from_paths((trunk_dir, lora_path, vae_path, wav2vec_dir), device, dtype, quantize,
                                             preset), True)

    @classmethod
    def _of(cls, parts, decoder: bool) -> LiveAvatarEngine:
        engine = cls(None, parts.front, StreamingDecoder(parts.vae) if decoder else None, model=parts.model,
                     vae=parts.vae, size=(parts.height, parts.width))
        engine.quantization = parts.quantization
        return engine

    # ---- session --------------------------------------------------------------------------------
    def reset(self, reference_image=None, prompt_embeds=None, seed: int | None = None) -> None:
        """Start a new stream from a reference image (path or HxWx3 uint8), or, with no arguments,
        start the current stream again (same reference, prompt and seed).

        The image is resized to cover the preset's size and centre-cropped, VAE-encoded to the
        reference latent; the motion latents are that image repeated over 73 video frames and encoded,
        as upstream initialises them. `prompt_embeds` [L, text_dim] (umT5 output); None gives one all-zero
        row, as family 1. Everything is validated before any state changes."""
        if reference_image is None:
            if prompt_embeds is not None or seed is not None:
                raise ValueError("prompt_embeds and seed start a new stream: pass reference_image too")
            return self._restart()
        ref, motion, embeds, settings = self.session_inputs(reference_image, prompt_embeds, seed)
        self.stream = None  # free the old rings before the new ones are allocated (10 GB each at 14B)
        self.stream = LiveAvatarStream(self.model, ref, motion, embeds, settings)
        self.settings = settings
        self._restart()

    def session_inputs(self, reference_image, prompt_embeds=None, seed: int | None = None):
        """What `reset(reference_image, prompt_embeds, seed)` starts a stream from, without starting one:
        (ref_latent, motion_latents, prompt_embeds, settings) in the model's dtype (TPP ranks use it)."""
        if self.vae is None or self.size is None:
            raise RuntimeError("this engine has no VAE to encode a reference image (build it with a decoder "
                               "or vae=)")
        pixels = reference_pixels(reference_image, *self.size)
        embeds = prompt_tensor(prompt_embeds, self.model.cfg)
        settings = dataclasses.replace(self.settings, seed=0 if seed is None else seed)
        ref, motion = encode_reference(self.vae, pixels, self.model.cfg.motion_frames)
        dtype = self.model.dtype
        return ref.to(dtype), motion.to(dtype), embeds.to(ref.device, dtype), settings

    def _restart(self) -> None:
        self.ring.clear()
        self.blocks, self.flushed, self.resampler = 0, False, None
        if self.stream is not None:
            self.stream.reset()
        if self.decoder is not None:
            self.decoder.reset()

    def _require_stream(self) -> LiveAvatarStream:
        if self.stream is None:
            raise RuntimeError("call reset(reference_image) before step()")
        if self.flushed:
            raise RuntimeError("this stream was flushed; call reset() to start a new one")
        return self.stream

    # ---- streaming ------------------------------------------------------------------------------
    def step(self, audio_chunk, sample_rate: int, resample: bool = False) -> list[LiveAvatarBlock]:
        """Push mono audio (int16 or float32 in [-1, 1]); return every block that became ready.

        Another rate is an error unless `resample=True`: a streaming soxr resampler per stream
        (chunking-independent; one input rate per stream, until reset/end_segment/interrupt)."""
        self._require_stream()
        if not (resample and sample_rate != SAMPLE_RATE):
            return self._feed(check_chunk(audio_chunk, sample_rate, SAMPLE_RATE))  # raises before any change
        check_chunk(audio_chunk, sample_rate, sample_rate)  # validate before a resampler is made
        if self.resampler is not None and self.resampler.from_rate != sample_rate:
            raise ValueError(f"sample rate changed mid-stream ({self.resampler.from_rate} -> {sample_rate} Hz); "
                             "call reset() or end_segment() first")
        self.resampler = self.resampler or Resampler(sample_rate, SAMPLE_RATE)
        return self._feed(self.resampler(audio_chunk))

    def flush(self) -> list[LiveAvatarBlock]:
        """Pad with silence until every pushed sample is in a block, emit them, end the stream."""
        self._require_stream()
        out = self._flush_resampler()
        pushed = self.ring.total  # every input sample, the resampler's tail included
        out = [trim_to_input(b, pushed) for b in out + self._cover_pushed_audio()]
        self.flushed = True
        return out

    def end_segment(self) -> list[LiveAvatarBlock]:
        """End of an utterance (LiveKit's AudioSegmentEnd): like flush, but the stream goes on. The
        silence queued past the last block is dropped, so the next speech starts at a block boundary."""
        self._require_stream()
        blocks = self._cover_pushed_audio()
        self.ring.truncate(self._block_start(self.blocks))
        return blocks

    def interrupt(self) -> int:
        """Barge-in: drop audio pushed but not yet in a block; rings, reference and the video timeline
        stay (the avatar does not jump). Returns the number of samples dropped."""
        self._require_stream()
        self.resampler = None  # its buffered input belongs to the dropped audio
        return self.ring.truncate(self._block_start(self.blocks))

    def idle(self, blocks: int = 1) -> list[LiveAvatarBlock]:
        """`blocks` more blocks driven by silence (listening avatar), after any queued audio. The
        lookahead silence past the last one is dropped again, so speech pushed next starts at once."""
        self._require_stream()
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        pushed = self.ring.total
        out = self._pad_to(self.front.planner.window(self.blocks + blocks - 1).stop)
        self.ring.truncate(max(pushed, self._block_start(self.blocks)))
        return out

    @property
    def next_block(self) -> int:
        self._require_stream()
        return self.blocks

    @property
    def pending_samples(self) -> int:
        """Pushed samples (16 kHz) not yet inside a generated block."""
        self._require_stream()
        return max(0, self.ring.total - self._block_start(self.blocks))

    # ---- internals ------------------------------------------------------------------------------
    def blocks_covering(self, num_samples: int) -> int:
        """How many blocks `flush()` makes of a stream of `num_samples` pushed samples."""
        frames = -(-num_samples // SAMPLES_PER_VIDEO_FRAME)
        return -(-frames // self.front.settings.block_video_frames)

    def block_place(self, block: int) -> BlockPlace:
        """Where block `block` of a stream sits on the output timeline (pure arithmetic)."""
        first = block * self.front.settings.block_video_frames
        return BlockPlace((self._block_start(block), self._block_start(block + 1)), first, first / VIDEO_FPS)

    @property
    def lead_frames(self) -> int:
        """Frames of block 0 before its first decoded one: the causal decode makes 1 + 4 * (F - 1) of 4F."""
        return self.front.settings.block_video_frames - (1 + 4 * (self.model.cfg.block_frames - 1))

    def block_features(self, audio: np.ndarray, block: int) -> torch.Tensor:
        """The wav2vec2 features of block `block` of a stream whose whole audio is `audio` (16 kHz
        float32), as `step(audio)` then `flush()` computes them (zeros before 0 and past the end)."""
        w = self.front.planner.window(block)
        return self.front.features(w, _samples(audio, w.start, w.stop))

    def covered_audio(self, audio: np.ndarray, block: int) -> np.ndarray:
        """The samples block `block`'s frames cover (`LiveAvatarBlock.audio`), from the whole audio."""
        return _samples(audio, *self.block_place(block).span)

    def _block_start(self, block: int) -> int:
        """First sample of the audio that drives `block`."""
        return block * self.front.settings.block_video_frames * SAMPLES_PER_VIDEO_FRAME

    def _flush_resampler(self) -> list[LiveAvatarBlock]:
        out = self._feed(self.resampler.flush()) if self.resampler is not None else []
        self.resampler = None  # flushed: a later segment starts a fresh delay line
        return out

    def _cover_pushed_audio(self) -> list[LiveAvatarBlock]:
        out = self._flush_resampler()
        target = self.blocks_covering(self.ring.total)
        if target > self.blocks:
            out += self._pad_to(self.front.planner.window(target - 1).stop)
        return out

    def _pad_to(self, total: int) -> list[LiveAvatarBlock]:
        return self._feed(np.zeros(max(0, total - self.ring.total), dtype=np.float32))

    def _feed(self, x: np.ndarray) -> list[LiveAvatarBlock]:
        out, at = [], 0
        while at < len(x):
            take = min(self.ring.free, len(x) - at)
            self.ring.push(x[at:at + take])
            at += take
            out += self._ready_blocks()
        return out

    def _ready_blocks(self) -> list[LiveAvatarBlock]:
        out = []
        while (w := self.front.planner.window(self.blocks)).stop <= self.ring.total:
            out.append(self._run_block(w))
            self.blocks += 1
            self.ring.release(self.front.planner.window(self.blocks).start)
        return out

    def _run_block(self, w) -> LiveAvatarBlock:
        clock = self.stage_clock
        t0 = clock()
        feats = self.front.features(w, self.ring.read(w.start, w.stop))
        t1 = clock()
        latents = self.stream.generate_block(feats.to(self.model.dtype))
        t2 = clock()
        frames = self.decode_block(self.blocks, latents, self.stream.ref_latent)
        t3 = clock()
        p = self.block_place(self.blocks)
        return LiveAvatarBlock(self.blocks, latents, p.span, frames, first_frame=p.first_frame, pts=p.pts,
                               audio=self.ring.read(*p.span),
                               timings={"audio": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2, "total": t3 - t0})

    def decode_block(self, block: int, latents: torch.Tensor, ref_latent: torch.Tensor) -> np.ndarray | None:
        """uint8 frames of block `block` (streaming decode); block 0 gets the lead frames first."""
        if self.decoder is None:
            return None
        dtype = self.decoder.model.dtype
        frames = frames_uint8(self.decoder.decode(latents.to(dtype)))
        if block != 0:
            return frames
        with torch.no_grad():  # the session's reference as the VAE shows it: the look of the frames after it
            still = frames_uint8(self.decoder.model.decode_offline(ref_latent[:1].to(dtype)))
        return np.concatenate([np.repeat(still[:1], self.lead_frames, axis=0), frames])
