"""train_and_evaluate: learning, exact eval counts, resume, NaN guard, seeds (vmap), sharding."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stnjax import train
from stnjax import workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
import distorted_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position


def tiny_config(model="st_fcn_aff", **overrides):
  """Synthetic 28x28 data, width-8 classifier: each run takes seconds on a CPU."""
  config = distorted_mnist.get_config(f"model={model},data=R,preset=test")
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def read_metrics(path):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_end_to_end_learns_and_counts_every_example(tmp_path):
  # 60 Adam steps take the ST-CNN (unpadded width-8 classifier) from chance
  # (about 90% error on 10 classes) to about 11% on the synthetic test set.
  config = tiny_config(model="st_cnn_aff", **{"train.num_steps": 60})
  state = train.train_and_evaluate(config, str(tmp_path))
  metrics = read_metrics(str(tmp_path))
  evals = [m for m in metrics if "test/error" in m]
  assert [m["step"] for m in evals] == [0, 10, 20, 30, 40, 50, 60]
  assert evals[0]["test/error"] > 80.0 and evals[0]["validation/error"] > 80.0
  assert evals[-1]["test/error"] < 25.0 and evals[-1]["validation/error"] < 25.0
  # 300 eval examples, batches of 64: the padded 20 are masked, none dropped.
  assert evals[-1]["test/nseen"] == 300 and evals[-1]["validation/nseen"] == 300
  assert evals[-1]["test/error"] == pytest.approx(100 * (1 - evals[-1]["test/ncorrect"][0] / 300))
  assert len(evals[-1]["test/theta_mean"]) == 6 and len(evals[-1]["test/theta_std"]) == 6
  assert int(state.step) == 60
  assert os.path.exists(tmp_path / "config.json")
  snapshots = sorted(os.listdir(tmp_path / "st_outputs"))
  assert snapshots == ["inputs.npy"] + [f"step_{s:08d}.npy" for s in range(0, 61, 10)]
  assert np.load(tmp_path / "st_outputs" / "step_00000040.npy").shape == (4, 1, 28, 28, 1)


def test_resume_equals_uninterrupted(tmp_path):
  # In one process (the SIGKILLed runs are tests/test_kill_resume.py): a run
  # stopped at its step-10 checkpoint, with a line logged after it, resumed.
  full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 20}), full_dir)
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 10}), resumed_dir)
  # A metrics line written after the last checkpoint (a run killed late) is dropped.
  with open(os.path.join(resumed_dir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 13, "train/loss": 1.0}) + "\n")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 20}), resumed_dir)
  full, resumed = workdir.load_checkpoint(full_dir), workdir.load_checkpoint(resumed_dir)
  assert int(resumed["step"]) == 20
  assert jax.tree.structure(full) == jax.tree.structure(resumed)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):  # Params and optimizer state.
    np.testing.assert_array_equal(a, b)
  timings = lambda ms: [{k: v for k, v in m.items() if k != "train/steps_per_sec"} for m in ms]
  assert timings(read_metrics(resumed_dir)) == timings(read_metrics(full_dir))


def test_rerun_of_a_run_killed_before_its_first_checkpoint_starts_afresh(tmp_path):
  config = tiny_config(**{"train.num_steps": 10})
  train.train_and_evaluate(config, str(tmp_path))
  expected = read_metrics(str(tmp_path))
  snapshots = sorted(os.listdir(tmp_path / "st_outputs"))
  # What a run killed between its last log and its first checkpoint leaves:
  # metrics and snapshots, no checkpoint.
  for name in os.listdir(tmp_path / "checkpoints"):
    shutil.rmtree(tmp_path / "checkpoints" / name)
  train.train_and_evaluate(config, str(tmp_path))
  rerun = read_metrics(str(tmp_path))
  assert [m["step"] for m in rerun] == [m["step"] for m in expected]  # Nothing twice.
  for a, b in zip(rerun, expected):
    assert a.get("train/loss") == b.get("train/loss") and a.get("test/loss") == b.get("test/loss")
  assert sorted(os.listdir(tmp_path / "st_outputs")) == snapshots


def test_non_finite_parameters_are_not_checkpointed(tmp_path):
  # The loss of step 1 is finite (computed before the update); the update
  # (an infinite learning rate) is not.
  config = tiny_config(**{"train.lr": float("inf"), "train.optimizer": "sgd", "log_every": 1,
                          "checkpoint_every": 1})
  with pytest.raises(FloatingPointError, match=r"Non-finite parameters after step 1 "):
    train.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == []


def test_non_finite_loss_raises_with_step(tmp_path):
  # Step 1's loss is finite (computed before the first, NaN, update); step 2's
  # is NaN, and step 2 is a checkpoint step: the loss check runs first, so
  # nothing is saved.
  config = tiny_config(**{"train.lr": float("nan"), "train.optimizer": "sgd", "log_every": 1,
                          "checkpoint_every": 2})
  with pytest.raises(FloatingPointError, match=r"Non-finite training loss nan at step 2 "
                                               r"\(seed index 0, seed 0\)"):
    train.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == []
  logged = read_metrics(str(tmp_path))
  assert [m["step"] for m in logged] == [0, 1] and np.isfinite(logged[1]["train/loss"])


# Plain SGD for the equivalence tests: Adam divides by sqrt(v), which turns
# float32 reassociation noise in near-zero gradients into visible differences.
SGD = {"train.optimizer": "sgd", "train.lr": 0.05, "train.num_steps": 10}


def test_vmapped_seeds_equal_separate_runs(tmp_path):
  together = train.train_and_evaluate(tiny_config(num_seeds=2, **SGD), str(tmp_path / "together"))
  for i in range(2):
    alone = train.train_and_evaluate(tiny_config(seed=i, **SGD), str(tmp_path / f"alone{i}"))
    for a, b in zip(leaves(together), leaves(alone)):
      np.testing.assert_allclose(a[i], b[0], rtol=0, atol=1e-5)


_SHARDED = textwrap.dedent("""
    import sys, jax, numpy as np
    sys.path.insert(0, {configs!r})
    sys.path.insert(0, {tests!r})
    from test_train import tiny_config, leaves
    from stnjax import train
    assert jax.device_count() == 4, jax.devices()
    from test_train import SGD
    state = train.train_and_evaluate(tiny_config(**SGD), {workdir!r})
    np.savez({out!r}, *leaves(state))

    # all_reduce_mean: the mean over devices of every leaf, dtypes kept.
    from jax.sharding import PartitionSpec as P
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = np.arange(12.0, dtype=np.float32).reshape(4, 3) ** 2
    # Sizes 3 and 1: one flat vector (default), "a" alone (3), both alone (1).
    for own_operand_size in (2**16, 3, 1):
      f = jax.shard_map(lambda x: train.all_reduce_mean(
                            {{"a": x, "b": x[:, :1].astype("bfloat16")}}, "data", own_operand_size),
                        mesh=mesh, in_specs=P("data"), out_specs=P())
      out = f(x)
      np.testing.assert_allclose(out["a"], x.mean(0, keepdims=True), rtol=1e-6)
      assert out["b"].dtype == jax.numpy.bfloat16 and float(out["b"][0, 0]) == x[:, 0].mean()
