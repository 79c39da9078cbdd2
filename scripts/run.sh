#!/usr/bin/env bash
# The main job: sets up .venv if needed, trains the default ST-CNN (affine) on
# RTS-distorted MNIST with the short preset into workdirs/main (resumable:
# re-running continues from the last checkpoint), writes the figures to
# workdirs/main/figures and prints the test error and the wall time.
#
#   bash scripts/run.sh [--config.train.num_steps=...]   (extra flags go to experiments/train.py)
#
# MNIST is read from $STNJAX_MNIST_DIR (default ../shared/data/mnist); the
# data package prepares its TFDS cache and the fixed RTS test set on first use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export STNJAX_MNIST_DIR=${STNJAX_MNIST_DIR:-$(cd .. && pwd)/shared/data/mnist}
WORKDIR=${WORKDIR:-workdirs/main}
# On a CPU, train data parallel over one JAX CPU device per core (at most 8,
# a divisor of the batch sizes): XLA:CPU does not spread this model's small
# operations over the cores by itself. Ignored when JAX runs on a GPU/TPU.
# Set JAX_NUM_CPU_DEVICES=1 for one.
if [[ -z "${JAX_NUM_CPU_DEVICES:-}" ]]; then
  cores=$(nproc)
  for d in 8 4 2 1; do
    if (( d <= cores )); then export JAX_NUM_CPU_DEVICES=$d; break; fi
  done
fi
# glibc's huge-page tunable (stnjax.xla_cpu.GLIBC_TUNABLES, docs/performance.md,
# "Memory"), exported so that every step of the job and the report's
# provenance see it; experiments/train.py would otherwise restart itself with
# it. Set GLIBC_TUNABLES to override (empty: glibc's defaults).
if [[ -z "${GLIBC_TUNABLES+set}" ]]; then
  GLIBC_TUNABLES=$(.venv/bin/python -c "from stnjax import xla_cpu; print(xla_cpu.GLIBC_TUNABLES)")
  export GLIBC_TUNABLES
fi
start=$(date +%s)
.venv/bin/python experiments/train.py \
  --config "experiments/configs/distorted_mnist.py:model=st_cnn_aff,data=RTS,preset=short" \
  --workdir "$WORKDIR" "$@"
.venv/bin/python scripts/figures.py --workdir "$WORKDIR"
end=$(date +%s)
.venv/bin/python scripts/report.py --workdir "$WORKDIR" --wall_time_s $((end - start)) \
  --job "bash scripts/run.sh" --out "$WORKDIR/report.json"
echo "wall time: $((end - start)) s"
