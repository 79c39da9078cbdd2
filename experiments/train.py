r"""Launcher: `python experiments/train.py --config <file>[:args] --workdir <dir>`.

Only flags and one call; the work is `stnjax.train.train_and_evaluate`. Example:

  python experiments/train.py \
    --config experiments/configs/distorted_mnist.py:model=st_cnn_aff,data=RTS,preset=short \
    --workdir workdirs/st_cnn_aff_rts --config.train.num_steps=500

Re-running with the same `--workdir` resumes from its last checkpoint. On
several hosts, add `--config.distributed=True` and start the same command on
every host (see `stnjax.train`).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from stnjax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (and :arguments).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
