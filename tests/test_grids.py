"""Tests for the grid generators: `base_grid`, `affine_grid`, `projective_grid`, `tps_grid`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stnjax

ALIGNS = (False, True)

# Jitted public API for shapes used once (cheaper than compiling each primitive eagerly).
sample = jax.jit(stnjax.grid_sample, static_argnames=("mode", "padding_mode", "align_corners"))
affine = jax.jit(stnjax.affine_grid, static_argnums=(1,), static_argnames=("align_corners",))


def apply_homography(h, points):
  """`h @ [p, 1]`, dehomogenised, for `points (n, 2)` (numpy)."""
  uvw = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.asarray(h).T
  return uvw[:, :2] / uvw[:, 2:]


# ---------------------------------------------------------------------------
# base_grid and affine_grid.
# ---------------------------------------------------------------------------


def test_base_grid_values():
  np.testing.assert_array_equal(stnjax.base_grid((1, 3), align_corners=True)[0, :, 0],
                                [-1.0, 0.0, 1.0])
  grid = stnjax.base_grid((2, 4), align_corners=False)  # Pixel centres (2j + 1) / W - 1.
  assert grid.shape == (2, 4, 2) and grid.dtype == np.float64
  np.testing.assert_allclose(grid[0, :, 0], [-0.75, -0.25, 0.25, 0.75], atol=1e-15)
  np.testing.assert_allclose(grid[:, 0, 1], [-0.5, 0.5], atol=1e-15)
  # An axis of size 1 sits at 0 for both align_corners.
  for align_corners in ALIGNS:
    np.testing.assert_array_equal(stnjax.base_grid((1, 1), align_corners=align_corners), 0.0)
    np.testing.assert_array_equal(stnjax.base_grid((3, 1), align_corners=align_corners)[:, 0, 0],
                                  0.0)
  # The default is align_corners=False.
  np.testing.assert_array_equal(stnjax.base_grid((2, 4)), grid)


def test_base_grid_3d_axis_order():
  grid = stnjax.base_grid((2, 3, 4), align_corners=True)
  assert grid.shape == (2, 3, 4, 3)
  # grid[d, h, w] = (x_w, y_h, z_d): x runs along width, z along depth.
  np.testing.assert_allclose(grid[1, 2, 3], [1.0, 1.0, 1.0])
  np.testing.assert_allclose(grid[0, 1, 2], [1 / 3, 0.0, -1.0], atol=1e-15)
  np.testing.assert_allclose(grid[1, 0, 0], [-1.0, -1.0, 1.0])


def test_affine_grid_identity_is_base_grid_and_keeps_dtype():
  for align_corners in ALIGNS:
    grid = stnjax.affine_grid(jnp.eye(2, 3), (3, 5), align_corners=align_corners)
    assert grid.shape == (3, 5, 2) and grid.dtype == jnp.float32
    np.testing.assert_allclose(grid, stnjax.base_grid((3, 5), align_corners=align_corners),
                               rtol=0, atol=1e-7)
  grid = stnjax.affine_grid(jnp.eye(3, 4), (2, 3, 4), align_corners=True)
  np.testing.assert_allclose(grid, stnjax.base_grid((2, 3, 4), align_corners=True), atol=1e-7)


def test_affine_grid_hand_values():
  # x_s = 2 x_t + 0.5 y_t + 0.1, y_s = -y_t + 0.3 on the align_corners=True base grid.
  theta = jnp.array([[2.0, 0.5, 0.1], [0.0, -1.0, 0.3]])
  grid = stnjax.affine_grid(theta, (2, 3), align_corners=True)
  xs, ys = np.meshgrid([-1.0, 0.0, 1.0], [-1.0, 1.0])
  np.testing.assert_allclose(grid[..., 0], 2 * xs + 0.5 * ys + 0.1, atol=1e-6)
  np.testing.assert_allclose(grid[..., 1], -ys + 0.3, atol=1e-6)


_TORCH_SIZES = {2: ((4, 5), (1, 5), (4, 1), (1, 1)), 3: ((2, 3, 4), (1, 3, 1), (3, 1, 2))}


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior has changed")
@pytest.mark.parametrize("align_corners", ALIGNS)
@pytest.mark.parametrize("ndim", (2, 3))
def test_affine_grid_matches_torch(x64, rng, ndim, align_corners):
  theta = np.eye(ndim, ndim + 1) + 0.5 * rng.normal(size=(2, ndim, ndim + 1))
  for size in _TORCH_SIZES[ndim]:
    grid = affine(theta, size, align_corners=align_corners)
    ref = F.affine_grid(torch.tensor(theta), (2, 1) + size, align_corners=align_corners)
    assert grid.shape == tuple(ref.shape) and grid.dtype == jnp.float64
    np.testing.assert_allclose(grid, ref.numpy(), rtol=0, atol=1e-12, err_msg=str(size))
    # A single theta (no batch dims) gives one grid.
    np.testing.assert_allclose(affine(theta[1], size, align_corners=align_corners),
                               ref.numpy()[1], rtol=0, atol=1e-12)


def test_affine_grid_batch_dims(rng):
  theta = rng.normal(size=(2, 3, 2, 3)).astype(np.float32)
  grid = stnjax.affine_grid(theta, (4, 5))
  assert grid.shape == (2, 3, 4, 5, 2)
  np.testing.assert_allclose(grid[1, 2], stnjax.affine_grid(theta[1, 2], (4, 5)), atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.vmap(lambda t: stnjax.affine_grid(t, (4, 5))))(theta),
                             grid, atol=1e-6)


@pytest.mark.parametrize("grid_fn", ("affine_grid", "projective_grid", "tps_grid"))
def test_batch_of_one_transform(grid_fn):
  # A leading batch dimension of size 1 must give a leading output dim of size 1.
  transform = {
      "affine_grid": np.eye(2, 3),
      "projective_grid": np.eye(3),
      "tps_grid": stnjax.tps_control_points(2),
  }[grid_fn]
  fn = getattr(stnjax, grid_fn)
  single = fn(jnp.asarray(transform, jnp.float32), (3, 4))
  batched = fn(jnp.asarray(transform[None], jnp.float32), (3, 4))
  assert batched.shape == (1, 3, 4, 2)
  np.testing.assert_allclose(batched[0], single, atol=1e-6)


# Composed gradient d loss / d theta of grid_sample(image, affine_grid(theta)).
_THETA_GRAD_CASES = (
    [(2, "bilinear", p, a) for p in ("zeros", "border", "reflection") for a in ALIGNS]
    + [(2, "bicubic", "zeros", False), (2, "bicubic", "reflection", True),
       (3, "bilinear", "border", False), (3, "bilinear", "zeros", True)])


@pytest.mark.parametrize("ndim,mode,padding_mode,align_corners", _THETA_GRAD_CASES)
def test_theta_gradient_matches_torch(x64, rng, ndim, mode, padding_mode, align_corners):
  spatial, out_spatial, channels = ((5, 6), (4, 7), 3) if ndim == 2 else ((3, 4, 5), (2, 3, 4), 2)
  image = rng.normal(size=(2,) + spatial + (channels,))
  theta = np.eye(ndim, ndim + 1) + 0.4 * rng.normal(size=(2, ndim, ndim + 1))
  cot = rng.normal(size=(2,) + out_spatial + (channels,))
  kwargs = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)

  def loss(theta, image):
    grid = stnjax.affine_grid(theta, out_spatial, align_corners=align_corners)
    return jnp.sum(cot * stnjax.grid_sample(image, grid, **kwargs))

  d_theta, d_image = jax.grad(loss, argnums=(0, 1))(theta, image)

  theta_t = torch.tensor(theta, requires_grad=True)
  image_t = torch.tensor(np.moveaxis(image, -1, 1), requires_grad=True)
  grid_t = F.affine_grid(theta_t, (2, channels) + out_spatial, align_corners=align_corners)
  out_t = F.grid_sample(image_t, grid_t, **kwargs)
  (out_t * torch.tensor(np.moveaxis(cot, -1, 1))).sum().backward()
  np.testing.assert_allclose(d_theta, theta_t.grad.numpy(), rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(d_image, np.moveaxis(image_t.grad.numpy(), 1, -1), rtol=0, atol=1e-10)
  assert np.abs(theta_t.grad.numpy()).max() > 1e-2


def test_affine_grid_bad_input():
  with pytest.raises(ValueError, match=r"theta.*\(2, 2\)"):
    stnjax.affine_grid(jnp.zeros((2, 2)), (4, 5))
  with pytest.raises(ValueError, match=r"theta.*\(5, 3, 3\)"):
    stnjax.affine_grid(jnp.zeros((5, 3, 3)), (4, 5))
  with pytest.raises(ValueError, match=r"theta.*\(3,\)"):
    stnjax.affine_grid(jnp.zeros((3,)), (4, 5))
  with pytest.raises(TypeError, match=r"theta.*int32"):
    stnjax.affine_grid(jnp.zeros((2, 3), jnp.int32), (4, 5))
  with pytest.raises(ValueError, match=r"out_shape.*\(4, 5, 6\)"):
    stnjax.affine_grid(jnp.eye(2, 3), (4, 5, 6))
  with pytest.raises(ValueError, match=r"out_shape.*\(4, 5\)"):  # 3-D theta, 2-D out_shape.
    stnjax.affine_grid(jnp.eye(3, 4), (4, 5))
  with pytest.raises(ValueError, match=r"out_shape.*\(0, 5\)"):
    stnjax.affine_grid(jnp.eye(2, 3), (0, 5))
  with pytest.raises(ValueError, match=r"out_shape.*integer.*got 28\."):  # Not a tuple.
    stnjax.affine_grid(jnp.eye(2, 3), 28)
  with pytest.raises(ValueError, match=r"out_shape.*\(4\.5, 5\)"):  # Not truncated to 4.
    stnjax.affine_grid(jnp.eye(2, 3), (4.5, 5))


# ---------------------------------------------------------------------------
# projective_grid.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", ALIGNS)
def test_projective_grid_of_affine_homography_is_affine_grid(rng, align_corners):
  theta = jnp.asarray(np.eye(2, 3) + 0.5 * rng.normal(size=(3, 2, 3)), jnp.float32)
  h = stnjax.affine_to_homography(theta)
  assert h.shape == (3, 3, 3)
  grid = stnjax.projective_grid(h, (4, 5), align_corners=align_corners)
  assert grid.shape == (3, 4, 5, 2) and grid.dtype == jnp.float32
  np.testing.assert_allclose(grid, stnjax.affine_grid(theta, (4, 5), align_corners=align_corners),
                             rtol=0, atol=1e-5)


def test_projective_grid_hand_values(x64):
  # u = x, v = y, w = 1 + 0.5 x: source (x, y) / (1 + 0.5 x).
  h = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]])
  grid = stnjax.projective_grid(h, (3, 3), align_corners=True)
  xs, ys = np.meshgrid([-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0])
  np.testing.assert_allclose(grid[..., 0], xs / (1 + 0.5 * xs), atol=1e-14)
  np.testing.assert_allclose(grid[..., 1], ys / (1 + 0.5 * xs), atol=1e-14)
  # The homography's overall scale does not matter.
  np.testing.assert_allclose(stnjax.projective_grid(3 * h, (3, 3), align_corners=True), grid,
                             atol=1e-14)


@pytest.mark.parametrize("offset", (0.0, -5e-7))
def test_projective_grid_safe_divide(x64, rng, offset):
  # w = x_t + offset: exactly 0 (or |w| < 1e-6) on the middle column x_t = 0.
  h = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, offset]])
  grid = stnjax.projective_grid(h, (3, 5), align_corners=True)
  assert bool(jnp.all(jnp.isfinite(grid)))
  safe_w = -1e-6 if offset < 0 else 1e-6  # Sign of w, + at 0.
  np.testing.assert_allclose(grid[:, 2, 0], 0.0, atol=1e-12)
  np.testing.assert_allclose(grid[:, 2, 1], np.array([-1.0, 0.0, 1.0]) / safe_w, rtol=1e-12)
  # Elsewhere the division is exact: (x, y) / (x + offset).
  xs, ys = np.meshgrid([-1.0, -0.5, 0.0, 0.5, 1.0], [-1.0, 0.0, 1.0])
  keep = xs != 0
  xs, ys = xs[keep], ys[keep]
  np.testing.assert_allclose(grid[..., 0][keep], xs / (xs + offset), rtol=1e-12)
  np.testing.assert_allclose(grid[..., 1][keep], ys / (xs + offset), rtol=1e-12)
  # Finite gradients, through the grid alone and through the sampler.
  jacobian = jax.jit(jax.jacobian(
      lambda h: stnjax.projective_grid(h, (3, 5), align_corners=True)))(h)
  assert bool(jnp.all(jnp.isfinite(jacobian)))
  np.testing.assert_array_equal(jacobian[:, 2, :, 2, :], 0.0)  # d / d w is 0 where clamped.
  image = jnp.asarray(rng.normal(size=(4, 5, 2)))

  def loss(h):
    grid = stnjax.projective_grid(h, (3, 5), align_corners=True)
    return jnp.sum(stnjax.grid_sample(image, grid, padding_mode="border") ** 2)

  grad = jax.jit(jax.grad(loss))(h)
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0


def test_homography_from_points_feeds_projective_grid(x64, rng):
  # Source corners on input pixel centres (9 x 9, align_corners=True: centre j is -1 + j / 4).
  pixels = np.array([[2, 1], [7, 2], [6, 8], [1, 6]])  # (col, row) for TL, TR, BR, BL.
  source = -1 + pixels / 4
  target = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])  # Output corners.
  h = stnjax.homography_from_points(target, source)
  np.testing.assert_allclose(apply_homography(h, target), source, rtol=0, atol=1e-12)
  grid = stnjax.projective_grid(h, (5, 5), align_corners=True)
  corners = np.asarray(grid)[[0, 0, -1, -1], [0, -1, -1, 0]]  # TL, TR, BR, BL output pixels.
  np.testing.assert_allclose(corners, source, rtol=0, atol=1e-12)
  image = rng.normal(size=(9, 9, 2))
  out = np.asarray(sample(image, grid, align_corners=True))
  np.testing.assert_allclose(out[[0, 0, -1, -1], [0, -1, -1, 0]],
                             image[pixels[:, 1], pixels[:, 0]], rtol=0, atol=1e-10)


def test_projective_grid_bad_input():
  with pytest.raises(ValueError, match=r"homography.*\(2, 3\)"):
    stnjax.projective_grid(jnp.eye(2, 3), (4, 5))
  with pytest.raises(TypeError, match=r"homography.*int32"):
    stnjax.projective_grid(jnp.eye(3, dtype=jnp.int32), (4, 5))
  with pytest.raises(ValueError, match=r"out_shape.*\(2, 4, 5\)"):
    stnjax.projective_grid(jnp.eye(3), (2, 4, 5))


# ---------------------------------------------------------------------------
# Thin-plate splines.
# ---------------------------------------------------------------------------


def test_tps_control_points_lattice():
  points = stnjax.tps_control_points(2)
  assert isinstance(points, np.ndarray) and points.shape == (4, 2)
  np.testing.assert_array_equal(points, [[-1, -1], [1, -1], [-1, 1], [1, 1]])  # x fastest.
  points = stnjax.tps_control_points(3)
  assert points.shape == (9, 2)
  np.testing.assert_array_equal(points[4], [0, 0])
  np.testing.assert_array_equal(points[5], [1, 0])
  assert stnjax.tps_control_points(4).shape == (16, 2)
  with pytest.raises(ValueError, match=r"k=1"):
    stnjax.tps_control_points(1)


@pytest.mark.parametrize("align_corners", ALIGNS)
@pytest.mark.parametrize("k", (2, 3, 4))
def test_tps_identity_lattice_gives_base_grid(k, align_corners):
  points = jnp.asarray(stnjax.tps_control_points(k), jnp.float32)
  grid = stnjax.tps_grid(points, (7, 9), align_corners=align_corners)
  assert grid.shape == (7, 9, 2) and grid.dtype == jnp.float32
  np.testing.assert_allclose(grid, stnjax.base_grid((7, 9), align_corners=align_corners),
                             rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", (3, 4))
def test_tps_interpolates_control_points(x64, rng, k):
  # Output size 3k - 2 with align_corners=True: lattice point (r, c) is output pixel (3r, 3c).
  size = 3 * k - 2
  points = stnjax.tps_control_points(k) + rng.uniform(-0.2, 0.2, (k * k, 2))
  grid = np.asarray(stnjax.tps_grid(points, (size, size), align_corners=True))
  lattice = grid[::3, ::3]  # (k, k, 2)
  np.testing.assert_allclose(lattice.reshape(k * k, 2), points, rtol=0, atol=1e-10)
  # So the sampled image at lattice pixels is the image at the control points.
  image = rng.normal(size=(5, 6, 2))
  out = sample(image, grid, align_corners=True)
  at_points = sample(image, points.reshape(k, k, 2), align_corners=True)
  np.testing.assert_allclose(np.asarray(out)[::3, ::3], at_points, rtol=0, atol=1e-10)
  # Between lattice points the spline is smooth, not the identity.
  assert np.abs(grid - stnjax.base_grid((size, size), align_corners=True)).max() > 1e-3


def test_tps_grid_is_linear_in_control_points_and_batches(x64, rng):
  base = stnjax.tps_control_points(3)
  a = base + rng.uniform(-0.2, 0.2, (9, 2))
  b = base + rng.uniform(-0.2, 0.2, (9, 2))
  grid = stnjax.tps_grid(np.stack([a, b]), (5, 6))
  assert grid.shape == (2, 5, 6, 2)
  np.testing.assert_allclose(grid[1], stnjax.tps_grid(b, (5, 6)), atol=1e-12)
  np.testing.assert_allclose(stnjax.tps_grid(0.3 * a + 0.7 * b, (5, 6)),
                             0.3 * grid[0] + 0.7 * grid[1], atol=1e-12)
  # The Jacobian w.r.t. the control points is constant and finite (the basis matrix).
  jac = jax.jacobian(lambda p: stnjax.tps_grid(p, (5, 6)))(jnp.asarray(a))
  assert bool(jnp.all(jnp.isfinite(jac)))
  np.testing.assert_allclose(jac[..., 0, :, 1], 0.0)  # x outputs do not depend on y inputs.


def test_tps_kernel_values_and_gradients():
  # numpy in, numpy out (float64 precomputation).
  r2 = np.array([0.0, 1.0, math.e, 4.0])
  values = stnjax.tps_kernel(r2)
  assert isinstance(values, np.ndarray)
  np.testing.assert_allclose(values, [0.0, 0.0, math.e, 4 * math.log(4)], rtol=1e-15)
  # jax in, jax out; U(0) = 0 and U'(0) finite (0), U'(e) = log e + 1 = 2.
  values = stnjax.tps_kernel(jnp.asarray(r2, jnp.float32))
  assert isinstance(values, jax.Array)
  np.testing.assert_allclose(values, [0.0, 0.0, math.e, 4 * math.log(4)], rtol=1e-6)
  grad = jax.grad(stnjax.tps_kernel)
  assert float(grad(0.0)) == 0.0
  assert float(grad(math.e)) == pytest.approx(2.0, rel=1e-6)
  np.testing.assert_allclose(jax.vmap(grad)(jnp.array([0.0, 1.0, math.e])), [0.0, 1.0, 2.0],
                             rtol=1e-6)
  assert np.isfinite(float(jax.grad(grad)(0.0)))


def test_tps_grid_bad_input():
  with pytest.raises(ValueError, match=r"control_points.*\(5, 2\)"):
    stnjax.tps_grid(jnp.zeros((5, 2)), (4, 5))
  with pytest.raises(ValueError, match=r"control_points.*\(1, 2\)"):  # k = 1.
    stnjax.tps_grid(jnp.zeros((1, 2)), (4, 5))
  with pytest.raises(ValueError, match=r"control_points.*\(4, 3\)"):
    stnjax.tps_grid(jnp.zeros((4, 3)), (4, 5))
  with pytest.raises(TypeError, match=r"control_points.*int32"):
    stnjax.tps_grid(jnp.zeros((4, 2), jnp.int32), (4, 5))
  with pytest.raises(ValueError, match=r"out_shape.*\(4,\)"):
    stnjax.tps_grid(jnp.asarray(stnjax.tps_control_points(2), jnp.float32), (4,))
