#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
