"""Python face of the per-block stage scheduler (C++ core: ``csrc/``, extension ``runtime._scheduler``).

A block's work is a small DAG of stages (denoising steps, KV refresh, VAE decode). Each stage runs
on a lane: a worker thread (``backend="host"``) or a CUDA stream (``backend="cuda"``). Stages of
one lane run in submission order; dependencies are ``(stage, block_offset)`` pairs, so block b+1
can start denoising while block b still decodes on another lane::

    stages = [
        Stage("step0", step0, lane="denoise", deps=[prev("refresh")]),
        Stage("step1", step1, lane="denoise", deps=["step0"]),
        Stage("refresh", refresh, lane="denoise", deps=["step1"]),
        Stage("decode", decode, lane="decode", deps=["step1", prev("decode")]),
    ]
    with Scheduler(stages) as sched:
        handles = [sched.submit_block(b, inputs) for b, inputs in enumerate(blocks)]
        results = [sched.wait(h) for h in handles]   # {stage name: returned value}

A stage callable is called as ``fn(block_index, inputs, stream)``: ``inputs`` is what was given
to ``submit_block``, ``stream`` is the lane's ``cudaStream_t`` as an int (``None`` on the host
backend). On the CUDA backend a stage may instead be a CUDA graph exec (a ``torch.cuda.CUDAGraph``
or a raw ``cudaGraphExec_t`` int), launched on the lane stream with no Python in the way.
See ``docs/scheduler.md``.
"""
from __future__ import annotations

import atexit
import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

try:
    from . import _scheduler as _ext
except ImportError as _err:  # the C++ extension is not built (pip install -e . builds it)
    _ext = None
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None

__all__ = ["Cancelled", "Plan", "Scheduler", "Stage", "StageError", "compiled_backends",
           "extension_available", "on_stream", "plan", "prev"]

Dep = str | tuple[str, int]
Lane = str | int

if _ext is not None:
    StageError = _ext.StageError
    Cancelled = _ext.Cancelled
else:
    class StageError(RuntimeError):
        """A stage raised: ``.stage``/``.block`` say where, ``.waited_block`` which block was waited
        on, ``__cause__`` is the original exception."""

    class Cancelled(RuntimeError):
        """The block was cancelled (``cancel()``/``reset()``) before it completed."""


def extension_available() -> bool:
    return _ext is not None


def compiled_backends() -> tuple[str, ...]:
    """Backends compiled into the extension: ``("host",)`` or ``("host", "cuda")``; ``()`` if unbuilt."""
    return tuple(_ext.compiled_backends) if _ext is not None else ()


def prev(stage: str, blocks: int = 1) -> tuple[str, int]:
    """A dependency on ``stage`` of the block ``blocks`` earlier (e.g. step0 after the previous refresh)."""
    if blocks < 1:
        raise ValueError(f"prev({stage!r}, {blocks}): blocks must be >= 1")
    return (stage, -blocks)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One node of the per-block DAG.

    fn: ``fn(block_index, inputs, stream) -> result`` (results of not-None are returned by
        ``wait``), or on the CUDA backend a ``torch.cuda.CUDAGraph`` / ``cudaGraphExec_t`` int.
    lane: the worker thread / CUDA stream it runs on (any hashable name or int).
    deps: stage names of the same block, or ``(name, offset)`` with offset <= 0 (see ``prev``).
    """

    name: str
    fn: Any
    lane: Lane = 0
    deps: Sequence[Dep] = ()


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
            raise TypeError(f"stage {s.name!r}: deps must be a sequence of dependencies, "
                            f"got the string {s.deps!r}")
    return [(s.name, lane, [_dep_pair(s.name, d) for d in s.deps]) for s, lane in zip(stages, lane_ids)]


def _require_ext() -> Any:
    if _ext is None:
        raise ImportError(
            "runtime._scheduler is not built: run `pip install --no-deps --no-build-isolation -e .` "
            f"in the repository ({_IMPORT_ERROR})"
        )
    return _ext


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated stage graph: launch order (a topological order keeping declaration order where
    possible), lanes per stage, and ``history`` = how many earlier blocks a block depends on."""

    launch_order: tuple[str, ...]
    lanes: tuple[Lane, ...]
    deps: tuple[tuple[tuple[str, int], ...], ...]
    history: int


def _plan_from_ext(p: Any, lane_names: list[Lane]) -> Plan:
    return Plan(tuple(p.launch_order), tuple(lane_names[i] for i in p.lanes),
                tuple(tuple(d) for d in p.deps), p.history)


def plan(stages: Sequence[Stage], lanes: int | Sequence[Lane] | None = None) -> Plan:
    """Validate a stage graph without starting anything; ``ValueError`` names the problem."""
    lane_ids, names = _lane_ids(stages, lanes)
    return _plan_from_ext(_require_ext().make_plan(_specs(stages, lane_ids), len(names)), names)


