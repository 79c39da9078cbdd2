r"""Runs the paper's grid (data variant x model), one JSON record per seed.

  python scripts/reproduce.py --variants R,RTS,P,E --models fcn,cnn,st_cnn_aff \
      --preset paper --seeds 3 --protocol_name paper

For every (variant, model) cell this trains all `--seeds` seeds in ONE
program (`experiments/configs/distorted_mnist.py` with `seeds=N`: vmapped
seeds, one compile) with `stnjax.train.train_and_evaluate`, then writes one
record per seed to

  <output_dir>/<protocol>/<variant>_<model>_seed<k>.json

(default `results/<protocol>/...`). Workdirs (config.json, metrics.jsonl,
checkpoints) go to `<workdir_root>/<protocol>/<variant>_<model>` (default:
`workdirs/reproduce` beside the output folder, i.e. `workdirs/reproduce/...`;
with `--first_seed k > 0` the workdir name ends in `_from_seed<k>`, so seeds
can be added to a cell later without retraining the first ones: seed `s` has
the same initialisation and data stream whichever program it is vmapped in,
and trains to the same parameters up to float rounding, see
`tests/test_train.py::test_vmapped_seeds_equal_separate_runs`).

Resumable: a cell whose records all exist is skipped (nothing is loaded or
trained); an interrupted cell resumes from its workdir's last checkpoint. A
workdir whose `config.json` differs from the config this invocation would run
(e.g. another `--num_steps` under the same `--protocol_name`) is an error:
pick another protocol name or delete the workdir. Records are written only
by this script, only after a run has reached its last step.

On a CPU, pass `--one_program_per_seed`: every seed k then runs as the cell
`--seeds 1 --first_seed k` (its own program and workdir `..._from_seed<k>`,
seed 0 in `<variant>_<model>`). XLA:CPU runs the vmapped seeds' convolutions
(grouped convolutions after vmap) 5-10x slower per seed than separate
programs, at ~18 GB peak memory for 3 ST-CNN seeds at batch 256 (measured on
jax 0.10.2, 2 cores; docs/reproduction.md).

Reduced protocols (`--num_steps`): the config's step count is replaced and,
for the paper preset's step schedule (lr 0.01 / 10 every 50k of 150k steps),
`decay_every` is scaled by `num_steps / 150k`, so the learning rate still
drops twice, at 1/3 and 2/3 of the run (e.g. 3,000 steps: 0.01 until 1,000,
0.001 until 2,000, then 0.0001). Without this a run of a few thousand steps
would never decay. `eval_every` / `checkpoint_every` become
`min(config value, num_steps // 10)` unless `--eval_every` is given.

Model selection: the record's main number is the FINAL test error. The
record also holds the step with the lowest validation error (step 0
excluded) and the test error at that step; the test set is never used to
select anything.

Timing (`--time_steps N`): instead of training, builds each cell's real
training step (same config, real data, `--seeds` vmapped seeds), runs 2
warm-up steps (compile) and times N steps (sampling included, each step
synchronised), then times one evaluation pass over the validation and test
sets; prints a Markdown table of seconds per step. Writes no records.

Record schema (JSON, one file per seed; errors in %):
  schema_version, protocol, preset, variant, model, seed, seed_index,
  num_seeds_in_program, data_source, iterations (the last step reached),
  batch_size, optimizer, lr, lr_schedule, decay_every, decay_factor,
  test_error, test_ncorrect, test_nseen, validation_error, validation_nseen,
  best_validation {step, validation_error, test_error}, paper_error,
  num_params, wall_time_s (the whole vmapped program, all seeds together,
  summed over the invocations that trained it, compile and evals included),
  train_steps_per_sec_median, device ("<device_kind> (<platform>)"), cpu_model
  (the host's CPU),
  device_kind, platform, num_devices, jax_version, jaxlib_version, xla_flags
  (`XLA_FLAGS` as the cell ran: `stnjax.xla_cpu.configure()` appends to it),
  glibc_tunables (`GLIBC_TUNABLES`: the script restarts itself with
  `stnjax.xla_cpu.GLIBC_TUNABLES` unless it is set; absent in older records),
  git_commit ("<sha>" or "<sha>-dirty": tracked files modified; untracked
  files are ignored), git_dirty, command (the exact command line that
  reproduces this cell), invocation (the argv that produced it), overrides,
  workdir, finished_at (UTC).
"""

