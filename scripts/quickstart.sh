#!/usr/bin/env bash
# The README's first command: install, start a local Ray + the Serve app with the demo
# detector from the MLflow repository, then run the sample video through it over HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/edgebatch up
.venv/bin/edgebatch demo
echo
echo "The detector keeps serving (address above); 'edgebatch status' shows it, 'edgebatch down' stops it."
echo "(activate the environment first: source .venv/bin/activate)"
