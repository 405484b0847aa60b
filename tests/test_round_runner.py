"""RoundRunner (contract B): round plans on the C++ host backend, and the backend choice.

Tasks are synthetic and record the order they ran in; overlap is proved with events (a task of
round r waits for a task of round r+1), never with timings.
"""
from __future__ import annotations

import threading
import time

import pytest

from runtime import scheduler as sch

pytestmark = pytest.mark.skipif(not sch.extension_available(), reason="runtime._scheduler is not built")

WAIT = 10.0  # bound so that a broken runner fails a test instead of hanging it


class Log:
    def __init__(self):
        self.lock = threading.Lock()
        self.order: list[str] = []

    def task(self, name, lane, *, deps=(), group=None, block=-1, raises=None, before=None):
        def run():
            if before is not None:
                before()
            if raises is not None:
                raise raises
            with self.lock:
                self.order.append(name)

        return sch.Task(name, lane, fn=run, deps=tuple(deps), group=group, block=block)


@pytest.fixture(params=["host", "torch"])
def runner(request):
    """Every contract test runs on the C++ host backend and on the Python torch fallback (here
    without a GPU: its lane threads, without streams)."""
    with sch.RoundRunner(request.param) as r:
        yield r


def test_backend_named_and_lanes(runner):
    assert runner.backend in ("host", "torch") and runner.fallback_reason is None
    assert runner.lanes == ("compute", "decode", "copy")


def test_round_runs_tasks_after_their_dependencies(runner):
    log = Log()
    tasks = [log.task("audio", "copy"), log.task("step0", "compute", deps=[0]), log.task("step1", "compute", deps=[1]),
             log.task("decode", "decode", deps=[2]), log.task("refresh", "compute", deps=[2]),
             log.task("download", "copy", deps=[3])]
    assert runner.submit(tasks).wait(WAIT) == {}
    pos = {n: i for i, n in enumerate(log.order)}
    assert sorted(pos) == sorted(t.name for t in tasks)
    for i, t in enumerate(tasks):
        for d in t.deps:
            assert pos[tasks[d].name] < pos[t.name], (tasks[d].name, t.name)


def test_lanes_are_fifo_across_rounds_and_cross_round_deps_hold(runner):
    log = Log()
    slow = threading.Event()
    r0 = runner.submit([log.task("c0", "compute", before=lambda: slow.wait(0.05)),
                        log.task("d0", "decode", deps=[0])])
    r1 = runner.submit([log.task("c1", "compute"), log.task("d1", "decode", deps=[(r0, 1)])])
    r2 = runner.submit([log.task("x2", "copy", deps=[(r1, 0), (r0, 1)])])
    for r in (r0, r1, r2):
        assert r.wait(WAIT) == {}
    pos = {n: i for i, n in enumerate(log.order)}
    assert pos["c0"] < pos["c1"] and pos["d0"] < pos["d1"]  # lane FIFO across rounds
    assert pos["d0"] < pos["d1"] and max(pos["c1"], pos["d0"]) < pos["x2"]


def test_decode_of_round_r_overlaps_compute_of_round_r_plus_1(runner):
    # decode(r) finishes only once compute(r+1) has started: possible only if they overlap.
    started_next = threading.Event()
    log = Log()

    def decode0():
        assert started_next.wait(WAIT), "compute of round 1 never started while decode of round 0 ran"

    r0 = runner.submit([log.task("c0", "compute"), sch.Task("d0", "decode", fn=decode0, deps=(0,))])
    r1 = runner.submit([log.task("c1", "compute", before=started_next.set, deps=[(r0, 0)])])
    assert r0.wait(WAIT) == {} and r1.wait(WAIT) == {}


def test_submit_returns_at_once_and_wait_releases_the_gil(runner):
    gate = threading.Event()
    progress = []

    def python_thread():  # needs the GIL to make progress while the main thread waits in C++
        for i in range(200):
            progress.append(i)
            time.sleep(0.0005)
        gate.set()

    rnd = runner.submit([sch.Task("hold", "compute", fn=lambda: gate.wait(WAIT))])
    assert not rnd.done()  # submit did not wait for the task
    with pytest.raises(RuntimeError, match="valid once done"):
        _ = rnd.failed
    t = threading.Thread(target=python_thread)
    t.start()
    assert rnd.wait(WAIT) == {}
    t.join()
    assert len(progress) == 200 and gate.is_set() and rnd.done() and rnd.failed == {}


