"""The C++ side of the round executor, built and run here: the CUDA launcher against a simulated
CUDA runtime (csrc/tests/sim_cudart.cpp: each stream a host thread, real event semantics), and the
NVTX ranges pushed per task, into a stand-in NVTX library."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from runtime import scheduler as sch

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def _cuda_include_dir():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in filter(None, candidates):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
            return os.path.join(root, "include")
    return None


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _build(args, what):
    build = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"building {what} failed:\n{build.stderr[-4000:]}"


@pytest.mark.slow
def test_cuda_launcher_on_a_simulated_runtime(tmp_path):
    """csrc/tests/round_cuda_test.cpp: graph-exec launches counted (one cudaGraphLaunch per graph
    task, no host call), launch order per stream, event waits between lanes, overlap across
    rounds, one group failing, a sticky fault poisoning the context, cancel, lifetimes."""
    include, cxx = _cuda_include_dir(), _compiler()
    if include is None or cxx is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (cuda_runtime_api.h)")
    exe = tmp_path / "round_cuda_test"
    sources = [os.path.join(CSRC, f) for f in ("cuda_launcher.cpp", "tests/sim_cudart.cpp", "tests/round_cuda_test.cpp")]
    flags = ["-std=c++17", "-O1", "-pthread", f"-I{CSRC}", f"-I{CSRC}/tests", f"-I{include}",
             "-DAVATAR_SCHED_WITH_CUDA=1"]
    _build([cxx, *flags, *sources, "-o", str(exe), "-ldl"], "the simulated CUDA test")
    run = subprocess.run([str(exe)], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all tests passed" in run.stdout


FAKE_NVTX = textwrap.dedent("""
    #include <stdio.h>
    #include <stdlib.h>
    static FILE* out(void) {
        static FILE* f = NULL;
        if (!f) { f = fopen(getenv("FAKE_NVTX_OUT"), "w"); setvbuf(f, NULL, _IOLBF, 0); }
        return f;
    }
    int nvtxRangePushA(const char* name) { fprintf(out(), "push %s\\n", name); return 0; }
    int nvtxRangePop(void) { fprintf(out(), "pop\\n"); return 0; }
""")

ROUND = textwrap.dedent("""
    from runtime import scheduler as sch
    from runtime import _scheduler
    print(_scheduler.nvtx_library())
    with sch.RoundRunner("host") as r:
        h = r.submit([sch.Task("alpha", "compute", fn=lambda: None),
                      sch.Task("beta", "decode", fn=lambda: None, deps=(0,))])
        assert h.wait(10) == {}
""")


@pytest.mark.skipif(not sch.extension_available(), reason="runtime._scheduler is not built")
@pytest.mark.parametrize("enabled", [True, False])
def test_nvtx_ranges_per_task_are_env_gated(tmp_path, enabled):
    cc = shutil.which("cc") or _compiler()
    if cc is None:
        pytest.skip("needs a C compiler")
    (tmp_path / "fake.c").write_text(FAKE_NVTX)
    lib = tmp_path / "libfakenvtx.so"
    _build([cc, "-shared", "-fPIC", str(tmp_path / "fake.c"), "-o", str(lib)], "the stand-in NVTX library")
    log = tmp_path / "ranges.txt"
    env = dict(os.environ, AVATAR_NVTX="1" if enabled else "0", AVATAR_NVTX_LIB=str(lib), FAKE_NVTX_OUT=str(log))
    run = subprocess.run([sys.executable, "-c", ROUND], check=False, capture_output=True, text=True,
                         timeout=120, env=env, cwd=os.path.dirname(CSRC))
    assert run.returncode == 0, run.stderr
    if not enabled:
        assert run.stdout.strip() == "" and not log.exists()
        return
    assert run.stdout.strip() == str(lib)
    lines = log.read_text().splitlines()
    assert lines == ["push alpha", "pop", "push beta", "pop"]  # beta depends on alpha: in order