import argparse
import datetime
import functools
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jaxlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import make_results_table  # pylint: disable=g-import-not-at-top,wrong-import-position
from bench import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from stnjax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from stnjax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from stnjax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from stnjax import xla_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position
from stnjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG_FILE = os.path.join(REPO, "experiments", "configs", "distorted_mnist.py")
SCHEMA_VERSION = 1
DEFAULT_OUTPUT_DIR = "results"


def load_config_module():
  spec = importlib.util.spec_from_file_location("distorted_mnist", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _csv(text):
  return [t for t in text.split(",") if t]


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="reproduce.py", description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", type=_csv, default=["R", "RTS", "P", "E"],
                      help="Comma-separated data variants (R, RTS, P, E, TC, addition, ...).")
  parser.add_argument("--models", type=_csv, default=["cnn", "st_cnn_aff"],
                      help="Comma-separated model names (fcn, cnn, st_cnn_aff, ...).")
  parser.add_argument("--seeds", type=int, default=3,
                      help="Seeds per cell, trained together (vmap): seeds first_seed..+N-1.")
  parser.add_argument("--first_seed", type=int, default=0)
  parser.add_argument("--preset", default="paper", choices=["paper", "cpu", "short", "test"])
  parser.add_argument("--num_steps", type=int, default=None,
                      help="Override the preset's iterations (reduced protocols); scales the "
                      "step-decay boundaries (see the docstring).")
  parser.add_argument("--eval_every", type=int, default=None,
                      help="Override eval_every and checkpoint_every.")
  parser.add_argument("--protocol_name", default=None,
                      help="Label of the protocol, e.g. 'paper' or 'reduced-cpu' (default: the "
                      "preset, or '<preset>-<num_steps>steps' with --num_steps).")
  parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                      help="Records go to <output_dir>/<protocol>/.")
  parser.add_argument("--workdir_root", default=None,
                      help="Workdirs go to <workdir_root>/<protocol>/<variant>_<model> "
                      "(default: <output_dir>/../workdirs/reproduce).")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE",
                      help="Any other config field, e.g. --set data.mnist_dir=/data/mnist "
                      "(repeatable; recorded; value parsed as JSON, else kept as a string).")
  parser.add_argument("--one_program_per_seed", action="store_true",
                      help="Train each seed k as its own program (--seeds 1 --first_seed k) "
                      "instead of vmapping the seeds: much faster and lighter on XLA:CPU, "
                      "where vmapped convolutions are slow (see docs/reproduction.md).")
  parser.add_argument("--time_steps", type=int, default=0,
                      help="Only time N training steps per cell (after 2 warm-up steps) and "
                      "print seconds per step; no training, no records.")
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error("--seeds must be >= 1")
  if args.num_steps is not None and args.num_steps < 1:
    parser.error("--num_steps must be >= 1")
  if args.eval_every is not None and args.eval_every < 1:
    parser.error(f"--eval_every must be >= 1, got {args.eval_every}")
  if args.protocol_name is None:
    args.protocol_name = (args.preset if args.num_steps is None
                          else f"{args.preset}-{args.num_steps}steps")
  if not args.protocol_name or "/" in args.protocol_name:
    parser.error(f"bad --protocol_name {args.protocol_name!r}")
  if args.workdir_root is None:
    args.workdir_root = os.path.join(os.path.dirname(os.path.abspath(args.output_dir)),
                                     "workdirs", "reproduce")
  return args