def test_a_stage_fault_fails_its_group_only_and_the_lanes_go_on(runner):
    log = Log()
    boom = ValueError("bad audio")
    r0 = runner.submit([
        log.task("a.step0", "compute", group="A", block=3, raises=boom),
        log.task("b.step0", "compute", group="B", block=7),
        log.task("a.decode", "decode", group="A", block=3, deps=[0]),
        log.task("b.decode", "decode", group="B", block=7, deps=[1]),
        log.task("a.copy", "copy", group="A", block=3),  # later task of the failed group, no dependency
    ])
    r1 = runner.submit([log.task("a.next", "compute", group="A", deps=[(r0, 2)]),
                        log.task("b.next", "compute", group="B", deps=[(r0, 3)])])
    failed = r0.wait(WAIT)
    assert set(failed) == {"A"}
    err = failed["A"]
    assert isinstance(err, sch.StageError) and not isinstance(err, sch.Cancelled)
    assert (err.stage, err.block, err.group) == ("a.step0", 3, "A")
    assert err.__cause__ is boom and err.__cause__.__traceback__ is not None
    assert "stage 'a.step0' of block 3 failed: ValueError: bad audio" in str(err)
    assert r1.wait(WAIT).keys() == {"A"}  # skipped through the cross-round edge, same root error
    assert r1.failed["A"].stage == "a.step0"
    assert "b.step0" in log.order and "b.decode" in log.order and "b.next" in log.order
    assert not {"a.decode", "a.next"} & set(log.order)
    # "a.copy" is a later task of the failed group on another lane: skipped unless it already ran
    r2 = runner.submit([log.task("a.again", "compute", group="A")])  # the group can go on
    assert r2.wait(WAIT) == {} and log.order[-1] == "a.again"


def test_a_dependent_in_another_group_is_skipped_with_the_root_error(runner):
    log = Log()
    rnd = runner.submit([log.task("a", "compute", group="A", raises=KeyError("k")),
                         log.task("batched", "compute", group="batch", deps=[0])])
    failed = rnd.wait(WAIT)
    assert set(failed) == {"A", "batch"} and failed["batch"].stage == "a"


def test_cancel_skips_the_queued_tasks_of_a_group(runner):
    log = Log()
    entered, go = threading.Event(), threading.Event()

    def hold():
        entered.set()
        go.wait(WAIT)

    r0 = runner.submit([sch.Task("hold", "compute", fn=hold, group="A"),
                        log.task("a.decode", "decode", group="A", deps=[0]),
                        log.task("b.step", "compute", group="B"),
                        log.task("a.step1", "compute", group="A")])
    assert entered.wait(WAIT)
    runner.cancel("A")
    runner.cancel("never-submitted")  # unknown groups are ignored
    go.set()
    failed = r0.wait(WAIT)
    assert set(failed) == {"A"} and isinstance(failed["A"], sch.Cancelled)
    assert log.order == ["b.step"]  # the running task finished; nothing queued of A started
    r1 = runner.submit([log.task("a.later", "compute", group="A")])
    assert r1.wait(WAIT) == {} and log.order[-1] == "a.later"  # later rounds of the group run


def test_wait_timeout_leaves_the_round_running(runner):
    go = threading.Event()
    rnd = runner.submit([sch.Task("hold", "compute", fn=lambda: go.wait(WAIT))])
    with pytest.raises(TimeoutError):
        rnd.wait(timeout=0.02)
    go.set()
    assert rnd.wait(WAIT) == {}


def test_bad_plans_are_refused_with_clear_errors(runner):
    ok = sch.Task("ok", "compute", fn=lambda: None)
    with pytest.raises(ValueError, match="earlier task of the round"):
        runner.submit([sch.Task("a", "compute", fn=lambda: None, deps=(0,))])
    with pytest.raises(ValueError, match="unknown lane 'gpu'"):
        runner.submit([sch.Task("a", "gpu", fn=lambda: None)])
    with pytest.raises(ValueError, match=f"{runner.backend} backend cannot run"):
        runner.submit([sch.Task("g", "compute", graph=0x1234)])
    with pytest.raises(TypeError, match="dependency"):
        runner.submit([ok, sch.Task("a", "compute", fn=lambda: None, deps=("ok",))])
    with pytest.raises(ValueError, match="neither fn nor graph"):
        sch.Task("a", "compute")
    with sch.RoundRunner(runner.backend) as other:
        foreign = other.submit([ok])
        with pytest.raises(ValueError, match="another RoundRunner"):
            runner.submit([sch.Task("a", "compute", fn=lambda: None, deps=((foreign, 0),))])
    with pytest.raises(ValueError, match="task 5 of an earlier round, which has 1 tasks"):
        runner.submit([sch.Task("a", "compute", fn=lambda: None, deps=((runner.submit([ok]), 5),))])
    assert runner.submit([ok]).wait(WAIT) == {}  # still usable


