"""Wall-clock timing shared by the benchmark scripts (`scripts/bench_*.py`)."""

import os
import statistics
import sys
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[int], object], *, warmup: int = 0, repeats: int) -> float:
  """Median wall time of `fn(i)` over `repeats` timed calls after `warmup` untimed ones.

  `i` counts every call, warm-up included (0, 1, ...), so a benchmark can
  feed each call different data. `fn` must block until its work is done
  (e.g. `jax.block_until_ready`): JAX dispatches asynchronously.
  """
  for i in range(warmup):
    fn(i)
  times = []
  for i in range(warmup, warmup + repeats):
    start = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# The C-library setting that `scripts/run.sh` gives the main job: glibc backs
# its large (mmap'd) blocks with transparent huge pages. XLA:CPU allocates
# each call's buffers afresh, and whether glibc hands back memory it already
# has or maps fresh 4 KiB pages depends on what the process allocated before
# (see docs/performance.md, the sampler benchmark).
GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"


def restart_with_glibc_tunables(tunables: str = GLIBC_TUNABLES) -> None:
  """Re-executes this script with `GLIBC_TUNABLES=tunables` unless the variable is set.

  glibc reads its tunables once, at process start, hence the restart (the
  same interpreter, arguments and environment). Any value already set,
  the empty one included, is kept: `GLIBC_TUNABLES= python scripts/...`
  runs with glibc's defaults. Other C libraries ignore the variable.
  """
  if "GLIBC_TUNABLES" in os.environ:
    return
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, *sys.argv],
            dict(os.environ, GLIBC_TUNABLES=tunables))


def pin_xla_worker_threads() -> dict[int, int]:
  """Pins each of XLA:CPU's intra-op worker threads in this process to a CPU of its own.

  A diagnostic for small machines (Linux only; `--pin-xla-threads` in
  scripts/bench_sampler.py). On this project's 2-vCPU VM the scheduler
  sometimes stacks XLA's two worker threads (`tf_XLAEigen`) on one vCPU,
  where their spin-waiting delays each other: the benchmark's 28x28 forward
  then takes 0.50 to 0.65 ms instead of 0.33 to 0.46. Round robin over the
  CPUs this process may use; call it after JAX has run a computation (the
  pool starts with the CPU client).

  Returns:
    `{thread id: CPU}` for the threads pinned (empty where there are none,
    or on systems without `/proc/self/task` and `os.sched_setaffinity`).
  """
  tasks = "/proc/self/task"
  if not (os.path.isdir(tasks) and hasattr(os, "sched_setaffinity")):
    return {}
  cpus = sorted(os.sched_getaffinity(0))
  workers = []
  for tid in sorted(os.listdir(tasks), key=int):
    try:
      with open(f"{tasks}/{tid}/comm") as f:
        if f.read().startswith("tf_XLAEigen"):
          workers.append(int(tid))
    except FileNotFoundError:  # The thread ended meanwhile.
      pass
  pinned = {tid: cpus[i % len(cpus)] for i, tid in enumerate(workers)}
  for tid, cpu in pinned.items():
    os.sched_setaffinity(tid, {cpu})
  return pinned
