"""Static-argument checks of sampler and grids; the models' float32 path vs torch; half floats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stnjax

GRIDS = {"affine": (stnjax.affine_grid, np.eye(2, 3)),
         "projective": (stnjax.projective_grid, np.eye(3)),
         "tps": (stnjax.tps_grid, stnjax.tps_control_points(4))}


@pytest.mark.parametrize("name", list(GRIDS))
def test_grids_refuse_a_non_bool_or_traced_align_corners(name):
  make, params = GRIDS[name]
  params = jnp.asarray(params, jnp.float32)
  with pytest.raises(TypeError, match=r"`align_corners` must be a bool, got 'no' \(str\)"):
    make(params, (4, 5), align_corners="no")
  with pytest.raises(TypeError, match=r"`align_corners` must be a Python bool known at trace "
                                      r"time, got a traced value"):
    jax.jit(lambda a: make(params, (4, 5), align_corners=a))(True)
  np.testing.assert_array_equal(make(params, (4, 5), align_corners=np.bool_(True)),
                                make(params, (4, 5), align_corners=True))


def test_grid_sample_refuses_a_non_bool_or_traced_align_corners():
  image, grid = jnp.ones((1, 3, 3, 1)), jnp.zeros((1, 2, 2, 2))
  with pytest.raises(TypeError, match=r"`align_corners` must be a bool, got 'no' \(str\)"):
    stnjax.grid_sample(image, grid, align_corners="no")
  with pytest.raises(TypeError, match=r"`align_corners` must be a bool, got 1 \(int\)"):
    stnjax.grid_sample(image, grid, align_corners=1)
  with pytest.raises(TypeError, match=r"`align_corners` .* traced value"):
    jax.jit(lambda a: stnjax.grid_sample(image, grid, align_corners=a))(False)
  with pytest.raises(TypeError, match=r"`align_corners` must be a bool"):
    stnjax.base_grid((2, 2), align_corners=None)


def test_affine_and_projective_grids_build_nothing_on_the_host():
  # 10^10 points: a host base grid would need 240 GB (float64 x, y, 1).
  shape = (100_000, 100_000)
  out = jax.eval_shape(lambda t: stnjax.affine_grid(t, shape), jnp.zeros((3, 2, 3)))
  assert out.shape == (3, 100_000, 100_000, 2) and out.dtype == jnp.float32
  out = jax.eval_shape(lambda h: stnjax.projective_grid(h, shape), jnp.zeros((3, 3)))
  assert out.shape == (100_000, 100_000, 2)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("out_shape", [(1, 1), (3, 1), (7, 10), (99, 197), (2, 3, 4)])
def test_affine_identity_equals_the_base_grid(out_shape, align_corners):
  ndim = len(out_shape)
  grid = stnjax.affine_grid(jnp.eye(ndim, ndim + 1), out_shape, align_corners=align_corners)
  np.testing.assert_allclose(grid, stnjax.base_grid(out_shape, align_corners=align_corners),
                             rtol=0, atol=1e-7)


def _model_path(image, theta):
  """What `stnjax.models.SpatialTransformer` does: affine grid, bilinear, zeros, no corners."""
  grid = stnjax.affine_grid(theta, image.shape[1:3])
  return stnjax.grid_sample(image, grid)


def test_models_float32_single_channel_path_matches_torch(rng):
  image = rng.uniform(size=(8, 28, 28, 1)).astype(np.float32)
  theta = (np.eye(2, 3) + rng.normal(0, 0.3, (8, 2, 3))).astype(np.float32)
  cotangent = rng.normal(size=(8, 28, 28, 1)).astype(np.float32)
  out, vjp = jax.vjp(jax.jit(_model_path), jnp.asarray(image), jnp.asarray(theta))
  d_image, d_theta = vjp(jnp.asarray(cotangent))

  image_t = torch.tensor(np.moveaxis(image, -1, 1), requires_grad=True)
  theta_t = torch.tensor(theta, requires_grad=True)
  grid_t = F.affine_grid(theta_t, (8, 1, 28, 28), align_corners=False)
  out_t = F.grid_sample(image_t, grid_t, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
  out_t.backward(torch.tensor(np.moveaxis(cotangent, -1, 1)))
  assert out.dtype == d_image.dtype == d_theta.dtype == jnp.float32
  np.testing.assert_allclose(out, np.moveaxis(out_t.detach().numpy(), 1, -1), rtol=0, atol=2e-5)
  np.testing.assert_allclose(d_image, np.moveaxis(image_t.grad.numpy(), 1, -1), rtol=0,
                             atol=2e-5)
  np.testing.assert_allclose(d_theta, theta_t.grad.numpy(), rtol=2e-4, atol=2e-3)
  assert np.abs(theta_t.grad.numpy()).max() > 1.0  # A real gradient, not a zero one.


# Half precision computes in the input dtype: the grid's coordinates carry
# its rounding (bfloat16: 8 bits, about 0.1 pixel at 28x28), so the bounds
# are the dtype's, measured against float32 on the same (rounded) inputs.
@pytest.mark.parametrize("dtype, max_error, mean_error, grad_error", [
    (jnp.bfloat16, 0.3, 0.02, 0.5), (jnp.float16, 0.04, 3e-3, 0.25)])
def test_half_precision_inputs(rng, dtype, max_error, mean_error, grad_error):
  image = jnp.asarray(rng.uniform(size=(4, 28, 28, 1)), dtype)
  theta = jnp.asarray(np.eye(2, 3) + rng.normal(0, 0.2, (4, 2, 3)), dtype)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  reference = _model_path(f32(image), f32(theta))
  out = jax.jit(_model_path)(image, theta)
  assert out.dtype == dtype
  error = np.abs(f32(out) - reference)
  assert error.max() < max_error and error.mean() < mean_error, (error.max(), error.mean())
  grad = jax.grad(lambda t: jnp.sum(_model_path(image, t)))(theta)
  reference_grad = jax.grad(lambda t: jnp.sum(_model_path(f32(image), t)))(f32(theta))
  assert grad.dtype == dtype and np.isfinite(f32(grad)).all()
  scale = np.abs(reference_grad).max()
  assert np.abs(f32(grad) - reference_grad).max() < grad_error * scale and scale > 1.0
