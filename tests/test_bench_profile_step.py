"""scripts/bench/profile_step.py: the per-thread summary of a profiler trace."""

import pytest

from scripts.bench import profile_step


def _thread(tid, name):
  return {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": name}}


def _span(tid, name, ts, dur):
  return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_summarize_trace_sums_operations_and_waits_per_thread_and_step():
  events = [
      _thread(1, "tf_XLAEigen/a"), _thread(2, "tf_XLAEigen/b"), _thread(3, "python"),
      _thread(4, "tf_XLAPjRtCpuClient/c"),
      # Two steps; times in microseconds.
      _span(1, "ThunkExecutor::Execute", 0, 9000), _span(1, "fusion.1", 0, 3000),
      _span(1, "psum.7", 3000, 6000), _span(1, "Rendezvous", 3000, 5000),
      _span(1, "Wait: pending_threads=1/2", 3000, 5000), _span(1, "fusion.1", 10000, 1000),
      _span(2, "fusion.1", 0, 2000), _span(2, "concat_fusion", 2000, 6000),
      _span(3, "step", 0, 9000), _span(4, "copy_fusion", 0, 500),
  ]
  threads = profile_step.summarize_trace(events, steps=2, top=2)
  assert [t["thread"] for t in threads] == [
      "tf_XLAEigen/a (1)", "tf_XLAEigen/b (2)", "tf_XLAPjRtCpuClient/c (4)"]
  a, b, c = threads
  # Thread a: fusion.1 4 ms, psum 6 ms (its wait included) over 2 steps; wrappers skipped.
  assert a["ops_s"] == pytest.approx(0.005)
  assert a["all_reduce_wait_s"] == pytest.approx(0.0025)
  assert a["top_ops"] == [{"op": "psum.7", "seconds": pytest.approx(0.003)},
                          {"op": "fusion.1", "seconds": pytest.approx(0.002)}]
  assert b["ops_s"] == pytest.approx(0.004)
  assert b["all_reduce_wait_s"] == 0
  assert [op["op"] for op in b["top_ops"]] == ["concat_fusion", "fusion.1"]
  assert c["ops_s"] == pytest.approx(0.00025)


def test_load_trace_names_the_directory_without_a_trace(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    profile_step.load_trace(str(tmp_path))
