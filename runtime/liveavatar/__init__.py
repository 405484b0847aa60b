"""Model family 2: Live Avatar (Wan2.2-S2V-14B trunk + the liveavatar.safetensors LoRA). See docs/liveavatar.md."""
from .config import PRESETS, LiveAvatarConfig, LoraConfig
from .engine import LiveAvatarBlock, LiveAvatarEngine
from .loading import check_index, load_liveavatar, release_index
from .model import AudioTokens, Condition, LiveAvatarDiT, TimeMod, build_liveavatar
from .random_weights import randomize_weights
from .stream import LiveAvatarStream, StreamSettings

__all__ = [
    "PRESETS",
    "AudioTokens",
    "Condition",
    "LiveAvatarBlock",
    "LiveAvatarConfig",
    "LiveAvatarDiT",
    "LiveAvatarEngine",
    "LiveAvatarStream",
    "LoraConfig",
    "StreamSettings",
    "TimeMod",
    "build_liveavatar",
    "check_index",
    "load_liveavatar",
    "randomize_weights",
    "release_index",
]
