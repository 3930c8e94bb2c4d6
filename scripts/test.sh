#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the tests on CPU; the Triton kernels run in-process under the Triton
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1 where no CUDA device is present).
#   bash scripts/test.sh              the fast suite: every test not marked `slow`
#   bash scripts/test.sh --all        every test, the slow real-model and Inductor ones too (what .ci/run runs)
#   bash scripts/test.sh [--all] ARGS more pytest arguments: files, -k NAME, -m cuda (every GPU test), ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
select=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  shift
  select=()
fi
exec "$PY" -m pytest -q -rs -p no:cacheprovider ${select[@]+"${select[@]}"} "$@"
