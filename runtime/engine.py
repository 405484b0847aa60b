"""The engine's public names. The code lives in runtime/core/ (the family-independent engine) and
runtime/families/ (LiveTalk in families/livetalk/); see docs/engine.md."""
from __future__ import annotations

from .config import EngineConfig
from .core.blocks import VideoBlock, check_finite, frames_uint8
from .core.engine import Engine, check_rate, check_seed
from .families.livetalk.family import _FP8_MODES, _default_device_dtype, check_quantize, timeline_of
from .families.livetalk.stages import BlockWork
from .families.livetalk.stages import TalkState as _Session

__all__ = ["BlockWork", "Engine", "VideoBlock", "check_finite", "check_quantize", "check_rate", "check_seed",
           "frames_uint8", "last_block_to_flush", "samples_to_run"]
_COMPAT = (_FP8_MODES, _default_device_dtype, _Session)  # imported from here by runtime/liveavatar


def samples_to_run(cfg: EngineConfig, block: int) -> int:
    """Samples a LiveTalk stream must hold before `block` can run (Timeline.samples_to_run)."""
    return timeline_of(cfg).samples_to_run(block)


def last_block_to_flush(cfg: EngineConfig, next_block: int, total_samples: int) -> int | None:
    return timeline_of(cfg).last_block_to_flush(next_block, total_samples)
