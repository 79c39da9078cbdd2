"""stnjax.workdir and the config checks: resume refusals, torn metrics, restore, field errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stnjax import config_schema
from stnjax import train
from stnjax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
import distorted_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_train import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run (st_fcn_aff on synthetic R, 20 steps, checkpoints at 10 and 20)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  state = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, state


def test_restore_classifies_in_three_lines(trained):
  workdir, state = trained
  model, params, config = workdir_lib.restore(workdir)
  images = jnp.asarray(np.load(os.path.join(workdir, "st_outputs", "inputs.npy")))
  logits = model.apply({"params": params}, images)
  assert logits.shape == (4, 10) and config.model.name == "st_fcn_aff"
  # The restored parameters are the run's final ones, and so are its predictions.
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b[0])
  at_10 = workdir_lib.restore(workdir, step=10)[1]
  assert not np.array_equal(jax.tree.leaves(at_10)[0], jax.tree.leaves(params)[0])
  with pytest.raises(ValueError, match=r"`step` 15 has no checkpoint .* available: \[10, 20\]"):
    workdir_lib.restore(workdir, step=15)
  with pytest.raises(ValueError, match=r"`seed_index` must be in \[0, 1\) .* got 1"):
    workdir_lib.restore(workdir, seed_index=1)
  with pytest.raises(FileNotFoundError, match="is not a workdir"):
    workdir_lib.restore(os.path.join(workdir, "checkpoints"))
  # A relative path restores the same parameters (Orbax needs an absolute one).
  relative = os.path.relpath(workdir)
  for a, b in zip(jax.tree.leaves(workdir_lib.restore(relative)[1]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("overrides, fields", [
    ({"data.variant": "P", "train.lr": 0.5},
     r"data\.variant: \"R\" -> \"P\", train\.lr: 0\.003 -> 0\.5"),
    ({"model.name": "st_cnn_aff"}, r"model\.name: \"st_fcn_aff\" -> \"st_cnn_aff\""),
    ({"model.width": 16}, r"model\.width: 8 -> 16"),
    ({"seed": 3}, r"seed: 0 -> 3"),
    ({"train.lr_schedule": "cosine"}, r"train\.lr_schedule"),
])
def test_resume_with_a_run_changing_config_is_refused(trained, overrides, fields):
  workdir, _ = trained
  before = {n: os.stat(os.path.join(workdir, n)).st_mtime_ns for n in ("config.json",
                                                                     "metrics.jsonl")}
  with pytest.raises(workdir_lib.ConfigMismatchError, match=fields) as info:
    train.train_and_evaluate(tiny_config(**overrides), workdir)
  assert "new --workdir" in str(info.value) and "--allow_config_change" in str(info.value)
  after = {n: os.stat(os.path.join(workdir, n)).st_mtime_ns for n in before}
  assert after == before  # Nothing written.


def test_fields_that_do_not_change_the_run_may_differ():
  old = workdir_lib.config_to_dict(tiny_config())
  new = workdir_lib.config_to_dict(tiny_config(**{"train.num_steps": 40, "log_every": 1,
                                                   "progress": True}))
  assert workdir_lib.config_differences(old, new) == []
  assert workdir_lib.config_differences(old, new, strict=True) == [
      "log_every", "progress", "train.num_steps"]
  # Under a cosine schedule the step count stretches the decay: it changes the run.
  cos = lambda **o: workdir_lib.config_to_dict(tiny_config(**{"train.lr_schedule": "cosine"}, **o))
  assert workdir_lib.config_differences(cos(), cos(**{"train.num_steps": 40})) == [
      "train.num_steps"]


def test_allow_config_change_continues_and_keeps_the_old_config(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 10}), workdir)
  changed = tiny_config(**{"train.num_steps": 20, "train.lr": 1e-3})
  state = train.train_and_evaluate(changed, workdir, allow_config_change=True)
  assert int(state.step) == 20
  assert workdir_lib.read_config(workdir)["train"]["lr"] == 1e-3
  with open(tmp_path / "config.until_step_00000010.json") as f:
    assert json.load(f)["train"]["lr"] == 3e-3
  assert [m["step"] for m in workdir_lib.read_evals(workdir)] == [0, 10, 20]


def test_invalid_config_writes_nothing_then_the_right_one_runs(tmp_path):
  with pytest.raises(ValueError, match=r"`config\.model\.name`: .*'st_cnn_afff'"):
    train.train_and_evaluate(tiny_config(model="st_cnn_afff"), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 0}), str(tmp_path / "w"))
  assert workdir_lib.read_config(str(tmp_path / "w"))["model"]["name"] == "st_fcn_aff"


def test_num_steps_zero_evaluates_the_initial_model(tmp_path):
  state = train.train_and_evaluate(tiny_config(**{"train.num_steps": 0}), str(tmp_path))
  assert int(state.step) == 0
  metrics = workdir_lib.read_metrics(str(tmp_path))
  assert [m["step"] for m in metrics] == [0]
  assert metrics[0]["test/nseen"] == 300 and 50.0 < metrics[0]["test/error"] <= 100.0


def test_torn_metrics_line_is_skipped_and_dropped_on_resume(tmp_path, trained):
  reference, _ = trained
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 10}), workdir)
  with open(workdir_lib.metrics_path(workdir), "a") as f:
    f.write('{"step": 15, "train/loss": 0.12')  # A kill in the middle of an append.
  assert [m["step"] for m in workdir_lib.read_metrics(workdir)] == [0, 5, 10, 10]
  train.train_and_evaluate(tiny_config(), workdir)
  strip = lambda ms: [{k: v for k, v in m.items() if k != "train/steps_per_sec"} for m in ms]
  assert strip(workdir_lib.read_metrics(workdir)) == strip(workdir_lib.read_metrics(reference))
  assert not os.path.exists(workdir_lib.metrics_path(workdir) + ".tmp")


def test_a_corrupt_metrics_line_in_the_middle_is_an_error(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 0}\n{"step": 5, oops\n{"step": 10}\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON object"):
    workdir_lib.read_metrics(str(tmp_path))


def test_truncate_metrics_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  text = "".join(json.dumps({"step": s}) + "\n" for s in (0, 5, 10, 15))
  path.write_text(text)

  def killed(*args):
    raise KeyboardInterrupt  # Stands for a kill between the temporary file and the rename.

  monkeypatch.setattr(workdir_lib.os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    workdir_lib.truncate_metrics(str(tmp_path), 10)
  assert path.read_text() == text  # The old file is whole.
  monkeypatch.undo()
  workdir_lib.truncate_metrics(str(tmp_path), 10)
  assert [m["step"] for m in workdir_lib.read_metrics(str(tmp_path))] == [0, 5, 10]


@pytest.mark.parametrize("preset", ["paper", "short", "test"])
def test_configs_hold_exactly_the_schema_fields(preset):
  config = distorted_mnist.get_config(f"preset={preset}")
  assert set(workdir_lib.flatten(config.to_dict())) == set(config_schema.FIELDS)
  config_schema.validate(config)


def test_unknown_and_misplaced_fields_name_the_nearest():
  config = tiny_config()
  with config.unlocked():
    config.lr = 0.1
    config.train.lr_shedule = "step"
  with pytest.raises(ValueError, match=r"`config\.lr`; did you mean `config\.train\.lr`\?; "
                                       r"Unknown config field `config\.train\.lr_shedule`; "
                                       r"did you mean `config\.train\.lr_schedule`\?"):
    config_schema.validate(config)
  as_dict = tiny_config().to_dict()  # A ConfigDict checks types itself; a dict does not.
  as_dict["train"]["lr"] = "fast"
  with pytest.raises(TypeError, match=r"`config\.train\.lr` must be a number, got 'fast' \(str\)"):
    config_schema.validate(as_dict)
  with pytest.raises(ValueError, match=r"`config\.train\.optimizer` must be one of"):
    config_schema.validate(tiny_config(**{"train.optimizer": "rmsprop"}))
  with pytest.raises(ValueError, match=r"did you mean `--config\.eval_every`"):
    config_schema.check_override_flags(["--workdir=x", "--config.eval_evry=3"])
  config_schema.check_override_flags(["--config.train.lr=0.1", "--noconfig.progress",
                                      "--config.model.width", "4", "--config.data=x"])


def test_launcher_names_the_field_of_a_misplaced_override(tmp_path):
  result = subprocess.run(
      [sys.executable, "experiments/train.py", "--config",
       "experiments/configs/distorted_mnist.py:preset=test", "--workdir", str(tmp_path / "w"),
       "--config.lr=0.1"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "Unknown config field `--config.lr`; did you mean `--config.train.lr`?" in result.stderr
  assert not os.path.exists(tmp_path / "w")
