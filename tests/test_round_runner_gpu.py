"""RoundRunner on a GPU (marked `gpu`, skipped without one): captured graphs launched by the lanes
equal eager PyTorch, and a CUDA-event trace shows the decode lane overlapping the compute lane."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from runtime import scheduler as sch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BACKENDS = [pytest.param("cuda", marks=pytest.mark.skipif("cuda" not in sch.compiled_backends(),
                                                          reason="built without CUDA")), "torch"]


def capture(fn):
    """A CUDA graph of fn (warmed up on a side stream first, as torch requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def after(prev, task):
    """A dependency on `task` of the previous round, if there is one."""
    return ((prev, task),) if prev is not None else ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounds_of_captured_graphs_equal_eager(backend):
    gen = torch.Generator().manual_seed(0)
    n, rounds = 64, 6
    w = torch.randn(n, n, generator=gen).cuda()
    inputs = [torch.randn(n, n, generator=gen).pin_memory() for _ in range(rounds)]
    outputs = [torch.empty(n, n).pin_memory() for _ in range(rounds)]
    x, y, out = (torch.zeros(n, n, device="cuda") for _ in range(3))  # static buffers of the graphs
    step = capture(lambda: y.copy_(torch.tanh(x @ w)))
    decode = capture(lambda: out.copy_(y * 2 + 1))
    with sch.RoundRunner(backend) as runner:
        prev = None
        handles = []
        for r in range(rounds):
            # Hazards of the single static buffers as edges: x is rewritten after step(r-1) read it,
            # y after decode(r-1) read it, out after download(r-1) read it.
            tasks = [
                sch.Task("upload", "copy", fn=lambda r=r: x.copy_(inputs[r], non_blocking=True), deps=after(prev, 1)),
                sch.Task("step", "compute", graph=step, deps=(0, *after(prev, 2))),
                sch.Task("decode", "decode", graph=decode, deps=(1, *after(prev, 3))),
                sch.Task("download", "copy", fn=lambda r=r: outputs[r].copy_(out, non_blocking=True), deps=(2,)),
            ]
            prev = runner.submit(tasks)
            handles.append(prev)
        assert all(h.wait(30) == {} for h in handles)
    for r in range(rounds):
        expected = torch.tanh(inputs[r].cuda() @ w) * 2 + 1
        torch.testing.assert_close(outputs[r], expected.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_event_trace_shows_decode_overlapping_compute(backend):
    cycles = 20_000_000  # ~10 ms of spinning per kernel on a current GPU: far above launch gaps
    compute = capture(lambda: torch.cuda._sleep(cycles))
    decode = capture(lambda: torch.cuda._sleep(cycles))
    base = torch.cuda.Event(enable_timing=True)
    base.record()
    marks: dict[tuple[str, int], torch.cuda.Event] = {}

    def mark(name, r):
        def record():
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()  # on the lane stream: the runner makes it current
            marks[(name, r)] = ev

        return record

    with sch.RoundRunner(backend) as runner:
        handles = []
        for r in range(3):  # compute(r+1) does not depend on decode(r): the lanes may overlap them
            handles.append(runner.submit([
                sch.Task("c.start", "compute", fn=mark("c0", r)),
                sch.Task("compute", "compute", graph=compute, deps=(0,)),
                sch.Task("c.end", "compute", fn=mark("c1", r), deps=(1,)),
                sch.Task("d.start", "decode", fn=mark("d0", r), deps=(2,)),
                sch.Task("decode", "decode", graph=decode, deps=(3,)),
                sch.Task("d.end", "decode", fn=mark("d1", r), deps=(4,)),
            ]))
        assert all(h.wait(30) == {} for h in handles)
    torch.cuda.synchronize()
    t = {k: base.elapsed_time(ev) for k, ev in marks.items()}
    for r in range(2):
        assert t[("c0", r + 1)] < t[("d1", r)] and t[("d0", r)] < t[("c1", r + 1)], t  # intervals intersect
