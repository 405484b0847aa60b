"""Pick the fastest attention backend for a GPU by timing the capable ones on the real shapes, once.

`fastest_backend(device, shape)` builds the engine's attention inputs at `shape` (a full ring: the
steady state of a stream) for every backend `available_backends` lists as capable, times each with
CUDA events (warm-up calls excluded, median of the timed calls), logs the table and keeps the fastest.
The answer is cached in-process per (device key, shape) and, with `cache_dir`, in a JSON file there,
so later engines on the same kind of device skip the timing. The device key (name + compute
capability) only names the cache entry: the choice itself comes from the clock, never from a name.
A backend that fails on the shape (an unsupported dtype, out of memory) is logged and left out.

The timer is injectable (`timer(fn) -> milliseconds`), so the selection logic is tested on the CPU
without timing anything.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import backends
from .rope import apply_rope, rope_angles
from .window_attention import window_attention_reference

log = logging.getLogger(__name__)

# The fp32 reference is the numerical truth, not a contender.
TIMED = ("sdpa", "triton", "flash_attn", "sdpa_ring")
_CACHE_FILE = "attention_backends.json"


@dataclass(frozen=True)
class AttentionShape:
    """One layer's window attention as the engine runs it: q [batch, frames*T, heads, head_dim] over a
    ring of `slots` frames of T = grid_h*grid_w tokens."""

    batch: int
    frames: int
    slots: int
    grid_h: int
    grid_w: int
    heads: int
    head_dim: int
    dtype: str            # "bfloat16", "float16", "float32"

    def key(self) -> str:
        return ",".join(f"{k}={v}" for k, v in asdict(self).items())


def device_key(device: torch.device | str) -> str:
    """The cache key of a device: name and compute capability on CUDA (a cache label only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def cuda_event_timer(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of `iters` calls of `fn`, each between two CUDA events, after `warmup`
    untimed calls (compilation, autotuning, allocator growth)."""
    for _ in range(warmup):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


def attention_case(name: str, shape: AttentionShape, device: torch.device) -> Callable[[], object]:
    """A call of backend `name`'s window attention at `shape` on its own ring layout, all slots valid."""
    g = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, shape.dtype)
    T = shape.grid_h * shape.grid_w
    B, H, D, S = shape.batch, shape.heads, shape.head_dim, shape.slots
    q = torch.randn(B, shape.frames * T, H, D, generator=g, device=device).to(dtype)
    k = torch.randn(B, S * T, H, D, generator=g, device=device).to(dtype)
    v = torch.randn(B, S * T, H, D, generator=g, device=device).to(dtype)
    slot_pos = (torch.arange(S, dtype=torch.int32, device=device) - S + shape.frames).expand(B, S).contiguous()
    q_pos = torch.arange(shape.frames, dtype=torch.int32, device=device).expand(B, -1).contiguous()
    grid = (shape.grid_h, shape.grid_w)
    if name == "sdpa_ring":
        k = apply_rope(k, rope_angles(slot_pos, *grid, D)).to(dtype)
        return lambda: backends.window_attention_sdpa_ring(q, k, v, slot_pos, q_pos, *grid)
    if name == "reference":
        return lambda: window_attention_reference(q, k, v, slot_pos, q_pos, *grid)
    return lambda: backends.window_attention(q, k, v, slot_pos, q_pos, *grid,
                                             spatial_roped_keys=name == "triton", backend=name)


def time_backends(cases: dict[str, Callable[[], object]], timer: Callable[[Callable[[], object]], float]
                  ) -> dict[str, float]:
    """Milliseconds per call of every case; a case that raises gets inf (and a log line)."""
    times = {}
    for name, fn in cases.items():
        try:
            times[name] = float(timer(fn))
        except Exception as err:  # noqa: BLE001 - any failure just removes the contender
            log.warning("attention backend %r failed at timing: %s", name, err)
            times[name] = math.inf
    return times


_chosen: dict[tuple[str, AttentionShape], str] = {}


def _read_disk(cache_dir: Path | None, key: str) -> str | None:
    if cache_dir is None:
        return None
    try:
        return json.loads((cache_dir / _CACHE_FILE).read_text()).get(key)
    except (OSError, ValueError):
        return None


def _write_disk(cache_dir: Path | None, key: str, choice: str) -> None:
    if cache_dir is None:
        return
    path = cache_dir / _CACHE_FILE
    try:
        table = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        table = {}
    table[key] = choice
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    tmp.replace(path)     # atomic: a concurrent reader sees the old table or the new one


def fastest_backend(device: torch.device | str, shape: AttentionShape, *,
                    candidates: list[str] | None = None,
                    timer: Callable[[Callable[[], object]], float] | None = None,
                    make_case: Callable[[str, AttentionShape, torch.device], Callable[[], object]] = attention_case,
                    cache_dir: str | Path | None = None) -> str:
    """The fastest of `candidates` (default: the capable backends in TIMED) for `shape` on `device`,
    timed once per (device key, shape) and then remembered (in-process; on disk with `cache_dir`)."""
    device = torch.device(device)
    dev_key = device_key(device)
    key = (dev_key, shape)
    if key in _chosen:
        return _chosen[key]
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    disk_key = f"{dev_key} | {shape.key()}"
    names = candidates or [n for n in backends.available_backends(device) if n in TIMED]
    stored = _read_disk(cache_dir, disk_key)
    if stored in names:
        log.info("attention backend %r for %s on %s (cached in %s)", stored, shape, dev_key, cache_dir)
        _chosen[key] = stored
        return stored
    if timer is None:
        timer = cuda_event_timer
    times = time_backends({n: make_case(n, shape, device) for n in names}, timer)
    finite = {n: t for n, t in times.items() if math.isfinite(t)}
    if not finite:
        raise RuntimeError(f"no attention backend ran at {shape} on {dev_key}: {times}")
    choice = min(finite, key=finite.get)
    table = ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(times.items(), key=lambda kv: kv[1]))
    log.info("attention backend %r for %s on %s, timed: %s", choice, shape, dev_key, table)
    _chosen[key] = choice
    _write_disk(cache_dir, disk_key, choice)
    return choice


def clear_cache() -> None:
    """Forget the in-process choices (tests)."""
    _chosen.clear()
