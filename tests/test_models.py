"""Models: identity initialisation, parameter counts, names and shapes, input validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stnjax
from stnjax import models


@pytest.mark.parametrize("transform", models.TRANSFORMS)
@pytest.mark.parametrize("localisation", [models.FCLocalisation, models.ConvLocalisation])
def test_untrained_transformer_is_identity(transform, localisation, rng):
  # Feature maps with 5 channels and a non-square size: any channel count works.
  x = jnp.asarray(rng.uniform(size=(3, 28, 32, 5)), jnp.float32)
  st = models.SpatialTransformer(localisation=localisation(), transform=transform)
  variables = st.init(jax.random.key(0), x)
  y, params = st.apply(variables, x)
  assert y.shape == x.shape
  # float32 round trip of normalised pixel centres: a few ulps of 1 (TPS also
  # solves its float32 spline system: a few more).
  np.testing.assert_allclose(y, x, rtol=0, atol=5e-6 if transform == "tps" else 3e-6)
  identity = models.identity_params(transform)
  np.testing.assert_array_equal(params, np.broadcast_to(identity, (3, identity.size)))
  regression = variables["params"]["regression"]
  np.testing.assert_array_equal(regression["kernel"], 0.0)
  np.testing.assert_array_equal(regression["bias"], identity)


def test_identity_params():
  np.testing.assert_array_equal(models.identity_params("affine"), [1, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(models.identity_params("projective"), [1, 0, 0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(models.identity_params("tps"),
                                stnjax.tps_control_points(4).ravel().astype(np.float32))
  np.testing.assert_array_equal(models.identity_params("attention"), [1, 0, 0])
  np.testing.assert_array_equal(models.identity_params("rts"), [0, 1, 0, 0])


def test_transform_grid_matches_core_builders():
  p = jnp.array([0.3, 0.8, -0.1, 0.2])
  np.testing.assert_allclose(
      models.transform_grid("rts", p, (5, 6)),
      stnjax.affine_grid(stnjax.rts_theta(0.3, 0.8, -0.1, 0.2), (5, 6)), atol=1e-6)
  h = jnp.array([1.0, 0.1, 0.0, -0.1, 0.9, 0.1, 0.05, 0.0])
  np.testing.assert_allclose(
      models.transform_grid("projective", h, (5, 6)),
      stnjax.projective_grid(jnp.append(h, 1.0).reshape(3, 3), (5, 6)), atol=1e-6)


def test_output_size_and_batch_of_one(rng):
  x = jnp.asarray(rng.uniform(size=(1, 12, 12, 2)), jnp.float32)
  st = models.SpatialTransformer(models.FCLocalisation((8,)), "attention", output_size=(6, 7))
  y, params = st.apply(st.init(jax.random.key(0), x), x)
  assert y.shape == (1, 6, 7, 2) and params.shape == (1, 3)


# (name, input shape, classes, st_pool, width) -> exact parameter count: every
# row of docs/models.md (the configs' padding, "VALID_MIN2"). The widths are
# the ones `solve_width` picks for the 400k budget.
PARAM_COUNTS = [
    ("fcn", (28, 28, 1), 10, 1, 349, 399_615),
    ("cnn", (28, 28, 1), 10, 1, 89, 399_086),
    ("st_fcn_aff", (28, 28, 1), 10, 1, 331, 400_477),
    ("st_fcn_proj", (28, 28, 1), 10, 1, 331, 400_543),
    ("st_fcn_tps", (28, 28, 1), 10, 1, 330, 399_878),
    ("st_cnn_aff", (28, 28, 1), 10, 1, 88, 401_376),
    ("st_cnn_proj", (28, 28, 1), 10, 1, 88, 401_418),
    ("st_cnn_tps", (28, 28, 1), 10, 1, 88, 401_922),
    ("fcn", (42, 42, 1), 10, 1, 202, 399_566),
    ("cnn", (42, 42, 1), 10, 1, 86, 400_512),
    ("st_fcn_aff", (42, 42, 1), 10, 2, 400, 400_000),
    ("st_fcn_proj", (42, 42, 1), 10, 2, 400, 400_066),
    ("st_fcn_tps", (42, 42, 1), 10, 2, 399, 399_606),
    ("st_cnn_aff", (42, 42, 1), 10, 2, 86, 403_998),
    ("st_cnn_proj", (42, 42, 1), 10, 2, 86, 404_040),
    ("st_cnn_tps", (42, 42, 1), 10, 2, 85, 395_922),
    ("fcn", (60, 60, 1), 10, 1, 108, 401_770),
    ("cnn", (60, 60, 1), 10, 1, 80, 400_250),
    ("st_fcn_aff", (60, 60, 1), 10, 2, 244, 399_616),
    ("st_fcn_proj", (60, 60, 1), 10, 2, 244, 399_682),
    ("st_fcn_tps", (60, 60, 1), 10, 2, 244, 400_474),
    ("st_cnn_aff", (60, 60, 1), 10, 2, 84, 403_372),
    ("st_cnn_proj", (60, 60, 1), 10, 2, 84, 403_414),
    ("st_cnn_tps", (60, 60, 1), 10, 2, 84, 403_918),
    ("fcn", (42, 42, 2), 19, 1, 109, 398_741),
    ("cnn", (42, 42, 2), 19, 1, 82, 399_031),
    ("st_fcn_aff", (42, 42, 2), 19, 2, 247, 399_307),
    ("st_fcn_proj", (42, 42, 2), 19, 2, 247, 399_373),
    ("st_fcn_tps", (42, 42, 2), 19, 2, 247, 400_165),
    ("2st_fcn_aff", (42, 42, 2), 19, 2, 147, 399_459),
    ("2st_fcn_proj", (42, 42, 2), 19, 2, 147, 399_591),
    ("2st_fcn_tps", (42, 42, 2), 19, 2, 146, 399_097),
]


@pytest.mark.parametrize("name,shape,classes,pool,width,count", PARAM_COUNTS)
def test_parameter_counts(name, shape, classes, pool, width, count):
  model = models.create_model(name, shape, classes, width=width, st_pool=pool,
                              padding="VALID_MIN2")
  assert models.count_params(model, shape) == count


def test_solve_width_hits_budget():
  assert models.solve_width("st_cnn_aff", (42, 42, 1), 10, 400_000, st_pool=2) == 87
  assert models.solve_width("fcn", (28, 28, 1), 10, 400_000) == 349
  # The padded layout needs fewer filters for the same budget (larger maps reach the Dense).
  assert models.solve_width("st_cnn_aff", (42, 42, 1), 10, 400_000, st_pool=2,
                            padding="SAME") == 79


@pytest.mark.parametrize("name,shape,pool,padding,maps", [
    ("cnn", (28, 28, 1), 1, "VALID", [(20, 20), (4, 4)]),
    ("cnn", (42, 42, 1), 1, "VALID", [(34, 34), (11, 11)]),
    ("st_cnn_aff", (42, 42, 1), 2, "VALID", [(13, 13), (1, 1)]),  # 21 -> 13 -> 7 -> 1.
    ("cnn", (28, 28, 1), 1, "SAME", [(28, 28), (14, 14)]),
    ("st_cnn_aff", (42, 42, 1), 2, "VALID_MIN2", [(13, 13), (7, 7)]),
    ("cnn", (28, 28, 1), 1, "VALID_MIN2", [(20, 20), (4, 4)]),
])
def test_classifier_convolution_maps(name, shape, pool, padding, maps):
  model = models.create_model(name, shape, 10, width=4, st_pool=pool, padding=padding)
  x = jnp.zeros((2,) + shape)
  variables = model.init(jax.random.key(0), x)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  convs = {k: v for k, v in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
           if "Conv" in jax.tree_util.keystr(k) and "localisation" not in jax.tree_util.keystr(k)}
  assert [v.shape[1:3] for v in convs.values()] == maps


def test_valid_convolution_that_does_not_fit_is_refused():
  model = models.create_model("cnn", (12, 12, 1), 10, width=4)
  with pytest.raises(ValueError, match="7x7 'VALID' convolution does not fit its 2x2"):
    model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 1)))
  with pytest.raises(ValueError, match="padding"):
    models.create_model("cnn", (28, 28, 1), 10, width=4, padding="same")


def test_two_transformers_concatenate_channels(rng):
  x = jnp.asarray(rng.uniform(size=(2, 42, 42, 2)), jnp.float32)
  model = models.create_model("2st_fcn_aff", (42, 42, 2), 19, width=16, st_pool=2)
  variables = model.init(jax.random.key(0), x)
  logits, inter = model.apply(variables, x, mutable=["intermediates"])
  assert logits.shape == (2, 19)
  outs = inter["intermediates"]["st_output"]
  assert len(outs) == 2 and all(o.shape == (2, 42, 42, 2) for o in outs)
  # The classifier sees 4 channels pooled to 21x21.
  assert variables["params"]["classifier"]["Dense_0"]["kernel"].shape == (21 * 21 * 4, 16)
  np.testing.assert_allclose(outs[0], x, atol=3e-6)


@pytest.mark.parametrize("name", ["fcn", "cnn", "st_fcn_proj", "st_cnn_tps"])
def test_forward_shapes(name, rng):
  x = jnp.asarray(rng.uniform(size=(2, 28, 28, 1)), jnp.float32)
  model = models.create_model(name, (28, 28, 1), 10, width=4)
  logits = jax.jit(model.apply)(model.init(jax.random.key(0), x), x)
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", ["st_cnn", "cnn_aff", "st_mlp_aff", "st_cnn_foo", ""])
def test_bad_names(name):
  with pytest.raises(ValueError, match="name"):
    models.create_model(name, (28, 28, 1), 10, width=4)


def test_bad_arguments():
  with pytest.raises(ValueError, match="width"):
    models.create_model("cnn", (28, 28, 1), 10)
  with pytest.raises(ValueError, match="input_shape"):
    models.create_model("cnn", (28, 28), 10, width=4)
  with pytest.raises(ValueError, match="transform"):
    models.identity_params("similarity")
  st = models.SpatialTransformer(models.FCLocalisation(), "affine")
  with pytest.raises(ValueError, match="x"):
    st.init(jax.random.key(0), jnp.zeros((28, 28, 1)))
