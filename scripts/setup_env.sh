#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) from the pinned requirements.
# Usage: source scripts/setup_env.sh [requirements-file]   (default: requirements.txt)
# Re-installs only when the requirements file changed since the last successful install.
set -euo pipefail
PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ_FILE="${1:-requirements.txt}"
VENV="${PROTOSCOPE_VENV:-$PROJECT_ROOT/.venv}"
PYTHON_BIN="${PYTHON:-}"
if [ -z "$PYTHON_BIN" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON_BIN="$candidate"; break; fi
  done
fi
if [ -z "$PYTHON_BIN" ]; then
  echo "Protoscope needs Python 3.11 (python3.11 or python3 on PATH)." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV" >&2
  "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.installed-$(basename "$REQ_FILE")"
HASH="$(cat "$PROJECT_ROOT/requirements.txt" "$PROJECT_ROOT/$REQ_FILE" | sha256sum | cut -d' ' -f1)"
# requirements-dev.txt includes requirements.txt: a current dev install serves the app as well.
DEV_STAMP="$VENV/.installed-requirements-dev.txt"
DEV_HASH=""
[ -f "$PROJECT_ROOT/requirements-dev.txt" ] && \
  DEV_HASH="$(cat "$PROJECT_ROOT/requirements.txt" "$PROJECT_ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
if [ "$REQ_FILE" = "requirements.txt" ] && [ -f "$DEV_STAMP" ] && [ "$(cat "$DEV_STAMP")" = "$DEV_HASH" ]; then
  : # nothing to install
elif [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[setup] installing $REQ_FILE into $VENV (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2 || true
  # torch first and alone, so that no other package can pull a (multi-GB) CUDA build.
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0" >&2
  "$VENV/bin/python" -m pip install --quiet -r "$PROJECT_ROOT/$REQ_FILE" >&2
  echo "$HASH" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export PROTOSCOPE_PYTHON="$VENV/bin/python"
