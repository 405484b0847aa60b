"""The "torch" backend of RoundRunner: the round executor's contract in Python over torch streams.

The fallback for a GPU machine whose C++ extension has no usable CUDA backend (built without the
toolkit, or its CUDA runtime too new for the driver), and for a machine without the extension at
all. It mirrors csrc/scheduler/round.h: one thread per lane, FIFO across rounds, a task runs once
its dependencies settled; on CUDA each lane has a ``torch.cuda.Stream``, a task waits on the
events of its dependencies on other lanes, runs with its lane stream current and records an event.
Python runs per task here (the C++ cuda backend launches graphs without it).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from typing import Any

_SETTLED = {"done", "failed", "skipped", "cancelled"}
_BROKEN = {"failed", "skipped", "cancelled"}


@dataclasses.dataclass(frozen=True)
class _Failure:
    kind: str  # "raised" | "device" | "cancelled"
    stage: str
    block: int
    message: str
    cause: BaseException | None


class _Round:
    def __init__(self, owner: TorchExecutor, seq: int, specs: list[tuple]):
        self.owner, self.seq, self.specs = owner, seq, specs
        n = len(specs)
        self.state = ["queued"] * n
        self.cause: list[_Failure | None] = [None] * n
        self.events: list[Any] = [None] * n
        self.failed: dict[int, tuple[int, _Failure]] = {}  # group -> (first failing task, failure)
        self.unsettled = n

    def fail_group(self, t: int, failure: _Failure) -> None:
        gid = self.specs[t][2]
        if gid not in self.failed:
            self.failed[gid] = (t, failure)

    def deps(self, t: int):
        """(round, task) pairs task t waits for."""
        _, _, _, _, deps, external, _, _ = self.specs[t]
        return [(self, d) for d in deps] + list(external)


class TorchExecutor:
    """Same methods as the C++ ``RoundExecutor`` binding (see runtime/scheduler.py)."""

    backend = "torch"

    def __init__(self, num_lanes: int, device=None, streams=None):
        import torch

        self._torch = torch
        dev = torch.device(device) if device is not None else None
        self._cuda = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
        self._streams: list[Any] = [None] * num_lanes
        if self._cuda:
            if streams is not None:
                if len(streams) != num_lanes:
                    raise ValueError(f"got {len(streams)} streams for {num_lanes} lanes")
                self._streams = [s if isinstance(s, torch.cuda.Stream) else torch.cuda.ExternalStream(int(s))
                                 for s in streams]
            else:
                self._streams = [torch.cuda.Stream(dev) for _ in range(num_lanes)]
        elif streams:
            raise ValueError("streams= needs a CUDA device")
        self._cv = threading.Condition()
        self._queues: list[deque] = [deque() for _ in range(num_lanes)]
        self._marks: dict[int, int] = {}
        self._seq = 0
        self._stopping = False
        self.poisoned = False
        self._threads = [threading.Thread(target=self._lane, args=(i,), name=f"round-lane-{i}", daemon=True)
                         for i in range(num_lanes)]
        for t in self._threads:
            t.start()

    def submit(self, specs: list[tuple], keepalive: Any = None) -> _Round:
        for t, spec in enumerate(specs):
            if spec[6] is None:
                raise ValueError(f"task #{t} {spec[0]!r} has no function: the torch backend runs Task.fn")
        with self._cv:
            if self._stopping:
                raise RuntimeError("round runner is closed")
            if self.poisoned:
                raise _context_error("the CUDA context is poisoned by an earlier device fault")
            rnd = _Round(self, self._seq, specs)
            rnd.keepalive = keepalive
            self._seq += 1
            for t, spec in enumerate(specs):
                self._queues[spec[1]].append((rnd, t))
            self._cv.notify_all()
        return rnd

    def wait(self, rnd: _Round, timeout: float | None = None) -> list[tuple]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            if not self._cv.wait_for(lambda: rnd.unsettled == 0, timeout):
                raise TimeoutError(f"round not done after {timeout} s")
        self._finish(rnd, deadline)
        return [(gid, f.stage, f.block, f.kind, f.message, f.cause) for gid, (_, f) in rnd.failed.items()]

    def done(self, rnd: _Round) -> bool:
        with self._cv:
            if rnd.unsettled:
                return False
        return all(e is None or e.query() for e in rnd.events)

    def cancel(self, group: int) -> None:
        with self._cv:
            self._marks[group] = self._seq
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            if self._stopping:
                return
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()
        for s in self._streams:
            if s is not None:
                s.synchronize()

    # ------------------------------------------------------------ lanes

    def _ready(self, item) -> bool:
        rnd, t = item
        return self._stopping or all(src.state[d] in _SETTLED for src, d in rnd.deps(t))

    def _why_not(self, rnd: _Round, t: int) -> _Failure | None:
        for src, d in rnd.deps(t):
            if src.state[d] in _BROKEN:
                return src.cause[d]
        name, _, gid, block = rnd.specs[t][:4]
        first = rnd.failed.get(gid)
        if first is not None and first[0] < t:
            return first[1]
        if self._stopping or rnd.seq < self._marks.get(gid, -1):
            why = "the round runner was closed" if self._stopping else "the group was cancelled"
            return _Failure("cancelled", name, block, why, None)
        return None

    def _lane(self, lane: int) -> None:
        queue = self._queues[lane]
        with self._cv:
            while True:
                self._cv.wait_for(lambda: (self._stopping and not queue) or (queue and self._ready(queue[0])))
                if not queue:
                    return
                rnd, t = queue.popleft()
                why = self._why_not(rnd, t)
                if why is not None:
                    rnd.cause[t] = why
                    rnd.fail_group(t, why)
                    self._settle(rnd, t, "cancelled" if why.kind == "cancelled" else "skipped")
                else:
                    self._run(rnd, t, lane)
                self._cv.notify_all()
                del rnd, why  # an idle lane must not keep its last round (and what it references) alive

    def _run(self, rnd: _Round, t: int, lane: int) -> None:
        """Runs task t with the lock released; settles it under the lock."""
        rnd.state[t] = "running"
        waits = [src.events[d] for src, d in rnd.deps(t) if src.specs[d][1] != lane and src.events[d] is not None]
        self._cv.release()
        failure = None
        try:
            rnd.events[t] = self._launch(rnd.specs[t][6], self._streams[lane], waits)
        except BaseException as err:  # noqa: BLE001 - a task's failure fails its group, whatever it is
            failure = _Failure("raised", rnd.specs[t][0], rnd.specs[t][3], str(err), err)
        finally:
            self._cv.acquire()
        if failure is not None:
            rnd.cause[t] = failure
            rnd.fail_group(t, failure)
        self._settle(rnd, t, "failed" if failure else "done")

    def _launch(self, fn, stream, waits):
        if stream is None:
            fn(None)
            return None
        torch = self._torch
        with torch.cuda.stream(stream):
            for ev in waits:
                stream.wait_event(ev)
            fn(stream.cuda_stream)
            ev = torch.cuda.Event()
            ev.record(stream)
        return ev

    def _settle(self, rnd: _Round, t: int, state: str) -> None:
        rnd.state[t] = state
        rnd.unsettled -= 1
        if rnd.unsettled == 0:  # drop the links to earlier rounds: no chain over a long stream
            rnd.specs = [(*spec[:5], (), *spec[6:]) for spec in rnd.specs]

    def _finish(self, rnd: _Round, deadline: float | None) -> None:
        """Waits for the device; an error there is an asynchronous fault: the context is poisoned."""
        for t, ev in enumerate(rnd.events):
            if ev is None:
                continue
            try:
                while deadline is not None and not ev.query():
                    if time.monotonic() >= deadline:
                        raise TimeoutError("round not done on the device in time")
                    time.sleep(5e-5)
                ev.synchronize()
            except TimeoutError:
                raise
            except Exception as err:  # noqa: BLE001 - a device error surfaces as whatever torch raises
                fault = _Failure("device", rnd.specs[t][0], rnd.specs[t][3], f"device error: {err}", None)
                with self._cv:
                    self.poisoned = True
                    for i, state in enumerate(rnd.state):
                        if state == "done":
                            rnd.fail_group(i, fault)
                return


def _context_error(message: str):
    from .scheduler import CudaContextError

    return CudaContextError(message)
