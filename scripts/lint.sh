#!/usr/bin/env bash
# Lint: the import contracts (import-linter, [tool.importlinter] in pyproject.toml) and ruff
# ([tool.ruff]). Exits non-zero on any violation. Needs the dev extra (scripts/setup.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
status=0
"$BIN/lint-imports" --no-cache || status=1
"$BIN/ruff" check . || status=1
exit "$status"
