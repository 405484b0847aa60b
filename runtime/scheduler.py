"""Round plans for the C++ scheduler (C++ core: ``csrc/``, extension ``runtime._scheduler``).

A round is the work of one engine step (the next block of every batched session) as a list of
``Task``s: each names a lane, its dependencies (earlier tasks of the round, or tasks of earlier
rounds) and a failure group (a session). ``RoundRunner.submit`` hands the whole round to C++ as one
plan and returns at once; the lanes run it with the GIL released::

    with RoundRunner("auto") as runner:
        r0 = runner.submit([Task("step0", "compute", graph=g0, group=s),
                            Task("decode", "decode", fn=decode, deps=(0,), group=s)])
        r1 = runner.submit([Task("step0", "compute", graph=g0, deps=((r0, 0),), group=s)])
        failed = r0.wait()        # {group: StageError}; never raises for a stage fault

Backends: "host" (C++ lane threads running ``Task.fn``), "cuda" (C++ lane threads launching graph
execs on one CUDA stream per lane, events between lanes), "torch" (the same contract in Python over
torch streams and events: the fallback), "auto". See docs/scheduler.md.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

try:
    from . import _scheduler as _ext
except ImportError as _err:  # the C++ extension is not built (pip install -e . builds it)
    _ext = None
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None

__all__ = ["BackendChoice", "Cancelled", "CudaContextError", "RoundHandle", "RoundRunner", "StageError",
           "Task", "compiled_backends", "extension_available", "select_backend"]

log = logging.getLogger(__name__)

if _ext is not None:
    StageError = _ext.StageError
    Cancelled = _ext.Cancelled
    CudaContextError = _ext.CudaContextError
else:
    class StageError(RuntimeError):
        """A task failed: ``.stage``/``.block``/``.group`` say where, ``__cause__`` is the original."""

    class Cancelled(StageError):
        """The task's group was cancelled (or the runner closed) before the task started."""

    class CudaContextError(StageError):
        """A sticky device fault poisoned the CUDA context: the process can run no more GPU work."""


def extension_available() -> bool:
    return _ext is not None


def compiled_backends() -> tuple[str, ...]:
    """Backends compiled into the extension: ``("host",)`` or ``("host", "cuda")``; ``()`` if unbuilt."""
    return tuple(_ext.compiled_backends) if _ext is not None else ()


