"""Errors the product surface raises on purpose, shared by the engine, the adapters and the server."""
from __future__ import annotations


class AtCapacityError(RuntimeError):
    """An engine (or a server, or a replica) already holds its `max_sessions` sessions.

    The server answers it as "at capacity"; the caller may retry later or go elsewhere."""

    def __init__(self, max_sessions: int, what: str = "engine"):
        super().__init__(f"{what} at capacity: it already holds max_sessions={max_sessions} sessions; "
                         "close one first")
        self.max_sessions = max_sessions
