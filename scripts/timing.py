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
# (see the README's sampler benchmark).
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
