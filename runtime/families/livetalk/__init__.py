"""Family 1: LiveTalk (livetalk-1.3b, tiny, micro)."""
from .family import LiveTalk, check_quantize
from .stages import BlockWork, TalkState

__all__ = ["BlockWork", "LiveTalk", "TalkState", "check_quantize"]
