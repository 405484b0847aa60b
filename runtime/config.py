"""Configuration dataclasses, validated on construction, and named presets.

Every config is frozen: a running engine's shapes never change. `EngineConfig.from_preset(name)`
returns a full configuration; `dataclasses.replace` derives variants (tests do this).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from avatar_kernels.rope import rope_split


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class DiTConfig:
    """The causal audio DiT (LiveTalk family). Defaults are the 1.3B release."""

    dim: int = 1536
    num_layers: int = 30
    num_heads: int = 12
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 33  # noisy latent (16) | reference latent (16) | mask (1)
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    audio_feature_dim: int = 10752  # per video frame: 14 hidden states x 768
    audio_pack: int = 4  # video frames per latent frame in the audio adapter
    audio_hidden: int = 32

    def __post_init__(self):
        _require(self.dim % self.num_heads == 0, f"dim {self.dim} not divisible by num_heads {self.num_heads}")
        _require(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        f, h, w = self.rope_split
        _require(min(f, h, w) > 0 and f % 2 == 0 and h % 2 == 0,
                 f"head_dim {self.head_dim} gives RoPE split {self.rope_split}; every part must be even and > 0")
        _require(self.num_layers >= 3, "num_layers must be >= 3 (audio is injected from layer 2)")
        _require(self.patch_size[0] == 1, "temporal patch size must be 1 for block-causal streaming")
        _require(self.in_dim == 2 * self.out_dim + 1, "in_dim must be 2 * out_dim + 1 (noisy | reference | mask)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """(frame, height, width) parts of head_dim, as Wan: 44/42/42 for head_dim 128."""
        return rope_split(self.head_dim)

    @property
    def audio_layers(self) -> tuple[int, ...]:
        """Blocks that get the audio condition added before them (1 < i <= num_layers // 2)."""
        return tuple(range(2, self.num_layers // 2 + 1))


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE. Defaults are the release (z 16, base 96, multipliers 1,2,4,4)."""

    z_dim: int = 16
    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self):
        _require(len(self.temporal_downsample) == len(self.dim_mult) - 1,
                 "temporal_downsample needs one entry per downsampling stage (len(dim_mult) - 1)")
        _require(self.base_dim % 4 == 0 or self.base_dim >= 4, "base_dim too small")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclass(frozen=True)
class AudioConfig:
    """wav2vec2 front end and the streaming window.

    The encoder sees, for every run of video frames it must describe, the audio from
    `left_context_s` before the first frame to `lookahead_s` after the last one (see
    runtime/audio/stream.py for the exact rule). Defaults are wav2vec2-base-960h.
    """

    sample_rate: int = 16000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    left_context_s: float = 2.0
    lookahead_s: float = 0.25

    def __post_init__(self):
        _require(self.sample_rate > 0, "sample_rate must be positive")
        _require(len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride),
                 "conv_dim, conv_kernel and conv_stride must have the same length")
        _require(self.hidden_size % self.num_heads == 0, "hidden_size not divisible by num_heads")
        _require(self.left_context_s >= 0 and self.lookahead_s >= 0, "audio window sizes must be >= 0")

    @property
    def feature_dim(self) -> int:
        """Per video frame: last_hidden_state + all (num_layers + 1) hidden states."""
        return (self.num_layers + 2) * self.hidden_size

    def window_frames(self, fps: int) -> tuple[int, int]:
        """(left context, lookahead) in whole video frames at `fps`.

        The streaming window is built from whole video frames so that every window has the same
        length (static shapes) and frame boundaries fall on sample boundaries; fractional values
        are rejected rather than rounded.
        """
        _require(fps > 0, f"fps must be positive, got {fps}")
        frames = []
        for name, seconds in (("left_context_s", self.left_context_s), ("lookahead_s", self.lookahead_s)):
            exact = seconds * fps
            _require(abs(exact - round(exact)) < 1e-6,
                     f"{name} * fps must be a whole number of video frames ({seconds} * {fps} = {exact})")
            frames.append(round(exact))
        return frames[0], frames[1]


@dataclass(frozen=True)
class CacheConfig:
    """Block-causal KV window in latent frames: `sink_frames` permanent anchors + a rolling region."""

    block_frames: int = 3
    sink_frames: int = 9
    window_frames: int = 15
    rope_mode: Literal["absolute", "rolling"] = "absolute"

    def __post_init__(self):
        _require(self.block_frames >= 1, "block_frames must be >= 1")
        _require(self.sink_frames >= 1, "sink_frames must be >= 1 (frame 0 is the reference)")
        _require(self.window_frames >= self.sink_frames + 2 * self.block_frames,
                 f"window_frames ({self.window_frames}) must be >= sink_frames + 2 * block_frames "
                 f"({self.sink_frames} + 2 * {self.block_frames}); otherwise the sink is overwritten")
        _require(self.rope_mode in ("absolute", "rolling"), f"unknown rope_mode {self.rope_mode!r}")

    @property
    def rolling_frames(self) -> int:
        return self.window_frames - self.sink_frames


@dataclass(frozen=True)
class SamplerConfig:
    """Distilled flow-matching sampler: 4 steps + one t=0 forward that refreshes the KV cache."""

    timesteps: tuple[float, ...] = (1000.0, 936.0, 832.0, 624.0)
    shift: float = 5.0
    base_sigmas: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    refresh_timestep: float = 0.0

    def __post_init__(self):
        _require(len(self.timesteps) == len(self.base_sigmas) >= 1, "one sigma per timestep")

    @property
    def sigmas(self) -> tuple[float, ...]:
        """Shifted sigmas: shift*s / (1 + (shift-1)*s) -> (1, 0.9375, 0.8333.., 0.625) for the release."""
        s = self.shift
        return tuple(s * b / (1 + (s - 1) * b) for b in self.base_sigmas)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class EngineConfig:
    name: str = "custom"
    height: int = 512
    width: int = 512
    fps: int = 16
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self):
        step = self.vae.spatial_factor * self.dit.patch_size[1]
        _require(self.height % step == 0 and self.width % step == 0,
                 f"height and width must be multiples of {step} (VAE x patch), got {self.height}x{self.width}")
        _require(self.audio.sample_rate % self.fps == 0,
                 f"sample_rate / fps must be an integer ({self.audio.sample_rate} / {self.fps}), or A/V drift")
        self.audio.window_frames(self.fps)  # the audio window must be whole video frames at this fps
        _require(self.dit.audio_feature_dim == self.audio.feature_dim,
                 f"DiT expects audio features of {self.dit.audio_feature_dim}, the encoder gives "
                 f"{self.audio.feature_dim}")
        _require(self.dit.audio_pack == self.vae.temporal_factor,
                 "audio_pack must equal the VAE temporal factor (video frames per latent frame)")
        _require(self.dit.out_dim == self.vae.z_dim, "DiT out_dim must equal the VAE z_dim")

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def latent_hw(self) -> tuple[int, int]:
        f = self.vae.spatial_factor
        return self.height // f, self.width // f

    @property
    def token_grid(self) -> tuple[int, int]:
        h, w = self.latent_hw
        return h // self.dit.patch_size[1], w // self.dit.patch_size[2]

    @property
    def tokens_per_frame(self) -> int:
        gh, gw = self.token_grid
        return gh * gw

    @property
    def samples_per_video_frame(self) -> int:
        return self.audio.sample_rate // self.fps

    def video_frames_in_block(self, block_index: int) -> int:
        """Block 0 gives 1 + tf*(B-1) frames (the first latent frame decodes to one), later blocks tf*B."""
        b, tf = self.cache.block_frames, self.vae.temporal_factor
        return 1 + tf * (b - 1) if block_index == 0 else tf * b

    def first_video_frame(self, block_index: int) -> int:
        if block_index == 0:
            return 0
        return self.video_frames_in_block(0) + (block_index - 1) * self.video_frames_in_block(1)

    @classmethod
    def from_preset(cls, name: str) -> EngineConfig:
        try:
            factory = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
        return factory()

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)


# ---- presets ------------------------------------------------------------------------------------

def _livetalk_1_3b() -> EngineConfig:
    return EngineConfig(name="livetalk-1.3b")


def _tiny_audio() -> AudioConfig:
    # Same wav2vec2 structure, CPU-sized: 2 layers of width 32, a narrow CNN with the real strides.
    return AudioConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                       left_context_s=1.0, lookahead_s=0.25)


def _tiny() -> EngineConfig:
    audio = _tiny_audio()
    return EngineConfig(
        name="tiny", height=64, width=64,
        dit=DiTConfig(dim=64, num_layers=6, num_heads=2, ffn_dim=128, freq_dim=32, text_dim=48,
                      text_len=16, audio_feature_dim=audio.feature_dim, audio_hidden=16),
        vae=VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
        audio=audio,
    )


def _micro() -> EngineConfig:
    """Smallest structurally complete config, for very long streams (thousands of latent frames)."""
    audio = _tiny_audio()
    return EngineConfig(
        name="micro", height=32, width=32,
        dit=DiTConfig(dim=32, num_layers=4, num_heads=1, ffn_dim=64, freq_dim=16, text_dim=16,
                      text_len=4, audio_feature_dim=audio.feature_dim, audio_hidden=8),
        vae=VAEConfig(base_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1),
        audio=audio,
        cache=CacheConfig(block_frames=3, sink_frames=3, window_frames=9),
    )


PRESETS = {"livetalk-1.3b": _livetalk_1_3b, "tiny": _tiny, "micro": _micro}
