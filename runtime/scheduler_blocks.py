"""The per-block stage API (``Scheduler``, ``Stage``, ``prev``): a thin layer over ``RoundRunner``.

Kept for ``runtime/scheduled.py`` (``ScheduledEngine``) until the one engine replaces it. A block
is one round: the stage templates are validated once (``csrc/scheduler/plan.h``), and every
``submit_block`` turns them into ``Task``s whose ``prev()`` dependencies point at the rounds of the
blocks kept in a window of ``plan.history`` blocks. The failure group of a task is its block, so a
failed stage fails its block and, through the cross-block edges, the blocks that depend on it.
All launching is the round runner's (one executor, no second copy of the launch logic).
"""
from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import scheduler as _rounds

Dep = str | tuple[str, int]
Lane = str | int


def prev(stage: str, blocks: int = 1) -> tuple[str, int]:
    """A dependency on ``stage`` of the block ``blocks`` earlier (e.g. step0 after the previous refresh)."""
    if blocks < 1:
        raise ValueError(f"prev({stage!r}, {blocks}): blocks must be >= 1")
    return (stage, -blocks)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One node of the per-block DAG: ``fn(block_index, inputs, stream) -> result`` (or on the cuda
    backend a ``torch.cuda.CUDAGraph`` / ``cudaGraphExec_t`` int), its lane and dependencies
    (stage names of the same block, or ``(name, offset)`` with offset <= 0, see ``prev``)."""

    name: str
    fn: Any
    lane: Lane = 0
    deps: Sequence[Dep] = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated stage graph: launch order (a topological order keeping declaration order where
    possible), lanes per stage, and ``history`` = how many earlier blocks a block depends on."""

    launch_order: tuple[str, ...]
    lanes: tuple[Lane, ...]
    deps: tuple[tuple[tuple[str, int], ...], ...]
    history: int


def _dep_pair(stage: str, dep: Dep) -> tuple[str, int]:
    if isinstance(dep, str):
        return (dep, 0)
    if isinstance(dep, tuple) and len(dep) == 2 and isinstance(dep[0], str) and isinstance(dep[1], int):
        return (dep[0], int(dep[1]))
    raise TypeError(f"stage {stage!r}: a dependency is a stage name or (name, block_offset), got {dep!r}")


def _lane_ids(stages: Sequence[Stage], lanes: int | Sequence[Lane] | None) -> tuple[list[int], list[Lane]]:
    """Maps stage lanes to 0..n-1; returns (lane id per stage, lane names)."""
    if lanes is None:
        names = list(dict.fromkeys(s.lane for s in stages))
    elif isinstance(lanes, int):
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        names = list(range(lanes))
    else:
        names = list(lanes)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate lane names in {names!r}")
    index = {name: i for i, name in enumerate(names)}
    unknown = [f"{s.name!r} (lane {s.lane!r})" for s in stages if s.lane not in index]
    if unknown:
        raise ValueError(f"stages on unknown lanes: {', '.join(unknown)}; lanes are {names!r}")
    return [index[s.lane] for s in stages], names


def _specs(stages: Sequence[Stage], lane_ids: list[int]) -> list[tuple[str, int, list[tuple[str, int]]]]:
    for s in stages:
        if not isinstance(s, Stage):
            raise TypeError(f"expected Stage, got {type(s).__name__}")
        if isinstance(s.deps, (str, bytes)):
            raise TypeError(f"stage {s.name!r}: deps must be a sequence of dependencies, got the string {s.deps!r}")
    return [(s.name, lane, [_dep_pair(s.name, d) for d in s.deps]) for s, lane in zip(stages, lane_ids)]


def _require_ext() -> Any:
    if _rounds._ext is None:
        raise ImportError("runtime._scheduler is not built: run `pip install --no-deps -e .` in the repository "
                          f"({_rounds._IMPORT_ERROR})")
    return _rounds._ext