""")


def test_sharded_equals_unsharded(tmp_path):
  out = str(tmp_path / "sharded.npz")
  script = _SHARDED.format(configs=os.path.join(REPO, "experiments", "configs"),
                           tests=os.path.dirname(os.path.abspath(__file__)),
                           workdir=str(tmp_path / "sharded"), out=out)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=REPO, timeout=300)
  single = train.train_and_evaluate(tiny_config(**SGD), str(tmp_path / "one"))
  sharded = np.load(out)
  for i, a in enumerate(leaves(single)):
    np.testing.assert_allclose(sharded[f"arr_{i}"], a, rtol=0, atol=1e-5)


_MANY_STEPS_IN_FLIGHT = textwrap.dedent("""
    import sys, jax
    sys.path.insert(0, {configs!r})
    sys.path.insert(0, {tests!r})
    from test_train import tiny_config
    from stnjax import train
    assert jax.device_count() == 4, jax.devices()
    config = tiny_config(model="st_cnn_aff", **{{"train.num_steps": 200, "log_every": 200,
                                                 "eval_every": 200, "checkpoint_every": 200}})
    evaluate, one_in_flight = train.evaluate, []
    def recording_evaluate(*args, **kwargs):
      one_in_flight.append(kwargs.get("one_in_flight"))
      return evaluate(*args, **kwargs)
    train.evaluate = recording_evaluate
    train.train_and_evaluate(config, {workdir!r})
    assert one_in_flight and all(one_in_flight), one_in_flight
""")


def test_sharded_cpu_run_without_host_syncs_completes(tmp_path):
  # Regression: 200 steps dispatched with no host sync between them made
  # XLA:CPU's all-reduce wait forever on 4 CPU devices (the runtime aborts
  # after 40 s); the training loop now keeps one step, and one evaluation
  # batch, in flight on CPU.
  script = _MANY_STEPS_IN_FLIGHT.format(
      configs=os.path.join(REPO, "experiments", "configs"),
      tests=os.path.dirname(os.path.abspath(__file__)), workdir=str(tmp_path))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=REPO, timeout=300)
  final = read_metrics(str(tmp_path))[-1]
  assert final["step"] == 200 and final["test/nseen"] > 0
  assert np.isfinite(final["test/loss"])


def test_evaluate_sums_every_batch_and_waits_for_each_when_asked(monkeypatch):
  images = np.arange(10, dtype=np.float32)
  padded = (images, np.zeros(10, np.int32), np.arange(10) < 7)
  eval_batch = jax.jit(lambda params, x, labels, mask: {"sum": params * jnp.sum(x * mask),
                                                        "nseen": jnp.sum(mask)})
  waited = []
  block_until_ready = jax.block_until_ready
  monkeypatch.setattr(jax, "block_until_ready", lambda x: waited.append(x) or block_until_ready(x))
  for one_in_flight, waits in ((False, 0), (True, 4)):  # Batches of 3: 0-2, 3-5, 6-8, 9.
    waited.clear()
    sums = train.evaluate(eval_batch, jnp.float32(2.0), padded, 3, one_in_flight=one_in_flight)
    assert float(sums["sum"]) == 2.0 * sum(range(7)) and int(sums["nseen"]) == 7
    assert len(waited) == waits


def test_config_validation(tmp_path):
  with pytest.raises(ValueError, match="optimizer"):
    train.train_and_evaluate(tiny_config(**{"train.optimizer": "rmsprop"}), str(tmp_path))
  with pytest.raises(ValueError, match="preset"):
    distorted_mnist.get_config("preset=long")
  for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
               "eval_batch_size", "train.batch_size", "num_seeds"):
    with pytest.raises(ValueError, match=rf"`config\.{name}` must be >= 1, got 0"):
      train.train_and_evaluate(tiny_config(**{name: 0}), str(tmp_path / "zero"))
  with pytest.raises(ValueError, match=r"`config\.train\.num_steps` must be >= 0, got -5"):
    train.train_and_evaluate(tiny_config(**{"train.num_steps": -5}), str(tmp_path / "zero"))
