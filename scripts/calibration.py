"""Collects calibration runs' validation curves into one JSON file and a Markdown table.

  python -m scripts.calibration --out results/cpu-calibration.json workdirs/cal_*
  python -m scripts.calibration --every 10000 workdirs/long_run  # fewer table columns

Each argument is a workdir written by `stnjax.train` (e.g. by
`experiments/train.py ... preset=cpu --config.train.num_steps=N`). For each
it records the run's protocol (model, data, padding, optimiser, schedule,
batch, steps) and its VALIDATION error at every evaluation: the protocol is
chosen on the validation split only, so the test errors are left out on
purpose. The Markdown table goes to stdout (docs/reproduction.md quotes it).
"""

import argparse
import os

from scripts.bench import timing
from stnjax import workdir as workdir_lib


def curve(workdir: str) -> dict:
  """One run's protocol and validation curve."""
  config = workdir_lib.read_config(workdir)
  if config is None:
    raise ValueError(f"{workdir}: no {workdir_lib.CONFIG}; not a training workdir.")
  evals = workdir_lib.read_evals(workdir)
  if not evals:
    raise ValueError(f"{workdir}: no evaluation in its metrics yet.")
  train = config["train"]
  return {
      "workdir": os.path.basename(os.path.normpath(workdir)),
      "model": config["model"]["name"], "data": config["data"]["variant"],
      "padding": config["model"]["padding"], "optimizer": train["optimizer"],
      "lr": train["lr"], "lr_schedule": train["lr_schedule"],
      "warmup_steps": train["warmup_steps"], "batch_size": train["batch_size"],
      "num_steps": train["num_steps"],
      "validation_error": {str(m["step"]): m["validation/error"] for m in evals},
  }


def markdown(runs: list[dict], every: int = 1) -> str:
  """The curves as a Markdown table, one column per evaluated step that is a multiple of `every`."""
  if every < 1:
    raise ValueError(f"every must be a positive number of steps, got {every}.")
  steps = sorted({int(s) for r in runs for s in r["validation_error"]
                  if int(s) > 0 and int(s) % every == 0})
  head = "| model | data | padding | steps | " + " | ".join(f"{s / 1000:g}k" for s in steps) + " |"
  lines = [head, "|" + "---|" * (4 + len(steps))]
  for r in runs:
    cells = [f"{r['validation_error'][str(s)]:.2f}" if str(s) in r["validation_error"] else ""
             for s in steps]
    lines.append(f"| `{r['model']}` | {r['data']} | {r['padding']} | {r['num_steps']:,} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--out", default=None, help="JSON file (optional)")
  parser.add_argument("--every", type=int, default=1,
                      help="table columns only at multiples of this many steps (the JSON "
                           "keeps every evaluation)")
  args = parser.parse_args()
  runs = [curve(w) for w in args.workdirs]
  print(markdown(runs, args.every))
  timing.write_results(args.out, {"metric": "validation error (%), fixed 10k validation set",
                                  "runs": runs})


if __name__ == "__main__":
  main()
