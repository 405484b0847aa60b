"""`avatar bench --family liveavatar` (benchmarks/liveavatar.py) and the device-side random initialiser
(random_weights.materialize_random). CPU only, tiny preset."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from benchmarks import cli as bench_cli
from benchmarks.harness import block_shares
from benchmarks.liveavatar import memory_budget
from runtime.families.liveavatar.model import build_liveavatar
from runtime.families.liveavatar.random_weights import materialize_random

runner = CliRunner()


def _device_init(seed: int) -> dict[str, torch.Tensor]:
    model = materialize_random(build_liveavatar("tiny", device="meta"), "cpu", torch.bfloat16, seed)
    return dict(model.named_parameters())


def test_materialize_random_is_finite_nontrivial_and_seeded():
    a, b, c = _device_init(0), _device_init(0), _device_init(1)
    assert len(a) == len(dict(build_liveavatar("tiny", device="meta").named_parameters()))
    for name, p in a.items():
        assert p.device.type == "cpu" and p.dtype == torch.bfloat16 and not p.requires_grad, name
        assert torch.isfinite(p).all(), name
        assert p.float().std() > 1e-3 if p.numel() > 1 else p.abs().item() > 0, name
        assert torch.equal(p, b[name]), f"{name}: same seed, other weights"
        assert not torch.equal(p, c[name]), f"{name}: other seed, same weights"
    norms = [p.float().mean().item() for n, p in a.items() if p.dim() == 1 and n.endswith("weight")]
    assert norms and all(0.8 < m < 1.2 for m in norms)   # norm weights are 1 + noise


def test_materialize_random_refuses_buffers():
    model = torch.nn.BatchNorm1d(4, device="meta")
    with pytest.raises(ValueError, match="buffers"):
        materialize_random(model, "cpu")


def test_memory_budget_of_the_14b_preset():
    m = memory_budget("liveavatar-14b")
    assert m["trunk_weights_gb"] == pytest.approx(2 * 16_295_755_609 / 1e9)
    assert m["ring_per_step_gb"] == pytest.approx(40 * 12 * 1056 * 5120 * 2 * 2 / 1e9)   # 10.38 GB
    assert m["rings"] == 4 and m["total_gb"] == pytest.approx(77.58, abs=0.05)
    assert memory_budget("liveavatar-14b", "tensor")["trunk_weights_gb"] < 0.52 * m["trunk_weights_gb"]


def test_block_shares_splits_calls_and_skips_block_zero():
    shares, seconds = block_shares([1.0, 4.0, 0.5, 3.0], [[], ["b0", "b1"], [], ["b2"]])
    assert shares == [(2.0, "b1"), (3.0, "b2")]
    assert seconds == pytest.approx(2.0 + 0.5 + 3.0)


def test_cli_liveavatar_writes_json_and_table(tmp_path):
    out = tmp_path / "la.json"
    args = ["--family", "liveavatar", "--preset", "tiny", "--device", "cpu", "--seconds", "1.2",
            "--warmup-blocks", "0", "--dit-blocks", "1", "--json", str(out)]
    result = runner.invoke(bench_cli.app, args)
    assert result.exit_code == 0, result.output
    from benchmarks.liveavatar import COLUMNS
    for text in (*COLUMNS, "e2e liveavatar-engine", "dit forward_block/step0", "stage p50 ms", "resident GB"):
        assert text in result.output
    report = json.loads(out.read_text())
    assert set(report) >= {"environment", "settings", "results"}
    st = report["settings"]
    assert (st["family"], st["preset"], st["resolution"], st["dtype"], st["quantize"]) == \
        ("liveavatar", "tiny", "64x64", "float32", None)
    assert {"block_frames", "ring_frames", "rings", "ring_tokens"} <= set(st["window"])
    e2e, dit = report["results"]["e2e"], report["results"]["dit"]
    assert e2e["blocks_measured"] == 1 and e2e["frames_measured"] == 12 and e2e["timer"] == "perf_counter"
    assert e2e["p99_block_ms"] >= e2e["p50_block_ms"] > 0 and e2e["first_frame_ms"] > 0 and e2e["fps"] > 0
    assert set(e2e["stage_p50_ms"]) == {"audio", "denoise", "decode", "total"} and e2e["peak_memory_mb"] > 0
    assert dit["blocks_measured"] == 1 and dit["dit_block_ms"] == pytest.approx(4 * dit["p50_block_ms"])
    assert report["resident_memory_gb"]["rings_gb"] == pytest.approx(st["memory_budget_gb"]["rings_gb"])
    assert report["environment"]["gpu_name"] is None


@pytest.mark.parametrize("args, option, message", [
    (["--family", "wan"], "--family", "family must be one of livetalk, liveavatar"),
    (["--family", "liveavatar", "--preset", "livetalk-1.3b"], "--preset", "unknown Live Avatar preset"),
    (["--preset", "liveavatar-14b"], "--preset", "add --family liveavatar"),
    (["--family", "liveavatar", "--compare-upstream"], "--compare-upstream", "--family livetalk only"),
    (["--family", "liveavatar", "--resolution", "64x64"], "--resolution", "--family livetalk only"),
    (["--family", "liveavatar", "--device", "cpu", "--quantize", "int4"], "--quantize", "quantize must be"),
    (["--family", "liveavatar", "--device", "cpu", "--seconds", "0.5"], "--seconds", "fewer than 2 blocks"),
])
def test_cli_liveavatar_rejects_bad_input(args, option, message):
    result = runner.invoke(bench_cli.app, args)
    assert result.exit_code != 0
    text = " ".join(result.output.replace("│", " ").split())  # the error box wraps lines
    assert option in text and message in text, result.output
