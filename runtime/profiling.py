"""Profiling hooks: NVTX ranges, a torch.profiler session, and a timer that never syncs mid-block.

- `nvtx_range(name, index=None)`: an NVTX range (domain "avatar") around a stage or block, for
  Nsight Systems. Off unless AVATAR_NVTX=1. The implementation is chosen once, when this module is
  imported (`refresh()` re-reads the environment); off, it returns one shared no-op context manager,
  so the cost at a call site is a function call and nothing is formatted, allocated or imported.
  On, it still does nothing inside a CUDA-graph capture or a torch.compile trace: there a host-side
  range would mark the capture/trace, not the replay, and an nvtx call would break the graph.
- `profile_session()`: a torch.profiler session writing a chrome trace into $AVATAR_TORCH_PROFILE
  (or an explicit directory); without either it does nothing.
- `Timer`: spans timed with CUDA events on a GPU device (recorded, resolved later with one sync)
  and with time.perf_counter on CPU.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ENV_NVTX = "AVATAR_NVTX"
ENV_TORCH_PROFILE = "AVATAR_TORCH_PROFILE"
NVTX_DOMAIN = "avatar"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")

_NULL: AbstractContextManager[None] = contextlib.nullcontext()  # stateless, so one instance serves every call


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={os.environ[name]!r}: expected 1/0 (or true/false, on/off)")


# ---- NVTX -----------------------------------------------------------------------------------------

class _NvtxRange:
    __slots__ = ("_name", "_nvtx")

    def __init__(self, nvtx_module, name: str):
        self._nvtx, self._name = nvtx_module, name

    def __enter__(self) -> None:
        self._nvtx.push_range(message=self._name, domain=NVTX_DOMAIN)

    def __exit__(self, *exc) -> bool:
        self._nvtx.pop_range(domain=NVTX_DOMAIN)
        return False


def _noop_range(name: str, index: int | None = None) -> AbstractContextManager[None]:
    return _NULL


def _make_live_range(has_cuda: bool) -> Callable[..., AbstractContextManager[None]]:
    import nvtx  # only imported when ranges are on

    def live_range(name: str, index: int | None = None) -> AbstractContextManager[None]:
        if torch.compiler.is_compiling():
            return _NULL
        # Only ask about capture where CUDA exists: CPU builds raise on the query itself.
        if has_cuda and torch.cuda.is_current_stream_capturing():
            return _NULL
        return _NvtxRange(nvtx, name if index is None else f"{name} {index}")

    return live_range


_range_impl: Callable[..., AbstractContextManager[None]] = _noop_range


def refresh() -> bool:
    """Re-read AVATAR_NVTX and choose the range implementation; returns whether ranges are on."""
    global _range_impl
    on = _env_flag(ENV_NVTX)
    _range_impl = _make_live_range(torch.cuda.is_available()) if on else _noop_range
    return on


def nvtx_enabled() -> bool:
    return _range_impl is not _noop_range


def nvtx_range(name: str, index: int | None = None) -> AbstractContextManager[None]:
    """`with nvtx_range("dit.step", 2):` -> range "dit.step 2" when AVATAR_NVTX=1, else nothing."""
    return _range_impl(name, index)


refresh()


# ---- torch.profiler -------------------------------------------------------------------------------

@dataclass
class ProfileSession:
    """What `profile_session` yields: `profiler` is None when profiling is off."""

    directory: Path | None = None
    profiler: Any = None
    trace_path: Path | None = None  # set when the session ends

    @property
    def enabled(self) -> bool:
        return self.profiler is not None


@contextlib.contextmanager
def profile_session(directory: str | os.PathLike | None = None, name: str = "avatar") -> Iterator[ProfileSession]:
    """Profile the body with torch.profiler and write `<dir>/<name>-<pid>-<ns>.pt.trace.json`.

    `directory` defaults to $AVATAR_TORCH_PROFILE; with neither, the body runs unprofiled. CUDA
    activity is recorded when CUDA is available. The trace is written even if the body raises.
    """
    if not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"profile_session name must be a plain file-name stem, got {name!r}")
    target = directory if directory is not None else os.environ.get(ENV_TORCH_PROFILE, "").strip()
    if not target:
        yield ProfileSession()
        return
    out_dir = Path(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    session = ProfileSession(directory=out_dir, profiler=torch.profiler.profile(activities=activities))
    try:
        with session.profiler:
            yield session
    finally:
        path = out_dir / f"{name}-{os.getpid()}-{time.time_ns()}.pt.trace.json"
        session.profiler.export_chrome_trace(str(path))
        session.trace_path = path


# ---- timer ----------------------------------------------------------------------------------------

class Timer:
    """Named spans timed without syncing inside a block.

    On a CUDA device each span records two CUDA events on the current stream; `resolve()`
    synchronises once and converts every pending span to seconds. On CPU spans use
    time.perf_counter (CPU ops are synchronous, so the host clock is the work's clock).
    Do not time inside a CUDA-graph capture: events there belong to the graph, not to a replay.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"Timer supports cpu and cuda devices, got {self.device}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Timer on {self.device} but CUDA is not available")
        self._cuda = self.device.type == "cuda"
        self._pending: list[tuple[str, Any, Any]] = []

    def timestamp(self) -> Any:
        """A point in the work's timeline: a recorded CUDA event, or a perf_counter reading."""
        if not self._cuda:
            return time.perf_counter()
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("Timer used inside a CUDA-graph capture; time the replay instead")
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def add(self, name: str, start: Any, end: Any) -> None:
        """Register a span between two `timestamp()`s (for spans that cross function boundaries)."""
        self._pending.append((name, start, end))

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time the body; a body that raises records nothing."""
        start = self.timestamp()
        yield
        self.add(name, start, self.timestamp())

    @property
    def pending(self) -> int:
        return len(self._pending)

    def resolve(self) -> dict[str, list[float]]:
        """Seconds of every pending span, by name in recording order; one sync on CUDA; clears."""
        if self._cuda and self._pending:
            torch.cuda.synchronize(self.device)
        out: dict[str, list[float]] = {}
        for name, start, end in self._pending:
            seconds = start.elapsed_time(end) / 1e3 if self._cuda else end - start
            out.setdefault(name, []).append(seconds)
        self._pending.clear()
        return out
