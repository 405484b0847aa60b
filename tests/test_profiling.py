"""Profiling hooks: NVTX on/off and out of graph regions, torch.profiler traces, the Timer."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nvtx
import pytest
import torch

from runtime import profiling


class NvtxSpy:
    """Replaces nvtx.push_range / pop_range and records the calls."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(nvtx, "push_range", lambda message=None, domain=None, **kw: self.calls.append(("push", message, domain)))
        monkeypatch.setattr(nvtx, "pop_range", lambda domain=None: self.calls.append(("pop", domain)))


@pytest.fixture
def spy(monkeypatch):
    yield NvtxSpy(monkeypatch)
    monkeypatch.undo()
    profiling.refresh()  # back to whatever the real environment says


def set_nvtx(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(profiling.ENV_NVTX, raising=False)
    else:
        monkeypatch.setenv(profiling.ENV_NVTX, value)
    return profiling.refresh()


@pytest.mark.parametrize("value", [None, "0", "", "off"])
def test_nvtx_off_makes_no_calls(monkeypatch, spy, value):
    assert set_nvtx(monkeypatch, value) is False and not profiling.nvtx_enabled()
    with profiling.nvtx_range("dit.step", 0), profiling.nvtx_range("vae"):
        pass
    assert spy.calls == []
    # One shared no-op object: nothing is built per call.
    assert profiling.nvtx_range("a") is profiling.nvtx_range("b", 3)


def test_nvtx_on_pushes_and_pops(monkeypatch, spy):
    assert set_nvtx(monkeypatch, "1") is True and profiling.nvtx_enabled()
    with profiling.nvtx_range("block", 7), profiling.nvtx_range("dit.step", 2):
        pass
    with pytest.raises(KeyError), profiling.nvtx_range("vae"):
        raise KeyError("boom")  # the range is still closed
    d = profiling.NVTX_DOMAIN
    assert spy.calls == [("push", "block 7", d), ("push", "dit.step 2", d), ("pop", d), ("pop", d),
                         ("push", "vae", d), ("pop", d)]


def test_nvtx_bad_value_is_named(monkeypatch, spy):
    with pytest.raises(ValueError, match="AVATAR_NVTX"):
        set_nvtx(monkeypatch, "maybe")


def test_nvtx_silent_during_cuda_graph_capture(monkeypatch, spy):
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    set_nvtx(monkeypatch, "1")
    with profiling.nvtx_range("captured"):
        pass
    assert spy.calls == []
    capturing[0] = False
    with profiling.nvtx_range("replay"):
        pass
    assert spy.calls == [("push", "replay", profiling.NVTX_DOMAIN), ("pop", profiling.NVTX_DOMAIN)]


def test_nvtx_silent_inside_torch_compile(monkeypatch, spy):
    set_nvtx(monkeypatch, "1")

    def f(x):
        with profiling.nvtx_range("inside"):
            return x * 2 + 1

    compiled = torch.compile(f, backend="eager", fullgraph=True)  # fullgraph: a graph break would raise
    x = torch.randn(4)
    torch.testing.assert_close(compiled(x), x * 2 + 1)
    assert spy.calls == []
    f(x)  # the same code run eagerly does emit the range
    assert [c[0] for c in spy.calls] == ["push", "pop"]


def test_profile_session_writes_a_chrome_trace(monkeypatch, tmp_path):
    target = tmp_path / "traces"
    monkeypatch.setenv(profiling.ENV_TORCH_PROFILE, str(target))
    a = torch.randn(32, 32)
    with profiling.profile_session(name="unit") as session:
        assert session.enabled and session.directory == target
        (a @ a).sum()
    assert session.trace_path is not None and session.trace_path.parent == target
    assert session.trace_path.name.startswith("unit-")
    events = json.loads(session.trace_path.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)


def test_profile_session_off_without_env(monkeypatch, tmp_path):
    monkeypatch.delenv(profiling.ENV_TORCH_PROFILE, raising=False)
    monkeypatch.chdir(tmp_path)
    with profiling.profile_session() as session:
        torch.ones(3).sum()
    assert not session.enabled and session.trace_path is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="name"), profiling.profile_session(tmp_path, name="a/b"):
        pass


def test_profile_session_explicit_directory_and_error_still_writes(tmp_path):
    with pytest.raises(RuntimeError, match="body"), profiling.profile_session(tmp_path / "x") as session:
        torch.ones(3).sum()
        raise RuntimeError("body failed")
    assert session.trace_path.is_file()


def test_timer_cpu():
    timer = profiling.Timer("cpu")
    for _ in range(2):
        with timer.span("sleep"):
            time.sleep(0.02)
    start = timer.timestamp()
    with timer.span("inner"):
        pass
    timer.add("outer", start, timer.timestamp())
    with pytest.raises(ZeroDivisionError), timer.span("failed"):
        raise ZeroDivisionError
    assert timer.pending == 4
    got = timer.resolve()
    assert set(got) == {"sleep", "inner", "outer"} and len(got["sleep"]) == 2
    assert all(0.02 <= s < 1.0 for s in got["sleep"])
    assert 0 <= got["inner"][0] <= got["outer"][0] < 0.02
    assert timer.pending == 0 and timer.resolve() == {}


def test_timer_rejects_bad_devices():
    with pytest.raises(ValueError, match="cpu and cuda"):
        profiling.Timer("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            profiling.Timer("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_timer_cuda_events_resolve_with_one_sync():
    timer = profiling.Timer("cuda")
    a = torch.randn(2048, 2048, device="cuda")
    with timer.span("mm"):
        for _ in range(10):
            a = torch.tanh(a @ a)
    with timer.span("sleep"):
        torch.cuda._sleep(10_000_000)  # ~ms of GPU time, host returns at once
    got = timer.resolve()
    assert got["mm"][0] > 0 and got["sleep"][0] > 1e-4


def test_choice_made_at_import():
    """A fresh process with AVATAR_NVTX=1 has ranges on as soon as it imports the module."""
    code = "from runtime import profiling; print(profiling.nvtx_enabled())"
    env = {**os.environ, profiling.ENV_NVTX: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "True"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvtx_silent_in_a_real_cuda_graph_capture(monkeypatch, spy):
    set_nvtx(monkeypatch, "1")
    x = torch.ones(8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        y = x * 2
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), profiling.nvtx_range("captured"):
        y = x * 2
    assert spy.calls == []
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, x * 2)
