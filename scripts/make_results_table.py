"""Turns workdirs into a Markdown results table (paper vs measured).

  python scripts/make_results_table.py workdirs/*

For each workdir: the model and data variant from `config.json`, the paper's
test error (`config.paper_error`), the measured final test error as mean +-
std over seeds (the vmapped seeds of one run, and several workdirs with the
same model and data are pooled), the steps and the preset's batch size.
"""

import argparse
import collections

import numpy as np

from stnjax import workdir as workdir_lib


def read_evals(workdir):
  """`(config dict, every eval line of metrics.jsonl in step order)`; raises if none yet."""
  config = workdir_lib.load_config(workdir).to_dict()
  evals = [m for m in workdir_lib.read_evals(workdir) if "test/error_per_seed" in m]
  if not evals:
    raise ValueError(f"{workdir}: no eval metrics yet.")
  return config, evals


def read_run(workdir):
  """`(config dict, the last eval line)` of a workdir."""
  config, evals = read_evals(workdir)
  return config, evals[-1]


def format_mean_std(values):
  """Errors (%) -> "mean +- std" (sample std, ddof=1), or the single value."""
  e = np.asarray(values, np.float64)
  return f"{e.mean():.2f} +- {e.std(ddof=1):.2f}" if len(e) > 1 else f"{e[0]:.2f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  args = parser.parse_args()
  rows = collections.OrderedDict()
  for workdir in args.workdirs:
    try:
      config, last = read_run(workdir)
    except (OSError, ValueError) as e:
      print(f"<!-- skipped {workdir}: {e} -->")
      continue
    # Runs are pooled only if they match in data, model, source, batch and steps.
    key = (config["data"]["variant"], config["model"]["name"], config["data"]["source"],
           config["train"]["batch_size"], last["step"])
    row = rows.setdefault(key, {"paper": config.get("paper_error"), "errors": [], "steps": set(),
                                "batch": config["train"]["batch_size"], "workdirs": []})
    row["errors"] += last["test/error_per_seed"]
    row["steps"].add(last["step"])
    row["workdirs"].append(workdir)
  print("| data | model | paper test error (%) | measured test error (%) | seeds | steps | batch |")
  print("|---|---|---|---|---|---|---|")
  for (variant, name, source, _, _), row in rows.items():
    variant = variant if source == "mnist" else f"{variant} ({source})"
    e = row["errors"]
    measured = format_mean_std(e)
    paper = "-" if row["paper"] is None else f"{row['paper']}"
    steps = ",".join(str(s) for s in sorted(row["steps"]))
    print(f"| {variant} | `{name}` | {paper} | {measured} | {len(e)} | {steps} | {row['batch']} |")


if __name__ == "__main__":
  main()
