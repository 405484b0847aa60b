"""The protocol a model family implements to run on the engine core (runtime/core/engine.py).

The core owns everything streams share: sessions and their slots, the audio timeline (pushes,
resampling, readiness, flush/idle/interrupt arithmetic), the rounds (which sessions run a block now,
the batch size, running the round's tasks, failure isolation) and the blocks handed back. A family
owns what is model specific, behind the methods below. To add a family:

    class MyFamily(Family):
        name = "myfamily"
        presets = ("my-big", "my-tiny")
        ...
    register(MyFamily)            # runtime.families.register, at import of the family's package

and add the package to `runtime.families.BUILTIN` (or import it before `Engine.from_pretrained`).

Lifecycle, as the core calls it:

    family = MyFamily.build("my-tiny", device=..., dtype=..., seed=0, max_sessions=4, **options)
    state = family.open_state(slot, image, prompt, prompt_embeds, seed)   # per session; validates first
    ... audio is pushed into state.audio (an AudioStream-like ring: push/free_samples/total_samples/
        truncate/samples) by the core; when state.audio.total_samples >= samples_to_run(state.block):
    work = family.plan_block(state)           # caller thread, block order: host plan, noise draw,
                                              # audio features; state.block += 1. May raise: that
                                              # session fails alone, before anything is batched.
    tasks = family.round_tasks(rows, batch)   # rows: [Row(slot, state, work)], batch: padded size
    ... the core runs `tasks` (eagerly in order, or through runtime.scheduler.RoundRunner) ...
    block = family.finish_block(row)          # caller thread: the VideoBlock (host copy, finite)
    family.close_state(state)                 # the slot's buffers may be reused by the next session

Rounds and batching: `round_tasks` gets the rows of every session that runs a block in this round
(at most one block each, sessions at different block indices), sorted by slot, and `batch`, the
smallest of `batch_sizes` >= 1 + the highest slot of the round. It returns `Task`s (contract B in
docs/engine.md: name, lane, fn, deps = indices of earlier tasks of the round, group, block). A task
that serves one session has `group=row.slot` (its failure fails that session only); a batched task
(one DiT forward for all rows) has `group=BATCH` and its failure fails every session of the round.
Rows of the batch that are not in the round (free slots, sessions without audio) are padding: the
family must leave their state exactly as it was (e.g. restore what a batched KV write put there).

Rounds can overlap (in-flight blocks): the core may plan round r+1 while round r's decode still
runs. `round_tasks` may therefore return tasks with dependencies on the previous round, through
`prev`: a list of (task name, RoundHandle-like token) pairs the core passes back; buffers that round
r+1 rewrites while round r may still read them must be double-buffered or ordered by such deps.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

BATCH = "batch"  # the group of a task that serves every row of a round


@dataclass(frozen=True)
class Timeline:
    """Where blocks sit on a stream's timeline; the core's only view of a family's block layout.

    Block 0 has `first_block_frames` video frames, every later block `block_frames`. A block can run
    once the audio up to its last frame plus `lookahead_frames` has been pushed."""

    sample_rate: int
    fps: int
    height: int
    width: int
    first_block_frames: int
    block_frames: int
    lookahead_frames: int = 0
    # flush() cuts its last block to the frames that cover the pushed audio (rounded up to a whole frame),
    # so no silence padding leaves the engine: N samples in, ceil(N / spf) frames and their audio out
    trim_flush: bool = False

    def __post_init__(self):
        if self.sample_rate % self.fps:
            raise ValueError(f"sample_rate / fps must be an integer ({self.sample_rate} / {self.fps})")
        if min(self.first_block_frames, self.block_frames) < 1 or self.lookahead_frames < 0:
            raise ValueError(f"bad block layout: {self}")

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps

    def frames_in_block(self, block: int) -> int:
        return self.first_block_frames if block == 0 else self.block_frames

    def first_frame(self, block: int) -> int:
        return 0 if block == 0 else self.first_block_frames + (block - 1) * self.block_frames

    def samples_to_run(self, block: int) -> int:
        """Samples a stream must hold before `block` can run: up to its last frame plus the lookahead."""
        end = self.first_frame(block) + self.frames_in_block(block)
        return (end + self.lookahead_frames) * self.samples_per_frame

    def block_start(self, block: int) -> int:
        """The first sample of `block`'s frames."""
        return self.first_frame(block) * self.samples_per_frame

    def last_block_to_flush(self, next_block: int, total_samples: int) -> int | None:
        """The last block a flush runs so every pushed sample is covered; None when none is pending."""
        frames_needed = -(-total_samples // self.samples_per_frame)
        if frames_needed <= self.first_frame(next_block):
            return None
        last = next_block
        while self.first_frame(last) + self.frames_in_block(last) < frames_needed:
            last += 1
        return last


@dataclass
class SessionState:
    """What the core reads and writes of a session; a family subclasses it with its own tensors."""

    audio: Any                      # the audio timeline ring (runtime.audio.AudioStream or alike)
    block: int = 0                  # the next block to plan
    flushed: bool = False
    resampler: Any = None           # the core's streaming resampler (resample=True at another rate)


@dataclass
class Row:
    """One session's block in a round."""

    slot: int
    state: SessionState
    work: Any                       # what plan_block returned
    timings: dict[str, float] = field(default_factory=dict)


class Family(ABC):
    """A model family (see the module docstring for the lifecycle)."""

    name: ClassVar[str]
    presets: ClassVar[tuple[str, ...]] = ()
    batch_sizes: ClassVar[tuple[int, ...]] = (1, 2, 4, 8)   # rows a batched forward is padded to

    timeline: Timeline
    max_sessions: int               # the sessions the family's shared buffers were built for
    # Capture the round's stages as CUDA graphs where the family can (on a CUDA device); the engine
    # sets it from its mode (False for mode="eager": the stages' eager bodies, the reference).
    capture_graphs: bool = True

    def padded(self, rows: int) -> int:
        """The batch a round of `rows` rows (1 + its highest slot) is padded to: the smallest of
        `batch_sizes` that holds it (beyond the largest: `rows` itself, not a captured size)."""
        return next((size for size in self.batch_sizes if size >= rows), rows)

    @classmethod
    @abstractmethod
    def recognises(cls, root: Path) -> bool:
        """True when directory `root` holds this family's checkpoint files."""

    @classmethod
    @abstractmethod
    def build(cls, path_or_preset: str, *, device, dtype, seed: int, max_sessions: int, **options) -> Family:
        """A preset name: random weights of its shapes (seeded); a directory: its files, loaded
        strictly (every missing, unexpected or mis-shaped key named). `options` are family specific
        (e.g. decoder=, quantize=, text_encoder=); unknown ones must raise TypeError."""

    @abstractmethod
    def open_state(self, slot: int, reference_image, prompt: str | None, prompt_embeds, seed: int) -> SessionState:
        """A new session's state in `slot` (0 <= slot < max_sessions). Validate every input first
        and raise before anything changes (ValueError/TypeError naming the problem)."""

    def share_weights(self, max_sessions: int = 1) -> Family:
        """A new family of the same models (no copy of any weight) with its own shared rows, for a
        second engine (`Engine.eager_twin`)."""
        raise NotImplementedError(f"family {self.name!r} cannot share its weights with a second engine")

    def close_state(self, state: SessionState) -> None:
        """The session ended; its buffers may be reused by the next session of the slot."""

    @abstractmethod
    def plan_block(self, state: SessionState) -> Any:
        """Host planning of the session's next block (state.block) and its per-session stages that
        must run in block order on the caller's thread (noise draw, audio features); advances
        state.block. Returns the block's work, handed back in Row.work."""

    @abstractmethod
    def round_tasks(self, rows: list[Row], batch: int) -> list:
        """The round as a list of runtime.scheduler.Task (see the module docstring)."""

    @abstractmethod
    def finish_block(self, row: Row):
        """The row's VideoBlock (runtime.core.blocks.VideoBlock), frames a host copy. Raise when the
        output is not finite: the session fails alone."""
