"""Spawning, watching and ending the rank processes of a pipeline on this machine (both families)."""
from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .failures import PipelineError, StageError, error_of


def init_spawned_rank(rank: int, world_size: int, root: str, backend: str, threads: int,
                      comm_timeout_s: float) -> tuple[torch.device, object]:
    """Process group of a rank spawned on this machine (a FileStore under `root`): its device (cuda:rank
    for NCCL, else the CPU) and the gloo meta group."""
    torch.set_num_threads(threads)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(os.path.join(root, "store"), world_size)
    timeout = timedelta(seconds=comm_timeout_s)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return device, dist.new_group(backend="gloo", timeout=timeout)



def write_json(path: Path, info: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)



def report_rank_error(root: Path, rank: int, e: BaseException, role: Callable[[], str], *,
                      session: int | None = None, name: str = "pipeline") -> None:
    """A rank's fatal error as `error{rank}.json` under `root` (what `wait_for` reads back into a
    PipelineError naming rank, role, stage and block), and one line on stdout. `role()` names the rank
    for a failure outside any stage (if it fails too: "?"); `session` overrides a StageError's session
    (a pipeline whose stages name none)."""
    if isinstance(e, StageError):
        info = {"role": e.role, "stage": e.stage, "session": e.session if session is None else session,
                "block": e.block, "transfer": e.transfer, "cause": e.cause}
    else:
        try:
            who = role()
        except Exception:  # noqa: BLE001 - the report must be written whatever went wrong
            who = "?"
        info = {"role": who, "stage": "setup", "session": -1, "block": -1, "transfer": False,
                "cause": f"{type(e).__name__}: {e}"}
    info.update(rank=rank, time=time.time(), traceback=traceback.format_exc())
    write_json(root / f"error{rank}.json", info)
    where = f" (block {info['block']})" if info["block"] >= 0 else ""
    print(f"[{name} rank {rank}] {info['stage']}{where}: {info['cause']}", flush=True)


def root_cause(root: Path, procs, exit_codes: list[int | None] | None = None) -> PipelineError:
    """The first failure that is not a peer noticing it (waits on a dead peer fail too, later).

    A rank that died without a report (SIGKILL, the OOM killer, a crash in native code) is that
    failure: its peers' reports then only say "connection closed". `exit_codes`: the ranks' codes
    before the driver ended any of them (so a signal the driver sent is not taken for the cause).
    """
    codes = [p.exitcode for p in procs] if exit_codes is None else exit_codes
    silent = [(r, c) for r, c in enumerate(codes) if c not in (None, 0) and not (root / f"error{r}.json").exists()]
    reports = [json.loads(p.read_text()) for p in sorted(root.glob("error*.json"))]
    if silent:
        rank, code = silent[0]
        then = ""
        if reports:
            first = min(reports, key=lambda e: e["time"])
            then = f"; then rank {first['rank']} failed in stage '{first['stage']}': {first['cause']}"
        return PipelineError(f"pipeline rank {rank} died without reporting an error: {exit_reason(code)}{then}",
                             rank=rank)
    if reports:
        return error_of(min(reports, key=lambda e: (e["transfer"], e["time"])))
    return PipelineError("pipeline ranks failed without reporting an error", rank=None)


def exit_reason(code: int) -> str:
    """'killed by signal 9 (SIGKILL)' or 'exit code 3' (multiprocessing gives -N for signal N)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-code} ({name})"
    return f"exit code {code}"



def stop(procs, grace_s: float) -> list[int | None]:
    """Give ranks `grace_s` to exit on their own (peers of a failed rank fail fast), then end them.
    Returns the exit codes the ranks had before any was ended here (None: still running then)."""
    started = [p for p in procs if p.pid is not None]
    deadline = time.monotonic() + grace_s
    for p in started:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode if p.pid is not None else None for p in procs]
    for p in started:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
    return codes



def process_context(start_method: str, preload: list[str]):
    """A multiprocessing context; with "forkserver", `preload` (module names) is imported once in the
    server, not in every rank (no torch thread pool or CUDA context exists there to be forked)."""
    import multiprocessing

    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(list(dict.fromkeys(preload)))
    return ctx


def wait_for(procs, root: Path, deadline: float) -> None:
    while True:
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return
        if any(c not in (None, 0) for c in codes) or any(root.glob("error*.json")):
            raise root_cause(root, procs, stop(procs, grace_s=3.0))
        if time.perf_counter() > deadline:
            running = [i for i, p in enumerate(procs) if p.is_alive()]
            stop(procs, 0)
            raise PipelineError(f"pipeline timed out; ranks still running: {running}")
        time.sleep(0.02)

