"""LiveTalk's round stages over static buffers (runtime/families/livetalk/graphs.py): the round plan,
the stages run through their graphs, and on a GPU (marked `gpu`) the captured engine against
mode="eager"."""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch

from runtime import Engine
from runtime.families.livetalk.graphs import RoundStages
from runtime.media import synth_speech_like
from tests.oracle import random_images

SR = 16000
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def images():
    return random_images(3, seed=5)


@pytest.fixture(scope="module")
def speech():
    return [synth_speech_like(1.6, sample_rate=SR, seed=20 + i).astype(np.float32) for i in range(3)]


def stream(engine, images, speech):
    """Sessions in slots 0 and 2 (slot 1 opened and closed), frames per session: a round of the session
    in slot 2 runs at batch 4 with rows 1 and 3 (and 0 when it runs alone) padded."""
    a, gap, c = (engine.open(images[i], seed=1 + i) for i in range(3))
    gap.close()
    got = {a.slot: [], c.slot: []}
    for s, audio in ((a, speech[0]), (c, speech[2])):
        got[s.slot] += s.step(audio)
    for s in (a, c):
        got[s.slot] += s.flush()
        s.close()
    return {slot: np.concatenate([b.frames for b in blocks]) for slot, blocks in got.items()}


def recorded_rounds(engine) -> list[list]:
    """Every round's tasks as the engine submits them."""
    rounds, submit = [], engine.runner.submit

    def record(tasks):
        rounds.append(list(tasks))
        return submit(tasks)
    engine.runner.submit = record
    return rounds


def test_a_round_is_its_stages_between_three_host_steps(images, speech):
    with Engine.from_pretrained("micro", max_sessions=4, mode="eager") as engine:
        rounds = recorded_rounds(engine)
        stream(engine, images, speech)
    stages = engine.family.round_stages
    steps = [f"step{i}" for i in range(engine.config.sampler.num_steps)]
    padded = [r for r in rounds if r[1].name == "save"]
    assert padded, "a round of slot 2 pads the rows of its batch of 4 that are not in it"
    for tasks in rounds:
        names = [t.name for t in tasks]
        rows = (len(names) - len(steps) - (5 if names[1] == "save" else 3)) // 2
        middle = ["save", *steps, "refresh", "restore"] if names[1] == "save" else [*steps, "refresh"]
        assert names[:len(middle) + 2] == ["load", *middle, "handoff"]
        assert all(t.lane == "compute" and t.group == "batch" for t in tasks[:len(middle) + 2])
        assert all(tasks[i].deps == (i - 1,) for i in range(1, len(middle) + 2))   # one chain on the compute lane
        handoff = len(middle) + 1
        for k in range(rows):
            decode, collect = tasks[handoff + 1 + 2 * k: handoff + 3 + 2 * k]
            assert decode.name.startswith("decode/") and collect.name == "collect"
            assert decode.lane == collect.lane == "decode" and decode.group == collect.group
            assert decode.deps == (handoff,) and collect.deps == (handoff + 1 + 2 * k,)
            want = "decode/first" if decode.block == 0 else f"decode/later{decode.block % 2}"
            assert decode.name == want
            assert decode.fn is stages.slots[decode.group].stages[want].body      # no graph on the CPU
        batch = stages.batches[4 if names[1] == "save" else 1]
        assert [t.fn for t in tasks[1:handoff]] == [batch.stages[n].body for n in middle]


class RecordingGraph:
    """Stands in for a captured torch.cuda.CUDAGraph on the CPU: `replay` runs the stage's body."""

    def __init__(self, stage, replays: Counter):
        self.stage, self.replays, self.body = stage, replays, stage.body

    def replay(self) -> None:
        self.replays[self.stage.name] += 1
        self.body()


def test_with_graphs_every_stage_runs_through_its_graph_and_frames_equal_eager(images, speech):
    with Engine.from_pretrained("micro", max_sessions=4, mode="eager") as eager:
        want = stream(eager, images, speech)
    with Engine.from_pretrained("micro", max_sessions=4) as engine:   # "auto": the C++ host lanes
        replays, direct = Counter(), Counter()
        for _, stage in engine.family.round_stages.all_stages():
            stage.graph = RecordingGraph(stage, replays)
            body = stage.body

            def counted(name=stage.name, body=body):
                direct[name] += 1
                body()
            stage.body = counted         # the graph kept the real body: it does not call Stage.body
        rounds = recorded_rounds(engine)
        got = stream(engine, images, speech)
    assert not direct, f"stages ran outside their graphs: {dict(direct)}"
    expected = Counter(t.name for tasks in rounds for t in tasks if t.graph is not None)
    assert replays == expected and replays["refresh"] == len(rounds)
    host = Counter(t.name for tasks in rounds for t in tasks if t.graph is None)
    assert set(host) == {"load", "handoff", "collect"}                 # Python per round, nothing per stage
    assert host["load"] == host["handoff"] == len(rounds) and host["collect"] == engine.rows_run
    assert want.keys() == got.keys()
    for slot in want:
        np.testing.assert_array_equal(got[slot], want[slot], err_msg=f"slot {slot}")


