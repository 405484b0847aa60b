"""What one Live Avatar engine is made of, per preset: trunk config, VAE, video size, wav2vec2.

Video size: upstream picks it from the reference image's aspect with an area budget
(`get_size_less_than_area(H, W, 720 * 400)`, padded to multiples of 64): a 16:9 landscape image
gives 384 x 704 (H x W), the size the release's caches are hard-coded for ("720*400"). Here the size
is fixed per preset, so every session has the same shapes (static buffers, no per-image recompiles).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from runtime.config import VAEConfig

from .audio_front import tiny_wav2vec2
from .config import LiveAvatarConfig


@dataclass(frozen=True)
class EnginePreset:
    name: str
    dit: LiveAvatarConfig
    vae: VAEConfig
    height: int
    width: int

    def __post_init__(self):
        # latent h, w must be multiples of 8: patch 2 x the 4x FramePack kernel of the motioner
        step = 8 * self.vae.spatial_factor
        if self.height % step or self.width % step:
            raise ValueError(f"{self.name}: height and width must be multiples of {step}, "
                             f"got {self.height}x{self.width}")
        if self.vae.z_dim != self.dit.latent_channels:
            raise ValueError(f"{self.name}: VAE z_dim {self.vae.z_dim} != trunk latent channels "
                             f"{self.dit.latent_channels}")


def large_wav2vec2_config() -> Wav2Vec2Config:
    """wav2vec2-large-xlsr-53's structure (24 layers of 1024, stable layer norm): 25 hidden states."""
    return Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)


def random_wav2vec2(preset: EnginePreset, seed: int = 0) -> Wav2Vec2Model:
    """Random wav2vec2 whose hidden states fit the trunk (tiny one for tiny trunks)."""
    cfg = preset.dit
    if preset.name != "liveavatar-14b":
        return tiny_wav2vec2(cfg.audio_layers, cfg.audio_dim, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Wav2Vec2Model(large_wav2vec2_config()).eval().requires_grad_(False)


ENGINE_PRESETS: dict[str, EnginePreset] = {
    "liveavatar-14b": EnginePreset("liveavatar-14b", LiveAvatarConfig.from_preset("liveavatar-14b"), VAEConfig(),
                                   height=384, width=704),
    # runtime.config's tiny VAE (z 16, 8x spatial, 4x temporal): 64x64 video, 8x8 latents
    "tiny": EnginePreset("tiny", LiveAvatarConfig.from_preset("tiny"),
                         VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1), height=64, width=64),
}


def engine_preset(name: str) -> EnginePreset:
    if name not in ENGINE_PRESETS:
        raise ValueError(f"unknown Live Avatar preset {name!r}; known: {sorted(ENGINE_PRESETS)}")
    return ENGINE_PRESETS[name]
