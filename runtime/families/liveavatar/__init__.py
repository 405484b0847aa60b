"""Model family 2: Live Avatar (Wan2.2-S2V-14B trunk + the liveavatar.safetensors LoRA). See docs/liveavatar.md.

Importing the package registers the family (`family.LiveAvatar`, presets liveavatar-14b and
liveavatar-tiny) with runtime.families, so `Engine.from_pretrained` finds it."""
from .config import PRESETS, LiveAvatarConfig, LoraConfig
from .family import LiveAvatar
from .loading import check_index, load_liveavatar, release_index
from .model import AudioTokens, Condition, LiveAvatarDiT, TimeMod, build_liveavatar
from .random_weights import randomize_weights
from .stream import LiveAvatarStream, StreamSettings

__all__ = [
    "PRESETS",
    "AudioTokens",
    "Condition",
    "LiveAvatar",
    "LiveAvatarConfig",
    "LiveAvatarDiT",
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