@pytest.mark.parametrize("backend", ["host", "torch"])
def test_close_cancels_queued_work_and_is_idempotent(backend):
    entered, go = threading.Event(), threading.Event()
    runner = sch.RoundRunner(backend, lanes=("compute",))

    def hold():
        entered.set()
        go.wait(WAIT)

    rnd = runner.submit([sch.Task("hold", "compute", fn=hold, group=1), sch.Task("next", "compute",
                                                                                  fn=lambda: None, group=2)])
    assert entered.wait(WAIT)
    threading.Timer(0.05, go.set).start()
    runner.close()
    runner.close()
    assert set(rnd.wait(WAIT)) == {2} and isinstance(rnd.failed[2], sch.Cancelled)
    with pytest.raises(RuntimeError, match="closed"):
        runner.submit([sch.Task("x", "compute", fn=lambda: None)])


# ---------------------------------------------------------------- backend choice


def caps(extension=True, cuda=True, gpu=True, driver_error=None):
    return lambda: sch.Capabilities(extension, cuda, gpu, driver_error)


@pytest.mark.parametrize("probe, backend, reason", [
    (caps(), "cuda", None),
    (caps(cuda=False), "torch", "built without the CUDA toolkit"),
    (caps(driver_error="cudaErrorInsufficientDriver"), "torch", "cannot use this driver"),
    (caps(extension=False, cuda=False), "torch", "not built"),
    (caps(gpu=False), "host", "no CUDA device"),
    (caps(extension=False, cuda=False, gpu=False), "torch", "no C++ extension"),
])
def test_auto_backend_choice(probe, backend, reason):
    choice = sch.select_backend("auto", probe)
    assert choice.backend == backend
    assert (choice.reason is None) if reason is None else (reason in choice.reason)


def test_named_backends_and_cpu_devices_skip_the_probe_and_unknown_names_fail():
    def no_probe():
        raise AssertionError("the probe runs only for 'auto' without a CPU device")

    assert sch.select_backend("host", no_probe) == sch.BackendChoice("host", None)
    assert sch.select_backend("cuda", no_probe, device="cpu").backend == "cuda"  # named: as asked
    for cpu in ("cpu", "cpu:0"):
        assert sch.select_backend("auto", no_probe, device=cpu).backend == "host"
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        sch.select_backend("tpu", no_probe)


def test_auto_on_this_machine_logs_one_line_when_it_falls_back(caplog):
    with caplog.at_level("INFO", logger="runtime.scheduler"), sch.RoundRunner("auto", probe=caps(gpu=False)) as r:
        assert r.backend == "host" and "no CUDA device" in r.fallback_reason
    assert [rec.getMessage() for rec in caplog.records] == [r.fallback_reason]


def test_a_round_keeps_what_its_tasks_reference_alive_until_it_is_done(runner):
    import gc
    import weakref

    class Buffer:
        pass

    go = threading.Event()
    buf = Buffer()
    ref = weakref.ref(buf)
    rnd = runner.submit([sch.Task("use", "compute", fn=lambda b=buf: go.wait(WAIT) and b)])
    del buf
    gc.collect()
    assert ref() is not None  # the plan still needs it
    go.set()
    assert rnd.wait(WAIT) == {}
    del rnd
    gc.collect()
    assert ref() is None  # nothing of a finished, dropped round is retained


def test_rounds_submitted_from_several_threads_keep_each_streams_order(runner):
    log = Log()
    per_thread, threads = 30, 4

    def stream(g):
        prev = None
        for i in range(per_thread):
            deps = ((prev, 0),) if prev is not None else ()
            prev = runner.submit([log.task(f"{g}:{i}", "compute" if i % 2 else "decode", deps=deps, group=g)])
        assert prev.wait(WAIT) == {}

    workers = [threading.Thread(target=stream, args=(g,)) for g in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT)
    assert len(log.order) == per_thread * threads
    for g in range(threads):
        mine = [int(n.split(":")[1]) for n in log.order if n.startswith(f"{g}:")]
        assert mine == list(range(per_thread))  # each chain ran in order across both lanes
