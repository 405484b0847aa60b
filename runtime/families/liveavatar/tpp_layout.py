"""Rank layout and session inputs of Live Avatar TPP (see runtime/families/liveavatar/tpp.py)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .stream import StreamSettings

KIND_BLOCK, KIND_END = 1, 2
TAG_HEADER, TAG_GLOBAL, TAG_LOCAL, TAG_X, TAG_SINK, TAG_AUDIO = 21, 22, 23, 24, 25, 26
DEFAULT_SETTINGS = StreamSettings()  # frozen: safe to share as a default


@dataclass(frozen=True)
class TppLayout:
    world_size: int
    num_steps: int
    decode: bool = False  # the collect rank decodes (a decode rank)

    def __post_init__(self):
        if self.world_size < 2 or self.world_size not in (self.num_steps, self.num_steps + 1):
            raise ValueError(f"world_size must be {self.num_steps} (one rank per denoising step) or "
                             f"{self.num_steps + 1} (+ a collect rank), and at least 2; got {self.world_size}")

    @property
    def last_step_rank(self) -> int:
        return self.num_steps - 1

    @property
    def collect_rank(self) -> int | None:
        return self.num_steps if self.world_size == self.num_steps + 1 else None

    @property
    def output_rank(self) -> int:
        """The rank that hands each block's latents to the sink."""
        return self.last_step_rank if self.collect_rank is None else self.collect_rank

    def role(self, rank: int) -> str:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        if rank == self.collect_rank:
            return "decode" if self.decode else "collect"
        return f"step {rank}" + (" + audio" if rank == 0 else "")

    def stages(self, rank: int) -> tuple[str, ...]:
        """Stages a rank runs (failure specs naming another stage would never fire)."""
        if rank == self.collect_rank:
            return ("decode", "emit") if self.decode else ("emit",)
        return ("audio", "denoise") if rank == 0 else ("denoise",)


@dataclass(frozen=True)
class TppSession:
    """One session's inputs. Every rank gets the conditions; only rank 0 reads `features`
    (an iterable of [B, audio_layers, audio_dim, 4F] per block: it may be a live source)."""

    ref_latent: torch.Tensor
    motion_latents: torch.Tensor
    prompt_embeds: torch.Tensor
    settings: StreamSettings = DEFAULT_SETTINGS
    features: Iterable[torch.Tensor] | None = None
    # rank 0 only, with a decode rank: per block, the float32 samples its frames cover (sent to the decode rank)
    block_audio: Iterable[torch.Tensor] | None = None
