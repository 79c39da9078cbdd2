"""The benchmarks' shared helpers (`scripts/bench/timing.py`)."""

import json
import os

import pytest

from scripts.bench import timing


def test_median_seconds_counts_warmup_calls_and_times_the_rest(monkeypatch):
  clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # Durations 1, 3, 2.
  monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
  seen = []
  assert timing.median_seconds(seen.append, warmup=2, repeats=3) == 2.0
  assert seen == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not (hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task")),
                    reason="needs Linux's per-thread CPU affinity")
def test_pin_xla_worker_threads_gives_each_worker_one_cpu():
  import jax
  import jax.numpy as jnp

  jax.block_until_ready(jnp.zeros(8) + 1)  # The CPU client's pool exists from here on.
  allowed = os.sched_getaffinity(0)
  try:
    pinned = timing.pin_xla_worker_threads()
    assert pinned, "no tf_XLAEigen threads found"
    cpus = sorted(allowed)
    for i, (tid, cpu) in enumerate(sorted(pinned.items())):
      assert cpu == cpus[i % len(cpus)]
      assert os.sched_getaffinity(tid) == {cpu}
    assert os.sched_getaffinity(0) == allowed  # The calling thread is left alone.
  finally:
    for tid in os.listdir("/proc/self/task"):
      try:
        os.sched_setaffinity(int(tid), allowed)
      except OSError:  # The thread ended meanwhile.
        pass


def test_write_results_records_provenance(tmp_path):
  path = tmp_path / "out" / "bench.json"
  timing.write_results(path, {"rows": [{"name": "x", "ms": 1.0}]})
  written = json.loads(path.read_text())
  assert written["rows"] == [{"name": "x", "ms": 1.0}]
  assert {"date", "commit", "command", "cpu_model", "jax"} <= set(written["provenance"])
  timing.write_results(None, {})  # No path: nothing written, no error.


def test_default_cpu_devices_follows_the_environment_then_the_cpus(monkeypatch):
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "3")
  assert timing.default_cpu_devices() == 3
  monkeypatch.delenv("JAX_NUM_CPU_DEVICES")
  assert timing.default_cpu_devices() == len(os.sched_getaffinity(0))


def test_cpu_idle_reads_the_driver_and_the_guest_poll_time(tmp_path):
  assert timing.cpu_idle(tmp_path) is None  # No cpuidle in sysfs: nothing to say.
  driver = tmp_path / "devices/system/cpu/cpuidle/current_driver"
  driver.parent.mkdir(parents=True)
  driver.write_text("intel_idle\n")
  assert timing.cpu_idle(tmp_path) == {"driver": "intel_idle", "guest_halt_poll_ns": None}
  poll = tmp_path / "module/haltpoll/parameters/guest_halt_poll_ns"
  poll.parent.mkdir(parents=True)
  poll.write_text("0\n")
  driver.write_text("haltpoll\n")
  assert timing.cpu_idle(tmp_path) == {"driver": "haltpoll", "guest_halt_poll_ns": 0}
