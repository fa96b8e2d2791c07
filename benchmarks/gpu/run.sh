#!/usr/bin/env bash
# GPU suite, step 2: bash benchmarks/gpu/run.sh OUT_DIR [--dry-run]
# On the GPU machine, with .whl/ carried (benchmarks/gpu/prepare.sh); --dry-run rehearses it on CPU (CI).
# Stages, time limits and budget: benchmarks/gpu/run.py. Exit status 0 when every stage passed.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/run.py" "$@"
