"""DiT only: one block = 4 denoising steps + the KV refresh (runtime.sampler.sample_block).

`test_dit_block` is our path (KV ring read in place, the engine's ops backend); `test_dit_block_upstream`
is the plain eager path structured like upstream (benchmarks/upstream_path.py) on the same weights,
shapes and inputs, so the two p50s in `extra_info` give the side-by-side ratio.
"""
import pytest

from benchmarks.harness import DitBench, DitSetup, RingRunner
from benchmarks.upstream_path import UpstreamRunner


@pytest.mark.parametrize("runner_cls", [RingRunner, UpstreamRunner], ids=["ours", "upstream"])
def test_dit_block(benchmark, bench_case, runner_cls):
    sizes = bench_case.sizes(benchmark)
    setup = DitSetup.from_engine(bench_case.engine)
    bench = DitBench(runner_cls(setup), setup, sizes.dit_blocks, sizes.warmup)
    bench.warmup()
    benchmark.group = f"dit {bench_case.preset}"
    benchmark.pedantic(bench.run_round, setup=bench.prepare, rounds=sizes.rounds, iterations=1)
    info = bench.record()
    benchmark.extra_info.update(info)
    assert info["blocks_measured"] == sizes.dit_blocks * sizes.rounds and info["p50_block_ms"] > 0
