"""Prints a workdir's final evaluation, and optionally writes it as JSON with provenance.

  python scripts/report.py --workdir workdirs/main [--wall_time_s 80 --out report.json]

`scripts/run.sh` writes `<workdir>/report.json`; the README's main-job row
quotes `results/main_job.json`, a copy of one such file.
"""

import json
import os

from absl import app
from absl import flags

from bench import timing
from stnjax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by stnjax.train.")
_WALL = flags.DEFINE_integer("wall_time_s", None, "Wall time of the job that trained it.")
_OUT = flags.DEFINE_string("out", None, "Also write the report to this JSON file.")
_JOB = flags.DEFINE_string("job", None, "The command of the job, for the JSON file.")
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
  if _OUT.value:
    config = workdir_lib.read_config(_WORKDIR.value)
    report = {"job": _JOB.value, "workdir": _WORKDIR.value, "model": config["model"]["name"],
              "data": config["data"]["variant"], "steps": last["step"],
              "batch_size": config["train"]["batch_size"], "wall_time_s": _WALL.value,
              "test_error": last["test/error"], "test_ncorrect": last["test/ncorrect"][0],
              "test_nseen": last["test/nseen"], "validation_error": last["validation/error"]}
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    timing.write_results(_OUT.value, report)


if __name__ == "__main__":
  app.run(main)