def _parse_value(text):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def build_config(config_module, args, variant, model):
  """The cell's config: the preset, then --num_steps (with scaled decay), --eval_every, --set."""
  config = config_module.get_config(
      f"model={model},data={variant},preset={args.preset},seeds={args.seeds}")
  config.seed = args.first_seed
  if args.num_steps is not None:
    old = int(config.train.num_steps)
    config.train.num_steps = args.num_steps
    if config.train.lr_schedule == "step":
      config.train.decay_every = max(1, round(config.train.decay_every * args.num_steps / old))
    every = min(int(config.eval_every), max(1, args.num_steps // 10))
    config.eval_every = config.checkpoint_every = every
    config.log_every = min(int(config.log_every), every)
  if args.eval_every is not None:
    config.eval_every = config.checkpoint_every = args.eval_every
    config.log_every = min(int(config.log_every), args.eval_every)
  for item in args.overrides:
    if "=" not in item:
      raise ValueError(f"--set expects KEY=VALUE, got {item!r}.")
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"--set {key}: no such config field.")
    node[leaf] = _parse_value(value)
  return config


def cell_command(args, variant, model):
  """The exact command line that reproduces one (variant, model) cell."""
  parts = ["python", "scripts/reproduce.py", "--variants", variant, "--models", model,
           "--preset", args.preset, "--seeds", str(args.seeds)]
  if args.first_seed:
    parts += ["--first_seed", str(args.first_seed)]
  if args.num_steps is not None:
    parts += ["--num_steps", str(args.num_steps)]
  if args.eval_every is not None:
    parts += ["--eval_every", str(args.eval_every)]
  parts += ["--protocol_name", args.protocol_name]
  if args.output_dir != DEFAULT_OUTPUT_DIR:
    parts += ["--output_dir", args.output_dir]
  for item in args.overrides:
    parts += ["--set", item]
  return shlex.join(parts)


@functools.lru_cache(maxsize=None)
def git_commit():
  """`(sha or sha-dirty, dirty)`; dirty = tracked files differ from HEAD (untracked ignored).

  Read once, when `main` starts (cached): a record must name the code that
  was launched, not whatever HEAD is when a long run finishes. (Records
  written before this fix, e.g. results/reduced-cpu-500/, read it at write
  time.)
  """
  def git(*cmd):
    return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
  try:
    sha = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.CalledProcessError):
    return "unknown", None
  return sha + ("-dirty" if dirty else ""), dirty


def device_info():
  d = jax.devices()[0]
  return {"device": f"{d.device_kind} ({d.platform})", "cpu_model": timing.cpu_model(),
          "device_kind": d.device_kind,
          "platform": d.platform, "num_devices": jax.device_count(),
          "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS"),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def record_path(args, variant, model, seed):
  return os.path.join(args.output_dir, args.protocol_name, f"{variant}_{model}_seed{seed}.json")


def workdir_name(args, variant, model):
  """`<variant>_<model>`, or `..._from_seed<k>` for --first_seed k > 0 (seeds added later)."""
  name = f"{variant}_{model}"
  return name if not args.first_seed else f"{name}_from_seed{args.first_seed}"


def _display_path(path):
  rel = os.path.relpath(path, REPO)
  return os.path.abspath(path) if rel.startswith("..") else rel


def num_params(config):
  """Parameter count of the cell's model (shapes only; real and synthetic data share shapes)."""
  size, channels, num_classes = input_pipeline.SYNTHETIC_SHAPES[config.data.variant]
  input_shape = (size, size, channels)
  m = config.model
  model = models.create_model(m.name, input_shape, num_classes, width=m.get("width"),
                              param_budget=m.get("param_budget"), st_pool=m.get("st_pool", 1),
                              padding=m.padding)
  return models.count_params(model, input_shape)


def _finished(workdir, num_steps):
  """Whether the workdir has its final checkpoint and its final evaluation."""
  if num_steps not in workdir_lib.checkpoint_steps(workdir):
    return False
  try:
    _, evals = make_results_table.read_evals(workdir)
  except (OSError, ValueError):
    return False
  return evals[-1]["step"] == num_steps


