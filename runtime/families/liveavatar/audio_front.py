"""Audio front end of Live Avatar: 16 kHz PCM -> [B, 25, 1024, 12] wav2vec2 features per block.

Upstream (liveavatar/models/wan/wan_2_2/modules/s2v/audio_encoder.py, used by
causal_s2v_pipeline_tpp.encode_audio):
the WHOLE file goes through wav2vec2-large-xlsr-53-english once (the processor normalises it over
the whole file), all 25 hidden states are kept, `linear_interpolation` resamples 50 Hz -> 30 Hz with
`F.interpolate(align_corners=True, size=int(T50 / 50 * 30))`, and video frame i (25 fps) takes
30 Hz row round(i * 30 / 25) (`get_sample_indices`, m = 0). The DiT's own audio encoder then gets
each block's 12 vectors on their own (with 73 copies of the first prepended: `encode_audio`).

A stream cannot see the whole file, so here each block is encoded from one window of audio:
- 30 Hz row k sits at 50 Hz position k * 5 / 3 on the absolute timeline (the limit of
  align_corners' (T50 - 1) / (T30 - 1) for a long clip; upstream's grid depends slightly on the clip
  length), and is linearly interpolated between the two 50 Hz frames around it;
- the window is `left_frames` 50 Hz frames before the block's first needed frame to `ahead_frames`
  after its last, a FIXED number of frames for every block (static shapes); samples before stream
  time 0 are zeros and are left out of the normalisation statistics;
- so a block's features are a pure function of the audio content and the block index: bitwise the
  same however the caller chunks the audio. The cost: wav2vec2 sees `left_frames` / 50 s of past
  and `ahead_frames` / 50 s of future instead of the whole file, and the lookahead adds latency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from runtime.audio.encoder import normalize_waveform
from runtime.transfer import to_device

SAMPLE_RATE = 16000
HOP = 320  # samples per 50 Hz wav2vec2 frame (conv strides 5 * 2^6)
FIELD = 400  # samples one wav2vec2 frame sees (the conv stack's receptive field)
VIDEO_FPS = 25
SAMPLES_PER_VIDEO_FRAME = SAMPLE_RATE // VIDEO_FPS  # 640


def row_30hz(video_frame: int) -> int:
    """Upstream's round(i * 30 / 25) in integers (1.2 i is never exactly x.5)."""
    return (12 * video_frame + 5) // 10


def position_50hz(video_frame: int) -> float:
    return row_30hz(video_frame) * 5 / 3


@dataclass(frozen=True)
class FrontEndSettings:
    block_video_frames: int = 12  # 3 latent frames x 4
    left_frames: int = 50   # 50 Hz frames of past audio in each window (1 s)
    ahead_frames: int = 10  # 50 Hz frames of future audio (0.2 s of added latency)
    normalize: bool = True  # the processor's do_normalize (true for wav2vec2-large-xlsr-53-english)

    def __post_init__(self):
        if self.block_video_frames < 1 or self.left_frames < 0 or self.ahead_frames < 0:
            raise ValueError(f"bad front-end settings {self}")


@dataclass(frozen=True)
class Window:
    """Where block b's audio comes from: absolute samples [start, stop) and the interpolation plan."""

    start: int  # may be negative: zeros before stream time 0
    stop: int
    lower: torch.Tensor   # [V] long: 50 Hz frame (window-relative) below each video frame's position
    weight: torch.Tensor  # [V] fp32: weight of the frame above


class FramePlanner:
    """Host arithmetic of the windows; the same number of 50 Hz frames for every block."""

    def __init__(self, s: FrontEndSettings):
        self.s = s
        period = 5  # 12 * 1.2 * 5 / 3 rows: the pattern of positions repeats every 5 blocks at most
        self.span = max(self._needed(b)[1] - self._needed(b)[0] + 1 for b in range(period * 6))
        self.frames = s.left_frames + self.span + s.ahead_frames

    def _needed(self, block: int) -> tuple[int, int]:
        v0 = block * self.s.block_video_frames
        first, last = position_50hz(v0), position_50hz(v0 + self.s.block_video_frames - 1)
        return math.floor(first), math.floor(last) + 1  # the frame above the last position is read too

    def window(self, block: int) -> Window:
        lo, _ = self._needed(block)
        j0 = lo - self.s.left_frames
        v0 = block * self.s.block_video_frames
        pos = np.array([position_50hz(v) for v in range(v0, v0 + self.s.block_video_frames)]) - j0
        lower = np.floor(pos).astype(np.int64)
        return Window(start=j0 * HOP, stop=j0 * HOP + (self.frames - 1) * HOP + FIELD,
                      lower=torch.from_numpy(lower), weight=torch.from_numpy(pos - lower).float())


def tiny_wav2vec2(layers: int, width: int, seed: int = 0) -> Wav2Vec2Model:
    """A random wav2vec2 with the large model's structure (stable layer norm, 320-sample hop), for
    tests: `layers` hidden states (embeddings + layers - 1 transformer layers) of `width`."""
    hf = Wav2Vec2Config(hidden_size=width, num_hidden_layers=layers - 1, num_attention_heads=2,
                        intermediate_size=2 * width, conv_dim=[8] * 7, num_conv_pos_embeddings=16,
                        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
                        conv_bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Wav2Vec2Model(hf).eval().requires_grad_(False)


class Wav2VecFrontEnd:
    """wav2vec2 over one window -> [1, hidden states, width, V] (upstream's [B, 25, 1024, T] layout)."""

    def __init__(self, model: Wav2Vec2Model, settings: FrontEndSettings = FrontEndSettings()):
        self.model, self.settings = model.eval().requires_grad_(False), settings
        self.planner = FramePlanner(settings)

    @property
    def window_samples(self) -> int:
        return (self.planner.frames - 1) * HOP + FIELD

    @torch.no_grad()
    def features(self, window: Window, samples: np.ndarray) -> torch.Tensor:
        """samples: the window's audio, float32 [window_samples] (zeros before stream time 0)."""
        if samples.shape != (self.window_samples,):
            raise ValueError(f"window needs {self.window_samples} samples, got {samples.shape}")
        wave = torch.from_numpy(samples)[None]
        pad = max(0, -window.start)
        if self.settings.normalize:
            wave = normalize_waveform(wave, pad)
        p = next(self.model.parameters())
        out = self.model(to_device(wave, p.device).to(p.dtype), output_hidden_states=True)
        states = torch.stack(out.hidden_states, dim=1).float()  # [1, layers, frames, width]
        if states.shape[2] != self.planner.frames:
            raise RuntimeError(f"wav2vec2 gave {states.shape[2]} frames, planned {self.planner.frames}")
        lo, w = to_device(window.lower, states.device), to_device(window.weight, states.device)[:, None]
        feats = states[:, :, lo] * (1 - w) + states[:, :, lo + 1] * w  # [1, layers, V, width]
        return feats.transpose(2, 3)
