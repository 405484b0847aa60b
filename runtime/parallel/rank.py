"""One rank's context: named stages (for errors and the trace) and failure injection, both families."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from .failures import FailSpec, InjectedFailure, RankLayout, StageError
from .transport import Transport


@dataclass
class StageEvent:
    rank: int
    stage: str
    session: int
    block: int
    step: int
    start: float  # time.perf_counter(): one monotonic clock for every process on the machine
    end: float



class RankContext:
    """A rank's stages: `with ctx.stage("denoise", session, block):` names the work inside; a failure
    there raises StageError (rank, role, stage, session, block); `events` is the trace of the compute
    stages. `fail` injects a failure (tests, drills); `sleeps` slows stages down (tests)."""

    def __init__(self, rank: int, layout: RankLayout, transport: Transport, fail: FailSpec | None,
                 sleeps: dict[str, float] | None):
        self.rank, self.layout, self.transport = rank, layout, transport
        self.role = layout.role(rank)
        self.fail, self.sleeps = fail, dict(sleeps or {})
        self.events: list[StageEvent] = []

    @contextlib.contextmanager
    def stage(self, name: str, session: int = -1, block: int = -1, step: int = -1, transfer: bool = False):
        """Names the work inside for errors and the trace; `transfer` marks waits on peers."""
        start = time.perf_counter()
        try:
            if self.fail is not None and self.fail.matches(self.rank, name, block, session):
                raise InjectedFailure(f"injected failure at {self.fail}")
            yield
            if name in self.sleeps:  # test hook: emulate a slow stage without using CPU
                time.sleep(self.sleeps[name])
        except StageError:
            raise
        except Exception as e:
            raise StageError(self.rank, self.role, name, session, block, transfer, e) from e
        if not transfer:
            self.events.append(StageEvent(self.rank, name, session, block, step, start, time.perf_counter()))

