#!/usr/bin/env bash
# Creates .venv with the CPU torch pin installed FIRST (a bare `torch` requirement would pull
# gigabytes of CUDA wheels), then the project (builds the C++ scheduler via scikit-build-core).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
