#!/usr/bin/env bash
# The test suite as the README and CI run it: every test but the wall-clock ones in parallel, one
# worker per core, whole files per worker (module fixtures built once); then the wall-clock tests
# (pytest -m wallclock: real-time pacing, a client's own timers) alone, on a quiet machine.
# Extra arguments go to both runs (e.g. --durations=25). Plain `.venv/bin/python -m pytest` runs
# the same tests serially.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -n auto --dist loadfile -m "not wallclock" "$@"
.venv/bin/python -m pytest -m wallclock "$@"
