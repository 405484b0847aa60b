"""One stateful streaming wrapper for every causal video decoder (Wan2.1 VAE, TAEHV, exported ones).

A decoder model provides a functional `decode_step(z, cache, first) -> (frames, new_cache)` whose
`first=True` call takes the stream's first latent frame alone (fresh cache) and whose later calls
take any number of latent frames, plus `init_decode_cache(batch, h, w)` (the engine keeps a static
cache per slot: runtime/families/livetalk/graphs.py), `spatial_factor`, `device` and `dtype`. This class holds the
cache between calls (taehv-style API: `reset()`, `decode(z)`, `flush()`).
"""
from __future__ import annotations

import torch

IMAGE_CHANNELS = 3


class StreamingDecoder:
    """`decode(z_block)` takes normalised latents [B, z, n, h, w] and returns the video frames they
    determine: 1 + tf*(n-1) for the first block of a stream, tf*n afterwards. The decoders are causal
    and hold nothing back, so every frame is returned as soon as its latent arrives and `flush()`
    returns an empty [B, 3, 0, H, W]. `reset()` starts a new stream.
    """

    def __init__(self, model, batch: int = 1):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.model = model
        self.batch = batch
        self.reset()

    def reset(self) -> None:
        self.cache: list[torch.Tensor] | None = None  # None until the stream's first latent frame
        self.latent_hw: tuple[int, int] | None = None

    @property
    def started(self) -> bool:
        return self.cache is not None

    def _check_block(self, z: torch.Tensor) -> None:
        if z.dim() != 5 or z.shape[0] != self.batch or z.shape[2] < 1:
            raise ValueError(f"decode: expected [{self.batch}, z, n>=1, h, w], got {tuple(z.shape)}")
        hw = (z.shape[3], z.shape[4])
        if self.started and hw != self.latent_hw:
            raise ValueError(f"decode: latent size changed from {self.latent_hw} to {hw} mid-stream; "
                             "call reset() first")

    @torch.no_grad()
    def decode(self, z_block: torch.Tensor) -> torch.Tensor:
        self._check_block(z_block)
        parts = []
        if not self.started:
            self.latent_hw = (z_block.shape[3], z_block.shape[4])
            frames, self.cache = self.model.decode_step(z_block[:, :, :1], None, first=True)
            parts.append(frames)
            z_block = z_block[:, :, 1:]
        if z_block.shape[2] > 0:
            frames, self.cache = self.model.decode_step(z_block, self.cache, first=False)
            parts.append(frames)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def flush(self) -> torch.Tensor:
        """Nothing is pending (causal decoder): an empty [B, 3, 0, H, W] (H = W = 0 before any decode)."""
        s = self.model.spatial_factor
        h, w = self.latent_hw if self.latent_hw is not None else (0, 0)
        return torch.zeros((self.batch, IMAGE_CHANNELS, 0, h * s, w * s),
                           device=self.model.device, dtype=self.model.dtype)
