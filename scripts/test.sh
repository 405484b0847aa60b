#!/usr/bin/env bash
# The test suite as the README and CI run it: every test but the wall-clock ones in parallel, one
# worker per core, whole files per worker (module fixtures built once); then the wall-clock tests
# (pytest -m wallclock: real-time pacing, a client's own timers) alone, on a quiet machine.
# Extra arguments go to both runs (e.g. --durations=25, or test files). Plain `.venv/bin/python -m
# pytest` runs the same tests serially.
set -uo pipefail
cd "$(dirname "$0")/.."

.venv/bin/python -m pytest -n auto --dist loadfile -m "not wallclock" "$@"
first=$?
.venv/bin/python -m pytest -m wallclock "$@"
second=$?
# exit 5 = no test selected. One part selecting nothing is expected when the arguments pick tests of
# the other part only (`bash scripts/test.sh tests/test_audio.py`); nothing selected at all, or a
# part failing otherwise, fails the run.
if [ "$first" -eq 5 ] && [ "$second" -ne 5 ] && [ "$#" -gt 0 ]; then first=0; fi
if [ "$second" -eq 5 ] && [ "$first" -ne 5 ] && [ "$#" -gt 0 ]; then second=0; fi
if [ "$first" -ne 0 ]; then exit "$first"; fi
exit "$second"