def plan(stages: Sequence[Stage], lanes: int | Sequence[Lane] | None = None) -> Plan:
    """Validate a stage graph without starting anything; ``ValueError`` names the problem."""
    lane_ids, names = _lane_ids(stages, lanes)
    p = _require_ext().make_plan(_specs(stages, lane_ids), len(names))
    return Plan(tuple(p.launch_order), tuple(names[i] for i in p.lanes), tuple(tuple(d) for d in p.deps), p.history)


class _StageCall:
    """A stage bound to one block: called by the lane with the stream, stores the result."""

    wants_stream = True

    def __init__(self, name: str, fn: Callable, block: int, inputs: Any, results: dict):
        self.name, self.fn, self.block, self.inputs, self.results = name, fn, block, inputs, results

    def __call__(self, stream: int | None) -> None:
        result = self.fn(self.block, self.inputs, stream)
        if result is not None:
            self.results[self.name] = result


class BlockHandle:
    def __init__(self, owner: Scheduler, block: int, rnd: _rounds.RoundHandle, results: dict, mark: int):
        self.owner, self.block, self.round, self.results, self.mark = owner, block, rnd, results, mark

    def __repr__(self) -> str:
        return f"<BlockHandle block={self.block}>"


def _work(stage: Stage, backend: str) -> tuple[Callable | None, Any]:
    """(fn, graph) of a stage for Task."""
    fn = stage.fn
    is_graph = hasattr(fn, "raw_cuda_graph_exec") or (isinstance(fn, int) and not isinstance(fn, bool))
    if is_graph:
        if backend != "cuda":
            raise ValueError(f"stage {stage.name!r}: CUDA graphs and cudaGraphExec_t handles need backend='cuda'")
        return None, fn
    if not callable(fn):
        raise TypeError(f"stage {stage.name!r}: fn must be callable or a CUDA graph, got {type(fn).__name__}")
    return fn, None


