"""No host sync inside a block: a test that counts host reads and host-data uploads per block.

Between a block's audio arriving and its frames being copied out (`finish_block`, the postprocess,
where the host has to wait anyway), the engine must not read a device value on the host (`item`,
`tolist`, `cpu`, `numpy`, `bool`/`int`/`float` of a tensor: each one waits for the GPU) nor create a
device tensor from host data (`torch.tensor(..., device=...)`, `torch.as_tensor(..., device=...)`:
a blocking pageable upload). The one sanctioned upload is `runtime.transfer.copy_into` (pinned,
non-blocking, event-ordered), which is not counted. On CPU the calls are the same as on a GPU, so
counting them here catches a new sync before any GPU sees it.
"""
from __future__ import annotations

import contextlib
import traceback

import pytest
import torch

from runtime.engine import Engine
from runtime.media import synth_speech_like, synthetic_face

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
UPLOADS = ("tensor", "as_tensor")


class HostSyncCounter:
    """Counts the calls above made while `active` (on any thread: lane threads run the stage bodies)."""

    def __init__(self):
        self.active = False
        self.calls: dict[str, list[str]] = {}

    def _record(self, name: str) -> None:
        if self.active:
            frame = next((f for f in reversed(traceback.extract_stack()[:-2])
                          if "/runtime/" in f.filename or "/avatar_kernels/" in f.filename), None)
            self.calls.setdefault(name, []).append(f"{frame.filename}:{frame.lineno}" if frame else "?")

    def patch(self, monkeypatch) -> None:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def read(t, *a, _name=name, _orig=original, **kw):
                self._record(f"Tensor.{_name}")
                return _orig(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, read)
        for name in UPLOADS:
            original = getattr(torch, name)

            def upload(*a, _name=name, _orig=original, **kw):
                if kw.get("device") is not None:
                    self._record(f"torch.{_name}(device=)")
                return _orig(*a, **kw)

            monkeypatch.setattr(torch, name, upload)

    @contextlib.contextmanager
    def paused(self):
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was


def _count_per_block(monkeypatch, engine: Engine, seconds: float) -> tuple[int, dict[str, list[str]]]:
    counter = HostSyncCounter()
    counter.patch(monkeypatch)
    family = engine.family
    finish = family.finish_block

    def finish_block(row):
        with counter.paused():  # the postprocess: the frames' copy-out syncs by design
            return finish(row)

    monkeypatch.setattr(family, "finish_block", finish_block)
    rate = engine.sample_rate
    audio = synth_speech_like(seconds, rate)
    blocks = []
    with engine.open(synthetic_face(*engine.size[::-1])) as session:
        chunk = rate // 4
        counter.active = True  # across calls: in mode "auto" the lanes run the stages between them too
        for i in range(0, audio.size, chunk):
            blocks += session.step(audio[i:i + chunk], rate)
        blocks += session.flush()
        counter.active = False
    return len(blocks), counter.calls


@pytest.mark.parametrize("preset", ["tiny", "liveavatar-tiny"])
@pytest.mark.parametrize("mode", ["eager", "auto"])
def test_no_host_sync_between_audio_and_frames(monkeypatch, preset, mode):
    kw = {"config": "liveavatar-tiny"} if preset.startswith("liveavatar") else {}
    with Engine.from_pretrained(preset, device="cpu", dtype=torch.float32, mode=mode, **kw) as engine:
        blocks, calls = _count_per_block(monkeypatch, engine, seconds=2.0)
    assert blocks >= 2
    assert not calls, f"host syncs in the hot path over {blocks} blocks: " + "; ".join(
        f"{name} x{len(where)} (first at {where[0]})" for name, where in calls.items())


def test_the_counter_sees_a_host_read(monkeypatch):
    """The counter is live: a `.item()` in a stage body is counted (the test above can fail)."""
    with Engine.from_pretrained("tiny", device="cpu", dtype=torch.float32, mode="eager") as engine:
        family = engine.family
        plan = family.plan_block

        def plan_block(state):
            work = plan(state)
            work.noise.sum().item()
            return work

        monkeypatch.setattr(family, "plan_block", plan_block)
        _, calls = _count_per_block(monkeypatch, engine, seconds=1.0)
    assert "Tensor.item" in calls
