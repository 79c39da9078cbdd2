"""Benchmark: the cost of one elementwise loop per call, XLA:CPU (a jitted `x * 2`) vs torch.

Times `y = x * 2` on float32 vectors from 128 KiB to 16 MiB: a jitted JAX
function (dispatch, XLA's loop, `block_until_ready`) against `torch.mul` in
the same process. The arithmetic is trivial, so the times are the runtimes'
fixed costs plus memory traffic. XLA:CPU splits a large enough loop into
parallel partitions (`outer_dimension_partitions` in the compiled HLO,
reported per row); each call then wakes a worker thread, and on a machine
where waking an idle core is slow (a virtual machine's halted vCPU) that
costs tens of microseconds, while torch's OpenMP threads spin between calls.
This bounds any kernel built from a few such loops, such as `grid_sample`
on a small batch (docs/performance.md, "The sampler benchmark against its
targets").

It also times the wake-up itself, without JAX: a one-byte pipe round trip
to a thread pinned to the same CPU and to another CPU, back to back and
after a 1 ms pause (in which an idle core may halt). The provenance
records the CPU idle driver and, on a virtual machine with `haltpoll`, how
long an idle CPU polls before it halts (`guest_halt_poll_ns`).

Rounds are interleaved (the two libraries alternate which goes first); the
reported time is the median of the round medians, and the ratio is torch
/ JAX (> 1: JAX is faster). With --out, writes the rows and the provenance
as JSON. A one-core run: `OMP_NUM_THREADS=1 taskset -c 0 python -m
scripts.bench.bench_loop_overhead`.

  python -m scripts.bench.bench_loop_overhead [--rounds 6] [--repeats 50] [--trips 500]
      [--out FILE]
"""

import argparse
import os
import statistics
import threading
import time

import jax
import numpy as np

from scripts.bench import timing
from stnjax import xla_cpu

SIZES_KIB = (128, 256, 512, 1024, 4096, 16384)


def partitions(compiled_text: str) -> int:
  """The largest `outer_dimension_partitions` product in a compiled module's HLO (1: none)."""
  largest = 1
  marker = '"outer_dimension_partitions":['
  for chunk in compiled_text.split(marker)[1:]:
    counts = [int(c.strip('"')) for c in chunk.split("]", 1)[0].split(",") if c.strip('"')]
    product = 1
    for c in counts:
      product *= c
    largest = max(largest, product)
  return largest


def pipe_round_trip_us(cpu_a: int, cpu_b: int, trips: int, pause_s: float = 0.0) -> float:
  """Median microseconds for a byte to go to a thread pinned to `cpu_b` and back to `cpu_a`."""
  to_echo, from_echo = os.pipe(), os.pipe()

  def echo():
    os.sched_setaffinity(0, {cpu_b})  # 0: the calling thread.
    while (byte := os.read(to_echo[0], 1)) != b"q":
      os.write(from_echo[1], byte)

  thread = threading.Thread(target=echo)
  thread.start()
  affinity = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {cpu_a})
  times = []
  try:
    for _ in range(trips):
      if pause_s:
        time.sleep(pause_s)
      start = time.perf_counter()
      os.write(to_echo[1], b"x")
      os.read(from_echo[0], 1)
      times.append(time.perf_counter() - start)
  finally:
    os.write(to_echo[1], b"q")
    thread.join()
    os.sched_setaffinity(0, affinity)
    for fd in (*to_echo, *from_echo):
      os.close(fd)
  return 1e6 * statistics.median(times)


def wake_up_rows(trips: int) -> list[dict]:
  """Pipe round trips on the same CPU and across two, back to back and after 1 ms pauses."""
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < 2:
    return []
  rows = []
  for pause_s in (0.0, 1e-3):
    same = pipe_round_trip_us(cpus[0], cpus[0], trips, pause_s)
    other = pipe_round_trip_us(cpus[0], cpus[1], trips, pause_s)
    rows.append({"pause_ms": pause_s * 1e3, "same_cpu_us": same, "other_cpu_us": other})
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--repeats", type=int, default=50, help="timed calls per round")
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--trips", type=int, default=500, help="pipe round trips per wake-up row")
  parser.add_argument("--out", default=None, help="JSON file for the results (optional)")
  args = parser.parse_args(argv)

  import torch  # pylint: disable=g-import-not-at-top

  double = jax.jit(lambda x: x * 2)
  rows = []
  load_before = os.getloadavg()[0]
  for kib in SIZES_KIB:
    n = kib * 1024 // 4
    x = jax.device_put(np.random.default_rng(0).random(n, np.float32))
    t = torch.from_numpy(np.asarray(x).copy())
    runners = {"jax": lambda _: jax.block_until_ready(double(x)),
               "torch": lambda _: torch.mul(t, 2)}
    rounds = {name: [] for name in runners}
    for r in range(args.rounds):
      for name in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
        rounds[name].append(1e6 * timing.median_seconds(
            runners[name], warmup=args.warmup, repeats=args.repeats))
    us = {name: statistics.median(v) for name, v in rounds.items()}
    rows.append({"kib": kib, "jax_us": us["jax"], "torch_us": us["torch"],
                 "ratio_torch_over_jax": us["torch"] / us["jax"],
                 "xla_partitions": partitions(double.lower(x).compile().as_text()),
                 "round_medians_us": rounds})
    print(f"# {kib} KiB: jax {us['jax']:.1f} us ({rows[-1]['xla_partitions']} partitions), "
          f"torch {us['torch']:.1f} us", flush=True)

  torch_info = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
  load = f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
  print(f"\n{timing.cpu_model()}, {len(os.sched_getaffinity(0))} CPUs "
        f"(idle: {timing.cpu_idle()}); jax {jax.__version__}; {torch_info}; {load}\n")
  print("| float32 vector | XLA partitions | jax us | torch us | torch / jax |")
  print("|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['kib']} KiB | {r['xla_partitions']} | {r['jax_us']:.1f} | "
          f"{r['torch_us']:.1f} | {r['ratio_torch_over_jax']:.2f} |")
  wake_ups = wake_up_rows(args.trips)
  if wake_ups:
    print("\n| pipe round trip | same CPU us | other CPU us |\n|---|---:|---:|")
  for w in wake_ups:
    print(f"| after {w['pause_ms']:g} ms pause | {w['same_cpu_us']:.1f} | {w['other_cpu_us']:.1f} |")
  timing.write_results(args.out, {"torch": torch_info, "load": load, "rounds": args.rounds,
                                  "repeats": args.repeats, "rows": rows,
                                  "trips": args.trips, "wake_up_rows": wake_ups})
  return rows, wake_ups


if __name__ == "__main__":
  xla_cpu.restart_with_huge_pages()
  main()
