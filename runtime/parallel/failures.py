"""Errors and failure injection shared by the pipelines of both families (runtime/parallel/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Every stage name a pipeline rank can run, in either family (a rank's layout says which it runs).
STAGE_NAMES = ("begin", "audio", "denoise", "refresh", "decode", "emit")
FAIL_ENV = "RUNTIME_PIPELINE_FAIL"  # "RANK:STAGE[:BLOCK[:SESSION]]": raise in that stage (tests, drills)


class RankLayout(Protocol):
    """What the shared parts ask of a family's rank layout."""

    world_size: int

    def role(self, rank: int) -> str: ...

    def stages(self, rank: int) -> tuple[str, ...]: ...


class PipelineError(RuntimeError):
    """A rank failed (or the pipeline timed out); names the rank and the stage."""

    def __init__(self, message: str, rank: int | None = None, role: str | None = None,
                 stage: str | None = None, session: int | None = None, block: int | None = None):
        super().__init__(message)
        self.rank, self.role, self.stage, self.session, self.block = rank, role, stage, session, block


class StageError(RuntimeError):
    """Raised inside a rank: the stage that failed, wrapping the original exception."""

    def __init__(self, rank: int, role: str, stage: str, session: int, block: int, transfer: bool,
                 cause: BaseException):
        self.rank, self.role, self.stage, self.session, self.block = rank, role, stage, session, block
        self.transfer = transfer
        self.cause = f"{type(cause).__name__}: {cause}"
        super().__init__(f"pipeline rank {rank} ({role}) failed in stage '{stage}' "
                         f"(session {session}, block {block}): {self.cause}")


class InjectedFailure(RuntimeError):
    pass


@dataclass(frozen=True)
class FailSpec:
    """Where to inject a failure: a rank's stage, optionally only at one block and/or one session."""

    rank: int
    stage: str
    block: int | None = None
    session: int | None = None

    @classmethod
    def parse(cls, text: str | FailSpec | None) -> FailSpec | None:
        if not text or isinstance(text, FailSpec):
            return text or None
        parts = text.split(":")
        try:
            if len(parts) not in (2, 3, 4) or parts[1] not in STAGE_NAMES:
                raise ValueError
            optional = [int(p) for p in parts[2:]] + [None] * (4 - len(parts))
            return cls(int(parts[0]), parts[1], *optional)
        except ValueError:
            raise ValueError(f"failure spec must be RANK:STAGE[:BLOCK[:SESSION]] with STAGE one of "
                             f"{', '.join(STAGE_NAMES)}, got {text!r}") from None

    def __str__(self) -> str:
        tail = [] if self.block is None and self.session is None else [self.block]
        tail += [] if self.session is None else [self.session]
        if None in tail:
            raise ValueError("a failure spec with a session needs a block too (RANK:STAGE:BLOCK:SESSION)")
        return ":".join(str(v) for v in (self.rank, self.stage, *tail))

    def check(self, layout: RankLayout, streams: int | None = None) -> None:
        """A spec naming a stage its rank never runs would silently never fire: reject it."""
        if not 0 <= self.rank < layout.world_size:
            raise ValueError(f"failure spec names rank {self.rank}, world size is {layout.world_size}")
        if self.stage not in layout.stages(self.rank):
            raise ValueError(f"rank {self.rank} ({layout.role(self.rank)}) runs only "
                             f"{', '.join(layout.stages(self.rank))}, not {self.stage!r}")
        if streams is not None and self.session is not None and not 0 <= self.session < streams:
            raise ValueError(f"failure spec names session {self.session}, there are {streams} streams")

    def matches(self, rank: int, stage: str, block: int, session: int = -1) -> bool:
        return (rank == self.rank and stage == self.stage and self.block in (None, block)
                and self.session in (None, session))



def error_of(r: dict) -> PipelineError:
    """The PipelineError of a rank's error report (the dict a rank writes: rank, role, stage, ...)."""
    where = f"stage '{r['stage']}'" + (f" (session {r['session']}, block {r['block']})" if r["block"] >= 0 else "")
    return PipelineError(f"pipeline rank {r['rank']} ({r['role']}) failed in {where}: {r['cause']}\n"
                         f"--- rank {r['rank']} traceback ---\n{r['traceback']}",
                         rank=r["rank"], role=r["role"], stage=r["stage"], session=r["session"], block=r["block"])
