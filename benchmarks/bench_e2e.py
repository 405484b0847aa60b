"""End to end: audio chunks in through Engine.step, frames out (audio features, DiT, VAE decode, copy).

pytest-benchmark's own columns time one round (a whole measured session of streamed audio); the
per-block figures (p50/p99 latency, FPS, first-frame latency, peak memory, TFLOP/s and fraction of
the floor, GPU and settings) are in `extra_info` (see benchmarks/harness.py and docs/benchmarks.md).
"""
from benchmarks.harness import EngineBench


def test_e2e(benchmark, bench_case):
    sizes = bench_case.sizes(benchmark)
    bench = EngineBench(bench_case.engine, sizes.seconds, sizes.chunk_ms, sizes.warmup)
    bench.warmup()
    benchmark.group = f"e2e {bench_case.preset}"
    benchmark.pedantic(bench.run_round, setup=bench.prepare, rounds=sizes.rounds, iterations=1)
    info = bench.record()
    benchmark.extra_info.update(info)
    assert info["blocks_measured"] >= 1 and info["p50_block_ms"] > 0 and info["first_frame_ms"] > 0
