"""Benchmarks: the upstream-structured path equals our sampler (so the speed ratio compares the same
work), the harness attributes time to blocks correctly, and the pytest-benchmark JSON and `avatar bench`
JSON carry every field a published number must name. CPU only, tiny shapes."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from avatar_kernels.window_attention import INVALID_POS
from benchmarks import cli as bench_cli
from benchmarks.harness import (
    DitSetup,
    EngineBench,
    RingRunner,
    block_inputs,
    blocks_in_audio,
    samples_for_blocks,
    seconds_for_blocks,
    steady_block_index,
)
from benchmarks.upstream_path import UpstreamRunner, cached_frames_before
from runtime.config import CacheConfig, EngineConfig
from runtime.flops import block_flops
from runtime.models.dit import build_dit
from runtime.models.ops import ops_for
from runtime.session import plan_block, visible_frames

REPO = Path(__file__).resolve().parents[1]

# What every measurement must name (issue 5 / spec integration.md), pytest-benchmark and CLI alike.
MEASUREMENT_FIELDS = ("p50_block_ms", "p99_block_ms", "fps", "first_frame_ms", "peak_memory_mb",
                      "achieved_tflops", "fraction_of_floor", "timer")
CONTEXT_FIELDS = ("gpu_name", "gpu_driver", "torch_version", "triton_version", "commit", "date_utc",
                  "dtype", "resolution", "window", "backend", "preset", "device")


def small_config(cache: CacheConfig | None = None) -> EngineConfig:
    """The tiny preset at 32x32 with 4 layers (the fewest that keep an audio layer): same structure."""
    tiny = EngineConfig.from_preset("tiny")
    return tiny.replace(height=32, width=32, dit=dataclasses.replace(tiny.dit, num_layers=4),
                        cache=cache or tiny.cache)


def dit_setup(cfg: EngineConfig, seed: int = 0) -> DitSetup:
    torch.manual_seed(seed)
    return DitSetup.build(cfg, build_dit(cfg), ops_for("reference"), torch.device("cpu"), torch.float32, seed)


# ---- the upstream path equals our sampler ----------------------------------------------------------

@pytest.mark.parametrize("cache, blocks", [
    (CacheConfig(), 7),                                                   # the release window: evicts from block 5
    (CacheConfig(block_frames=2, sink_frames=3, window_frames=7), 6),     # sink not block-aligned: evicts from 3
])
def test_upstream_path_equals_sampler(cache, blocks):
    setup = dit_setup(small_config(cache))
    ours, upstream = RingRunner(setup), UpstreamRunner(setup)
    for b in range(blocks):
        inputs = block_inputs(setup, b, seed=1)
        x_ours, x_up = ours.run_block(b, inputs), upstream.run_block(b, inputs)
        torch.testing.assert_close(x_up, x_ours, atol=1e-4, rtol=1e-4, msg=lambda m, b=b: f"block {b}: {m}")
    held = upstream.cache.frames
    assert held != list(range(len(held))), "the test must reach eviction (a gap after the sink frames)"
    assert len(held) == cache.window_frames


def test_upstream_without_eviction_differs():
    """The equality above is not vacuous: an upstream cache that never evicts gives other latents."""
    cache = CacheConfig(block_frames=2, sink_frames=3, window_frames=7)
    setup = dit_setup(small_config(cache))
    no_evict = dataclasses.replace(setup, config=setup.config.replace(
        cache=CacheConfig(block_frames=2, sink_frames=3, window_frames=40)))
    ours, upstream = RingRunner(setup), UpstreamRunner(no_evict)
    diffs = []
    for b in range(5):
        inputs = block_inputs(setup, b)
        diffs.append((ours.run_block(b, inputs) - upstream.run_block(b, inputs)).abs().max().item())
    assert max(diffs[:3]) < 1e-4          # the window is not full yet: same frames seen
    assert min(diffs[3:]) > 1e-3          # block 3 on: ours evicts, this one does not


def test_upstream_refuses_rolling_rope():
    setup = dit_setup(small_config(CacheConfig(rope_mode="rolling")))
    with pytest.raises(ValueError, match="rolling"):
        UpstreamRunner(setup)


@pytest.mark.parametrize("cache", [CacheConfig(), CacheConfig(block_frames=2, sink_frames=3, window_frames=7),
                                   CacheConfig(block_frames=1, sink_frames=1, window_frames=3)])
def test_upstream_eviction_rule_is_the_session_window(cache):
    """Derived separately (upstream_path vs runtime.session): the frames a block sees before its own."""
    for b in range(12):
        f0 = b * cache.block_frames
        assert cached_frames_before(b, cache) == [f for f in visible_frames(b, cache) if f < f0]


def test_steady_block_index_is_first_full_window():
    for cache in (CacheConfig(), CacheConfig(block_frames=2, sink_frames=3, window_frames=7)):
        b = steady_block_index(cache)
        full = [bool((plan_block(i, cache).slot_pos != INVALID_POS).all()) for i in (b - 1, b, b + 1)]
        assert full == [False, True, True]


# ---- end-to-end timing attribution (a scripted engine, so times have known lower bounds) ------------

@dataclass
class _Block:
    index: int
    frames: np.ndarray
    timings: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.frames)


class _SleepyEngine:
    """Follows the Engine contract: emits a block once its audio (with lookahead) is in; each block
    costs `sleep` seconds, pushes without a block cost nothing."""

    def __init__(self, cfg: EngineConfig, sleep: float):
        self.config, self.sleep = cfg, sleep
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.ops = type("FakeOps", (), {"name": "fake"})
        self.decoder_name, self.mode = "wan", "auto"  # the row is labelled as the default path

    def reset(self, image, seed=0):
        self.pushed, self.block = 0, 0

    def drain(self):  # every block is returned by the step that made it
        return []

    def step(self, chunk, sample_rate):
        self.pushed += len(chunk)
        out = []
        while samples_for_blocks(self.config, self.block + 1) <= self.pushed:
            time.sleep(self.sleep)
            n = self.config.video_frames_in_block(self.block)
            out.append(_Block(self.block, np.zeros((n, 1, 1, 3), np.uint8), {"total": self.sleep}))
            self.block += 1
        return out


@pytest.mark.parametrize("chunk_ms", [40.0, 2000.0])  # 2 s chunks return several blocks per step()
def test_engine_bench_attributes_time_to_blocks(chunk_ms):
    cfg = EngineConfig.from_preset("micro")
    sleep = 0.02
    engine = _SleepyEngine(cfg, sleep)
    bench = EngineBench(engine, seconds_for_blocks(cfg, 4), chunk_ms=chunk_ms, warmup_blocks=0)
    bench.prepare()
    bench.run_round()
    m = bench.measurement()
    assert m["blocks_measured"] == 3                    # block 0 is the first-frame figure, not a sample
    assert m["p50_block_ms"] >= 1e3 * sleep and m["first_frame_ms"] >= 1e3 * sleep
    frames = sum(cfg.video_frames_in_block(b) for b in (1, 2, 3))
    assert m["fps"] <= frames / (3 * sleep) + 1e-9
    assert m["flops_measured"] == pytest.approx(sum(block_flops(cfg, "wan", b).total for b in (1, 2, 3)))
    assert m["achieved_tflops"] == pytest.approx(m["flops_measured"] / (frames / m["fps"]) / 1e12)


def test_audio_block_arithmetic():
    cfg = EngineConfig.from_preset("tiny")
    for n in (1, 2, 5):
        need = samples_for_blocks(cfg, n)
        assert blocks_in_audio(cfg, need) == n and blocks_in_audio(cfg, need - 1) == n - 1
    # block 0: 9 video frames + 4 lookahead frames at 16 fps, 1000 samples per frame
    assert samples_for_blocks(cfg, 1) == (9 + 4) * 1000
    with pytest.raises(ValueError, match="need >= 2"):
        EngineBench(_SleepyEngine(cfg, 0.0), seconds_for_blocks(cfg, 2) - 0.01)


# ---- the pytest-benchmark JSON and the CLI JSON --------------------------------------------------

def _check_fields(record: dict, where: str) -> None:
    missing = [k for k in MEASUREMENT_FIELDS + CONTEXT_FIELDS if k not in record]
    assert not missing, f"{where}: missing {missing}"
    assert record["p99_block_ms"] >= record["p50_block_ms"] > 0, where
    assert record["fps"] > 0 and record["first_frame_ms"] > 0 and record["peak_memory_mb"] > 0, where
    assert 0 < record["fraction_of_floor"] and record["achieved_tflops"] > 0, where
    assert record["achieved_tflops"] / record["peak_tflops"] == pytest.approx(record["fraction_of_floor"]), where
    assert record["timer"] == "perf_counter" and record["device"] == "cpu" and record["dtype"] == "float32", where
    assert record["torch_version"] == torch.__version__ and record["gpu_name"] is None, where
    assert {"block_frames", "sink_frames", "window_frames"} <= set(record["window"]), where


def test_benchmark_suite_json_on_cpu(tmp_path):
    """Run the suite's tiny benchmarks with --benchmark-enable in a subprocess; read its JSON."""
    out = tmp_path / "bench.json"
    # not xdist's worker variables: pytest-benchmark would take the child for a worker and disable itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env = {**env, "AVATAR_BENCH_ROUNDS": "1", "AVATAR_BENCH_WARMUP": "1", "AVATAR_BENCH_BLOCKS": "2",
           "AVATAR_BENCH_SECONDS": str(seconds_for_blocks(EngineConfig.from_preset("tiny"), 3))}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_e2e.py",
           "benchmarks/bench_dit.py", "-k", "tiny", "--benchmark-enable", f"--benchmark-json={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    by_name = {b["name"]: b for b in data["benchmarks"]}
    assert len(by_name) == 3, list(by_name)       # e2e, DiT ours, DiT upstream
    for name, b in by_name.items():
        info = b["extra_info"]
        _check_fields(info, name)
        assert info["preset"] == "tiny" and info["resolution"] == "64x64" and b["stats"]["rounds"] == 1
    backend = next(iter(by_name.values()))["extra_info"]["backend"]    # what ops_for("auto") chose on the CPU
    kinds = sorted((b["extra_info"]["kind"], b["extra_info"]["path"]) for b in by_name.values())
    assert kinds == [("dit", f"ring/{backend}"), ("dit", "upstream-eager"), ("e2e", f"engine/{backend}")]
    e2e = next(b["extra_info"] for b in by_name.values() if b["extra_info"]["kind"] == "e2e")
    assert e2e["blocks_measured"] == 2 and set(e2e["stage_p50_ms"]) >= {"audio", "denoise", "decode"}


