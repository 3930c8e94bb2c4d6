#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the tests on CPU; the Triton kernels run in-process under the Triton
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1 where no CUDA device is present).
#   bash scripts/test.sh              the fast suite: every test not marked `slow`
#   bash scripts/test.sh --all        every test, the slow real-model and Inductor ones too (what .ci/run runs)
#   bash scripts/test.sh [--all] ARGS more pytest arguments: files, -k NAME, -m cuda (every GPU test), ...
# Tests run in SQCOMPILE_TEST_WORKERS processes (pytest-xdist; default 2, one file per process at a time, one
# thread each: 2 threads per process on 2 busy cores make small matmuls wait on each other); 1 runs them in this one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
select=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  shift
  select=()
  "$PY" tests/models.py smollm2 texts >/dev/null  # the real model and texts, fetched once before the workers start
fi
workers=()
if [ "${SQCOMPILE_TEST_WORKERS:-2}" != 1 ]; then
  # the longest files first (tests/conftest.py's LONGEST_FIRST), in the order collected: no idle worker at the end
  workers=(-n "${SQCOMPILE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec "$PY" -m pytest -q -rs -p no:cacheprovider -p no:benchmark ${workers[@]+"${workers[@]}"} ${select[@]+"${select[@]}"} "$@"
