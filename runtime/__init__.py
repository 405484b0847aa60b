"""Streaming inference runtime for audio-driven talking-avatar video diffusion."""
from .config import AudioConfig, CacheConfig, DiTConfig, EngineConfig, SamplerConfig, VAEConfig
from .models.dit import CausalAudioDiT, build_dit

__all__ = [
    "AudioConfig",
    "CacheConfig",
    "CausalAudioDiT",
    "DiTConfig",
    "Engine",
    "EngineConfig",
    "SamplerConfig",
    "VAEConfig",
    "VideoBlock",
    "build_dit",
]


def __getattr__(name):
    # The engine pulls in the audio, VAE and media stacks: import it only when asked for.
    if name in ("Engine", "VideoBlock"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)
