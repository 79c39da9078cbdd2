"""The paper-model training benchmark (`scripts/bench/bench_paper_models.py`), at tiny sizes."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from scripts.bench import bench_paper_models as bench
from stnjax import models


def test_main_runs_and_torch_models_match_stnjax(tmp_path):
  out = tmp_path / "paper_models.json"
  # --cpu_devices 0: JAX has started in this process, its device count stays.
  results = bench.main(["--layouts", "R", "--batch_sizes", "2", "--rounds", "1", "--steps", "1",
                        "--warmup", "1", "--torch_threads", "1", "--cpu_devices", "0",
                        "--out", str(out)])
  assert [r["model"] for r in results["rows"]] == ["cnn", "st_cnn_aff"]
  for row in results["rows"]:
    # The paper-size models, with the cpu preset's layout.
    assert abs(row["params"] - bench.PARAM_BUDGET) < 0.01 * bench.PARAM_BUDGET
    assert row["params_torch"] == row["params"]
    assert row["seconds_per_step"]["stnjax_1"] > 0 and row["seconds_per_step"]["torch"] > 0
  for check in results["equivalence_checks"]:
    assert check["max_abs_logit_diff"] < 1e-4 * max(1.0, check["max_abs_logit"])
  written = json.loads(out.read_text())
  assert written["provenance"]["command"] and len(written["rows"]) == 2


@pytest.mark.parametrize("padding", ["SAME", "VALID_MIN2"])
def test_torch_st_cnn_matches_other_paddings(padding):
  # RTS's 21x21 pooled transformer output: where VALID_MIN2 pads the 7x7
  # convolution and VALID does not (a narrow model: only the layout matters).
  model = models.create_model("st_cnn_aff", (42, 42, 1), 10, width=4, st_pool=2, padding=padding)
  net = bench.torch_model(model, (42, 42, 1))
  assert bench.torch_param_count(net) == models.count_params(model, (42, 42, 1))
  max_diff, max_logit = bench.check_same_network(model, net, (42, 42, 1))
  assert max_diff < 1e-4 * max(1.0, max_logit)


def test_avg_pool_divides_partial_windows_like_flax():
  x = np.random.default_rng(0).random((1, 5, 5, 1), dtype=np.float32)  # Odd: a partial window.
  ours = bench._avg_pool(  # pylint: disable=protected-access
      torch.from_numpy(x).permute(0, 3, 1, 2), 2)
  flax_y = nn.avg_pool(jnp.asarray(x), (2, 2), strides=(2, 2), padding="SAME")
  np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), flax_y, rtol=1e-6, atol=1e-7)


def test_data_parallel_step_updates_like_one_device():
  # The sharded step on this process's devices (one or more) takes the same
  # SGD step as the single-device one.
  model = models.create_model("cnn", (28, 28, 1), 10, width=4)
  n = jax.device_count()
  x = jax.random.uniform(jax.random.key(1), (2 * n, 28, 28, 1))
  y = jnp.arange(2 * n) % 10
  params = bench.random_params(model, (28, 28, 1))
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  one = bench.stnjax_step(model, params, x, y)
  sharded = bench.stnjax_step(model, params, x, y, mesh)
  for step in (one, sharded):
    step()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               one.state(), sharded.state())
