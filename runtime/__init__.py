"""Streaming inference runtime for audio-driven talking-avatar video diffusion."""
from .config import AudioConfig, CacheConfig, DiTConfig, EngineConfig, SamplerConfig, VAEConfig
from .models.dit import CausalAudioDiT, build_dit

__all__ = [
    "AudioConfig",
    "BatchedEngine",
    "CacheConfig",
    "CausalAudioDiT",
    "DiTConfig",
    "Engine",
    "EngineConfig",
    "SamplerConfig",
    "ScheduledEngine",
    "VAEConfig",
    "VideoBlock",
    "build_dit",
]


def __getattr__(name):
    # The engine pulls in the audio, VAE and media stacks: import it only when asked for.
    if name in ("Engine", "VideoBlock"):
        from . import engine
        return getattr(engine, name)
    if name == "ScheduledEngine":
        from .scheduled import ScheduledEngine
        return ScheduledEngine
    if name == "BatchedEngine":
        from .batched import BatchedEngine
        return BatchedEngine
    raise AttributeError(name)
