#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu_check.py): a few minutes on one GPU, no internet.
#   benchmarks/gpu_check.sh                 # tables on stdout, JSON in benchmarks/results/gpu_check.json
#   benchmarks/gpu_check.sh --dry-run       # the same sections on the CPU with tiny presets (seconds)
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh --only parity ddp
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