runner = CliRunner()


def test_cli_writes_json_with_upstream_ratio(tmp_path):
    cfg = EngineConfig.from_preset("micro")
    out = tmp_path / "sub" / "bench.json"
    args = ["--preset", "micro", "--resolution", "16x32", "--device", "cpu",
            "--seconds", str(seconds_for_blocks(cfg, 3)), "--warmup-blocks", "1", "--dit-blocks", "2", "--compare-upstream", "--json", str(out)]
    result = runner.invoke(bench_cli.app, args)
    assert result.exit_code == 0, result.output
    for column in bench_cli.COLUMNS:
        assert column in result.output
    assert "upstream / ours" in result.output
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"e2e", "e2e_eager", "dit", "dit_upstream"}
    default, eager = report["results"]["e2e"]["path"], report["results"]["e2e_eager"]["path"]
    assert eager == default + "/eager" and "engine/" + default.split("/")[1] + "/eager" in result.output
    for key, res in report["results"].items():
        _check_fields({**report["environment"], **report["settings"], **res}, key)
    assert report["results"]["e2e"]["blocks_measured"] == 2 and report["settings"]["resolution"] == "16x32"
    ratio = report["upstream_ratio"]
    up, ours = report["results"]["dit_upstream"], report["results"]["dit"]
    assert ratio["dit_p50"] == pytest.approx(up["p50_block_ms"] / ours["p50_block_ms"])


