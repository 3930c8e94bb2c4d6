#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU; Triton kernels run in the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
