"""The one thread that makes every Engine call of a session.

GPU work must not block the event loop, and the Engine is not thread-safe, so a session's engine is
touched by this thread alone, in command order (FIFO). Commands need no cancelling: each one checks
its epoch with the output buffer before every engine call that makes a block, so after a barge-in or
close the stale ones fall through without generating anything. The first failure stops the thread:
later commands never run, and the session reports the error to its consumer and to the next push.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .driver import EngineDriver


class AvatarSessionError(RuntimeError):
    """The engine failed inside a session; the message names the engine call and block."""


@dataclass
class Command:
    run: Callable[[], None]
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


_STOP = object()


class EngineWorker:
    def __init__(self, driver: EngineDriver, *,
                 on_done: Callable[[], None], on_error: Callable[[AvatarSessionError], None]):
        """`on_done` and `on_error` are called on this thread; they must hand over to the loop themselves."""
        self.driver = driver
        self._on_done, self._on_error = on_done, on_error
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="avatar-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, command: Command) -> None:
        self._commands.put(command)

    def stop(self) -> None:
        """Ask the thread to end once the engine call under way (if any) returns."""
        self._commands.put(_STOP)

    def join(self) -> None:
        self._thread.join()

    def _serve(self) -> None:
        try:
            self._run_commands()
        finally:
            self.driver.close()

    def _run_commands(self) -> None:
        while (command := self._commands.get()) is not _STOP:
            try:
                command.run()
                command.done.set_result(None)
            except Exception as exc:  # noqa: BLE001 - any engine failure ends this session only
                command.done.set_exception(exc)
                self._on_error(self._describe(exc))
                self._on_done()
                return
            self._on_done()

    def _describe(self, exc: Exception) -> AvatarSessionError:
        d = self.driver
        error = AvatarSessionError(f"avatar session failed in {d.stage} (block {d.next_block}): "
                                   f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error
