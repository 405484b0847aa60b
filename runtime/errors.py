"""Errors the product surface raises on purpose, shared by the engine, the adapters and the server."""
from __future__ import annotations


class AtCapacityError(RuntimeError):
    """An engine (or a server, or a replica) already holds its `max_sessions` sessions.

    The server answers it as "at capacity"; the caller may retry later or go elsewhere."""

    def __init__(self, max_sessions: int, what: str = "engine"):
        super().__init__(f"{what} at capacity: it already holds max_sessions={max_sessions} sessions; "
                         "close one first")
        self.max_sessions = max_sessions


class SessionBusyError(RuntimeError):
    """A call on a session while another thread is inside a call on the same session."""


class BlockFailedError(RuntimeError):
    """A block of one session failed (a stage raised, or its output was not finite). Only that session
    fails; `.session`, `.block` and `.stage` say where, `__cause__` is the original error."""

    def __init__(self, message: str, session: int = -1, block: int = -1, stage: str = ""):
        super().__init__(message)
        self.session, self.block, self.stage = session, block, stage


class SessionFailedError(RuntimeError):
    """A call on a session whose earlier block failed; `__cause__` is that failure."""
