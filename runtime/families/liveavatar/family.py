"""Live Avatar on the engine core: the family plug-in (runtime/families/base.py's protocol).

    engine = Engine.from_pretrained("liveavatar-tiny")      # or "liveavatar-14b", or a release directory
    with engine.open(image, prompt_embeds=embeds, seed=0) as s:
        blocks = s.step(audio_16k) + s.flush()

What is family 2's (the core owns sessions, the audio timeline, rounds and flush/idle/interrupt):
- config, model, strict loader (build.py, loading.py), random weights of a preset;
- the sampler schedule and KV policy: one ring per denoising step with the rolling and adaptive
  sink (stream.py), no t=0 refresh;
- the audio front end: fixed wav2vec2 windows per block (audio_front.py), read from the core's ring;
- the reference/condition: the VAE-encoded image and its 73-frame motion latents (reference.py);
- the decoder: the streaming Wan2.1 VAE, block 0 opening with `lead_frames` frames of the reference
  (no input audio lost: every block is 12 frames and carries exactly their 12 * 640 samples).

Rows are batched: the sessions whose audio is ready run their next block together, one forward of
the trunk per denoising step over all their rows (each attends to its own prompt, condition and
rings), then each session's decode on the decode lane (`group=slot`: a failing decode fails its
session alone).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from runtime.audio import AudioStream
from runtime.config import AudioConfig
from runtime.core.blocks import VideoBlock, check_finite, frames_uint8_device
from runtime.core.rounds import Task
from runtime.families import register
from runtime.families.base import BATCH, Family, Row, SessionState, Timeline
from runtime.models.streaming import StreamingDecoder

from .audio_front import SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME, VIDEO_FPS
from .build import FamilyParts, pretrained_parts, random_parts, release_candidates
from .reference import encode_reference, prompt_tensor, reference_pixels
from .stream import BlockBatch, LiveAvatarStream, StreamSettings

REFERENCE_CACHE = 8  # reference images whose latents an engine keeps (see LiveAvatar._encoded_reference)
PRESET_OF = {"liveavatar-14b": "liveavatar-14b", "liveavatar-tiny": "tiny"}  # engine preset -> family preset


@dataclass
class AvatarState(SessionState):
    stream: LiveAvatarStream | None = None
    decoder: StreamingDecoder | None = None


@dataclass
class AvatarWork:
    """One block: the front end's features and the samples its frames cover, then latents and frames."""

    index: int
    features: torch.Tensor
    audio: np.ndarray
    latents: torch.Tensor | None = None
    frames: torch.Tensor | None = None  # uint8 [N, H, W, 3] on the device until finish_block
    timings: dict[str, float] = field(default_factory=dict)


