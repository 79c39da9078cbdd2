"""A real SIGKILL at any moment, then resume: bit-identical to an uninterrupted run.

Each run is a subprocess that SIGKILLs itself at a chosen point (after a
step, while appending a metrics line, between writing the checkpoint's data
and its rename, while rewriting metrics.jsonl on resume); the final
parameters, optimizer state and metric values (timings aside) must equal
those of an uninterrupted run bit for bit.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from stnjax import train
from stnjax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

_RUN = textwrap.dedent("""
    import os, signal, sys
    import jax
    if os.environ.get("STNJAX_TEST_COMPILATION_CACHE"):
      jax.config.update("jax_compilation_cache_dir", os.environ["STNJAX_TEST_COMPILATION_CACHE"])
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    sys.path.insert(0, {configs!r})
    sys.path.insert(0, {tests!r})
    from test_train import tiny_config
    from stnjax import train, workdir
    from orbax.checkpoint._src.handlers import standard_checkpoint_handler as sch

    where, at, wd = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    if where == "step":  # After step `at` has run, between logs and checkpoints.
      make = train.make_functions
      def make_functions(*args, **kwargs):
        init, sample, step, evaluate, st = make(*args, **kwargs)
        def killing_step(state, batch):
          state, metrics = step(state, batch)
          if int(state.step) == at:
            jax.block_until_ready(state)
            die()
          return state, metrics
        return init, sample, killing_step, evaluate, st
      train.make_functions = make_functions
    elif where == "append":  # Half of the metrics line of step `at` is written.
      write = workdir.MetricsWriter.write
      def torn_write(self, step, metrics):
        if step == at:
          with open(self.path, "a") as f:
            f.write('{{"step": %d, "train/lo' % step)
          die()
        write(self, step, metrics)
      workdir.MetricsWriter.write = torn_write
    elif where == "checkpoint":  # Checkpoint `at`'s arrays written, not yet renamed into place.
      finalize = sch.StandardCheckpointHandler.finalize
      def killing_finalize(self, directory):
        if int(train.jax.device_get(killing_finalize.state.step)) == at:
          die()
        finalize(self, directory)
      sch.StandardCheckpointHandler.finalize = killing_finalize
      save = train.ocp.CheckpointManager.save
      def remembering_save(self, step, *args, **kwargs):
        killing_finalize.state = kwargs["args"].item
        return save(self, step, *args, **kwargs)
      train.ocp.CheckpointManager.save = remembering_save
    elif where == "rewrite":  # Half of the truncated metrics.jsonl.tmp written, no rename.
      def torn_rewrite(path, text):
        with open(path + ".tmp", "w") as f:
          f.write(text[:len(text) // 2])
        die()
      workdir._atomic_write = torn_rewrite
    train.train_and_evaluate(tiny_config(), wd)
""")


def _run(workdir, where="none", at=0, killed=True):
  script = _RUN.format(configs=os.path.join(REPO, "experiments", "configs"), tests=TESTS)
  # Same platform and flags as this process, which runs the reference.
  result = subprocess.run([sys.executable, "-c", script, where, str(at), str(workdir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  expected = -9 if killed else 0
  assert result.returncode == expected, (where, at, result.stderr[-3000:])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  train.train_and_evaluate(__import__("test_train").tiny_config(), workdir)
  return workdir


def _metric_values(workdir):
  return [{k: v for k, v in m.items() if k != "train/steps_per_sec"}
          for m in workdir_lib.read_metrics(workdir)]


def assert_same_run(workdir, reference):
  assert workdir_lib.checkpoint_steps(workdir) == workdir_lib.checkpoint_steps(reference) == [
      10, 20]
  got, want = workdir_lib.load_checkpoint(workdir), workdir_lib.load_checkpoint(reference)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert int(got["step"]) == 20
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # params and opt_state.
    np.testing.assert_array_equal(a, b)
  assert _metric_values(workdir) == _metric_values(reference)
  assert sorted(os.listdir(os.path.join(workdir, "st_outputs"))) == sorted(
      os.listdir(os.path.join(reference, "st_outputs")))
  for name in os.listdir(os.path.join(reference, "st_outputs")):
    np.testing.assert_array_equal(np.load(os.path.join(workdir, "st_outputs", name)),
                                  np.load(os.path.join(reference, "st_outputs", name)))


def test_kill_mid_steps_then_during_the_metrics_rewrite(tmp_path, uninterrupted):
  _run(tmp_path, "step", 17)  # Killed after step 17: checkpoint 10, metrics up to 15.
  assert workdir_lib.checkpoint_steps(str(tmp_path)) == [10]
  assert workdir_lib.read_metrics(str(tmp_path))[-1]["step"] == 15
  _run(tmp_path, "rewrite")  # The resume is killed while dropping the line of step 15.
  assert workdir_lib.read_metrics(str(tmp_path))[-1]["step"] == 15  # The old file is whole.
  _run(tmp_path, killed=False)
  assert_same_run(str(tmp_path), uninterrupted)


def test_kill_during_a_checkpoint_save_then_mid_append(tmp_path, uninterrupted):
  _run(tmp_path, "checkpoint", 20)  # Metrics and snapshots of 20 written; checkpoint 20 not.
  assert workdir_lib.checkpoint_steps(str(tmp_path)) == [10]
  assert workdir_lib.read_metrics(str(tmp_path))[-1]["step"] == 20
  _run(tmp_path, "append", 15)  # The resume is killed in the middle of a metrics line.
  with open(workdir_lib.metrics_path(str(tmp_path))) as f:
    assert not f.read().endswith("\n")
  _run(tmp_path, killed=False)
  assert_same_run(str(tmp_path), uninterrupted)