def test_stage_bodies_are_capturable_no_host_read_no_upload(images, speech, monkeypatch):
    """What capture forbids, caught on the CPU: inside a stage body no host read of a device value
    (a sync), no tensor from host data, no pinned staging copy (runtime.transfer: only `load` may)."""
    from runtime import transfer
    from tests.test_host_sync import HostSyncCounter

    counter = HostSyncCounter()
    counter.patch(monkeypatch)
    pinned = transfer.pinned

    def staged(t, device):
        counter._record("runtime.transfer.pinned")
        return pinned(t, device)
    monkeypatch.setattr(transfer, "pinned", staged)
    ran = Counter()
    with Engine.from_pretrained("micro", max_sessions=4, mode="eager") as engine:
        for _, stage in engine.family.round_stages.all_stages():
            def watched(body=stage.body, name=stage.name):
                ran[name] += 1
                counter.active = True
                try:
                    body()
                finally:
                    counter.active = False
            stage.body = watched
        stream(engine, images, speech)
    assert {"step0", "refresh", "save", "restore", "decode/first", "decode/later1"} <= set(ran)
    assert counter.calls == {}, counter.calls


def test_stage_buffers_are_per_batch_size_and_slot():
    with Engine.from_pretrained("micro", max_sessions=3) as engine:
        stages: RoundStages = engine.family.round_stages
        assert sorted(stages.batches) == [1, 2, 4]                          # padded(1..3), rows of 4
        assert all("save" in b.stages for size, b in stages.batches.items() if size > 1)
        assert "save" not in stages.batches[1].stages
        assert len(stages.slots) == 3
        assert stages.fallbacks == {} and not stages.captured               # CPU: nothing to capture
        d = stages.slots[0]
        assert d.out_first.shape[2] == engine.config.video_frames_in_block(0)
        assert d.out_later.shape[2] == engine.config.video_frames_in_block(1)


# ---------------------------------------------------------------- GPU

def cuda_engine(dtype=torch.float32, mode="auto", **kw) -> Engine:
    return Engine.from_pretrained("tiny", device="cuda", dtype=dtype, max_sessions=4, mode=mode, **kw)


@needs_gpu
@pytest.mark.gpu
def test_every_stage_is_captured_and_replays_its_body_exactly(images):
    with cuda_engine() as engine:
        engine.open(images[0]).close()      # the first session captures
        stages = engine.family.round_stages
        assert stages.captured and stages.fallbacks == {}
        gen = torch.Generator("cuda").manual_seed(0)
        written = [engine.family.rows.ring.k, engine.family.rows.ring.v]
        for b in stages.batches.values():
            written += [b.x]
        for d in stages.slots:
            written += [d.z, *d.cache, d.out_first, d.out_later]
        for _, stage in stages.all_stages():
            for t in written:
                if t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=gen, device="cuda") * 0.5)
            before = [t.clone() for t in written]
            stage.body()
            torch.cuda.synchronize()
            eager = [t.clone() for t in written]
            for t, saved in zip(written, before):
                t.copy_(saved)
            stage.graph.replay()
            torch.cuda.synchronize()
            for i, (a, b) in enumerate(zip(eager, written)):
                assert torch.equal(a, b), f"{stage.name}: buffer {i} differs"


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_engine_equals_mode_eager_on_cuda(images, speech, dtype):
    # Graphs replay exactly the kernels the bodies launch, on the same shapes: bit for bit.
    with cuda_engine(dtype, mode="eager") as eager:
        want = stream(eager, images, speech)
    with cuda_engine(dtype) as engine:
        got = stream(engine, images, speech)
        assert engine.family.round_stages.captured and not engine.family.round_stages.fallbacks
    for slot in want:
        np.testing.assert_array_equal(got[slot], want[slot], err_msg=f"slot {slot}")


@needs_gpu
@pytest.mark.gpu
def test_a_stage_that_cannot_be_captured_runs_its_body_with_one_warning(images, speech, caplog, monkeypatch):
    real = RoundStages._refresh_body

    def synchronising(self, S):
        body = real(self, S)

        def run():
            body()
            torch.cuda.synchronize()   # not allowed while capturing
        return run if S.batch == 2 else body

    monkeypatch.setattr(RoundStages, "_refresh_body", synchronising)
    with caplog.at_level(logging.INFO, logger="runtime.families.livetalk.graphs"), cuda_engine() as engine:
        got = stream(engine, images, speech)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "graphs" in r.name]
    assert len(warnings) == 1 and "refresh" in warnings[0], warnings
    monkeypatch.undo()
    with cuda_engine(mode="eager") as eager:
        want = stream(eager, images, speech)
    for slot in want:
        np.testing.assert_array_equal(got[slot], want[slot])
