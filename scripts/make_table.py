r"""Turns `scripts/reproduce.py` records into the results tables (Markdown) and a bar chart.

  python scripts/make_table.py                       # Markdown to stdout, no chart
  python scripts/make_table.py --out docs/results.md --plot docs/images/results.png \
      --protocols cpu --readme README.md          # what the README shows

Reads every `<results_dir>/**/*.json` record (default `results/`; files
without `schema_version` are ignored). For each protocol (`--protocol_name`
of the runs) it writes one table per experiment: Table 1 (models x R / RTS /
P / E), translated + cluttered (TC) and MNIST addition. Each cell is the
paper's test error beside the measured one, "mean +- std (n seeds)" (sample
std over seeds), or "not run" where no record exists, so the table shows its
own coverage. Under each table: the protocol (preset, iterations, batch,
optimizer, schedule), the data source, the device(s) and the jax version(s)
of the records (each record's JSON keeps its git commit).

`--metric final` (default) reports the final test error; `--metric best_val`
the test error at each seed's lowest-validation-error step (selected on
validation, never on test).

The chart (matplotlib, Agg) has one panel per experiment with records: for
every measured cell the paper's number and each protocol's mean (std as
error bar).
"""

import argparse
import collections
import glob
import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

from make_results_table import format_mean_std  # pylint: disable=g-import-not-at-top,wrong-import-position


