"""Session inputs of Live Avatar: reference image -> reference and motion latents; prompt embeddings.

Upstream (`causal_s2v_pipeline_tpp.WanS2V.generate`): the image is resized (shorter side to
min(H, W)) and centre-cropped to H x W, scaled to [-1, 1] and VAE-encoded as one frame: the reference
latent. The motion latents are `ref_pixel_values.repeat(1, 1, motion_frames=73, 1, 1)` VAE-encoded:
(73 + 3) // 4 = 19 latent frames, exactly what the FramePack motioner reads. Here the resize covers
the target and crops (runtime.media.resize_cover_center_crop): upstream's shorter-side resize leaves
a 16:9 image 682 px wide for a 704 px target, which its CenterCrop pads with black bars.
"""
from __future__ import annotations

import numpy as np
import torch

from runtime.media import load_image, resize_cover_center_crop

from .config import LiveAvatarConfig


def reference_pixels(image, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3] from a path or an HxWx3 uint8 array (errors name the problem)."""
    return resize_cover_center_crop(load_image(image), height, width)


def prompt_tensor(prompt_embeds, cfg: LiveAvatarConfig) -> torch.Tensor:
    """[1, L, text_dim] float; None gives one all-zero row (no prompt), as family 1 does."""
    if isinstance(prompt_embeds, str):
        raise TypeError("prompt_embeds must be umT5 embeddings [L, text_dim], not text")
    p = torch.zeros(1, cfg.text_dim) if prompt_embeds is None else torch.as_tensor(prompt_embeds)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[0] != 1 or p.shape[-1] != cfg.text_dim or not 1 <= p.shape[1] <= cfg.text_len:
        raise ValueError(f"prompt_embeds must be [L, {cfg.text_dim}] with 1 <= L <= {cfg.text_len}, "
                         f"got shape {tuple(p.shape)}")
    if not p.is_floating_point() or not torch.isfinite(p).all():
        raise ValueError("prompt_embeds must be finite floating-point values")
    return p.float()


@torch.no_grad()
def encode_reference(vae, pixels: np.ndarray, motion_latent_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference latent [1, z, 1, h, w], motion latents [1, z, motion_latent_frames, h, w]), fp32."""
    p = next(vae.parameters())
    img = torch.from_numpy(pixels).to(p.device).permute(2, 0, 1)[None].to(p.dtype) / 127.5 - 1
    ref = vae.encode_image(img)
    video_frames = 1 + vae.config.temporal_factor * (motion_latent_frames - 1)  # 73 at the release
    motion = vae.encode(img[:, :, None].expand(-1, -1, video_frames, -1, -1))
    return ref.float(), motion.float()
