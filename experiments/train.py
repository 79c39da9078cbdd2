r"""Launcher: `python experiments/train.py --config <file>[:args] --workdir <dir>`.

Only flags and one call; the work is `stnjax.train.train_and_evaluate`. Example:

  python experiments/train.py \
    --config experiments/configs/distorted_mnist.py:model=st_cnn_aff,data=RTS,preset=short \
    --workdir workdirs/st_cnn_aff_rts --config.train.num_steps=500

Re-running with the same `--workdir` resumes from its last checkpoint; a
config that differs in anything that changes the run is refused unless
`--allow_config_change` is given. On several processes or hosts, add
`--config.distributed=True` and start the same command in every process,
with `--coordinator_address`, `--num_processes` and `--process_id` where the
cluster does not provide them (docs/training.md).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from stnjax import config_schema
from stnjax import train
from stnjax import xla_cpu

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (and :arguments).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics, checkpoints.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even though its config.json differs in "
    "fields that change the run (the old config is kept beside the new one).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (with --config.distributed=True, "
    "where the cluster environment does not provide it).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to N-1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  xla_cpu.configure()  # Before the first JAX computation.
  cluster = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in cluster):
    if not _CONFIG.value.distributed:
      raise app.UsageError("--coordinator_address, --num_processes and --process_id need "
                           "--config.distributed=True.")
    train.initialize_distributed(*cluster)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                           allow_config_change=_ALLOW_CHANGE.value)


if __name__ == "__main__":
  xla_cpu.restart_with_huge_pages()  # Before anything is allocated.
  try:  # absl would only say "AttributeError: 'lr'" for a misplaced override.
    config_schema.check_override_flags(sys.argv[1:])
  except ValueError as e:
    sys.exit(f"FATAL Flags parsing error: {e}")
  app.run(main)
