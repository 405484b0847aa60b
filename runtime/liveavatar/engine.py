"""`LiveAvatarEngine`: audio chunks in, latent blocks out (family 2's step/flush face).

step(chunk, sample_rate) validates the chunk (nothing changes on bad input), appends it to a bounded
ring on the absolute sample timeline and returns every block whose audio window (audio_front.py) is
now complete: zero or more `LiveAvatarBlock`s. Block b covers video frames 12b .. 12b + 11 (25 fps)
of the audio timeline; its latents come from `LiveAvatarStream.generate_block`. A chunk larger than
the ring is taken in pieces, generating blocks in between, so memory stays bounded for any chunk.

With a decoder (runtime.models.streaming.StreamingDecoder over the Wan2.1 VAE, z 16: the one S2V
uses) every block is also decoded, causally with the decoder's carried cache: 1 + 2 * 4 = 9 frames
for the first block, 12 after, which is what upstream keeps too (it drops 3 of the first block's 12).
Upstream instead re-decodes [motion latents | block] from scratch per block and re-encodes the last
9 frames as the next motion latents; the carried cache is the streaming form of that context.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtime.audio.validate import check_chunk
from runtime.models.streaming import StreamingDecoder

from .audio_front import SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME, Wav2VecFrontEnd
from .stream import LiveAvatarStream


@dataclass
class LiveAvatarBlock:
    index: int               # block counter of this engine (0 = first block)
    latents: torch.Tensor    # [B, 16, 3, h, w] denoised
    audio_span: tuple[int, int]  # absolute samples of the block's own 12 video frames
    frames: torch.Tensor | None = None  # uint8 [B, N, H, W, 3] when a decoder is attached


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


class LiveAvatarEngine:
    def __init__(self, stream: LiveAvatarStream, front: Wav2VecFrontEnd, decoder: StreamingDecoder | None = None):
        if front.settings.block_video_frames != 4 * stream.cfg.block_frames:
            raise ValueError(f"front end makes blocks of {front.settings.block_video_frames} video frames, "
                             f"the stream takes {4 * stream.cfg.block_frames}")
        self.stream, self.front, self.decoder = stream, front, decoder
        hop = front.settings.block_video_frames * SAMPLES_PER_VIDEO_FRAME
        self.ring = SampleRing(front.window_samples + 2 * hop)  # one window + room to push into
        self.blocks = 0

    def reset(self) -> None:
        """A new stream on the same session: audio timeline, stream, decoder cache back to the start."""
        self.ring.buf.fill(0.0)
        self.ring.floor = self.ring.total = 0
        self.blocks = 0
        self.stream.reset()
        if self.decoder is not None:
            self.decoder.reset()

    def step(self, audio_chunk, sample_rate: int) -> list[LiveAvatarBlock]:
        x = check_chunk(audio_chunk, sample_rate, SAMPLE_RATE)  # raises before anything changes
        out, at = [], 0
        while at < len(x):
            take = min(self.ring.free, len(x) - at)
            self.ring.push(x[at:at + take])
            at += take
            out += self._ready_blocks()
        return out

    def flush(self) -> list[LiveAvatarBlock]:
        """Pad with silence until every video frame the pushed audio touches is in a block."""
        frames = -(-self.ring.total // SAMPLES_PER_VIDEO_FRAME)
        per_block = self.front.settings.block_video_frames
        target = -(-frames // per_block)
        out = []
        while self.blocks < target:
            need = self.front.planner.window(self.blocks).stop - self.ring.total
            out += self.step(np.zeros(max(need, 0), dtype=np.float32), SAMPLE_RATE)
        return out

    def _decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        if self.decoder is None:
            return None
        video = self.decoder.decode(latents.to(self.decoder.model.dtype))  # [B, 3, N, H, W] in [-1, 1]
        return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()

    def _ready_blocks(self) -> list[LiveAvatarBlock]:
        out = []
        while (w := self.front.planner.window(self.blocks)).stop <= self.ring.total:
            feats = self.front.features(w, self.ring.read(w.start, w.stop))
            latents = self.stream.generate_block(feats.to(self.stream.model.dtype))
            span = self.blocks * self.front.settings.block_video_frames * SAMPLES_PER_VIDEO_FRAME
            hop = self.front.settings.block_video_frames * SAMPLES_PER_VIDEO_FRAME
            out.append(LiveAvatarBlock(self.blocks, latents, (span, span + hop), self._decode(latents)))
            self.blocks += 1
            self.ring.release(self.front.planner.window(self.blocks).start)
        return out
