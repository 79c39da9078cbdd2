#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
# One pytest worker per core, at most 4 (pytest-xdist; each worker compiles its
# own programs, and most tests are compile-bound on one core). Override with
# -n N (or -n 0 for one process). Workers share an accelerator, so JAX must not
# preallocate its memory.
cores=$(nproc)
workers=$(( cores < 4 ? cores : 4 ))
if [ "$workers" -le 1 ]; then workers=0; fi
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec .venv/bin/python -m pytest -n "$workers" "$@"
