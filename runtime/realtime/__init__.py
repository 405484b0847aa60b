"""Real-time face of the runtime: `AvatarSession` turns pushed audio into paced, interleaved A/V events."""
from .convert import float_to_pcm16, rgb_to_i420
from .events import AudioFrame, PlaybackFinished, VideoFrame
from .pacing import Pacer
from .session import AvatarSession
from .worker import AvatarSessionError

__all__ = [
    "AudioFrame",
    "AvatarSession",
    "AvatarSessionError",
    "Pacer",
    "PlaybackFinished",
    "VideoFrame",
    "float_to_pcm16",
    "rgb_to_i420",
]
