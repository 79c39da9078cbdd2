"""Timing and result files shared by the benchmarks in `scripts/bench/`."""

import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[2]


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


def pin_xla_worker_threads() -> dict[int, int]:
  """Pins each of XLA:CPU's intra-op worker threads in this process to a CPU of its own.

  A diagnostic for small machines (Linux only; `--pin-xla-threads` in
  `scripts.bench.bench_sampler`): the scheduler can stack XLA's worker
  threads (`tf_XLAEigen`) on one CPU, where their spin-waiting delays each
  other and a small benchmark runs at one of two speeds. Round robin over the
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


def default_cpu_devices() -> int:
  """The CPU devices a training benchmark uses: `JAX_NUM_CPU_DEVICES` if set (as the
  training is run), else one per CPU this process may use."""
  return int(os.environ.get("JAX_NUM_CPU_DEVICES") or len(os.sched_getaffinity(0)))


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_idle(sysfs: str | os.PathLike = "/sys") -> dict | None:
  """Linux's CPU idle driver and, under the `haltpoll` driver, how long an idle guest CPU polls.

  `guest_halt_poll_ns` = 0 means an idle virtual CPU halts at once, so waking
  a thread on it costs a round trip through the hypervisor (the cost
  `bench_loop_overhead` measures). None where sysfs does not say.
  """
  def read(path):
    try:
      return pathlib.Path(sysfs, path).read_text().strip()
    except OSError:
      return None

  driver = read("devices/system/cpu/cpuidle/current_driver")
  if driver is None:
    return None
  poll_ns = read("module/haltpoll/parameters/guest_halt_poll_ns")
  return {"driver": driver, "guest_halt_poll_ns": None if poll_ns is None else int(poll_ns)}


def _commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


def provenance() -> dict:
  """Where and how a result was measured: date, commit, machine, versions, command."""
  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  command = (["python", "-m", spec.name] if spec is not None and spec.name else
             ["python", sys.argv[0]]) + sys.argv[1:]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": _commit(),
      "command": " ".join(command),
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "cpus_available": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count()),
      "cpu_idle": cpu_idle(),
      "device": f"{device.device_kind} ({device.platform}) x{jax.device_count()}",
      "jax": jax.__version__,
      "python": platform.python_version(),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
      "xla_flags": os.environ.get("XLA_FLAGS"),
      "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
  }


def write_results(path: str | os.PathLike | None, results: dict) -> None:
  """Writes `{"provenance": ..., **results}` as JSON to `path` (nothing if None)."""
  if path is None:
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"provenance": provenance(), **results}, indent=1) + "\n")
  print(f"wrote {path}")
