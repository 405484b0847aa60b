#!/usr/bin/env bash
# The GPU checks owed in docs/benchmarks.md, in groups that each fit a 10-minute device call.
#
#   bash scripts/gpu_checks.sh OUT_DIR [install] [tests] [kernels] [e2e-512] [e2e-480] [e2e-fp8] [e2e-liveavatar] [graphs] [all]
#
# Every check writes its log (and JSON where it has one) under OUT_DIR and the script goes on after a
# failure, so one call brings back everything it got; the summary at the end says which passed.
# A check that hangs is stopped after $CHECK_TIMEOUT seconds (default 540: inside one 10-minute call).
# `install` builds the project in place (the device image has torch, triton, cmake, pybind11 and
# scikit-build-core, and no internet): run it first on a fresh machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_checks.sh OUT_DIR [install|tests|kernels|e2e-512|e2e-480|e2e-fp8|e2e-liveavatar|graphs|all]...}
shift
mkdir -p "$out"
groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(all)
export PYTHONUNBUFFERED=1
summary=()

check() {  # check NAME COMMAND...: run (at most $CHECK_TIMEOUT s), log to OUT/NAME.log, record pass/fail
    local name=$1; shift
    local start=$SECONDS
    timeout "${CHECK_TIMEOUT:-540}" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-14s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
    tail -n 25 "$out/$name.log"
}

want() {  # want GROUP: whether GROUP (or all) was asked for
    local g
    for g in "${groups[@]}"; do [ "$g" = "$1" ] || [ "$g" = all ] && return 0; done
    return 1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
git rev-parse HEAD >"$out/commit.txt" 2>/dev/null
if want install; then
    check install python -m pip install --no-deps --no-build-isolation -e .
fi
if want tests; then
    check gpu-tests python -m pytest -q -m gpu -rs --junitxml="$out/gpu-tests.xml"
fi
if want kernels; then
    check sass python -m benchmarks.sass_report --json "$out/sass.json"
    check kernels sh -c "python benchmarks/bench_kernels.py > '$out/kernels.json'"
fi
if want graphs; then
    check graphs python -m pytest -q -rs -m gpu tests/test_livetalk_graphs.py tests/test_round_runner_gpu.py
fi
if want e2e-512; then
    check e2e-512 python -m benchmarks.cli --preset livetalk-1.3b --device cuda --dtype bfloat16 \
        --compare-upstream --json "$out/e2e-512.json"
fi
if want e2e-fp8; then
    check e2e-fp8 python -m benchmarks.cli --preset livetalk-1.3b --device cuda --dtype bfloat16 \
        --quantize fp8 --peak-tflops 1500 --json "$out/e2e-fp8.json"
fi
if want e2e-480; then
    check e2e-480 python -m benchmarks.cli --preset livetalk-1.3b --device cuda --dtype bfloat16 \
        --resolution 480x832 --compare-upstream --json "$out/e2e-480.json"
fi
if want e2e-liveavatar; then  # family 2 on one GPU: the 14B bf16 session holds 77.6 GB (an H200; tight on 80 GB)
    check la-tiny python -m benchmarks.cli --family liveavatar --preset tiny --device cpu --seconds 2 \
        --json "$out/la-tiny.json"
    check la-14b python -m benchmarks.cli --family liveavatar --preset liveavatar-14b --device cuda \
        --dtype bfloat16 --json "$out/la-14b.json"
    check la-14b-fp8 python -m benchmarks.cli --family liveavatar --preset liveavatar-14b --device cuda \
        --dtype bfloat16 --quantize fp8 --json "$out/la-14b-fp8.json"
fi
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
