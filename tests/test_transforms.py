"""Tests for the transform builders: identity, attention, rotation-scale-translation, homography."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stnjax
from stnjax import transforms


def apply_homography(h, points):
  """`h @ [p, 1]`, dehomogenised, for `points (..., n, 2)` (numpy)."""
  points = np.asarray(points)
  ones = np.ones(points.shape[:-1] + (1,))
  uvw = np.einsum("...ij,...nj->...ni", np.asarray(h), np.concatenate([points, ones], -1))
  return uvw[..., :2] / uvw[..., 2:]


def test_identity_theta():
  theta = stnjax.identity_theta()
  assert theta.shape == (2, 3) and theta.dtype == jnp.float32
  np.testing.assert_array_equal(theta, [[1, 0, 0], [0, 1, 0]])
  np.testing.assert_array_equal(stnjax.identity_theta(3), np.eye(3, 4))


def test_attention_theta_values():
  theta = stnjax.attention_theta(0.5, 0.1, -0.2)
  assert theta.shape == (2, 3) and theta.dtype == jnp.float32
  np.testing.assert_allclose(theta, [[0.5, 0.0, 0.1], [0.0, 0.5, -0.2]])
  # Integer arguments give a floating-point matrix; (1, 0, 0) is the identity.
  theta = stnjax.attention_theta(1, 0, 0)
  assert jnp.issubdtype(theta.dtype, jnp.floating)
  np.testing.assert_array_equal(theta, stnjax.identity_theta())


def test_attention_theta_broadcasts():
  scale = jnp.array([[1.0], [2.0], [3.0]])  # (3, 1)
  tx = jnp.array([0.1, 0.2, 0.3, 0.4])  # (4,)
  theta = stnjax.attention_theta(scale, tx, -0.5)
  assert theta.shape == (3, 4, 2, 3)
  np.testing.assert_allclose(theta[2, 1], [[3.0, 0.0, 0.2], [0.0, 3.0, -0.5]], rtol=1e-6)
  np.testing.assert_allclose(theta[..., 0, 0], np.broadcast_to(scale, (3, 4)))
  np.testing.assert_allclose(theta[..., 0, 2], np.broadcast_to(tx, (3, 4)))


def test_rts_theta_values():
  np.testing.assert_allclose(stnjax.rts_theta(0.0, 1.0, 0.0, 0.0), stnjax.identity_theta())
  theta = stnjax.rts_theta(math.pi / 2, 2.0, 0.1, 0.2)
  assert theta.shape == (2, 3)
  np.testing.assert_allclose(theta, [[0.0, -2.0, 0.1], [2.0, 0.0, 0.2]], atol=1e-6)
  a = 0.3
  np.testing.assert_allclose(
      stnjax.rts_theta(a, 1.5, -0.1, 0.4),
      [[1.5 * math.cos(a), -1.5 * math.sin(a), -0.1], [1.5 * math.sin(a), 1.5 * math.cos(a), 0.4]],
      rtol=1e-6)
  # With angle 0 it is the attention transform.
  np.testing.assert_allclose(stnjax.rts_theta(0.0, 0.7, 0.1, 0.2),
                             stnjax.attention_theta(0.7, 0.1, 0.2), rtol=1e-7)


def test_rts_theta_broadcasts_and_differentiates():
  angle = jnp.linspace(-1.0, 1.0, 5)[:, None]  # (5, 1)
  scale = jnp.array([0.5, 2.0])  # (2,)
  theta = stnjax.rts_theta(angle, scale, 0.0, 0.0)
  assert theta.shape == (5, 2, 2, 3)
  # det of the linear part is scale^2 for every angle.
  det = theta[..., 0, 0] * theta[..., 1, 1] - theta[..., 0, 1] * theta[..., 1, 0]
  np.testing.assert_allclose(det, np.broadcast_to(scale**2, (5, 2)), rtol=1e-5)
  # d theta[1, 0] / d angle = s cos(a).
  grad = jax.grad(lambda a: stnjax.rts_theta(a, 2.0, 0.0, 0.0)[1, 0])(0.3)
  assert float(grad) == pytest.approx(2 * math.cos(0.3), rel=1e-6)


def test_attention_scale_below_one_zooms_in():
  # attention_theta(0.5, 0, 0) samples the central half: with align_corners=True
  # on 5 x 5, even output pixels 2m land on input pixels 1 + m.
  image = jnp.arange(25.0).reshape(5, 5, 1)
  theta = stnjax.attention_theta(0.5, 0.0, 0.0)

  @jax.jit  # One compilation instead of one per primitive.
  def zoom(image, theta):
    grid = stnjax.affine_grid(theta, (5, 5), align_corners=True)
    return stnjax.grid_sample(image, grid, align_corners=True)

  out = zoom(image, theta)
  np.testing.assert_allclose(out[::2, ::2], image[1:4, 1:4], atol=1e-5)


def test_affine_to_homography():
  theta = jnp.arange(12.0).reshape(2, 2, 3)
  h = stnjax.affine_to_homography(theta)
  assert h.shape == (2, 3, 3) and h.dtype == theta.dtype
  np.testing.assert_array_equal(h[:, :2], theta)
  np.testing.assert_array_equal(h[:, 2], [[0, 0, 1], [0, 0, 1]])
  np.testing.assert_array_equal(stnjax.affine_to_homography(stnjax.identity_theta()), np.eye(3))
  with pytest.raises(ValueError, match=r"theta.*\(3, 3\)"):
    stnjax.affine_to_homography(jnp.eye(3))


def test_homography_from_points_maps_target_to_source(x64, rng):
  target = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
  source = target * 0.6 + rng.uniform(-0.25, 0.25, (4, 2))
  h = stnjax.homography_from_points(target, source)
  assert h.shape == (3, 3) and h.dtype == jnp.float64
  assert float(h[2, 2]) == 1.0
  np.testing.assert_allclose(apply_homography(h, target), source, rtol=0, atol=1e-12)


def test_homography_from_points_batched_identity_and_affine(x64, rng):
  target = rng.uniform(-1, 1, (3, 4, 2)) + np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]])
  source = rng.uniform(-1, 1, (3, 4, 2)) + np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]])
  h = stnjax.homography_from_points(target, source)
  assert h.shape == (3, 3, 3)
  np.testing.assert_allclose(apply_homography(h, target), source, rtol=0, atol=1e-10)
  # Identical points: the identity.
  np.testing.assert_allclose(stnjax.homography_from_points(target[0], target[0]), np.eye(3),
                             atol=1e-12)
  # Points related by an affine map: that map, as a homography.
  theta = np.array([[1.2, 0.3, 0.1], [-0.2, 0.9, -0.3]])
  affine_source = target[0] @ theta[:, :2].T + theta[:, 2]
  np.testing.assert_allclose(stnjax.homography_from_points(target[0], affine_source),
                             stnjax.affine_to_homography(theta), atol=1e-12)


def test_homography_from_points_broadcasts_target_and_source(x64, rng):
  # Fixed corners as targets for a batch of sources, and the reverse.
  corners = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
  sources = corners * 0.7 + rng.uniform(-0.2, 0.2, (2, 3, 4, 2))
  h = stnjax.homography_from_points(corners, sources)
  assert h.shape == (2, 3, 3, 3)
  np.testing.assert_allclose(apply_homography(h, corners), sources, rtol=0, atol=1e-12)
  for index in np.ndindex(2, 3):
    np.testing.assert_array_equal(h[index], stnjax.homography_from_points(corners, sources[index]))
  h = stnjax.homography_from_points(sources[:, :1], sources[0])  # (2, 1) with (3,): (2, 3).
  assert h.shape == (2, 3, 3, 3)
  np.testing.assert_allclose(apply_homography(h[1, 2], sources[1, 0]), sources[0, 2],
                             rtol=0, atol=1e-12)


def test_homography_from_points_bad_input():
  with pytest.raises(ValueError, match=r"target.*\(3, 2\)"):
    stnjax.homography_from_points(jnp.zeros((3, 2)), jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match=r"\(4, 3\)"):
    stnjax.homography_from_points(jnp.zeros((4, 2)), jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"`target` batch dims \(3,\), `source` batch dims \(2,\)"):
    stnjax.homography_from_points(jnp.zeros((3, 4, 2)), jnp.zeros((2, 4, 2)))


def test_parameters_that_do_not_broadcast_are_named():
  with pytest.raises(ValueError, match=r"`angle` \(3,\), `scale` \(2,\), `tx` \(\), `ty` \(\)"):
    stnjax.rts_theta(jnp.zeros(3), jnp.ones(2), 0.0, 0.0)
  with pytest.raises(ValueError, match=r"`scale` \(2,\), `tx` \(3,\), `ty` \(\)"):
    stnjax.attention_theta(jnp.ones(2), jnp.zeros(3), 0.0)


@pytest.mark.parametrize("transform", transforms.TRANSFORMS)
@pytest.mark.parametrize("lead", [(), (1,), (1, 1), (2, 1), (1, 3)])
def test_transform_grid_batch_dims_include_sizes_of_one(transform, lead):
  # Batch dimensions that are all 1 take `_batching.batched_apply`'s unbatched
  # branch (no vmap): the grid keeps them, and each example's grid is the
  # unbatched one.
  identity = transforms.identity_params(transform)
  params = np.broadcast_to(identity, lead + identity.shape)
  grid = transforms.transform_grid(transform, params, (3, 4))
  assert grid.shape == lead + (3, 4, 2)
  single = transforms.transform_grid(transform, identity, (3, 4))
  np.testing.assert_allclose(grid, np.broadcast_to(single, grid.shape), rtol=0, atol=1e-6)
  np.testing.assert_allclose(single, stnjax.base_grid((3, 4)), rtol=0, atol=1e-6)


def test_models_reexports_the_transform_parameterisations():
  from stnjax import models  # pylint: disable=g-import-not-at-top
  assert models.transform_grid is transforms.transform_grid
  assert models.identity_params is transforms.identity_params


def test_solve_pivots_like_lapack(x64, rng):
  # A zero on the diagonal needs a row swap; batched systems; against numpy.
  a = rng.normal(size=(5, 8, 8))
  a[0, 0, 0] = 0.0
  b = rng.normal(size=(5, 8))
  x = transforms._solve(jnp.asarray(a), jnp.asarray(b))  # pylint: disable=protected-access
  np.testing.assert_allclose(x, np.linalg.solve(a, b[..., None])[..., 0], rtol=1e-9, atol=1e-9)