@register
class LiveAvatar(Family):
    name = "liveavatar"
    presets = tuple(PRESET_OF)
    # the clock of the blocks' "denoise"/"decode" timings: host stamps; benchmarks swap in one that
    # synchronises the device first
    stage_clock = staticmethod(time.perf_counter)

    def __init__(self, parts: FamilyParts, settings: StreamSettings | None = None, max_sessions: int = 4):
        """`max_sessions`: sessions at once (each allocates its own per-step rings at open)."""
        self.max_sessions = max_sessions
        self.model, self.vae, self.front = parts.model, parts.vae, parts.front
        self.quantization = parts.quantization
        self._reference_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.size, self.settings = (parts.height, parts.width), settings or StreamSettings()
        blocks = self.front.settings.block_video_frames
        if blocks != 4 * self.model.cfg.block_frames:
            raise ValueError(f"front end makes blocks of {blocks} video frames, the trunk takes "
                             f"{4 * self.model.cfg.block_frames}")
        # trim_flush: no input audio is lost and none is added (block 0's lead frames cover its first 120 ms)
        self.timeline = Timeline(SAMPLE_RATE, VIDEO_FPS, parts.height, parts.width, first_block_frames=blocks,
                                 block_frames=blocks, lookahead_frames=self._lookahead_frames(), trim_flush=True)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def recognises(cls, root: Path) -> bool:
        """Any part of the release layout (loading.find_release): `build` then names what is missing."""
        return any(p.exists() for p in release_candidates(root))

    @classmethod
    def build(cls, path_or_preset: str, *, device=None, dtype=None, seed: int = 0, max_sessions: int = 4,
              backend: str = "auto", config: str = "liveavatar-14b", quantize: str | None = None,
              device_init: bool = False, settings: StreamSettings | None = None) -> LiveAvatar:
        """A preset: random weights (seeded; `device_init` draws the 14B trunk on the device). A
        directory: the release files (loading.find_release), of preset `config`'s shapes, loaded strictly.
        `backend`: attention ops; family 2 runs its eager PyTorch attention only (any value but "auto"
        or "torch" is refused). `settings`: the sink and seed defaults of every session."""
        if backend not in ("auto", "torch"):
            raise ValueError(f"Live Avatar runs the eager PyTorch attention only; backend={backend!r} is not "
                             "available for it (use 'auto')")
        if config not in PRESET_OF:
            raise ValueError(f"config must be one of {sorted(PRESET_OF)}, got {config!r}")
        if path_or_preset in PRESET_OF and not Path(path_or_preset).exists():
            parts = random_parts(PRESET_OF[path_or_preset], device, dtype, seed, quantize, device_init)
        else:
            parts = pretrained_parts(Path(path_or_preset), device, dtype, quantize, PRESET_OF[config])
        return cls(parts, settings, max_sessions)

    def _lookahead_frames(self) -> int:
        """Video frames past a block's last one its audio window reaches (the most over the pattern)."""
        planner, n = self.front.planner, self.front.settings.block_video_frames
        reach = max(planner.window(b).stop - (b + 1) * n * SAMPLES_PER_VIDEO_FRAME for b in range(30))
        return max(0, -(-reach // SAMPLES_PER_VIDEO_FRAME))

    @property
    def lead_frames(self) -> int:
        """Frames of block 0 before its first decoded one: the causal decode makes 1 + 4 * (F - 1) of 4F."""
        return self.front.settings.block_video_frames - (1 + 4 * (self.model.cfg.block_frames - 1))

    # ---- sessions -------------------------------------------------------------------------------
    def session_inputs(self, reference_image, prompt_embeds=None, seed: int = 0):
        """(ref_latent, motion_latents, prompt_embeds, settings) a stream starts from, in the model's
        dtype; validated before anything is encoded (TPP ranks use it too)."""
        pixels = reference_pixels(reference_image, *self.size)
        embeds = prompt_tensor(prompt_embeds, self.model.cfg)
        settings = dataclasses.replace(self.settings, seed=seed)
        ref, motion = self._encoded_reference(pixels)
        dtype = self.model.dtype
        return ref.to(dtype), motion.to(dtype), embeds.to(ref.device, dtype), settings

    def _encoded_reference(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_reference, remembered for the last REFERENCE_CACHE images: a server reopening the same
        avatar skips the VAE encode of 1 + 73 frames (most of an open's time). Keyed by the pixels'
        hash; the latents are small (19 latent frames) and read-only (the stream clones them)."""
        key = hashlib.sha256(pixels.tobytes()).hexdigest()
        cache = self._reference_cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        cache[key] = encode_reference(self.vae, pixels, self.model.cfg.motion_frames)
        while len(cache) > REFERENCE_CACHE:
            cache.popitem(last=False)
        return cache[key]

    def open_state(self, slot: int, reference_image, prompt: str | None = None, prompt_embeds=None,
                   seed: int = 0) -> AvatarState:
        if prompt is not None:
            raise ValueError("Live Avatar has no prompt text encoder here: pass umT5 embeddings as prompt_embeds "
                             "(e.g. from `avatar encode-prompt`)")
        ref, motion, embeds, settings = self.session_inputs(reference_image, prompt_embeds, seed)
        return AvatarState(audio=self._audio_ring(), stream=LiveAvatarStream(self.model, ref, motion, embeds, settings),
                           decoder=StreamingDecoder(self.vae))

    def _audio_ring(self) -> AudioStream:
        """The core's audio timeline ring, holding one front-end window + two blocks to push into."""
        n, spf = self.front.settings.block_video_frames, SAMPLES_PER_VIDEO_FRAME
        left = -(-(n * spf - self.front.planner.window(1).start) // spf)  # frames of past audio a window reads
        cfg = AudioConfig(sample_rate=SAMPLE_RATE, left_context_s=left / VIDEO_FPS,
                          lookahead_s=self.timeline.lookahead_frames / VIDEO_FPS)
        return AudioStream(cfg, VIDEO_FPS, None, "cpu", torch.float32, max_span_frames=n, max_chunk_samples=2 * n * spf)

    def close_state(self, state: AvatarState) -> None:
        state.stream = state.decoder = None  # the per-step rings are the big buffers (10 GB a step at 14B)

    # ---- blocks ---------------------------------------------------------------------------------
    def block_features(self, audio, block: int) -> torch.Tensor:
        """The front end on block `block`'s window of `audio`: a ring (AudioStream) or the whole
        16 kHz stream as an array (zeros before 0 and past the end), as a session computes them."""
        w = self.front.planner.window(block)
        return self.front.features(w, window_samples(audio, w.start, w.stop))

    def plan_block(self, state: AvatarState) -> AvatarWork:
        b, span = state.block, self.timeline.frames_in_block(state.block) * SAMPLES_PER_VIDEO_FRAME
        feats = self.block_features(state.audio, b)
        start = self.timeline.block_start(b)
        work = AvatarWork(b, feats.to(self.model.dtype), state.audio.samples(start, start + span))
        state.audio.drop_before(min(start + span, self.front.planner.window(b + 1).start))
        state.block += 1
        return work

    def round_tasks(self, rows: list[Row], batch: int) -> list[Task]:
        """The round's blocks as one batch (stream.BlockBatch): audio tokens and noise, one batched
        forward per denoising step, the sink update (group BATCH: a fault there fails every session
        of the round), then each session's streaming decode (its own group). Family 2 captures no
        graphs, so the batch is exactly the round's rows: `batch` (the padded size) is not used."""
        blocks = BlockBatch([r.state.stream for r in rows], [r.work.features for r in rows])
        first = min(r.work.index for r in rows)
        stages = [("audio", blocks.begin)] + [(f"step{i}", partial(blocks.step, i)) for i in range(blocks.num_steps)]
        stages.append(("sink", partial(self._end_denoise, rows, blocks)))
        tasks = []
        for name, fn in stages:
            tasks.append(Task(name, "compute", fn=self._timed(rows, "denoise", fn), group=BATCH, block=first,
                              deps=(len(tasks) - 1,) if tasks else ()))
        last = len(tasks) - 1
        for row in rows:
            tasks.append(Task("decode", "decode", fn=lambda r=row: self._decode(r), deps=(last,), group=row.slot,
                              block=row.work.index))
        return tasks

    def _timed(self, rows: list[Row], key: str, fn):
        """fn, its time added to every row's `key` timing (the rows share the batched stage)."""
        def run():
            t0 = self.stage_clock()
            fn()
            took = self.stage_clock() - t0  # once: the benchmark clock synchronises the device
            for row in rows:
                row.work.timings[key] = row.work.timings.get(key, 0.0) + took
        return run

    @staticmethod
    def _end_denoise(rows: list[Row], blocks: BlockBatch) -> None:
        for row, latents in zip(rows, blocks.end()):
            row.work.latents = latents

    def _decode(self, row: Row) -> None:
        t0 = self.stage_clock()
        row.work.frames = self.decode_block_device(row.state.decoder, row.work.index, row.work.latents,
                                            row.state.stream.ref_latent)
        row.work.timings["decode"] = self.stage_clock() - t0

    def decode_block(self, decoder: StreamingDecoder, block: int, latents: torch.Tensor,
                     ref_latent: torch.Tensor) -> np.ndarray:
        """uint8 frames of block `block` (streaming decode) as a host copy; block 0 opens with the lead frames."""
        return self.decode_block_device(decoder, block, latents, ref_latent).cpu().numpy()

    def decode_block_device(self, decoder: StreamingDecoder, block: int, latents: torch.Tensor,
                            ref_latent: torch.Tensor) -> torch.Tensor:
        """decode_block's frames left on the device: the decode lane never waits for the host copy."""
        dtype = self.vae.dtype
        with torch.no_grad():
            frames = frames_uint8_device(decoder.decode(latents.to(dtype)))
            if block != 0:
                return frames
            # the reference as the VAE shows it (the look of the frames after it), held still
            still = frames_uint8_device(self.vae.decode_offline(ref_latent[:1].to(dtype)))
        return torch.cat([still[:1].expand(self.lead_frames, -1, -1, -1), frames])

    def finish_block(self, row: Row) -> VideoBlock:
        w = row.work
        check_finite(w.latents, "denoised latents", w.index)
        v0 = self.timeline.first_frame(w.index)
        timings = {**row.timings, **w.timings}
        timings["total"] = sum(timings.get(k, 0.0) for k in ("audio", "denoise", "decode"))
        frames = w.frames.cpu().numpy()  # the copy-out (postprocess): waits for this block's decode
        return VideoBlock(index=w.index, frames=frames, first_frame=v0, pts=v0 / VIDEO_FPS, audio=w.audio,
                          timings=timings)


def window_samples(audio, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of a ring (AudioStream) or an array, zeros before 0 (and past an array's end)."""
    out = np.zeros(stop - start, dtype=np.float32)
    lo = max(start, 0)
    if isinstance(audio, np.ndarray):
        hi = min(stop, len(audio))
        if hi > lo:
            out[lo - start:hi - start] = audio[lo:hi]
    elif stop > lo:
        out[lo - start:] = audio.samples(lo, stop)
    return out
