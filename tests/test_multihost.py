"""Multi-host training for real: two JAX processes on localhost (CPU collectives over gloo).

The two processes train one model over a global mesh of their two CPU
devices: the same numbers as one process with two devices and the same
global batch, `config.json`,
metrics and checkpoints written once, and a resume of both processes after
one of them is SIGKILLed ends bit-identical to the uninterrupted two-process
run.
"""

import os
import signal
import socket
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

_PROCESS = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {configs!r})
    sys.path.insert(0, {tests!r})
    from stnjax import train
    port, process_id, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    kill_after = int(sys.argv[4])
    train.initialize_distributed(f"localhost:{{port}}", 2, process_id)
    import jax
    from test_train import tiny_config
    assert jax.process_count() == 2 and len(jax.devices()) == 2, jax.devices()
    if kill_after:  # This process SIGKILLs itself once step `kill_after` has run.
      make = train.make_functions
      def make_functions(*args, **kwargs):
        init, sample, step, evaluate, st = make(*args, **kwargs)
        def killing_step(state, batch):
          state, metrics = step(state, batch)
          if int(state.step) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
          return state, metrics
        return init, sample, killing_step, evaluate, st
      train.make_functions = make_functions
    state = train.train_and_evaluate(tiny_config(distributed=True), workdir)
    assert int(state.step) == 20
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, kill_after=(0, 0)):
  """Starts processes 0 and 1; `kill_after[i]`: the step after which process i kills itself."""
  script = _PROCESS.format(configs=os.path.join(REPO, "experiments", "configs"), tests=TESTS)
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  return [subprocess.Popen([sys.executable, "-c", script, str(port), str(i), str(workdir),
                            str(kill_after[i])], env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _wait(processes, timeout=240):
  outputs = []
  for p in processes:
    try:
      outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in processes:
        q.kill()
      raise
  return [p.returncode for p in processes], outputs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two_processes"))
  codes, outputs = _wait(_launch(workdir))
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
  return workdir


def _values(workdir):
  return [{k: v for k, v in m.items() if k != "train/steps_per_sec"}
          for m in workdir_lib.read_metrics(workdir)]


def _one_process_two_devices(workdir):
  """The same run in one process with two CPU devices: the same mesh and half-batches."""
  configs = os.path.join(REPO, "experiments", "configs")
  code = (f"import sys; sys.path[:0] = [{TESTS!r}, {configs!r}]\n"
          "from stnjax import train; from test_train import tiny_config\n"
          f"train.train_and_evaluate(tiny_config(), {workdir!r})")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2")
  env.pop("XLA_FLAGS", None)
  subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, timeout=240,
                 capture_output=True)


def test_two_processes_match_one_process(two_processes, tmp_path):
  # Against one process with two devices: one device with the whole batch
  # rounds its gradient differently, and this tiny run (Adam, gradient norms
  # up to 10) amplifies such differences (with the C++ sampler kernels, one
  # device and two parted visibly at step 10).
  one = str(tmp_path)
  _one_process_two_devices(one)
  # Written once: the same lines, checkpoints and config as one process.
  assert [m["step"] for m in workdir_lib.read_metrics(two_processes)] == [
      m["step"] for m in workdir_lib.read_metrics(one)]
  assert workdir_lib.checkpoint_steps(two_processes) == [10, 20]
  config = workdir_lib.read_config(two_processes)
  assert config["distributed"] is True
  assert workdir_lib.config_differences(config, workdir_lib.read_config(one), strict=True) == [
      "distributed"]
  two, single = workdir_lib.load_checkpoint(two_processes), workdir_lib.load_checkpoint(one)
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)
  for a, b in zip(_values(two_processes), _values(one)):
    assert a.keys() == b.keys()
    for key in ("train/loss", "test/loss", "validation/loss"):
      if key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4)
    for key in ("test/nseen", "validation/nseen"):
      assert a.get(key) == b.get(key)


def test_both_processes_resume_after_one_is_killed(two_processes, tmp_path):
  processes = _launch(tmp_path, kill_after=(0, 17))
  try:
    assert processes[1].wait(timeout=240) == -signal.SIGKILL
  finally:
    processes[0].kill()  # Left waiting for its peer in a collective.
    _wait(processes)
  assert workdir_lib.checkpoint_steps(str(tmp_path)) == [10]
  codes, outputs = _wait(_launch(tmp_path))
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
  got, want = workdir_lib.load_checkpoint(str(tmp_path)), workdir_lib.load_checkpoint(two_processes)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert _values(str(tmp_path)) == _values(two_processes)