def _write_json(path, obj):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def make_records(args, config, variant, model, workdir, wall_time_s, argv):
  """One record per seed from the finished workdir's metrics.jsonl."""
  _, evals = make_results_table.read_evals(workdir)
  last = evals[-1]
  num_steps = int(config.train.num_steps)
  if last["step"] != num_steps:
    raise RuntimeError(f"{workdir}: last eval at step {last['step']}, expected {num_steps}.")
  sps = [m["train/steps_per_sec"] for m in workdir_lib.read_metrics(workdir)
         if "train/steps_per_sec" in m]
  candidates = [m for m in evals if m["step"] > 0] or evals
  commit, dirty = git_commit()
  common = {
      "schema_version": SCHEMA_VERSION, "protocol": args.protocol_name, "preset": args.preset,
      "variant": variant, "model": model, "num_seeds_in_program": int(config.num_seeds),
      "data_source": config.data.source, "iterations": int(last["step"]),
      "batch_size": int(config.train.batch_size), "optimizer": config.train.optimizer,
      "lr": float(config.train.lr), "lr_schedule": config.train.lr_schedule,
      "decay_every": int(config.train.decay_every),
      "decay_factor": float(config.train.decay_factor),
      "test_nseen": int(last["test/nseen"]), "validation_nseen": int(last["validation/nseen"]),
      "paper_error": config.get("paper_error"), "num_params": num_params(config),
      "wall_time_s": round(float(wall_time_s), 1),
      "train_steps_per_sec_median": statistics.median(sps) if sps else None,
      **device_info(), "git_commit": commit, "git_dirty": dirty,
      "command": cell_command(args, variant, model), "invocation": shlex.join(argv),
      "overrides": list(args.overrides), "workdir": _display_path(workdir),
      "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  records = []
  for i in range(int(config.num_seeds)):
    best = min(candidates, key=lambda m: (m["validation/error_per_seed"][i], m["step"]))
    records.append({
        **common, "seed": int(config.seed) + i, "seed_index": i,
        "test_error": float(last["test/error_per_seed"][i]),
        "test_ncorrect": int(last["test/ncorrect"][i]),
        "validation_error": float(last["validation/error_per_seed"][i]),
        "best_validation": {"step": int(best["step"]),
                            "validation_error": float(best["validation/error_per_seed"][i]),
                            "test_error": float(best["test/error_per_seed"][i])},
    })
  return records


def run_cell(args, config, variant, model, argv):
  """Trains (or resumes) one cell and writes its missing records; returns their paths."""
  seeds = [args.first_seed + i for i in range(args.seeds)]
  paths = [record_path(args, variant, model, s) for s in seeds]
  missing = [p for p in paths if not os.path.exists(p)]
  if not missing:
    print(f"[reproduce] {args.protocol_name}/{variant}_{model}: records exist, skipped.",
          flush=True)
    return []
  workdir = os.path.join(args.workdir_root, args.protocol_name, workdir_name(args, variant, model))
  os.makedirs(workdir, exist_ok=True)
  # Strict: the records must describe one config, so even a field that
  # would not change the run (e.g. a longer --num_steps) is refused.
  workdir_lib.check_resumable(
      config, workdir, strict=True,
      how_to_proceed=f"Use another --protocol_name or delete {workdir}")
  print(f"[reproduce] {args.protocol_name}/{variant}_{model}: training {len(seeds)} seed(s), "
        f"{config.train.num_steps} steps, workdir {workdir}", flush=True)
  wall_path = os.path.join(workdir, "reproduce_wall_time.json")
  segments = []
  if os.path.exists(wall_path):
    with open(wall_path) as f:
      segments = json.load(f)["segments_s"]
  if _finished(workdir, int(config.train.num_steps)):
    print(f"[reproduce] {workdir} already finished: records from its metrics.", flush=True)
  else:
    start = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    segments.append(round(time.perf_counter() - start, 2))
    _write_json(wall_path, {"segments_s": segments})
  records = make_records(args, config, variant, model, workdir, sum(segments), argv)
  written = []
  for path, record in zip(paths, records):
    if path in missing:
      _write_json(path, record)
      written.append(path)
  errors = ", ".join(f"{r['test_error']:.2f}" for r in records)
  print(f"[reproduce] {args.protocol_name}/{variant}_{model}: test error per seed {errors} "
        f"(%); {sum(segments):.0f} s", flush=True)
  return written


def time_cell(config, num_steps):
  """Seconds per training step (median of `num_steps` after 2 warm-up steps) and per eval pass."""
  dataset = input_pipeline.load(config.data)
  model = train.create_model_from_config(config, dataset)
  optimizer = train.create_optimizer(config.train)
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  batch_size = int(config.train.batch_size)
  init, sample_batch, train_step, eval_batch, _ = train.make_functions(
      model, optimizer, dataset, mesh, batch_size)
  num_seeds = int(config.num_seeds)
  keys = np.stack([np.asarray(jax.random.PRNGKey(config.seed + i)) for i in range(num_seeds)])
  state = init(jax.numpy.asarray(keys))
  pool = (jax.device_put(dataset.train_images), jax.device_put(dataset.train_labels))
  data_keys = jax.numpy.asarray(keys)
  t0 = time.perf_counter()
  times = []
  for step in range(num_steps + 2):
    t = time.perf_counter()
    state, metrics = train_step(state, sample_batch(*pool, data_keys, step))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  compile_s = times[0] + times[1] - 2 * statistics.median(times[2:])
  del t0
  eval_bs = int(config.eval_batch_size)
  padded = {s: train._pad_eval_set(*dataset.eval_sets[s], eval_bs)  # pylint: disable=protected-access
            for s in ("validation", "test")}
  eval_times = []
  for _ in range(2):  # The first pass compiles.
    t = time.perf_counter()
    for p in padded.values():
      train.evaluate(eval_batch, state.params, p, eval_bs)
    eval_times.append(time.perf_counter() - t)
  nseen = sum(len(dataset.eval_sets[s][1]) for s in padded)
  return {"s_per_step": statistics.median(times[2:]), "compile_s": compile_s,
          "eval_s": eval_times[-1], "eval_examples": nseen,
          "num_params": models.count_params(model, dataset.input_shape)}


def main(argv=None):
  """Runs the grid; returns the list of record paths written (timing mode: the timings)."""
  argv = list(sys.argv if argv is None else ["scripts/reproduce.py", *argv])
  args = parse_args(argv[1:])
  xla_cpu.configure()  # Before the first JAX computation (seed programs inherit XLA_FLAGS).
  git_commit()  # Pin the launched commit (see git_commit).
  config_module = load_config_module()
  cells = [(v, m) for v in args.variants for m in args.models]
  configs = {(v, m): build_config(config_module, args, v, m) for v, m in cells}
  if args.one_program_per_seed and not args.time_steps:
    return _run_per_seed(args, config_module, cells, argv)
  if args.time_steps:
    info = device_info()
    rows = []
    print(f"device: {info['device']}, jax {info['jax_version']}, {os.cpu_count()} CPU cores; "
          f"preset {args.preset}, {args.time_steps} timed steps after 2 warm-up steps\n")
    print("| variant | model | params | seeds | batch | s/step | s/step/seed | compile (s) | "
          "eval val+test (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (v, m), config in configs.items():
      t = time_cell(config, args.time_steps)
      rows.append({"variant": v, "model": m, "seeds": args.seeds, **t})
      print(f"| {v} | `{m}` | {t['num_params']:,} | {args.seeds} | {config.train.batch_size} | "
            f"{t['s_per_step']:.3f} | {t['s_per_step'] / args.seeds:.3f} | "
            f"{t['compile_s']:.1f} | {t['eval_s']:.1f} ({t['eval_examples']}) |", flush=True)
    return rows
  return _run_cells(
      [(args, config, v, m) for (v, m), config in configs.items()], argv)


def _run_per_seed(args, config_module, cells, argv):
  """--one_program_per_seed: each seed k is its own cell `--seeds 1 --first_seed k`."""
  jobs = []
  for k in range(args.seeds):
    sub = argparse.Namespace(**{**vars(args), "seeds": 1, "first_seed": args.first_seed + k,
                                "one_program_per_seed": False})
    jobs += [(sub, build_config(config_module, sub, v, m), v, m) for v, m in cells]
  return _run_cells(jobs, argv)


def _run_cells(jobs, argv):
  written, failed = [], []
  for args, config, v, m in jobs:
    try:
      written += run_cell(args, config, v, m, argv)
    except Exception as e:  # pylint: disable=broad-except
      print(f"[reproduce] {args.protocol_name}/{v}_{m} FAILED: {type(e).__name__}: {e}",
            file=sys.stderr, flush=True)
      failed.append(f"{v}_{m}" + (f" (seed {args.first_seed})" if args.seeds == 1 else ""))
  if failed:
    raise SystemExit(f"{len(failed)} of {len(jobs)} cells failed: {', '.join(failed)}")
  return written


if __name__ == "__main__":
  xla_cpu.restart_with_huge_pages()
  main()
