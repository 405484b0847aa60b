"""Configuration of model family 2: Live Avatar = Wan2.2-S2V-14B trunk + the `liveavatar.safetensors` LoRA.

Every number of the `liveavatar-14b` preset is the release's; docs/liveavatar.md names the upstream file
each one comes from. `tiny` keeps the structure (same modules, buckets, audio alignment, sampler) with
tiny widths and a few layers, so tests run it on a CPU in milliseconds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from avatar_kernels.rope import rope_split


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA of the release: r=128, alpha=64 (liveavatar/configs/s2v_causal_sft.yaml).

    The file carries only the A/B factors, never alpha: the scale alpha / r = 0.5 must come from here.
    """

    rank: int = 128
    alpha: float = 64.0
    # PEFT `target_modules` (matched as a module-name suffix): every attention q/k/v/o, including
    # cross-attention and the audio injector's attention, and both FFN linears.
    targets: tuple[str, ...] = ("q", "k", "v", "o", "ffn.0", "ffn.2")

    def __post_init__(self):
        _require(self.rank >= 1, f"LoRA rank must be >= 1, got {self.rank}")
        _require(self.alpha > 0, f"LoRA alpha must be > 0, got {self.alpha}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class LiveAvatarConfig:
    name: str = "liveavatar-14b"
    # ---- trunk (wan/configs/wan_s2v_14B.py) ----
    dim: int = 5120
    num_layers: int = 40
    num_heads: int = 40
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    latent_channels: int = 16  # patch_embedding in, head out, cond_encoder (pose) in, frame_packer in
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # ---- audio: wav2vec2-large-xlsr-53 hidden states -> casual_audio_encoder -> audio_injector ----
    audio_layers: int = 25  # hidden states per frame (embeddings + 24 transformer layers)
    audio_dim: int = 1024
    audio_tokens: int = 4  # local tokens per latent frame (a learned padding token makes 5)
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    audio_prepend_frames: int = 73  # motion_frames[0]: copies of the block's first audio frame
    adain_eps: float = 1e-5  # diffusers AdaLayerNorm default
    # ---- reference (sink) and motion frames ----
    ref_rope_frame: int = 30  # temporal RoPE index of the reference frame (before any rolling)
    motion_buckets: tuple[int, int, int] = (1, 2, 16)  # FramePack: newest first; proj, proj_2x, proj_4x
    # ---- sampler: diffusers FlowMatchEulerDiscreteScheduler(1000, shift=3), 4 steps ----
    num_train_timesteps: int = 1000
    sample_shift: float = 3.0
    num_steps: int = 4
    # ---- streaming (used by the engine, not by one forward) ----
    block_frames: int = 3  # latent frames per block (num_frames_per_block)
    ring_frames: int = 12  # KV ring per denoising step: the current block + 3 previous
    sink_offset_range: tuple[int, int] = (4, 30)  # upstream draws the rolling-sink distance here
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        _require(self.dim % self.num_heads == 0, f"dim {self.dim} not divisible by num_heads {self.num_heads}")
        _require(self.head_dim % 2 == 0 and self.head_dim >= 6,
                 f"head_dim {self.head_dim} must be even and >= 6 for the 3-D RoPE split")
        _require(self.dim % 4 == 0, f"dim {self.dim} must be divisible by 4 (audio encoder widths dim/4, dim/2)")
        _require(self.patch_size[0] == 1, "temporal patch size must be 1 (one latent frame per token row)")
        _require(self.freq_dim % 2 == 0, "freq_dim must be even (cos half, sin half)")
        layers = self.audio_inject_layers
        _require(list(layers) == sorted(set(layers)) and all(0 <= i < self.num_layers for i in layers),
                 f"audio_inject_layers must be increasing block indices < {self.num_layers}, got {layers}")
        _require(len(self.motion_buckets) == 3 and all(n >= 1 for n in self.motion_buckets),
                 "motion_buckets needs three positive sizes (proj, proj_2x, proj_4x)")
        for size, scale in zip(self.motion_buckets, self.motion_scales):
            _require(size % scale == 0, f"motion bucket {size} must be a multiple of its downsampling {scale}")
        _require(self.audio_prepend_frames >= 0, "audio_prepend_frames must be >= 0")
        _require(self.num_steps >= 1, "num_steps must be >= 1")
        _require(self.ring_frames % self.block_frames == 0, "ring_frames must be a whole number of blocks")
        lo, hi = self.sink_offset_range
        _require(1 <= lo <= hi, f"sink_offset_range must be 1 <= lo <= hi, got {self.sink_offset_range}")

    # ---- derived sizes ----
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """(frame, height, width) parts of head_dim: d - 4*(d//6), 2*(d//6), 2*(d//6) = 44/42/42 at 128."""
        return rope_split(self.head_dim)

    @property
    def motion_scales(self) -> tuple[int, int, int]:
        """Temporal and spatial downsampling of the three FramePack projections (kernels (1,2,2)x scale)."""
        return 1, 2, 4

    @property
    def motion_frames(self) -> int:
        """Latent frames of motion history the FramePack motioner reads (19 at the release)."""
        return sum(self.motion_buckets)

    @property
    def audio_drop_tokens(self) -> int:
        """Leading audio-encoder outputs that belong to the prepended copies: ceil(prepend / 4)."""
        return -(-self.audio_prepend_frames // 4)

    # ---- sampler: diffusers FlowMatchEulerDiscreteScheduler(1000, shift).set_timesteps(num_steps), the
    # release's scheduler (causal_s2v_pipeline: `sample_scheduler.timesteps`), step for step in its dtypes:
    # the training sigmas in fp32 (__init__), the linspace and shift in float64 (numpy), then fp32 sigmas
    # and fp32 timesteps = sigmas * 1000. The float64 product differs in the last fp32 bit (602.1505 vs
    # the release's 602.1506 at step 2), so the fp32 multiply is kept. ----
    def _sigma_range(self) -> tuple[float, float]:
        """(sigma_max, sigma_min) as the scheduler's __init__ computes them: fp32 tensors, shifted."""
        n = self.num_train_timesteps
        t = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy())
        s = t / n
        s = self.sample_shift * s / (1 + (self.sample_shift - 1) * s)
        return s[0].item(), s[-1].item()

    def _schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (sigmas [num_steps + 1] ending in 0, timesteps [num_steps])."""
        n = self.num_train_timesteps
        sigma_max, sigma_min = self._sigma_range()
        s = np.linspace(sigma_max * n, sigma_min * n, self.num_steps) / n
        s = self.sample_shift * s / (1 + (self.sample_shift - 1) * s)
        sigmas = torch.from_numpy(s).to(torch.float32)
        return torch.cat([sigmas, torch.zeros(1)]), sigmas * n

    @property
    def sigmas(self) -> tuple[float, ...]:
        """num_steps + 1 fp32 sigmas ending in 0: (1, .8577, .6022, .00893, 0) at the release."""
        return tuple(self._schedule()[0].tolist())

    @property
    def timesteps(self) -> tuple[float, ...]:
        """Network timesteps, fp32 sigma * 1000: (1000, 857.6923, 602.1506, 8.9286) at the release."""
        return tuple(self._schedule()[1].tolist())

    @classmethod
    def from_preset(cls, name: str) -> LiveAvatarConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown Live Avatar preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name]

    def replace(self, **changes) -> LiveAvatarConfig:
        return dataclasses.replace(self, **changes)


def _tiny() -> LiveAvatarConfig:
    # Four layers with the release's injection pattern squeezed (first, then every other, last); the
    # audio alignment (73 prepended frames, 19 dropped tokens), motion buckets and sampler are unchanged.
    return LiveAvatarConfig(
        name="tiny", dim=64, num_layers=4, num_heads=4, ffn_dim=128, freq_dim=32, text_dim=32, text_len=16,
        audio_layers=3, audio_dim=16, audio_inject_layers=(0, 2, 3))


PRESETS: dict[str, LiveAvatarConfig] = {"liveavatar-14b": LiveAvatarConfig(), "tiny": _tiny()}


def resolve_config(config: LiveAvatarConfig | str) -> LiveAvatarConfig:
    return LiveAvatarConfig.from_preset(config) if isinstance(config, str) else config

