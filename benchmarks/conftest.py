"""Benchmark suite plumbing: collect bench_*.py, one engine per case, and sizes from the environment.

pytest's default `python_files` only matches test_*.py, so the hook below collects bench_*.py files
under benchmarks/ as test modules (unless `python_files` already matches them, or the file was named
on the command line: then pytest collects it itself and this hook stays out, so nothing runs twice).

Cases: `tiny` on the CPU always; `livetalk-1.3b` (random weights, the real shapes) on CUDA when
available. Sizes: with `--benchmark-disable` (the default addopts) every body runs once as a smoke
test at the smallest size that still measures something; with `--benchmark-enable` the defaults
below measure properly. Environment variables override either:
  AVATAR_BENCH_SECONDS (audio per end-to-end round), AVATAR_BENCH_CHUNK_MS, AVATAR_BENCH_WARMUP
  (warm-up blocks), AVATAR_BENCH_ROUNDS, AVATAR_BENCH_BLOCKS (DiT-only blocks per round),
  AVATAR_BENCH_DTYPE (float32 | bfloat16 | float16), AVATAR_BENCH_BACKEND (ops backend, default auto).
"""
from __future__ import annotations

import fnmatch
import functools
import os
from dataclasses import dataclass

import pytest
import torch

from benchmarks.harness import env_flag_int, seconds_for_blocks

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (audio seconds, warm-up blocks, rounds, DiT blocks) when measuring
_MEASURE = {"tiny": (6.0, 2, 3, 8), "livetalk-1.3b": (15.0, 2, 3, 10)}


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


@dataclass(frozen=True)
class Sizes:
    seconds: float
    chunk_ms: float
    warmup: int
    rounds: int
    dit_blocks: int


@dataclass
class BenchCase:
    preset: str
    device: str

    @property
    def engine(self):
        return _engine(self.preset, self.device, os.environ.get("AVATAR_BENCH_DTYPE", "").strip(),
                       os.environ.get("AVATAR_BENCH_BACKEND", "").strip() or "auto")

    def sizes(self, benchmark) -> Sizes:
        cfg = self.engine.config
        if benchmark.disabled:  # smoke: block 0 + 2 measured blocks, one round
            seconds, warmup, rounds, blocks = seconds_for_blocks(cfg, 3), 1, 1, 2
        else:
            seconds, warmup, rounds, blocks = _MEASURE.get(self.preset, _MEASURE["tiny"])
        raw_seconds = os.environ.get("AVATAR_BENCH_SECONDS", "").strip()
        raw_chunk = os.environ.get("AVATAR_BENCH_CHUNK_MS", "").strip()
        return Sizes(seconds=float(raw_seconds) if raw_seconds else seconds,
                     chunk_ms=float(raw_chunk) if raw_chunk else 40.0,
                     warmup=env_flag_int("AVATAR_BENCH_WARMUP", warmup),
                     rounds=env_flag_int("AVATAR_BENCH_ROUNDS", rounds),
                     dit_blocks=env_flag_int("AVATAR_BENCH_BLOCKS", blocks))


@functools.cache
def _engine(preset: str, device: str, dtype_name: str, backend: str):
    """One random-weights engine per (preset, device, dtype, backend), shared by every benchmark file."""
    from runtime.config import EngineConfig
    from runtime.engine import Engine

    if dtype_name and dtype_name not in _DTYPES:
        raise ValueError(f"AVATAR_BENCH_DTYPE={dtype_name!r}: expected one of {', '.join(_DTYPES)}")
    return Engine.random(EngineConfig.from_preset(preset), device=device, dtype=_DTYPES.get(dtype_name),
                         backend=backend, seed=0)


_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the 1.3B shape is measured on CUDA only")


@pytest.fixture(params=[pytest.param(("tiny", "cpu"), id="tiny-cpu"),
                        pytest.param(("livetalk-1.3b", "cuda"), id="livetalk-1.3b-cuda",
                                     marks=[pytest.mark.gpu, _NO_CUDA])])
def bench_case(request) -> BenchCase:
    return BenchCase(*request.param)
