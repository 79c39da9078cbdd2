"""Wall-clock timing shared by the benchmark scripts (`scripts/bench_*.py`)."""

import statistics
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
