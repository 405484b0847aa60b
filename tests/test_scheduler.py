"""Host backend of the stage scheduler: order, overlap, errors, cancel/reset, plans, leaks.

Stages are synthetic: they sleep (releasing the GIL, like a GPU-bound stage) and record when they
ran, so every property is checked on a recorded trace against dependencies written down here.
"""
from __future__ import annotations

import gc
import itertools
import os
import threading
import time
import weakref

import pytest

from runtime import scheduler as sch

pytestmark = pytest.mark.skipif(
    not sch.extension_available(),
    reason="runtime._scheduler is not built: run `.venv/bin/pip install --no-deps --no-build-isolation -e .`",
)

WAIT = 10.0  # generous bound so that a broken scheduler fails a test instead of hanging it
STAGE_ORDER = ["feat", "step0", "step1", "refresh", "decode"]


def noop(block, inputs, stream):
    return None


class Trace:
    """Thread-safe record of (block, stage, lane, start, end) written by synthetic stages."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows: list[tuple[int, str, str, float, float]] = []

    def stage(self, name, lane, seconds=0.0, deps=(), fail_on=None, gate=None):
        """A stage that sleeps `seconds`, raises on block `fail_on`, or, on block gate[0], sets
        gate[1] and waits for gate[2]."""

        def run(block, inputs, stream):
            assert stream is None  # host backend: no CUDA stream
            start = time.perf_counter()
            if gate is not None and block == gate[0]:
                gate[1].set()
                gate[2].wait(WAIT)
            if seconds:
                time.sleep(seconds)
            if block == fail_on:
                raise ValueError(f"synthetic failure in {name}")
            with self.lock:
                self.rows.append((block, name, lane, start, time.perf_counter()))
            return (name, block, inputs)

        return sch.Stage(name, run, lane=lane, deps=list(deps))

    def span(self, block, name):
        (row,) = [r for r in self.rows if r[0] == block and r[1] == name]
        return row[3], row[4]

    def ran(self, block, name):
        return any(r[0] == block and r[1] == name for r in self.rows)


def pipeline(trace, step_s=0.0, decode_s=0.0, fail=None, gate=None):
    """The avatar block DAG: two denoising steps and the KV refresh on one lane, decode on another."""
    fail, gate = fail or {}, gate or {}
    deps = {"step0": [sch.prev("refresh")], "step1": ["step0"], "refresh": ["step1"],
            "decode": ["step1", sch.prev("decode")]}
    return [trace.stage(name, "decode" if name == "decode" else "denoise",
                        decode_s if name == "decode" else step_s, d, fail.get(name), gate.get(name))
            for name, d in deps.items()]


def os_threads():
    return len(os.listdir("/proc/self/task"))


# ---------------------------------------------------------------- plans


def test_compiled_backends_reports_host():
    assert "host" in sch.compiled_backends()
    assert set(sch.compiled_backends()) <= {"host", "cuda"}


def test_plan_orders_by_dependencies_and_keeps_declaration_order():
    stages = [
        sch.Stage("decode", noop, lane="vae", deps=["step1", sch.prev("decode")]),
        sch.Stage("step1", noop, lane="dit", deps=["step0"]),
        sch.Stage("step0", noop, lane="dit", deps=[sch.prev("refresh", 2)]),
        sch.Stage("refresh", noop, lane="dit", deps=["step1"]),
        sch.Stage("audio", noop, lane="dit"),
    ]
    p = sch.plan(stages)
    assert p.launch_order == ("step0", "step1", "decode", "refresh", "audio")
    assert p.lanes == ("dit", "dit", "vae", "dit", "dit")
    assert p.history == 2
    assert dict(zip(p.launch_order, p.deps))["decode"] == (("step1", 0), ("decode", -1))


@pytest.mark.parametrize(
    "graph, message",
    [
        ([("a", ["b"]), ("b", ["c"]), ("c", ["a"])], "dependency cycle"),
        ([("a", ["a"])], "depends on itself"),
        ([("a", ["nope"])], "unknown stage 'nope'"),
        ([("a", [("a", 1)])], "later block"),
        ([("a", []), ("a", [])], "duplicate stage name 'a'"),
        ([], "empty"),
        ([("", [])], "empty name"),
    ],
)
def test_invalid_graphs_are_rejected_with_a_clear_error(graph, message):
    stages = [sch.Stage(name, noop, deps=deps) for name, deps in graph]
    with pytest.raises(ValueError, match=message):
        sch.plan(stages)
    with pytest.raises(ValueError, match=message):
        sch.Scheduler(stages)


def test_cycle_error_names_the_cycle():
    stages = [sch.Stage("x", noop), sch.Stage("a", noop, deps=["c", "x"]), sch.Stage("b", noop, deps=["a"]),
              sch.Stage("c", noop, deps=["b"])]
    with pytest.raises(ValueError) as err:
        sch.plan(stages)
    cycle = str(err.value).split(": ", 1)[1].split(" -> ")
    assert cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["a", "b", "c"]


def test_bad_lanes_works_and_backends_are_rejected():
    with pytest.raises(ValueError, match="unknown lanes: 'a' \\(lane 'gpu9'\\)"):
        sch.Scheduler([sch.Stage("a", noop, lane="gpu9")], lanes=["dit", "vae"])
    with pytest.raises(ValueError, match="unknown lanes"):
        sch.Scheduler([sch.Stage("a", noop, lane=2)], lanes=2)
    with pytest.raises(TypeError, match="must be callable"):
        sch.Scheduler([sch.Stage("a", "not callable")])
    with pytest.raises(ValueError, match="backend='cuda'"):
        sch.Scheduler([sch.Stage("a", 0x1234)])  # a graph exec handle on the host backend
    with pytest.raises(ValueError, match="unknown backend"):
        sch.Scheduler([sch.Stage("a", noop)], backend="tpu")
    with pytest.raises(TypeError, match="dependency"):
        sch.Scheduler([sch.Stage("a", noop, deps=[("a", "prev")])])
    with pytest.raises(TypeError, match="deps must be a sequence"):
        sch.Scheduler([sch.Stage("a", noop), sch.Stage("b", noop, deps="a")])


# ---------------------------------------------------------------- order and overlap


@pytest.mark.parametrize("backend", ["host", "torch"])
def test_trace_respects_every_dependency_and_lane_order(backend):
    # Three lanes and cross-lane, cross-block edges: audio features are single-buffered (block
    # b+1's features wait until step0 of block b consumed them) and latents double-buffered (step0
    # of block b+2 waits until the decode of block b read them). The slow decode makes that bind.
    trace = Trace()
    deps = {"feat": [sch.prev("step0")], "step0": ["feat", sch.prev("refresh"), sch.prev("decode", 2)],
            "step1": ["step0"], "refresh": ["step1"], "decode": ["step1", sch.prev("decode")]}
    lanes = {"feat": "audio", "decode": "decode"}
    stages = [trace.stage(n, lanes.get(n, "denoise"), 0.02 if n == "decode" else 0.002, d)
              for n, d in deps.items()]
    blocks = 5
    with sch.Scheduler(stages, backend=backend) as s:
        assert s.plan.history == 2 and s.lanes == ("audio", "denoise", "decode")
        handles = [s.submit_block(b, inputs=f"in{b}") for b in range(blocks)]
        results = [s.wait(h, timeout=WAIT) for h in handles]
    assert results[2]["decode"] == ("decode", 2, "in2")
    assert sorted((r[0], r[1]) for r in trace.rows) == sorted((b, n) for b in range(blocks) for n in deps)
    # Independent reference: the edges as the pipeline is meant to have them, (src, dst, block gap).
    edges = [("feat", "step0", 0), ("step0", "feat", 1), ("refresh", "step0", 1), ("decode", "step0", 2),
             ("step0", "step1", 0), ("step1", "refresh", 0), ("step1", "decode", 0), ("decode", "decode", 1)]
    for b in range(blocks):
        for src, dst, gap in edges:
            if b + gap < blocks:
                assert trace.span(b, src)[1] <= trace.span(b + gap, dst)[0], (src, b, dst, b + gap)
    for lane in ("audio", "denoise", "decode"):  # one stage at a time per lane, in submission order
        rows = sorted((r for r in trace.rows if r[2] == lane), key=lambda r: r[3])
        ran = [(r[0], r[1]) for r in rows]
        assert ran == sorted(ran, key=lambda k: (k[0], STAGE_ORDER.index(k[1])))
        assert all(a[4] <= b[3] for a, b in itertools.pairwise(rows))


def test_block_b_plus_1_denoises_while_block_b_decodes():
    trace = Trace()
    step_s, decode_s, blocks = 0.02, 0.15, 3
    with sch.Scheduler(pipeline(trace, step_s=step_s, decode_s=decode_s)) as s:
        t0 = time.perf_counter()
        handles = [s.submit_block(b) for b in range(blocks)]
        for h in handles:
            s.wait(h, timeout=WAIT)
        wall = time.perf_counter() - t0
    for b in range(blocks - 1):
        assert trace.span(b + 1, "step0")[0] < trace.span(b, "decode")[1]
        assert trace.span(b + 1, "refresh")[1] < trace.span(b, "decode")[1]
    assert wall < blocks * (3 * step_s + decode_s)  # sequential would be 630 ms, pipelined is ~490 ms


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", ["host", "torch"])
def test_stage_error_names_stage_and_block_and_fails_dependent_blocks(backend):
    trace = Trace()
    with sch.Scheduler(pipeline(trace, fail={"step1": 2}), backend=backend) as s:
        handles = [s.submit_block(b) for b in range(5)]
        for b in (0, 1):
            assert s.wait(handles[b], timeout=WAIT)["decode"] == ("decode", b, None)
        with pytest.raises(sch.StageError, match="stage 'step1' of block 2 failed: ValueError") as err:
            s.wait(handles[2], timeout=WAIT)
        assert (err.value.stage, err.value.block, err.value.waited_block) == ("step1", 2, 2)
        assert isinstance(err.value.__cause__, ValueError)
        assert "synthetic failure in step1" in str(err.value.__cause__)
        assert err.value.__cause__.__traceback__ is not None
        for b in (3, 4):  # step0 of b depends on refresh of b-1: the failure runs down the chain
            with pytest.raises(sch.StageError, match=f"block {b} depends on it") as dep_err:
                s.wait(handles[b], timeout=WAIT)
            assert (dep_err.value.stage, dep_err.value.block, dep_err.value.waited_block) == ("step1", 2, b)
        assert not any(trace.ran(2, n) for n in ("refresh", "decode"))  # the failed block stopped there
        assert not any(trace.ran(b, n) for b in (3, 4) for n in ("step0", "decode"))
        # The scheduler stays usable: a new session after reset() runs cleanly.
        s.reset()
        assert s.wait(s.submit_block(0), timeout=WAIT)["refresh"] == ("refresh", 0, None)


def test_failure_does_not_leak_into_independent_blocks():
    trace = Trace()
    stages = [trace.stage("work", "a", fail_on=1), trace.stage("post", "b", deps=["work"])]
    with sch.Scheduler(stages) as s:
        handles = [s.submit_block(b) for b in range(3)]
        with pytest.raises(sch.StageError, match="stage 'work' of block 1"):
            s.wait(handles[1], timeout=WAIT)
        assert s.wait(handles[2], timeout=WAIT)["post"] == ("post", 2, None)
        assert s.wait(handles[0], timeout=WAIT)["post"] == ("post", 0, None)


# ---------------------------------------------------------------- cancel, reset, waits


def test_cancel_mid_pipeline_then_reset_and_reuse():
    trace = Trace()
    entered, go = threading.Event(), threading.Event()
    with sch.Scheduler(pipeline(trace, gate={"step1": (1, entered, go)})) as s:
        try:
            handles = [s.submit_block(b) for b in range(4)]
            assert entered.wait(WAIT)  # block 1's step1 is running (held by the gate)
            s.wait(handles[0], timeout=WAIT)
            s.cancel()
            assert all(s.done(h) for h in handles)  # nothing left to wait for
            t0 = time.perf_counter()
            for h in handles[1:]:  # pending waits return at once, while that stage still runs
                with pytest.raises(sch.Cancelled):
                    s.wait(h, timeout=WAIT)
            assert time.perf_counter() - t0 < 1.0
            with pytest.raises(sch.Cancelled, match="reset"):
                s.submit_block(4)
        finally:
            go.set()
        s.reset()  # waits for the running stage; nothing queued after the cancel starts
        assert trace.ran(1, "step1")
        assert not any(trace.ran(b, n) for b in (1, 2, 3) for n in ("refresh", "decode"))
        assert not any(trace.ran(b, "step0") for b in (2, 3))
        out = [s.wait(s.submit_block(b, inputs=b), timeout=WAIT) for b in range(3)]  # indices start over
        assert [o["decode"] for o in out] == [("decode", b, b) for b in range(3)]


def test_wait_timeout_and_done():
    go = threading.Event()
    with sch.Scheduler([sch.Stage("hold", lambda b, i, s: go.wait(WAIT))]) as s:
        h = s.submit_block(0)
        assert not s.done(h)
        with pytest.raises(TimeoutError):
            s.wait(h, timeout=0.02)
        go.set()
        assert s.wait(h, timeout=WAIT) == {"hold": True}
        assert s.done(h)


def test_block_indices_must_increase_and_handles_are_per_scheduler():
    with sch.Scheduler([sch.Stage("a", noop)]) as s1, sch.Scheduler([sch.Stage("a", noop)]) as s2:
        h = s1.submit_block(5)
        with pytest.raises(ValueError, match="must increase"):
            s1.submit_block(5)
        with pytest.raises(ValueError, match="does not belong"):
            s2.wait(h)
        s1.submit_block(9)  # gaps are allowed: a dependency on a block never submitted is void
        s1.reset()
        s1.wait(s1.submit_block(0), timeout=WAIT)


# ---------------------------------------------------------------- long streams


def test_many_blocks_keep_threads_and_memory_flat():
    class Inputs:  # weak-referenceable payload: the scheduler must not keep old blocks alive
        pass

    gc.collect()  # schedulers left by earlier tests are gone
    baseline = os_threads()
    trace = Trace()
    s = sch.Scheduler(pipeline(trace))
    assert os_threads() == baseline + 2  # one worker per lane
    refs = []
    for _ in range(3):
        pending = []
        for b in range(150):
            inputs = Inputs()
            refs.append(weakref.ref(inputs))
            pending.append(s.submit_block(b, inputs))
            if len(pending) > 4:  # a few blocks in flight, like a streaming engine
                s.wait(pending.pop(0), timeout=WAIT)
        for h in pending:
            s.wait(h, timeout=WAIT)
        del h, pending, inputs
        gc.collect()
        assert sum(r() is not None for r in refs) <= 1  # only the window's last block (history 1)
        assert os_threads() == baseline + 2
        s.reset()
        assert all(r() is None for r in refs)
    assert len(trace.rows) == 3 * 150 * 4
    s.close()
    assert os_threads() == baseline
    for _ in range(5):  # create/destroy loops give every thread back
        with sch.Scheduler(pipeline(Trace())) as tmp:
            tmp.wait(tmp.submit_block(0), timeout=WAIT)
    assert os_threads() == baseline


def test_close_releases_stages_so_an_owner_cycle_is_collected():
    class Engine:  # owns the scheduler; its stages are bound methods: a cycle through C++
        def __init__(self):
            self.sched = sch.Scheduler([sch.Stage("step", self.step)])

        def step(self, block, inputs, stream):
            return block

    engine = Engine()
    assert engine.sched.wait(engine.sched.submit_block(0), timeout=WAIT) == {"step": 0}
    ref = weakref.ref(engine)
    engine.sched.close()
    engine.sched.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        engine.sched.submit_block(1)
    del engine
    gc.collect()
    assert ref() is None


def test_cuda_backend_without_a_gpu_fails_clearly():
    if "cuda" not in sch.compiled_backends():
        with pytest.raises(ValueError, match="not compiled"):
            sch.Scheduler([sch.Stage("a", noop)], backend="cuda")
        return
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: covered by the GPU tests")
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        sch.Scheduler([sch.Stage("a", noop)], backend="cuda")
