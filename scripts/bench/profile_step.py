"""Where one training step of a paper-size model spends its time: per-thread op times from a JAX profile.

  python -m scripts.bench.profile_step [--layout R] [--model cnn] [--batch 128]
      [--steps 10] [--warmup 3] [--top 12] [--out results/bench/profile_step.json]

Builds the step that `bench_paper_models` times (same model and SGD step,
data parallel over `--cpu_devices` CPU devices as `stnjax.train`, after
`stnjax.xla_cpu.configure()`), times `--steps` steps, then records `--steps`
more under `jax.profiler.trace(..., create_perfetto_trace=True)`. From the
trace it sums, per thread and per step, each operation's time (fusions,
the all-reduce, convolutions where they have spans), and the time spent waiting at the
all-reduce's rendezvous ("Wait: ..." events): on several CPU devices, the
device that reaches the all-reduce first waits there for the others, so a
large wait on one thread is time the other thread spent on its last
operations. Prints the step times, each thread's operation and waiting
time and its largest operations; with --out writes them as JSON with provenance.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import tempfile
import time

from scripts.bench import timing
from stnjax import xla_cpu

# Spans around the operations, not operations ("[0] CommonPjRt..." launches device 0).
_WRAPPERS = ("ThunkExecutor::", "Rendezvous", "ThreadpoolListener::", "end: ",
             "[", "CommonPjRt")
_WAIT_PREFIX = "Wait:"


def summarize_trace(events: list[dict], steps: int, top: int) -> list[dict]:
  """Per thread that ran operations: busy and waiting time per step, and its `top` operations.

  `events` are Chrome-trace events (the perfetto trace JAX writes): "M"
  events name the threads, "X" events are timed spans (microseconds).
  Threads are the ones other than Python's whose spans include something
  other than wrappers; times are per step (totals divided by `steps`), in
  seconds. `ops_s` is the sum of the thread's operation spans (a
  collective's includes its wait). On the worker threads of a
  multi-device run XLA's own (Eigen) convolutions have no span, so there
  the step time minus `ops_s` is mostly convolution.
  """
  names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "thread_name"}
  per_thread = collections.defaultdict(lambda: collections.defaultdict(float))
  for e in events:
    if e.get("ph") != "X":
      continue
    key = (names.get((e["pid"], e["tid"]), str(e["tid"])), e["tid"])
    per_thread[key][e["name"]] += e["dur"] * 1e-6 / steps
  threads = []
  for (thread, tid), ops in sorted(per_thread.items(), key=lambda kv: str(kv[0])):
    if thread == "python":
      continue  # Python frames and dispatch.
    wait = sum(v for k, v in ops.items() if k.startswith(_WAIT_PREFIX))
    op_times = {k: v for k, v in ops.items()
                if not k.startswith(_WRAPPERS) and not k.startswith(_WAIT_PREFIX)}
    if not op_times:
      continue
    largest = sorted(op_times.items(), key=lambda kv: -kv[1])[:top]
    threads.append({"thread": f"{thread} ({tid})",
                    "ops_s": sum(op_times.values()), "all_reduce_wait_s": wait,
                    "top_ops": [{"op": k, "seconds": v} for k, v in largest]})
  return threads


def load_trace(directory: str) -> list[dict]:
  """The events of the perfetto trace `jax.profiler.trace` wrote under `directory`."""
  files = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {directory!r}")
  with gzip.open(files[0]) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layout", default="R", choices=("R", "RTS"))
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10, help="timed, then profiled, steps")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--top", type=int, default=12, help="operations listed per thread")
  parser.add_argument("--cpu_devices", type=int,
                      default=timing.default_cpu_devices(),
                      help="CPU devices (default: JAX_NUM_CPU_DEVICES, else one per core)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="JSON file for the results (optional)")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  xla_cpu.configure(args.cpu_devices)  # Before JAX starts its backend, as the training scripts.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scripts.bench import bench_paper_models  # pylint: disable=g-import-not-at-top

  n_dev = jax.device_count()
  if args.batch % n_dev:
    raise ValueError(f"`--batch` must be a multiple of the {n_dev} devices, got {args.batch}.")
  mesh = (jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
          if n_dev > 1 else None)
  model, shape = bench_paper_models.create_stnjax_model(args.model, args.layout)
  params = bench_paper_models.random_params(model, shape, args.seed)
  rng = np.random.default_rng(args.seed)
  x = jnp.asarray(rng.random((args.batch,) + shape, dtype=np.float32))
  y = jnp.asarray(rng.integers(0, bench_paper_models.NUM_CLASSES, args.batch), jnp.int32)
  step = bench_paper_models.stnjax_step(model, params, x, y, mesh)
  for _ in range(args.warmup):
    step()
  step_seconds = []
  for _ in range(args.steps):
    start = time.perf_counter()
    step()
    step_seconds.append(time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      for _ in range(args.steps):
        step()
    threads = summarize_trace(load_trace(directory), args.steps, args.top)

  median = statistics.median(step_seconds)
  print(f"{args.layout} {args.model}, batch {args.batch} on {n_dev} device(s): "
        f"{median * 1e3:.1f} ms/step median (min {min(step_seconds) * 1e3:.1f}, "
        f"max {max(step_seconds) * 1e3:.1f}); {timing.cpu_model()}; "
        f"xla_cpu flags in effect: {xla_cpu.in_effect()}")
  for t in threads:
    print(f"\n{t['thread']}: operations with spans "
          f"{t['ops_s'] * 1e3:.1f} ms/step, waiting at the all-reduce "
          f"{t['all_reduce_wait_s'] * 1e3:.1f}")
    for op in t["top_ops"]:
      print(f"  {op['seconds'] * 1e3:8.2f} ms  {op['op']}")
  results = {"layout": args.layout, "model": args.model, "batch": args.batch,
             "devices": n_dev, "xla_cpu_flags_in_effect": xla_cpu.in_effect(),
             "steps": args.steps, "step_seconds": step_seconds,
             "median_step_seconds": median, "threads": threads}
  timing.write_results(args.out, results)
  return results


if __name__ == "__main__":
  xla_cpu.restart_with_huge_pages()
  main()