@dataclasses.dataclass(frozen=True)
class Task:
    """One node of a round plan (contract B in the project's interface notes).

    fn: eager body (host backend, torch fallback, or a stage that was not captured); on the cuda
        backend it runs on the lane thread with the GIL and the lane stream current.
    graph: ``torch.cuda.CUDAGraph`` or a raw ``cudaGraphExec_t`` int, launched by C++.
    deps: ints (earlier tasks of this round) or ``(RoundHandle, int)`` (a task of an earlier round).
    group: failure domain; a failed task skips its dependents (transitively) and the later tasks of
        its group in this round. block: the block index, for error messages.
    """

    name: str
    lane: str
    fn: Callable[[], None] | None = None
    graph: Any = None
    deps: tuple = ()
    group: Hashable = None
    block: int = -1

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task.name must be a non-empty str, got {self.name!r}")
        if self.fn is None and self.graph is None:
            raise ValueError(f"task {self.name!r} has neither fn nor graph")
        if self.fn is not None and not callable(self.fn):
            raise TypeError(f"task {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.deps, (tuple, list)):
            raise TypeError(f"task {self.name!r}: deps must be a tuple, got {type(self.deps).__name__}")


# ---------------------------------------------------------------- backend choice


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the machine offers: the probe ``select_backend`` decides on (injectable for tests)."""

    extension: bool        # runtime._scheduler imports
    cuda_compiled: bool    # ... and has the cuda backend
    gpu: bool              # torch sees a CUDA device
    driver_error: str | None = None  # why the extension's CUDA runtime cannot use the driver


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    backend: str
    reason: str | None  # why "auto" did not pick cuda (None when it did, or a backend was named)


def probe_capabilities() -> Capabilities:
    import torch

    gpu = torch.cuda.is_available()
    cuda_compiled = "cuda" in compiled_backends()
    driver_error = None
    if gpu and cuda_compiled:
        try:  # a runner creates streams: the cheapest proof that this cudart runs on the driver
            _ext.RoundExecutor("cuda", 1, -1, []).close()
        except Exception as err:  # noqa: BLE001 - any failure means: do not use it
            driver_error = str(err)
    return Capabilities(_ext is not None, cuda_compiled, gpu, driver_error)


def select_backend(requested: str = "auto", probe: Callable[[], Capabilities] = probe_capabilities,
                   device=None) -> BackendChoice:
    """Resolve ``requested`` to a backend; "auto" prefers cuda, then torch on a GPU, then host
    (host at once for an explicit CPU ``device``: an engine on the CPU runs eager bodies)."""
    if requested not in ("auto", "host", "cuda", "torch"):
        raise ValueError(f"unknown backend {requested!r}: expected 'auto', 'host', 'cuda' or 'torch'")
    if requested != "auto":
        return BackendChoice(requested, None)
    if _device_type(device) == "cpu" and _ext is not None:
        return BackendChoice("host", "round runner: the device is the CPU, using the C++ host backend")
    caps = probe()
    if caps.gpu:
        if caps.cuda_compiled and caps.driver_error is None:
            return BackendChoice("cuda", None)
        if not caps.extension:
            why = f"the C++ extension is not built ({_IMPORT_ERROR})"
        elif not caps.cuda_compiled:
            why = "the extension was built without the CUDA toolkit"
        else:
            why = f"the extension's CUDA runtime cannot use this driver ({caps.driver_error})"
        return BackendChoice("torch", f"round runner: using torch streams, not the C++ cuda backend: {why}")
    if caps.extension:
        return BackendChoice("host", "round runner: no CUDA device, using the C++ host backend")
    return BackendChoice("torch", f"round runner: no CUDA device and no C++ extension ({_IMPORT_ERROR}); "
                                  "using Python lane threads")


# ---------------------------------------------------------------- rounds


def _make_error(group, stage, block, kind, message, cause) -> StageError:
    cls = {"raised": StageError, "cancelled": Cancelled, "device": CudaContextError}[kind]
    what = f"{type(cause).__name__}: {cause}" if cause is not None else message
    err = cls(f"stage '{stage}' of block {block} failed: {what}" if kind == "raised"
              else f"stage '{stage}' of block {block}: {what}")
    err.stage, err.block, err.group = stage, block, group
    err.__cause__ = cause if cause is not None else RuntimeError(message)
    return err


class RoundHandle:
    """A submitted round: ``wait()`` for it; ``failed`` once ``done()``."""

    def __init__(self, runner: RoundRunner, core_round: Any, groups: dict[int, Hashable], ntasks: int):
        self._runner = runner
        self._round = core_round
        self._groups = groups  # group id -> group, for the failures
        self._ntasks = ntasks
        self._failed: dict[Hashable, StageError] | None = None

    def done(self) -> bool:
        return self._failed is not None or self._runner._exec.done(self._round)

    def wait(self, timeout: float | None = None) -> dict[Hashable, StageError]:
        """Blocks until every task finished or was skipped; returns the failed groups.

        ``TimeoutError`` after ``timeout`` seconds (the round keeps running)."""
        if self._failed is None:
            rows = self._runner._exec.wait(self._round, timeout)
            self._failed = {self._groups[gid]: _make_error(self._groups[gid], *rest) for gid, *rest in rows}
        return self._failed

    @property
    def failed(self) -> dict[Hashable, StageError]:
        if not self.done():
            raise RuntimeError("RoundHandle.failed is valid once done(): the round is still running")
        return self.wait()


# Runners still open at exit are closed while the interpreter is whole: a lane thread asking for
# the GIL during interpreter teardown would be killed mid-task.
_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_runners() -> None:
    for runner in list(_OPEN):
        runner.close()


class RoundRunner:
    """Runs round plans on lanes: one worker thread (host) or CUDA stream (cuda, torch) per lane.

    Rounds submitted later run after earlier ones on the same lane; cross-lane ordering is only
    what ``deps`` say. ``streams``: existing streams for the lanes (cuda backend; ints or
    ``torch.cuda.Stream``). ``probe``: capability probe for "auto" (tests inject one).
    """

    def __init__(self, backend: str = "auto", device=None, lanes: Sequence[str] = ("compute", "decode", "copy"),
                 *, streams: Sequence[Any] | None = None, probe: Callable[[], Capabilities] | None = None):
        choice = select_backend(backend, probe or probe_capabilities, device)
        if choice.reason:
            log.info(choice.reason)
        self.backend, self.fallback_reason = choice.backend, choice.reason
        self.lanes = tuple(lanes)
        if not self.lanes or len(set(self.lanes)) != len(self.lanes):
            raise ValueError(f"lanes must be distinct names, at least one: got {self.lanes!r}")
        self._lane_index = {name: i for i, name in enumerate(self.lanes)}
        self._device = _device_index(device)
        self._exec = self._make_executor(device, streams)
        self._group_ids: dict[Hashable, int] = {}
        self._next_gid = 0
        # Weak: a handle the caller dropped counts as finished here (its group ids may be
        # recycled, so cancel() no longer reaches it); holding it would pin the round's objects.
        self._inflight: collections.deque[weakref.ref] = collections.deque()
        self._streams: dict[int, Any] = {}
        self._lock = threading.Lock()  # submit/cancel from several threads: one round order, one id map
        _OPEN.add(self)

    def _make_executor(self, device, streams) -> Any:
        handles = [int(getattr(s, "cuda_stream", s)) for s in streams] if streams is not None else []
        if self.backend == "torch":
            from .scheduler_torch import TorchExecutor

            return TorchExecutor(len(self.lanes), device, streams)
        if _ext is None:
            raise ImportError("runtime._scheduler is not built: run `pip install --no-deps -e .` "
                              f"in the repository ({_IMPORT_ERROR})")
        if self.backend not in _ext.compiled_backends:
            raise ValueError(f"backend {self.backend!r} was not compiled into this build "
                             f"(compiled: {', '.join(_ext.compiled_backends)})")
        return _ext.RoundExecutor(self.backend, len(self.lanes), self._device, handles)

    @property
    def poisoned(self) -> bool:
        """True once a sticky device fault poisoned the CUDA context (every later submit raises)."""
        return self._exec.poisoned

    def submit(self, tasks: Sequence[Task]) -> RoundHandle:
        """Hand a round to the lanes; returns at once (the GIL is released while it runs).
        Safe from several threads: each round is one submission, in one lane order."""
        with self._lock:
            self._forget_finished()
            keep: list = []  # what the plan references (graphs); not the Tasks: their deps chain rounds
            groups: dict[int, Hashable] = {}
            specs = [self._spec(i, t, keep, groups) for i, t in enumerate(tasks)]
            handle = RoundHandle(self, self._exec.submit(specs, keep), groups, len(specs))
            self._inflight.append(weakref.ref(handle))
        return handle

    def cancel(self, group: Hashable) -> None:
        """Tasks of ``group`` in rounds submitted so far that have not started will not run
        (the group is reported as ``Cancelled``); later rounds of that group run normally."""
        with self._lock:
            gid = self._group_ids.get(group)
        if gid is not None:
            self._exec.cancel(gid)

    def close(self) -> None:
        """Cancel queued tasks, join the lanes, release the streams. Idempotent."""
        _OPEN.discard(self)
        self._exec.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ plan conversion

    def _spec(self, i: int, task: Task, keep: list, groups: dict[int, Hashable]) -> tuple:
        if not isinstance(task, Task):
            raise TypeError(f"round item #{i}: expected Task, got {type(task).__name__}")
        lane = self._lane_index.get(task.lane)
        if lane is None:
            raise ValueError(f"task #{i} {task.name!r} is on unknown lane {task.lane!r}; lanes are {self.lanes!r}")
        deps, external = self._deps(i, task)
        gid = self._group_ids.get(task.group)
        if gid is None:
            gid = self._group_ids[task.group] = self._next_gid
            self._next_gid += 1
        groups[gid] = task.group
        fn, graph = self._work(task, keep)
        return (task.name, lane, gid, int(task.block), deps, external, fn, graph)

    def _deps(self, i: int, task: Task) -> tuple[list[int], list[tuple[Any, int]]]:
        deps, external = [], []
        for d in task.deps:
            if isinstance(d, int) and not isinstance(d, bool):
                if not 0 <= d < i:
                    raise ValueError(f"task #{i} {task.name!r} depends on task {d}: a dependency must be an "
                                     "earlier task of the round (or (RoundHandle, index) for an earlier round)")
                deps.append(d)
            elif isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], RoundHandle) and isinstance(d[1], int):
                if d[0]._runner is not self:
                    raise ValueError(f"task #{i} {task.name!r} depends on a round of another RoundRunner")
                if not 0 <= d[1] < d[0]._ntasks:
                    raise ValueError(f"task #{i} {task.name!r} depends on task {d[1]} of an earlier round, "
                                     f"which has {d[0]._ntasks} tasks")
                external.append((d[0]._round, d[1]))
            else:
                raise TypeError(f"task #{i} {task.name!r}: a dependency is an int or (RoundHandle, int), got {d!r}")
        return deps, external

    def _work(self, task: Task, keep: list) -> tuple[Callable | None, int]:
        graph = task.graph
        if self.backend == "cuda" and graph is not None:
            if hasattr(graph, "raw_cuda_graph_exec"):
                keep.append(graph)  # the exec lives as long as the graph object
                return None, int(graph.raw_cuda_graph_exec())
            if isinstance(graph, int) and not isinstance(graph, bool) and graph != 0:
                return None, graph
            raise TypeError(f"task {task.name!r}: graph must be a torch.cuda.CUDAGraph or a cudaGraphExec_t int")
        fn = task.fn
        if fn is None and self.backend == "torch" and hasattr(graph, "replay"):
            fn = graph.replay
        if fn is None:
            raise ValueError(f"task {task.name!r} has only a graph, which the {self.backend} backend cannot run: "
                             "give Task.fn (the eager body) too")
        return self._lane_call(fn), 0

    def _lane_call(self, fn: Callable) -> Callable[[int | None], None]:
        if getattr(fn, "wants_stream", False):  # the per-block Scheduler's stages take the stream
            return fn
        if self.backend != "cuda":
            return lambda stream: fn()
        streams, device = self._streams, (self._device if self._device >= 0 else None)

        def on_lane_stream(stream: int | None) -> None:
            import torch

            s = streams.get(stream)
            if s is None:
                s = streams[stream] = torch.cuda.ExternalStream(stream, device=device)
            with torch.cuda.stream(s):
                fn()

        return on_lane_stream

    def _forget_finished(self) -> None:
        """Drops finished rounds from the in-flight list and, now and then, the group ids no
        in-flight round uses (cancel ids only matter for rounds still running)."""
        def finished(ref: weakref.ref) -> bool:
            h = ref()
            return h is None or h.done()

        while self._inflight and finished(self._inflight[0]):
            self._inflight.popleft()
        if len(self._group_ids) > 64 + 4 * len(self._inflight):
            live = {g for ref in self._inflight if (h := ref()) is not None for g in h._groups.values()}
            self._group_ids = {g: gid for g, gid in self._group_ids.items() if g in live}


def _device_type(device) -> str | None:
    if device is None:
        return None
    if isinstance(device, int):
        return "cuda"
    return getattr(device, "type", None) or str(device).split(":")[0]


def _device_index(device) -> int:
    if device is None:
        return -1
    if isinstance(device, int):
        return device
    index = getattr(device, "index", None)
    if index is None and isinstance(device, str):
        index = int(device.split(":")[1]) if ":" in device else None
    return -1 if index is None else int(index)

