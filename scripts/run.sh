#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the sampler benchmark
# (stnjax vs torch vs map_coordinates) and writes results/bench_sampler.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
mkdir -p results
exec .venv/bin/python scripts/bench_sampler.py --out results/bench_sampler.json "$@"