def test_cli_taehv_decoder_is_recorded_and_counted(tmp_path):
    from runtime.flops import block_flops

    cfg = EngineConfig.from_preset("micro")
    out = tmp_path / "bench.json"
    args = ["--preset", "micro", "--device", "cpu", "--decoder", "taehv", "--seconds", str(seconds_for_blocks(cfg, 3)),
            "--warmup-blocks", "1", "--dit-blocks", "1", "--json", str(out)]
    result = runner.invoke(bench_cli.app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["settings"]["decoder"] == "taehv"
    e2e = report["results"]["e2e"]
    # two measured blocks (indices 1 and 2), counted with TAEHV's decoder FLOPs, not the Wan VAE's
    assert e2e["flops_measured"] == pytest.approx(sum(block_flops(cfg, "taehv", b).total for b in (1, 2)))


def test_cli_fp8_is_recorded(tmp_path):
    cfg = EngineConfig.from_preset("micro")
    out = tmp_path / "bench.json"
    args = ["--preset", "micro", "--device", "cpu", "--quantize", "fp8-row", "--seconds",
            str(seconds_for_blocks(cfg, 3)), "--warmup-blocks", "1", "--dit-blocks", "1", "--json", str(out)]
    result = runner.invoke(bench_cli.app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["settings"]["quantize"] == "fp8-row"


@pytest.mark.parametrize("args, message", [
    (["--preset", "micro", "--device", "cpu", "--quantize", "int4"], "quantize must be None or one of"),
    (["--preset", "micro", "--device", "cpu", "--decoder", "tiny"], "decoder must be wan or taehv"),
    (["--preset", "nope"], "unknown preset"),
    (["--preset", "micro", "--device", "tpu"], "device must be cpu or cuda"),
    (["--preset", "micro", "--device", "cpu", "--dtype", "float64"], "dtype must be one of"),
    (["--preset", "micro", "--device", "cpu", "--seconds", "0.5"], "fewer than 2 blocks"),
    (["--preset", "micro", "--resolution", "48"], "resolution must be HxW"),
    (["--preset", "micro", "--resolution", "40x40"], "multiples of 16"),
])
def test_cli_rejects_bad_input(args, message):
    result = runner.invoke(bench_cli.app, args)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split()), result.output


def test_bench_mounts_as_a_subcommand():
    """The line runtime/cli.py adds (`app.command(name="bench")(bench)`) on an app shaped like it."""
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command(name="bench")(bench_cli.bench)
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--preset", "--device", "--dtype", "--seconds", "--chunk-ms", "--json", "--compare-upstream"):
        assert option in result.output
