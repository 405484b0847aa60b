"""Benchmarks: pytest-benchmark suites (bench_*.py), the shared harness, the upstream-structured path
and the `avatar bench` command. See docs/benchmarks.md for the method."""