def paper_errors():
  """PAPER_ERRORS of `experiments/configs/distorted_mnist.py` (the single copy of the paper's numbers)."""
  path = os.path.join(REPO, "experiments", "configs", "distorted_mnist.py")
  spec = importlib.util.spec_from_file_location("distorted_mnist", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.PAPER_ERRORS


# (title, variants): one table per experiment.
EXPERIMENTS = [
    ("Table 1: distorted MNIST (% test error)", ["R", "RTS", "P", "E"]),
    ("Translated + cluttered MNIST, TC 60x60 (% test error)", ["TC"]),
    ("MNIST addition (% test error)", ["addition"]),
]


def load_records(results_dir):
  records = []
  for path in sorted(glob.glob(os.path.join(results_dir, "**", "*.json"), recursive=True)):
    try:
      with open(path) as f:
        record = json.load(f)
    except (OSError, json.JSONDecodeError):
      continue
    if isinstance(record, dict) and "schema_version" in record and "test_error" in record:
      records.append(record)
  return records


def _error(record, metric):
  return record["test_error"] if metric == "final" else record["best_validation"]["test_error"]


def _protocol_order(names):
  return sorted(names, key=lambda n: (n != "paper", n))


def group(records, metric):
  """protocol -> (variant, model) -> {seed: error}; a seed's duplicate keeps the latest record."""
  cells = collections.defaultdict(lambda: collections.defaultdict(dict))
  for r in sorted(records, key=lambda r: r.get("finished_at", "")):
    cells[r["protocol"]][(r["variant"], r["model"])][r["seed"]] = _error(r, metric)
  return cells


def _cell(errors):
  if not errors:
    return "not run"
  n = len(errors)
  return f"{format_mean_std(list(errors.values()))} ({n} seed{'s' if n > 1 else ''})"


def _paper(value):
  return "-" if value is None else f"{value}"


def _summary(records):
  """One line describing a set of records (the protocol as actually run)."""
  def values(key, fmt=str):
    return ", ".join(sorted({fmt(r[key]) for r in records if r.get(key) is not None})) or "?"
  sched = sorted({(r["optimizer"], r["lr"], r["lr_schedule"], r["decay_every"], r["decay_factor"])
                  for r in records})
  sched_text = "; ".join(
      f"{o} lr {lr}" + (f" x{f} every {d} steps" if s == "step" else f" ({s})")
      for o, lr, s, d, f in sched)
  sources = {r["data_source"] for r in records}
  data = values("data_source")
  if sources != {"mnist"}:
    data += " (not MNIST: a smoke test, not comparable to the paper)"
  return (f"preset `{values('preset')}`; iterations {values('iterations')}; batch "
          f"{values('batch_size')}; {sched_text}; data {data}; device {values('device')} "
          f"(CPU: {values('cpu_model')}); "
          f"jax {values('jax_version')}")


def experiment_table(title, variants, protocol, cells, paper):
  """Markdown lines for one experiment under one protocol."""
  models = []
  for v in variants:
    models += [m for m in paper.get(v, {}) if m not in models]
  models += sorted({m for (v, m) in cells if v in variants and m not in models})
  total = len(variants) * len(models)
  run = sum(1 for v in variants for m in models if cells.get((v, m)))
  lines = [f"### {title}", ""]
  if not run:
    return lines + [f"Not run under `{protocol}` (0 of {total} cells).", ""]
  if len(variants) > 1:
    header = "| model | " + " | ".join(f"{v} paper | {v} measured" for v in variants) + " |"
  else:
    header = "| model | paper | measured |"
  lines += [header, "|---" * (1 + 2 * len(variants)) + "|"]
  for m in models:
    row = [f"`{m}`"]
    for v in variants:
      row += [_paper(paper.get(v, {}).get(m)), _cell(cells.get((v, m)))]
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", f"{run} of {total} cells run.", ""]
  return lines


def markdown(records, metric, plot_link=None):
  paper = paper_errors()
  cells = group(records, metric)
  what = ("final test error" if metric == "final"
          else "test error at the lowest-validation-error step")
  lines = ["# Results: paper vs measured", "",
           "Generated by `python scripts/make_table.py` from the `scripts/reproduce.py` records "
           "(`results/<protocol>/*.json`); see `docs/reproduction.md`. Measured: "
           f"{what}, mean +- sample std over seeds; paper: Jaderberg et al. 2015 (Table 1 and "
           "text). \"not run\": no record.", ""]
  if plot_link:
    lines += [f"![paper vs measured]({plot_link})", ""]
  if not records:
    return "\n".join(lines + ["No records found.", ""])
  for protocol in _protocol_order(cells):
    recs = [r for r in records if r["protocol"] == protocol]
    lines += [f"## Protocol `{protocol}`", "", _summary(recs) + ".", ""]
    for title, variants in EXPERIMENTS:
      lines += experiment_table(title, variants, protocol, cells[protocol], paper)
  return "\n".join(lines)


README_BEGIN = "<!-- results:begin (generated by scripts/make_table.py --readme) -->"
README_END = "<!-- results:end -->"


def readme_block(records, metric, plot_link=None):
  """The README's results: per protocol, its summary and the tables of experiments it ran."""
  cells, paper, lines = group(records, metric), paper_errors(), []
  for protocol in _protocol_order(cells):
    recs = [r for r in records if r["protocol"] == protocol]
    lines += [f"Protocol `{protocol}`: {_summary(recs)}. % test error "
              f"({'final' if metric == 'final' else 'at the lowest validation error'}), "
              "mean +- std over seeds.", ""]
    for title, variants in EXPERIMENTS:
      if any(v in variants for v, _ in cells[protocol]):
        table = experiment_table(title, variants, protocol, cells[protocol], paper)
        lines += [f"**{table[0][4:]}**"] + table[1:]
  if plot_link:
    lines += [f"![paper vs measured]({plot_link})", ""]
  return "\n".join(lines).rstrip("\n")


def replace_readme_block(text, block, begin=README_BEGIN, end=README_END):
  """`text` with the part between the `begin` and `end` markers replaced by `block`."""
  start, stop = text.find(begin), text.find(end)
  if start < 0 or stop < start:
    raise ValueError(f"The README has no '{begin}' ... '{end}' block.")
  return text[:start + len(begin)] + "\n" + block + "\n" + text[stop:]


def plot(records, metric, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  paper = paper_errors()
  cells = group(records, metric)
  protocols = _protocol_order(cells)
  panels = []
  for title, variants in EXPERIMENTS:
    keys = sorted({k for p in protocols for k in cells[p] if k[0] in variants},
                  key=lambda k: (variants.index(k[0]), k[1]))
    if keys:
      panels.append((title, keys))
  # Panels stacked, one per row, so Table 1's 32 cells stay legible at a README's width.
  widest = max([len(k) for _, k in panels], default=1)
  fig, axes = plt.subplots(max(1, len(panels)), 1, squeeze=False,
                           figsize=(min(16, max(6, 0.5 * widest + 2)), 3.2 * max(1, len(panels))))
  if not panels:
    axes[0, 0].text(0.5, 0.5, "no records", ha="center", va="center")
    axes[0, 0].set_axis_off()
  width = 0.8 / (1 + len(protocols))
  for ax, (title, keys) in zip(axes[:, 0], panels):
    x = np.arange(len(keys))
    ax.bar(x, [paper.get(v, {}).get(m, np.nan) for v, m in keys], width, label="paper",
           color="0.6")
    for i, p in enumerate(protocols):
      errs = [list(cells[p].get(k, {}).values()) for k in keys]
      mean = [np.mean(e) if e else np.nan for e in errs]
      std = [np.std(e, ddof=1) if len(e) > 1 else 0.0 for e in errs]
      ax.bar(x + (i + 1) * width, mean, width, yerr=std, capsize=2, label=f"measured: {p}")
    ax.set_xticks(x + 0.4 - width / 2, [f"{v}\n{m}" for v, m in keys], fontsize=6, rotation=90)
    ax.set_title(title.split(" (")[0], fontsize=9)
    ax.set_ylabel("test error (%)")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="make_table.py", description=__doc__.splitlines()[0])
  parser.add_argument("--results_dir", default=os.path.join(REPO, "results"))
  parser.add_argument("--protocols", default="",
                      help="Comma-separated protocol names to include (default: all).")
  parser.add_argument("--metric", choices=["final", "best_val"], default="final")
  parser.add_argument("--out", default="", help="Markdown file (default: stdout).")
  parser.add_argument("--plot", default="",
                      help="Also write the bar chart to this PNG and link it (default: none).")
  parser.add_argument("--readme", default="",
                      help="Also rewrite this README's generated results block.")
  args = parser.parse_args(argv)
  records = load_records(args.results_dir)
  if args.protocols:
    keep = set(args.protocols.split(","))
    records = [r for r in records if r["protocol"] in keep]
  link = None
  if args.plot:
    plot(records, args.metric, args.plot)
    base = os.path.dirname(os.path.abspath(args.out)) if args.out else os.getcwd()
    link = os.path.relpath(os.path.abspath(args.plot), base)
  text = markdown(records, args.metric, link)
  if args.readme:
    readme_link = (os.path.relpath(os.path.abspath(args.plot),
                                   os.path.dirname(os.path.abspath(args.readme)))
                   if args.plot else None)
    with open(args.readme) as f:
      old = f.read()
    with open(args.readme, "w") as f:
      f.write(replace_readme_block(old, readme_block(records, args.metric, readme_link)))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")
  else:
    print(text)
  return text


if __name__ == "__main__":
  main()
