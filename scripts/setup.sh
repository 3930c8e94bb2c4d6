#!/usr/bin/env bash
# Set up a virtual environment for sqcompile on a fresh machine (CPU or GPU) and print its python.
# Never pulls a CUDA build of torch onto a CPU machine: torch==2.13.0 is the CPU wheel on our machines, and a
# machine that already has torch (the GPU machine) keeps its own.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SQCOMPILE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV" >&2
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" >&2
fi
"$PY" -m pip install -q -e ".[test,triton]" >&2
echo "$PY"
