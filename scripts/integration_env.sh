#!/usr/bin/env bash
# Makes .venv-NAME for an integration whose client clashes with the main .venv or is too heavy for
# the main test command (NAME = pipecat | ray), then runs its tests:
#     bash scripts/integration_env.sh pipecat      # pipecat-ai pins protobuf 6 (livekit-agents needs 7)
#     bash scripts/integration_env.sh ray          # ray[serve]: a local cluster takes ~30 s to start
# The new venv layers on the main one (a .pth file adds .venv's site-packages after its own), so torch
# and the project are not installed twice; its own packages (e.g. pipecat's protobuf) win.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: integration_env.sh pipecat|ray}
case "$NAME" in
  pipecat) EXTRA=pipecat; TESTS=tests/test_integration_pipecat.py ;;
  ray) EXTRA=ray; TESTS=tests/test_integration_ray.py ;;
  *) echo "unknown integration: $NAME (pipecat | ray)" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || bash scripts/setup.sh
ENV=.venv-$NAME
[ -x "$ENV/bin/python" ] || .venv/bin/python -m venv "$ENV"
BASE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
OWN=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a bare path line) so the main venv's own .pth files run too: the editable project
echo "import site; site.addsitedir('$BASE')" > "$OWN/_main_venv.pth"
mapfile -t PKGS < <("$ENV/bin/python" -c "import sys, tomllib
print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies'][sys.argv[1]]))" "$EXTRA")
"$ENV/bin/python" -m pip install -q "${PKGS[@]}"
shift
"$ENV/bin/python" -m pytest -q "$TESTS" "$@"
