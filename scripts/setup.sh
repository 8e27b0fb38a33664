#!/usr/bin/env bash
# Make .venv and install edgebatch with what the tests need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# --progress-bar off keeps CI logs short; "dev" adds pytest, hypothesis, tritonclient, LiteRT and the
# pinned CPU torch of the "torch" extra (the torch backend's tests)
.venv/bin/python -m pip install -q --progress-bar off -e ".[dev]"
echo "edgebatch installed in $(pwd)/.venv"
