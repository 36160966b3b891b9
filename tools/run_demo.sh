#!/usr/bin/env bash
# Set up the real ComfyUI host (idempotent; caches in .cache/) and run the main job in it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$HERE/tools/setup_host.sh"
PY="${COMFYUI_PYTHON:-$HERE/.cache/host/venv/bin/python}"
exec "$PY" "$HERE/tools/demo.py" "$@"
