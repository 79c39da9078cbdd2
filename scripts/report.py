"""Prints a workdir's final evaluation: `python scripts/report.py --workdir workdirs/main`."""

from absl import app
from absl import flags

from stnjax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by stnjax.train.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  evals = workdir_lib.read_evals(_WORKDIR.value)
  if not evals:
    raise app.UsageError(f"{_WORKDIR.value}: no evaluation in its metrics.jsonl yet.")
  last = evals[-1]
  print(f"step {last['step']}: test error {last['test/error']:.2f}% "
        f"({last['test/ncorrect'][0]}/{last['test/nseen']} correct), "
        f"validation error {last['validation/error']:.2f}%")


if __name__ == "__main__":
  app.run(main)
