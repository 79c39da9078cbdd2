#!/usr/bin/env bash
# Creates .venv (once) and installs stnjax with every extra (`.[all,test]`) into it.
# Idempotent: re-installs only when pyproject.toml changed. Sourced by run.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.stnjax-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch==2.13.0 (CPU) is the parity reference for tests and benchmarks; on
  # the project's machines pip takes a local CPU build. Elsewhere, install a
  # CPU wheel first: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  .venv/bin/python -m pip install -q -e ".[all,test]"
  echo "$want" > "$stamp"
fi