def _work(stage: Stage, backend: str, keepalive: list) -> Any:
    fn = stage.fn
    if hasattr(fn, "raw_cuda_graph_exec"):  # torch.cuda.CUDAGraph: launched raw, kept alive here
        if backend != "cuda":
            raise ValueError(f"stage {stage.name!r}: CUDA graphs need backend='cuda'")
        keepalive.append(fn)
        return int(fn.raw_cuda_graph_exec())
    if isinstance(fn, int) and not isinstance(fn, bool):
        if backend != "cuda":
            raise ValueError(f"stage {stage.name!r}: a cudaGraphExec_t handle needs backend='cuda'")
        return fn
    if not callable(fn):
        raise TypeError(f"stage {stage.name!r}: fn must be callable or a CUDA graph, got {type(fn).__name__}")
    return fn


# Schedulers still open at exit are closed while the interpreter is whole: a lane worker that
# asked for the GIL during interpreter teardown would be killed mid-stage.
_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_schedulers() -> None:
    for sched in list(_OPEN):
        sched.close()


def _stream_handle(s: Any) -> int:
    return int(getattr(s, "cuda_stream", s))  # torch.cuda.Stream or a raw int


class Scheduler:
    """Runs the stage DAG for each submitted block on host threads or CUDA streams.

    backend: "host" (one worker thread per lane) or "cuda" (one stream per lane).
    lanes: None (the stages' lanes, in order of appearance), a count, or a sequence of lane names.
    device: CUDA device ordinal (cuda backend; default the current device).
    streams: existing streams for the lanes, one per lane (torch.cuda.Stream or int handles);
        by default the cuda backend creates its own non-blocking streams.
    """

    def __init__(self, stages: Sequence[Stage], backend: str = "host",
                 lanes: int | Sequence[Lane] | None = None, *, device: int | None = None,
                 streams: Sequence[Any] | None = None):
        ext = _require_ext()
        if backend not in ("host", "cuda"):
            raise ValueError(f"unknown backend {backend!r}: expected 'host' or 'cuda'")
        if backend not in ext.compiled_backends:
            raise ValueError(f"backend {backend!r} was not compiled into this build "
                             f"(compiled: {', '.join(ext.compiled_backends)})")
        stages = list(stages)
        lane_ids, self._lane_names = _lane_ids(stages, lanes)
        self._keepalive: list = []  # CUDA graphs whose execs the core launches
        works = [_work(s, backend, self._keepalive) for s in stages]
        handles = [_stream_handle(s) for s in streams] if streams is not None else []
        self._core = ext.Scheduler(backend, _specs(stages, lane_ids), works, len(self._lane_names),
                                   -1 if device is None else int(device), handles)
        self._plan = _plan_from_ext(self._core.plan, self._lane_names)
        _OPEN.add(self)

    @property
    def backend(self) -> str:
        return self._core.backend

    @property
    def plan(self) -> Plan:
        return self._plan

    @property
    def lanes(self) -> tuple[Lane, ...]:
        return tuple(self._lane_names)

    def submit_block(self, block_index: int, inputs: Any = None):
        """Queue (host) or launch (cuda) every stage of a block; returns a handle at once.

        Block indices must increase (``reset()`` starts over). Raises ``Cancelled`` after
        ``cancel()`` until ``reset()``."""
        return self._core.submit(int(block_index), inputs)

    def wait(self, handle, timeout: float | None = None) -> dict[str, Any]:
        """Wait for a block; returns ``{stage name: result}`` for stages that returned non-None.

        Raises ``StageError`` (stage, block, original exception as ``__cause__``) when the block
        or a block it depends on failed, ``Cancelled`` when ``cancel()`` came first, and
        ``TimeoutError`` after ``timeout`` seconds (the block keeps running)."""
        return self._core.wait(handle, timeout)

    def done(self, handle) -> bool:
        """True when ``wait(handle)`` would not block."""
        return self._core.done(handle)

    def cancel(self) -> None:
        """Stop launching stages; running stages finish; pending and future waits raise ``Cancelled``."""
        self._core.cancel()

    def reset(self) -> None:
        """Cancel, wait for running stages, forget every block: the scheduler is ready for a new session."""
        self._core.reset()

    def close(self) -> None:
        """Cancel and stop the lane workers / release the streams. Idempotent."""
        self._core.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def on_stream(fn: Callable[[int, Any], Any]) -> Callable[[int, Any, int | None], Any]:
    """Adapts ``fn(block_index, inputs)`` into a stage that runs with the lane's CUDA stream made
    torch's current stream (eager fallback for a stage that could not be captured as a graph).
    On the host backend (stream None) it just calls ``fn``."""

    def stage(block_index: int, inputs: Any, stream: int | None) -> Any:
        if stream is None:
            return fn(block_index, inputs)
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            return fn(block_index, inputs)

    stage.__name__ = getattr(fn, "__name__", "stage")
    return stage
