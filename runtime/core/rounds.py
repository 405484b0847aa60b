"""A round as a list of tasks (contract B of runtime/scheduler.py), and the inline runner.

The inline runner is `mode="eager"`: every task's `fn` in list order on the caller's thread. It is
the numerical reference and the debug path (a stage's traceback is the caller's). Failure isolation
is contract B's: a failing task records a StageError for its group and skips every task that depends
on it (transitively) and the later tasks of its group.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

try:  # contract B's types, once runtime/scheduler.py has them (helper `sched`)
    from ..scheduler import Task
except ImportError:
    @dataclass(frozen=True)
    class Task:
        name: str
        lane: str
        fn: Callable[[], None] | None = None
        graph: Any = None
        deps: tuple = ()
        group: Hashable = None
        block: int = -1


class RoundStageError(RuntimeError):
    """A task of a round raised: `.stage` and `.block` say which, `__cause__` is the original."""

    def __init__(self, stage: str, block: int, err: BaseException):
        super().__init__(f"stage '{stage}' of block {block} failed: {type(err).__name__}: {err}")
        self.stage, self.block = stage, block
        self.__cause__ = err


class InlineHandle:
    """A finished round (the inline runner runs it inside submit)."""

    def __init__(self, failed: dict[Hashable, RoundStageError]):
        self.failed = failed

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> dict[Hashable, RoundStageError]:
        return self.failed


class InlineRunner:
    """Runs a round's tasks in order in the caller's thread (mode="eager")."""

    backend = "inline"
    fallback_reason = None

    def submit(self, tasks: Sequence[Task]) -> InlineHandle:
        failed: dict[Hashable, RoundStageError] = {}
        skipped: set[int] = set()
        for i, task in enumerate(tasks):
            local = [d for d in task.deps if isinstance(d, int)]
            if task.group in failed or any(d in skipped for d in local):
                skipped.add(i)
                continue
            try:
                if task.fn is None:
                    raise RuntimeError("the inline runner needs an eager body (Task.fn)")
                task.fn()
            except Exception as err:
                failed.setdefault(task.group, RoundStageError(task.name, task.block, err))
                skipped.add(i)
        return InlineHandle(failed)

    def close(self) -> None:
        pass
