#!/usr/bin/env bash
# Set up the real ComfyUI test host (idempotent; caches in .cache/) and run the whole test suite in it.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh tests/unit -x`.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$HERE/tools/setup_host.sh" --browser
PY="${COMFYUI_PYTHON:-$HERE/.cache/host/venv/bin/python}"
cd "$HERE"
exec "$PY" -m pytest "$@"
