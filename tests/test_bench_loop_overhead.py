"""scripts/bench/bench_loop_overhead: the HLO partition count it reports, and one tiny run."""

import json
import os

import pytest

from scripts.bench import bench_loop_overhead


@pytest.mark.parametrize("text, expected", [
    ("%fusion = f32[8] fusion(%p), kind=kLoop", 1),
    ('backend_config={"outer_dimension_partitions":["2"]}', 2),
    ('{"outer_dimension_partitions":["2","3"]} ... {"outer_dimension_partitions":["4"]}', 6),
])
def test_partitions(text, expected):
  assert bench_loop_overhead.partitions(text) == expected


def test_main_writes_rows(tmp_path, monkeypatch):
  pytest.importorskip("torch")
  monkeypatch.setattr(bench_loop_overhead, "SIZES_KIB", (4, 64))
  out = tmp_path / "loop.json"
  rows, wake_ups = bench_loop_overhead.main(["--rounds", "2", "--repeats", "2", "--warmup", "1",
                                             "--trips", "3", "--out", str(out)])
  assert [r["kib"] for r in rows] == [4, 64]
  for r in rows:
    assert r["jax_us"] > 0 and r["torch_us"] > 0
    assert r["xla_partitions"] >= 1
    assert len(r["round_medians_us"]["jax"]) == 2
  saved = json.loads(out.read_text())
  assert saved["provenance"]["command"] and saved["rows"][1]["kib"] == 64
  assert saved["wake_up_rows"] == wake_ups


def test_pipe_round_trip_measures_something():
  cpu = min(os.sched_getaffinity(0))
  assert bench_loop_overhead.pipe_round_trip_us(cpu, cpu, trips=5) > 0
  cpus = sorted(os.sched_getaffinity(0))
  rows = bench_loop_overhead.wake_up_rows(trips=3)
  assert len(rows) == (2 if len(cpus) > 1 else 0)
  assert all(r["same_cpu_us"] > 0 and r["other_cpu_us"] > 0 for r in rows)
