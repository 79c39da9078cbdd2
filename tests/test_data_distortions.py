"""Distortions: determinism, shapes, labels, parameter distributions, identity, placement, clutter."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_data_support as support
import stnjax
from stnjax import data
from stnjax.data import distortions

B = 256  # One batch size everywhere: one compilation per variant.


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory):
  return support.tfds_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def pool(mnist_cache):
  images, labels = mnist_cache[1]["train"]
  return jax.device_put(images), jax.device_put(labels)


_BATCHES = {}


def batch(pool, variant, seed=0, step=0):
  """`sample_train_batch` with key fold_in(key(seed), step), as numpy, memoised."""
  k = (variant, seed, step)
  if k not in _BATCHES:
    key = jax.random.fold_in(jax.random.key(seed), step)
    out = data.sample_train_batch(variant, key, *pool, B, return_params=True)
    _BATCHES[k] = jax.tree.map(np.asarray, out)
  return _BATCHES[k]


@pytest.mark.parametrize("variant", list(data.VARIANTS))
def test_batch_shapes_ranges_labels_determinism(pool, variant):
  v = data.get_variant(variant)
  images, labels, params = batch(pool, variant)
  assert images.shape == (B,) + v.shape and images.dtype == np.float32
  assert labels.shape == (B,) and labels.dtype == np.int32
  assert images.min() >= 0.0 and images.max() <= 1.0
  assert (images.reshape(B, -1, v.channels).max(axis=1) > 0.5).all()  # No blank digit.
  pool_labels = np.asarray(pool[1])
  if v.kind == "addition":
    np.testing.assert_array_equal(params["digit_labels"], pool_labels[params["index"]])
    np.testing.assert_array_equal(labels, params["digit_labels"].sum(axis=1))
    assert labels.min() >= 0 and labels.max() <= 18 and len(np.unique(labels)) > 12
  else:
    np.testing.assert_array_equal(labels, pool_labels[params["index"]])
    assert len(np.unique(labels)) == 10
  # Same key: the same bytes (recomputed, not memoised); another step: different images.
  key = jax.random.fold_in(jax.random.key(0), 0)
  again = data.sample_train_batch(variant, key, *pool, B, return_params=True)
  np.testing.assert_array_equal(np.asarray(again[0]), images)
  other = batch(pool, variant, step=1)[0]
  assert np.abs(other - images).mean() > 0.01


def test_same_digit_different_keys_differ(pool):
  indices = jnp.zeros((4,), jnp.int32)
  keys = jax.random.split(jax.random.key(3), 4)
  images, _, params = jax.jit(data.distort, static_argnums=0)("rts", keys, indices, *pool)
  assert len(np.unique(np.asarray(params["angle"]))) == 4
  assert np.abs(np.asarray(images[0] - images[1])).max() > 0.5


def test_rotation_parameters(pool):
  angles = batch(pool, "r")[2]["angle"]
  assert np.abs(angles).max() <= 90.0
  assert angles.min() < -80 and angles.max() > 80  # Spread over the range...
  assert abs(np.mean(np.abs(angles)) - 45) < 6  # ... uniformly (mean |U[-90, 90]| = 45).


def test_rts_parameters(pool):
  params = batch(pool, "rts")[2]
  angle, scale = params["angle"], params["scale"]
  assert np.abs(angle).max() <= 45.0 and angle.min() < -40 and angle.max() > 40
  assert scale.min() >= 0.7 and scale.max() <= 1.2 and scale.min() < 0.73 and scale.max() > 1.17
  assert abs(scale.mean() - 0.95) < 0.03
  center = params["center"]
  assert center.min() > 0 and center.max() < 42
  assert center[:, 0].min() < 14 and center[:, 0].max() > 28  # Placed all over the canvas.


def test_projective_and_tps_parameters(pool):
  p = batch(pool, "p")[2]
  assert p["scale"].min() >= 0.75 and p["scale"].max() <= 1.0
  assert p["corner_offsets"].shape == (B, 4, 2)
  assert abs(p["corner_offsets"].std() - 5.0) < 0.4 and abs(p["corner_offsets"].mean()) < 0.5
  e = batch(pool, "e")[2]
  assert e["scale"].min() >= 0.75 and e["scale"].max() <= 1.0
  assert e["control_offsets"].shape == (B, 16, 2)
  assert abs(e["control_offsets"].std() - 1.5) < 0.1 and abs(e["control_offsets"].mean()) < 0.1


@pytest.mark.parametrize("variant", ["t", "tc"])
def test_translation_parameters(pool, variant):
  offset = batch(pool, variant)[2]["offset"]
  assert offset.dtype == np.int32 and offset.min() == 0 and offset.max() == 32


def test_clutter_count_size_and_content(pool):
  images, _, params = batch(pool, "tc")
  n, size = 6, 6
  assert params["clutter_index"].shape == (B, n)
  assert params["clutter_crop"].shape == params["clutter_offset"].shape == (B, n, 2)
  assert (params["clutter_index"] != params["index"][:, None]).all()  # Other digits.
  assert params["clutter_crop"].min() >= 4 and params["clutter_crop"].max() <= 18
  assert params["clutter_offset"].min() >= 0 and params["clutter_offset"].max() <= 60 - size
  # Rebuild every image in numpy: the digit box, then six 6x6 crops pasted with max.
  pool_images = np.asarray(pool[0]).astype(np.float32) / 255
  for b in range(B):
    expected = np.zeros((60, 60), np.float32)
    x, y = params["offset"][b]
    expected[y:y + 28, x:x + 28] = pool_images[params["index"][b]]
    for k in range(n):
      (cx, cy), (px, py) = params["clutter_crop"][b, k], params["clutter_offset"][b, k]
      crop = pool_images[params["clutter_index"][b, k], cy:cy + size, cx:cx + size]
      expected[py:py + size, px:px + size] = np.maximum(expected[py:py + size, px:px + size], crop)
    np.testing.assert_allclose(images[b, ..., 0], expected, atol=1e-6)


def test_translation_is_an_exact_copy(pool):
  images, _, params = batch(pool, "t")
  pool_images = np.asarray(pool[0]).astype(np.float32) / 255
  for b in range(0, B, 7):
    x, y = params["offset"][b]
    np.testing.assert_allclose(images[b, y:y + 28, x:x + 28, 0], pool_images[params["index"][b]],
                               atol=1e-6)
    assert np.isclose(images[b].sum(), pool_images[params["index"][b]].sum(), rtol=1e-5)


@pytest.mark.parametrize("variant", ["rts", "addition"])
def test_rts_digit_is_never_clipped(pool, variant):
  images, _, params = batch(pool, variant)
  # Draw the same warps into a canvas 2x larger, centred on the same spot:
  # if nothing was clipped, the 42x42 image holds all of the ink.
  flat = {k: params[k].reshape((-1,) + params[k].shape[2 if variant == "addition" else 1:])
          for k in ("angle", "scale", "center", "pivot", "index")}
  big = 84
  digits = np.asarray(pool[0])[flat["index"]].astype(np.float32)[..., None] / 255

  @jax.jit
  def warp(angle, scale, center, pivot, digits):
    theta = distortions.similarity_theta(angle, scale, center + 21, pivot, out_size=big)
    return stnjax.grid_sample(digits, stnjax.affine_grid(theta, (big, big)))

  unclipped = warp(flat["angle"], flat["scale"], flat["center"], flat["pivot"], digits)
  unclipped_mass = np.asarray(unclipped).sum(axis=(1, 2, 3))
  mass = np.moveaxis(images, -1, 1).reshape(-1, 42 * 42).sum(axis=1)
  np.testing.assert_allclose(mass, unclipped_mass, rtol=1e-4)
  # And the digit's size follows `scale`: ink mass ~ scale^2 x the original mass.
  # (Bilinear resampling is not exactly mass-preserving: within 1% typically, 10% always.)
  ratio = mass / (digits.sum(axis=(1, 2, 3)) * flat["scale"] ** 2)
  assert abs(np.median(ratio) - 1) < 0.01 and np.abs(ratio - 1).max() < 0.1, ratio


def _identity_params(variant, index):
  b = len(index)
  zeros, ones = np.zeros((b,), np.float32), np.ones((b,), np.float32)
  if variant == "r":
    return {"index": index, "angle": zeros}
  if variant == "rts":
    return {"index": index, "angle": zeros, "scale": ones, "center": np.full((b, 2), 21.0, np.float32),
            "pivot": np.full((b, 2), 14.0, np.float32)}
  if variant == "p":
    return {"index": index, "scale": ones, "corner_offsets": np.zeros((b, 4, 2), np.float32)}
  if variant == "e":
    return {"index": index, "scale": ones, "control_offsets": np.zeros((b, 16, 2), np.float32)}
  if variant == "t":
    return {"index": index, "offset": np.full((b, 2), 16, np.int32)}
  raise AssertionError(variant)


@pytest.mark.parametrize("variant", ["r", "rts", "p", "e", "t"])
def test_identity_parameters_give_back_the_digit(pool, variant):
  index = np.arange(3, dtype=np.int32)
  images = np.asarray(data.render(variant, _identity_params(variant, index), pool[0]))
  digits = np.asarray(pool[0])[index].astype(np.float32) / 255
  size = data.get_variant(variant).image_size
  margin = (size - 28) // 2
  expected = np.zeros((3, size, size), np.float32)
  expected[:, margin:margin + 28, margin:margin + 28] = digits
  np.testing.assert_allclose(images[..., 0], expected, atol=1e-5)


def test_batch_of_one(pool):
  params = {k: v[:1] for k, v in _identity_params("e", np.arange(3, dtype=np.int32)).items()}
  image = np.asarray(data.render("e", params, pool[0]))
  np.testing.assert_allclose(image[0, ..., 0], np.asarray(pool[0][0]) / 255, atol=1e-5)


def test_rotation_direction_and_scale_direction(pool):
  index = np.arange(3, dtype=np.int32)
  digits = np.asarray(pool[0])[index].astype(np.float32) / 255
  quarter = data.render("r", {"index": index, "angle": np.full((3,), 90.0, np.float32)}, pool[0])
  # +90 degrees turns the digit clockwise on screen.
  np.testing.assert_allclose(np.asarray(quarter)[..., 0], np.rot90(digits, k=-1, axes=(1, 2)),
                             atol=1e-5)
  # scale is the digit's size: 0.5 halves the ink's extent.
  params = _identity_params("rts", index)
  params["scale"] = np.full((3,), 0.5, np.float32)
  small = np.asarray(data.render("rts", params, pool[0]))[..., 0]
  for b in range(3):
    ink_rows = np.flatnonzero(digits[b].max(axis=1) > 0.3)
    small_rows = np.flatnonzero(small[b].max(axis=1) > 0.15)
    assert abs((small_rows[-1] - small_rows[0]) - 0.5 * (ink_rows[-1] - ink_rows[0])) <= 2


def test_sample_train_batch_composes_with_jit_and_raw_keys(pool):
  images = batch(pool, "rts")[0]
  raw_key = jax.random.key_data(jax.random.fold_in(jax.random.key(0), 0))  # uint32 (2,)
  inner = jax.jit(lambda k, p: data.sample_train_batch("RTS", k, *p, B))(raw_key, pool)
  # The same batch up to float32 round-off: inside this program XLA fuses
  # the warp parameters' arithmetic into the sampler's loop (measured: up to
  # 5e-6 apart); other digits or parameters would differ by ~0.1 or more.
  np.testing.assert_allclose(np.asarray(inner[0]), images, rtol=0, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(inner[1]), batch(pool, "rts")[1])


def test_registry_is_complete_and_frozen():
  assert set(data.VARIANTS) == {"none", "r", "rts", "p", "e", "t", "tc", "addition"}
  shapes = {name: v.shape for name, v in data.VARIANTS.items()}
  assert shapes["rts"] == (42, 42, 1) and shapes["tc"] == (60, 60, 1) and shapes["t"] == (60, 60, 1)
  assert shapes["addition"] == (42, 42, 2) and data.VARIANTS["addition"].num_classes == 19
  assert "scale_range" in data.VARIANTS["e"].unverified
  for v in data.VARIANTS.values():
    assert v.source and v.description
  with pytest.raises(Exception):
    data.VARIANTS["r"].angle_range_deg = (0, 1)  # pytype: disable=not-writable
  with pytest.raises(TypeError):
    data.VARIANTS["x"] = data.VARIANTS["r"]  # pytype: disable=unsupported-operands


def test_bad_inputs_raise_value_errors_naming_the_argument(pool):
  images, labels = pool
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"`variant` must be one of \('none', 'r', 'rts'.*'XYZ'"):
    data.sample_train_batch("XYZ", key, images, labels, 4)
  with pytest.raises(ValueError, match="`batch_size`.*0"):
    data.sample_train_batch("r", key, images, labels, 0)
  with pytest.raises(ValueError, match=r"`pool_images`.*\(50000, 28\)"):
    data.sample_train_batch("r", key, images[:, 0], labels, 4)
  with pytest.raises(ValueError, match="`pool_images`.*float32"):
    data.sample_train_batch("r", key, images.astype(jnp.float32), labels, 4)
  with pytest.raises(ValueError, match=r"`pool_labels`.*\(7,\)"):
    data.sample_train_batch("r", key, images, labels[:7], 4)
  with pytest.raises(ValueError, match="`keys`"):
    data.distort("r", jax.random.split(key, 3), jnp.arange(4), images, labels)


def test_quad_is_well_formed_hand_cases():
  rule = distortions.QuadRule()
  square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32)
  def ok(quad, scale=1.0):
    return bool(distortions.quad_is_well_formed(jnp.asarray(quad, jnp.float32), scale, rule))
  assert ok(square) and ok(0.8 * square, 0.8)
  assert ok(square + np.array([[0.1, 0.05], [-0.1, 0.0], [0.05, -0.1], [0.0, 0.1]]))
  assert not ok(square[[0, 2, 1, 3]])                 # Folded over (a bow tie).
  assert not ok(square[::-1])                         # Mirrored.
  assert not ok(square * [1, 0.2])                    # Area 20% of the box: a streak.
  assert not ok([[-1, -1], [1, -1], [0.05, 0.05], [-1, 1]])  # A corner near the diagonal.
  # A trapezoid whose top edge is 1/5 of its bottom edge: strong perspective
  # (w ratio 5 at the corners) although convex, with every angle >= 25 degrees.
  trapezoid = [[-0.2, -1], [0.2, -1], [1, 1], [-1, 1]]
  assert not ok(trapezoid)
  assert ok([[-0.7, -1], [0.7, -1], [1, 1], [-1, 1]])  # Mild perspective (ratio 1.4).


def test_p_draws_are_well_formed_and_literal_draws_are_not(pool):
  params = batch(pool, "p")[2]
  v = data.get_variant("p")
  quads = distortions.projective_target(params["scale"], params["corner_offsets"], 28)
  assert np.all(distortions.quad_is_well_formed(quads, params["scale"], v.quad_rule))
  # The protocol taken literally (no redraw) folds or squeezes some quads.
  literal = dataclasses.replace(v, quad_rule=None)
  key = jax.random.key(0)
  raw = data.sample_train_batch(literal, key, *pool, 4 * B, return_params=True)[2]
  quads = distortions.projective_target(raw["scale"], raw["corner_offsets"], 28)
  rejected = ~np.asarray(distortions.quad_is_well_formed(quads, raw["scale"], v.quad_rule))
  assert 0.05 < rejected.mean() < 0.25, rejected.mean()


SHARDED_P_BATCH = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from stnjax import data
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 28, 28), np.uint8))
labels = jnp.zeros((64,), jnp.int32)

@jax.jit
def batch(key):
  out = data.sample_train_batch("P", key, images, labels, 32)
  return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P("data")))

print(batch(jax.random.key(0))[0].shape)
"""


def test_p_batches_sharded_over_two_cpu_devices_finish():
  # As stnjax.train draws a data-parallel run's batches. With LAPACK's solve
  # in homography_from_points this program never returned on XLA:CPU.
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", SHARDED_P_BATCH], env=env, capture_output=True,
                        text=True, timeout=180, check=True)
  assert done.stdout.strip().splitlines()[-1] == "(32, 28, 28, 1)"