class Scheduler:
    """Runs the stage DAG for each submitted block, one round per block (see the module docstring).

    backend: "host" or "cuda" (or "torch"/"auto", see RoundRunner). lanes: None (the stages' lanes,
    in order of appearance), a count, or lane names. device, streams: as for RoundRunner.
    """

    def __init__(self, stages: Sequence[Stage], backend: str = "host",
                 lanes: int | Sequence[Lane] | None = None, *, device: int | None = None,
                 streams: Sequence[Any] | None = None):
        stages = list(stages)
        self._lane_names = _lane_ids(stages, lanes)[1]
        self._plan = plan(stages, self._lane_names)
        by_name = {s.name: s for s in stages}
        self._stages = [by_name[n] for n in self._plan.launch_order]
        self._index = {n: i for i, n in enumerate(self._plan.launch_order)}
        self._runner = _rounds.RoundRunner(backend, device, lanes=self._lane_names, streams=streams)
        self._works = [_work(s, self._runner.backend) for s in self._stages]
        self._window: collections.deque[BlockHandle] = collections.deque(maxlen=max(self._plan.history, 1))
        self._pending: list[BlockHandle] = []
        self._last: int | None = None
        self._cancels = 0
        self._cancelled = False
        self._closed = False

    @property
    def backend(self) -> str:
        return self._runner.backend

    @property
    def plan(self) -> Plan:
        return self._plan

    @property
    def lanes(self) -> tuple[Lane, ...]:
        return tuple(self._lane_names)

    def submit_block(self, block_index: int, inputs: Any = None) -> BlockHandle:
        """Queue every stage of a block as one round; returns at once. Block indices must increase
        (``reset()`` starts over); raises ``Cancelled`` after ``cancel()`` until ``reset()``."""
        b = int(block_index)
        if self._closed:
            raise RuntimeError("scheduler is closed")
        if self._cancelled:
            raise _rounds.Cancelled(f"scheduler was cancelled: call reset() before submitting block {b}")
        if self._last is not None and b <= self._last:
            raise ValueError(f"block {b} submitted after block {self._last}: block indices must increase "
                             "(reset() starts over)")
        results: dict[str, Any] = {}
        recent = {h.block: h.round for h in self._window if h.block >= b - self._plan.history}
        tasks = [self._task(i, b, inputs, results, recent) for i in range(len(self._stages))]
        handle = BlockHandle(self, b, self._runner.submit(tasks), results, self._cancels)
        self._last = b
        if self._plan.history:
            self._window.append(handle)
        self._pending = [h for h in self._pending if not h.round.done()] + [handle]
        return handle

    def _task(self, i: int, b: int, inputs: Any, results: dict, recent: dict) -> _rounds.Task:
        stage = self._stages[i]
        deps: list = []
        for name, offset in self._plan.deps[i]:
            if offset == 0:
                deps.append(self._index[name])
            elif (src := recent.get(b + offset)) is not None:  # a block never submitted: nothing to wait for
                deps.append((src, self._index[name]))
        fn, graph = self._works[i]
        call = _StageCall(stage.name, fn, b, inputs, results) if fn is not None else None
        return _rounds.Task(stage.name, stage.lane, fn=call, graph=graph, deps=tuple(deps), group=b, block=b)

    def wait(self, handle: BlockHandle, timeout: float | None = None) -> dict[str, Any]:
        """Wait for a block; returns ``{stage name: result}`` for stages that returned non-None.

        Raises ``StageError`` (stage, block, ``waited_block``, the original as ``__cause__``) when the
        block or a block it depends on failed, ``Cancelled`` when ``cancel()`` came first, and
        ``TimeoutError`` after ``timeout`` seconds (the block keeps running)."""
        if not isinstance(handle, BlockHandle) or handle.owner is not self:
            raise ValueError("handle does not belong to this scheduler")
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not handle.round.done():
            if handle.mark < self._cancels:
                raise _rounds.Cancelled(f"block {handle.block} was cancelled")
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"block {handle.block} not done after {timeout} s")
            try:
                handle.round.wait(left)  # in slices: a cancel() from another thread ends the wait
            except TimeoutError:
                pass
        failed = handle.round.wait()
        self._pending = [h for h in self._pending if not h.round.done()]
        if handle.block in failed:
            raise _block_error(failed[handle.block], handle.block)
        return handle.results

    def done(self, handle: BlockHandle) -> bool:
        """True when ``wait(handle)`` would not block."""
        return handle.mark < self._cancels or handle.round.done()

    def cancel(self) -> None:
        """No stage of a submitted block starts any more (running ones finish); pending and
        future waits on blocks not completed raise ``Cancelled``; submit raises until reset()."""
        self._cancelled = True
        self._cancels += 1
        for h in self._pending:
            self._runner.cancel(h.block)

    def reset(self) -> None:
        """Cancel, wait for running stages, forget every block: ready for a new session."""
        if self._closed:
            raise RuntimeError("scheduler is closed")
        self.cancel()
        for h in self._pending:
            h.round.wait()
        self._pending, self._last, self._cancelled = [], None, False
        self._window.clear()

    def close(self) -> None:
        """Cancel and stop the lanes; drops the stages (they often reference the owner). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.cancel()
        self._runner.close()
        self._pending, self._stages, self._works = [], [], []
        self._window.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _block_error(err: _rounds.StageError, waited: int) -> _rounds.StageError:
    """The round's error, re-raised for one waited block (``waited_block`` says which)."""
    if isinstance(err, _rounds.Cancelled):
        return _rounds.Cancelled(f"block {waited} was cancelled")
    msg = str(err)
    if err.block != waited:
        msg += f" (block {waited} depends on it and was abandoned)"
    out = type(err)(msg)
    out.stage, out.block, out.group, out.waited_block = err.stage, err.block, err.group, waited
    out.__cause__ = err.__cause__
    return out


def on_stream(fn: Callable[[int, Any], Any]) -> Callable[[int, Any, int | None], Any]:
    """Adapts ``fn(block_index, inputs)`` into a stage run with the lane's CUDA stream current in
    torch (eager fallback for a stage that could not be captured). Host (stream None): just calls."""

    def stage(block_index: int, inputs: Any, stream: int | None) -> Any:
        if stream is None:
            return fn(block_index, inputs)
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            return fn(block_index, inputs)

    stage.__name__ = getattr(fn, "__name__", "stage")
    return stage
