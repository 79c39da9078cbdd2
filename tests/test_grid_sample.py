"""Tests for `stnjax.grid_sample`: known values, PyTorch parity, gradients, batching, errors.

Conventions under test (see `stnjax/sampling.py`): channels-last images, grid
last axis `(x, y[, z])` with x along width, pixel `j`'s centre at normalised
`(2j + 1) / W - 1` (align_corners=False) or `2j / (W - 1) - 1` (True).
"""

import doctest
import functools
import itertools
import math
import os
import re
import subprocess
import sys
import textwrap
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.test_util import check_grads

import stnjax
from stnjax import _cpu_ffi
from stnjax import _cpu_kernels
from stnjax import _interp
from stnjax import sampling
from stnjax._cpu_kernels import CpuOptions

MODES = ("bilinear", "nearest", "bicubic")
PADDINGS = ("zeros", "border", "reflection")
ALIGNS = (False, True)


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def normalize(pixel, size, align_corners):
  """Pixel coordinate (pixel j's centre is j) -> normalised coordinate; inverse of unnormalising."""
  pixel = np.asarray(pixel, np.float64)
  if align_corners:
    return pixel / (size - 1) * 2 - 1
  return (2 * pixel + 1) / size - 1


def pixel_grid(cols, rows, width, height, align_corners):
  """Normalised `(..., 2)` grid `(x, y)` from pixel coordinates (cols: width, rows: height)."""
  return np.stack([normalize(cols, width, align_corners),
                   normalize(rows, height, align_corners)], axis=-1)


def torch_grid_sample(image, grid, cotangent, **kwargs):
  """PyTorch's `grid_sample` on channels-last numpy arrays.

  Returns `(out, d loss / d image, d loss / d grid)` for `loss = sum(out * cotangent)`,
  all channels-last numpy.
  """
  image_t = torch.tensor(np.moveaxis(np.asarray(image), -1, 1), requires_grad=True)
  grid_t = torch.tensor(np.asarray(grid), requires_grad=True)
  out = F.grid_sample(image_t, grid_t, **kwargs)
  out.backward(torch.tensor(np.moveaxis(np.asarray(cotangent), -1, 1)))
  return (np.moveaxis(out.detach().numpy(), 1, -1), np.moveaxis(image_t.grad.numpy(), 1, -1),
          grid_t.grad.numpy())


def stnjax_grid_sample(image, grid, cotangent, jit=False, **kwargs):
  """Like `torch_grid_sample`, with stnjax (reverse mode via `jax.vjp`), eager or jitted.

  `kwargs` may include `cpu_options` (`sampling.grid_sample_with_options`).
  """

  def run(image, grid, cotangent):
    out, vjp = jax.vjp(functools.partial(sampling.grid_sample_with_options, **kwargs), image, grid)
    return (out,) + vjp(cotangent.astype(out.dtype))

  results = (jax.jit(run) if jit else run)(image, grid, jnp.asarray(cotangent))
  return tuple(np.asarray(r) for r in results)


def smooth_pixel_coords(rng, shape, size):
  """Random pixel coordinates away from every kink of the piecewise-polynomial sampler.

  Kinks sit at integers (taps change) and, for reflection with
  align_corners=False, at half-integers (-0.5, size - 0.5). Fractional parts
  are drawn from [0.15, 0.35] U [0.65, 0.85]; integer parts cover a margin
  of 3 pixels outside the image so every padding branch is exercised.
  """
  whole = rng.integers(-3, size + 3, shape)
  frac = rng.uniform(0.15, 0.35, shape)
  frac = np.where(rng.random(shape) < 0.5, frac, 1.0 - frac)
  return whole + frac


# Shared small shapes, (batch, spatial, out_spatial, channels). Eager JAX compiles
# each primitive once per shape, so reusing a few shapes keeps the suite fast.
SHAPES_2D = ((2,), (5, 6), (4, 7), 3)
SHAPES_3D = ((2,), (3, 4, 5), (2, 3, 4), 2)


def random_case(rng, shapes=SHAPES_2D, dtype=np.float64):
  """Random image, grid (coordinates in [-1.5, 1.5], so padding matters) and output cotangent."""
  batch, spatial, out_spatial, channels = shapes
  ndim = len(spatial)
  image = rng.normal(size=batch + spatial + (channels,)).astype(dtype)
  grid = rng.uniform(-1.5, 1.5, size=batch + out_spatial + (ndim,)).astype(dtype)
  cotangent = rng.normal(size=batch + out_spatial + (channels,)).astype(dtype)
  return image, grid, cotangent


def smooth_case(rng, align_corners):
  """Like `random_case` (2-D, float64), with grid points away from the sampler's kinks."""
  image, _, cotangent = random_case(rng)
  batch, (height, width), out_spatial, _ = SHAPES_2D
  grid = pixel_grid(smooth_pixel_coords(rng, batch + out_spatial, width),
                    smooth_pixel_coords(rng, batch + out_spatial, height), width, height,
                    align_corners)
  return image, grid, cotangent


# Jitted public API for tests with shapes of their own: eager JAX compiles every
# primitive separately for each new shape (about 1 s for one bilinear call
# here), one fused program compiles several times faster. Tests that share the
# SHAPES_* above run eagerly and reuse those per-primitive compilations.
sample = jax.jit(stnjax.grid_sample, static_argnames=("mode", "padding_mode", "align_corners"))
affine = jax.jit(stnjax.affine_grid, static_argnums=(1,), static_argnames=("align_corners",))


# ---------------------------------------------------------------------------
# Hand-computed values.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", ALIGNS)
@pytest.mark.parametrize("mode", MODES)
def test_identity_grid_returns_image(x64, rng, mode, align_corners):
  image = jnp.asarray(rng.normal(size=(4, 5, 2)))
  grid = affine(jnp.eye(2, 3), (4, 5), align_corners=align_corners)
  assert grid.dtype == jnp.float64
  out = sample(image, grid, mode=mode, align_corners=align_corners)
  np.testing.assert_allclose(out, image, rtol=0, atol=1e-12)


@pytest.mark.parametrize("align_corners", ALIGNS)
def test_identity_grid_returns_image_float32(rng, align_corners):
  image = jnp.asarray(rng.normal(size=(2, 6, 7, 3)), jnp.float32)
  grid = affine(jnp.eye(2, 3), (6, 7), align_corners=align_corners)
  for mode in MODES:
    out = sample(image, grid, mode=mode, align_corners=align_corners)
    assert out.dtype == jnp.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, image, rtol=0, atol=1e-5, err_msg=mode)
  # Nearest never mixes pixels: the identity is exact even in float32.
  out = sample(image, grid, mode="nearest", align_corners=align_corners)
  np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("mode", MODES)
def test_identity_upsample_align_corners_true_hits_every_pixel(x64, rng, mode):
  # 5 -> 9 with align_corners=True: output 2i sits exactly on input pixel i.
  image = rng.normal(size=(5, 5, 2))
  grid = affine(jnp.eye(2, 3), (9, 9), align_corners=True)
  out = np.asarray(sample(image, grid, mode=mode, align_corners=True))
  assert out.shape == (9, 9, 2)
  np.testing.assert_allclose(out[::2, ::2], image, rtol=0, atol=1e-12)
  if mode == "bilinear":  # Odd positions are midpoints between two pixels.
    np.testing.assert_allclose(out[1::2, ::2], (image[:-1] + image[1:]) / 2, atol=1e-12)
    np.testing.assert_allclose(out[::2, 1::2], (image[:, :-1] + image[:, 1:]) / 2, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_identity_upsample_align_corners_false_hits_every_pixel(x64, rng, mode):
  # W -> 3W with align_corners=False: output centre 3i + 1 is input centre i.
  image = rng.normal(size=(3, 4, 2))
  grid = affine(jnp.eye(2, 3), (9, 12), align_corners=False)
  out = np.asarray(sample(image, grid, mode=mode, align_corners=False))
  assert out.shape == (9, 12, 2)
  np.testing.assert_allclose(out[1::3, 1::3], image, rtol=0, atol=1e-12)


def test_identity_downsample_by_two_is_average_pooling(x64, rng):
  # 6x8 -> 3x4 with align_corners=False: output centre j is input 2j + 0.5.
  image = rng.normal(size=(6, 8, 3))
  grid = affine(jnp.eye(2, 3), (3, 4), align_corners=False)
  out = sample(image, grid)
  pooled = image.reshape(3, 2, 4, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(out, pooled, rtol=0, atol=1e-12)


def test_linear_ramp_is_reproduced_by_bilinear(x64, rng):
  height, width = 5, 6
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  image = (2.0 * cols + 3.0 * rows)[..., None]
  pc = rng.uniform(0, width - 1, (4, 7))
  pr = rng.uniform(0, height - 1, (4, 7))
  for align_corners in ALIGNS:
    grid = pixel_grid(pc, pr, width, height, align_corners)
    out = sample(image, grid, align_corners=align_corners)
    np.testing.assert_allclose(out[..., 0], 2 * pc + 3 * pr, rtol=0, atol=1e-12)


@pytest.mark.parametrize("align_corners", ALIGNS)
@pytest.mark.parametrize("padding_mode", ("zeros", "border"))
def test_integer_pixel_translation_shifts_pixels(rng, padding_mode, align_corners):
  height, width = 5, 6
  image = jnp.asarray(rng.normal(size=(height, width, 2)), jnp.float32)
  # One pixel in normalised units: 2 / size (edges) or 2 / (size - 1) (centres).
  step_x = 2 / width if not align_corners else 2 / (width - 1)
  step_y = 2 / height if not align_corners else 2 / (height - 1)
  # Sample one pixel right (x + 1) and one pixel up (y - 1): out[i, j] = image[i - 1, j + 1].
  theta = jnp.array([[1.0, 0.0, step_x], [0.0, 1.0, -step_y]], jnp.float32)
  grid = affine(theta, (height, width), align_corners=align_corners)
  out = np.asarray(sample(image, grid, padding_mode=padding_mode, align_corners=align_corners))
  image = np.asarray(image)
  np.testing.assert_allclose(out[1:, :-1], image[:-1, 1:], rtol=0, atol=1e-5)
  if padding_mode == "zeros":
    np.testing.assert_allclose(out[0], 0, atol=1e-5)
    np.testing.assert_allclose(out[:, -1], 0, atol=1e-5)
  else:  # Border repeats the edge pixels.
    np.testing.assert_allclose(out[1:, -1], image[:-1, -1], atol=1e-5)
    np.testing.assert_allclose(out[0, :-1], image[0, 1:], atol=1e-5)
    np.testing.assert_allclose(out[0, -1], image[0, -1], atol=1e-5)


@pytest.mark.parametrize("size", (4, 5))
@pytest.mark.parametrize("align_corners", ALIGNS)
def test_quarter_turns_equal_rot90(rng, size, align_corners):
  image = jnp.asarray(rng.normal(size=(size, size, 3)), jnp.float32)
  for k in (1, 2, 3):
    theta = stnjax.rts_theta(k * math.pi / 2, 1.0, 0.0, 0.0)
    grid = affine(theta, (size, size), align_corners=align_corners)
    out = sample(image, grid, align_corners=align_corners)
    np.testing.assert_allclose(out, jnp.rot90(image, k, axes=(0, 1)), rtol=0, atol=1e-5,
                               err_msg=f"k={k}")


# Row image [1, 2, 4, 8] (H = 1, so y = 0 is row 0 for both align_corners).
# Each row: x, its pixel coordinate, then the expected bilinear values for
# (zeros, border, reflection) and the expected nearest values (half to even).
_ROW = [1.0, 2.0, 4.0, 8.0]
_PADDING_TABLE = {
    # x_pix = ((x + 1) * 4 - 1) / 2; reflection about [-0.5, 3.5], then clip to [0, 3].
    False: [
        (0.1, 1.7, (3.4, 3.4, 3.4), (4, 4, 4)),
        (1.5, 4.5, (0, 8, 6), (0, 8, 4)),  # Reflects to 2.5 (nearest: 2).
        (-1.2, -0.9, (0.1, 1, 1), (0, 1, 1)),  # Reflects to -0.1, clipped to 0.
        (-1.75, -2.0, (0, 1, 2), (0, 1, 2)),  # Reflects to 1.
        (1.875, 5.25, (0, 8, 3.5), (0, 8, 4)),  # Reflects to 1.75.
    ],
    # x_pix = (x + 1) * 1.5; reflection about [0, 3].
    True: [
        (1.5, 3.75, (2, 8, 5), (0, 8, 4)),  # Reflects to 2.25.
        (-1.4, -0.6, (0.4, 1, 1.6), (0, 1, 2)),  # Reflects to 0.6.
        (4.0, 7.5, (0, 8, 3), (0, 8, 4)),  # Reflects twice, to 1.5 (nearest: 2).
        (-3.0, -3.0, (0, 1, 8), (0, 1, 8)),  # Reflects to 3.
    ],
}


@pytest.mark.parametrize("align_corners", ALIGNS)
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_out_of_range_values_by_hand(padding_mode, align_corners):
  image = jnp.array(_ROW).reshape(1, 4, 1)
  table = _PADDING_TABLE[align_corners]
  xs = np.array([row[0] for row in table])
  pixels = np.array([row[1] for row in table])
  np.testing.assert_allclose(((xs + 1) * 1.5) if align_corners else ((xs + 1) * 4 - 1) / 2,
                             pixels)  # The table's own pixel coordinates.
  grid = jnp.asarray(np.stack([xs, np.zeros_like(xs)], -1)[None], jnp.float32)  # (1, n, 2)
  column = PADDINGS.index(padding_mode)
  for mode, values in (("bilinear", 2), ("nearest", 3)):
    expected = [row[values][column] for row in table]
    out = sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    np.testing.assert_allclose(out[0, :, 0], expected, rtol=0, atol=1e-5, err_msg=mode)
    # The table agrees with PyTorch.
    ref = torch_grid_sample(np.asarray(image)[None], np.asarray(grid)[None],
                            np.ones((1, 1, len(xs), 1), np.float32), mode=mode,
                            padding_mode=padding_mode, align_corners=align_corners)[0]
    np.testing.assert_allclose(ref[0, 0, :, 0], expected, rtol=0, atol=1e-5, err_msg=mode)


def test_corner_out_of_range_2d_by_hand():
  image = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1)
  grid = jnp.array([[[1.5, -1.5]]])  # Far right, far up.
  def value(padding_mode):
    return float(sample(image, grid, padding_mode=padding_mode, align_corners=True)[0, 0, 0])
  # x_pix = 1.25, y_pix = -0.25: only tap (row 0, col 1) is inside, weight 0.75 * 0.75.
  assert value("zeros") == pytest.approx(0.5625 * 2.0, abs=1e-6)
  assert value("border") == 2.0  # Clipped to (row 0, col 1).
  # x_pix = 1.25 -> 0.75, y_pix = -0.25 -> 0.25:
  # 0.75 * (0.25 * 1 + 0.75 * 2) + 0.25 * (0.25 * 3 + 0.75 * 4) = 2.25.
  assert value("reflection") == pytest.approx(2.25, abs=1e-6)


@pytest.mark.parametrize("align_corners", ALIGNS)
def test_nearest_rounds_half_to_even(align_corners):
  if align_corners:  # W = 5: x_pix = 2 (x + 1).
    row, xs, expected = [10.0, 20.0, 30.0, 40.0, 50.0], [-0.75, -0.25, 0.25, 0.75], [10, 30, 30, 50]
  else:  # W = 4: x_pix = 2 x + 1.5.
    row, xs, expected = [10.0, 20.0, 30.0, 40.0], [-0.5, 0.0, 0.5], [10, 30, 30]
  # x_pix = 0.5, 1.5, 2.5(, 3.5) -> 0, 2, 2(, 4).
  image = jnp.array(row).reshape(1, -1, 1)
  grid = jnp.array([[[x, 0.0] for x in xs]])
  out = sample(image, grid, mode="nearest", align_corners=align_corners)
  np.testing.assert_array_equal(out[0, :, 0], expected)
  ref = torch_grid_sample(np.asarray(image)[None], np.asarray(grid)[None],
                          np.ones((1, 1, len(xs), 1), np.float32), mode="nearest",
                          align_corners=align_corners)[0]
  np.testing.assert_array_equal(ref[0, 0, :, 0], expected)


def test_bicubic_of_constant_is_constant(rng):
  height, width = 6, 7
  image = jnp.full((height, width, 2), 3.7, jnp.float32)
  # Interior: all 16 taps inside the image, so even zeros padding keeps the constant.
  grid = pixel_grid(rng.uniform(1, width - 3, (5, 5)), rng.uniform(1, height - 3, (5, 5)),
                    width, height, False)
  out = sample(image, jnp.asarray(grid, jnp.float32), mode="bicubic")
  np.testing.assert_allclose(out, 3.7, rtol=0, atol=1e-5)
  # Border and reflection pad each tap with a real pixel: constant everywhere.
  grid = jnp.asarray(rng.uniform(-1.5, 1.5, (5, 5, 2)), jnp.float32)
  for padding_mode, align_corners in (("border", True), ("reflection", False)):
    out = sample(image, grid, mode="bicubic", padding_mode=padding_mode,
                 align_corners=align_corners)
    np.testing.assert_allclose(out, 3.7, rtol=0, atol=1e-5, err_msg=padding_mode)


def test_trilinear_axis_order_by_hand():
  # image[d, h, w] = 4 d + 2 h + w: trilinear reproduces it, and x -> w, y -> h, z -> d.
  image = jnp.arange(8.0).reshape(2, 2, 2, 1)
  grid = jnp.array([[[[0.25, 0.5, 0.75], [0.5, 0.5, 0.5]]]]) * 2 - 1  # align_corners=True.
  out = sample(image, grid, align_corners=True)
  assert out.shape == (1, 1, 2, 1)
  np.testing.assert_allclose(out[0, 0, :, 0], [0.25 + 1.0 + 3.0, 3.5], rtol=0, atol=1e-6)


def test_docstring_examples_explicitly():
  image = jnp.arange(12.0).reshape(3, 4, 1)
  grid = stnjax.affine_grid(jnp.eye(2, 3), (3, 4))
  assert bool(jnp.allclose(stnjax.grid_sample(image, grid), image))
  x = (2 + 0.5) / 4 * 2 - 1
  y = (1 + 0.5) / 3 * 2 - 1
  value = stnjax.grid_sample(image, jnp.array([[[x, y]]]))[0, 0, 0]
  assert value.dtype == jnp.float32 and float(value) == pytest.approx(6.0, abs=1e-6)
  line = stnjax.affine_grid(jnp.eye(2, 3), (1, 3), align_corners=True)[0, :, 0]
  np.testing.assert_array_equal(line, [-1.0, 0.0, 1.0])


@pytest.mark.parametrize("fn", (stnjax.grid_sample, stnjax.affine_grid), ids=lambda f: f.__name__)
def test_docstring_examples_pass_as_doctests(fn):
  tests = doctest.DocTestFinder().find(fn, fn.__name__, globs={})
  runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
  for test in tests:
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------
# Parity with torch.nn.functional.grid_sample.
# ---------------------------------------------------------------------------

_PARITY_CASES = (
    [(2, m, p, a) for m in MODES for p in PADDINGS for a in ALIGNS]
    + [(3, m, p, a) for m in ("bilinear", "nearest") for p in PADDINGS for a in ALIGNS])


@pytest.mark.parametrize("ndim,mode,padding_mode,align_corners", _PARITY_CASES)
def test_matches_torch_values_and_gradients(x64, rng, ndim, mode, padding_mode, align_corners):
  image, grid, cot = random_case(rng, SHAPES_2D if ndim == 2 else SHAPES_3D)
  kwargs = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
  out, d_image, d_grid = stnjax_grid_sample(image, grid, cot, **kwargs)
  ref_out, ref_d_image, ref_d_grid = torch_grid_sample(image, grid, cot, **kwargs)
  assert out.dtype == np.float64 and out.shape == ref_out.shape
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-10)
  np.testing.assert_allclose(d_image, ref_d_image, rtol=0, atol=1e-10)
  np.testing.assert_allclose(d_grid, ref_d_grid, rtol=0, atol=1e-10)
  assert np.abs(ref_out).max() > 0.1  # Not a vacuous comparison.
  if mode != "nearest":
    assert np.abs(ref_d_grid).max() > 0.1


@pytest.mark.parametrize("mode,padding_mode,align_corners", [
    ("bilinear", "zeros", False), ("bicubic", "reflection", True)])
def test_matches_torch_float32(rng, mode, padding_mode, align_corners):
  image, grid, cot = random_case(rng, dtype=np.float32)
  kwargs = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
  out, d_image, d_grid = stnjax_grid_sample(image, grid, cot, jit=True, **kwargs)
  ref_out, ref_d_image, ref_d_grid = torch_grid_sample(image, grid, cot, **kwargs)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5)
  np.testing.assert_allclose(d_image, ref_d_image, rtol=0, atol=1e-5)
  np.testing.assert_allclose(d_grid, ref_d_grid, rtol=0, atol=1e-4)


@pytest.mark.parametrize("align_corners", ALIGNS)
@pytest.mark.parametrize("mode", MODES)
def test_reflection_of_huge_finite_coordinates_matches_torch(x64, rng, mode, align_corners):
  # Pixel coordinates of 1e7 to 1e9 (beyond the +-2**24 that zeros and border
  # clamp to): reflection brings them back into the image, as PyTorch does.
  image, _, cot = random_case(rng)
  batch, (height, width), out_spatial, _ = SHAPES_2D
  shape = batch + out_spatial
  far = rng.choice([-1, 1], shape) * rng.integers(10**7, 10**9, shape)
  cols = smooth_pixel_coords(rng, shape, width) + far * 2 * width
  rows = smooth_pixel_coords(rng, shape, height) - far * 2 * height
  grid = pixel_grid(cols, rows, width, height, align_corners)
  assert np.abs(grid).min() > 1e6
  kwargs = dict(mode=mode, padding_mode="reflection", align_corners=align_corners)
  out, d_image, d_grid = stnjax_grid_sample(image, grid, cot, **kwargs)
  ref_out, ref_d_image, ref_d_grid = torch_grid_sample(image, grid, cot, **kwargs)
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-8)
  np.testing.assert_allclose(d_image, ref_d_image, rtol=0, atol=1e-8)
  np.testing.assert_allclose(d_grid, ref_d_grid, rtol=1e-6, atol=1e-6)
  assert np.abs(ref_out).max() > 0.1
  if mode != "nearest":
    assert np.abs(ref_d_grid).max() > 0.1  # Reflected, not clamped (clamped would give 0).


def test_matches_torch_with_shared_grid(x64, rng):
  # One grid (no batch dims) for a batch of 2 images == torch with the grid repeated.
  image, grid, cot = random_case(rng)
  grid = grid[0]
  kwargs = dict(mode="bicubic", padding_mode="border", align_corners=False)
  out, d_image, d_grid = stnjax_grid_sample(image, grid, cot, **kwargs)
  ref_out, ref_d_image, ref_d_grid = torch_grid_sample(
      image, np.broadcast_to(grid, (2, 4, 7, 2)), cot, **kwargs)
  np.testing.assert_allclose(out, ref_out, atol=1e-10)
  np.testing.assert_allclose(d_image, ref_d_image, atol=1e-10)
  np.testing.assert_allclose(d_grid, ref_d_grid.sum(0), atol=1e-10)  # Shared: summed.


# ---------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------

_CHECK_GRADS_CASES = (("bilinear", "zeros", False), ("bicubic", "reflection", True))


@pytest.mark.parametrize("mode,padding_mode,align_corners", _CHECK_GRADS_CASES)
def test_check_grads_second_order(x64, rng, mode, padding_mode, align_corners):
  image, grid, _ = smooth_case(rng, align_corners)
  fn = functools.partial(stnjax.grid_sample, mode=mode, padding_mode=padding_mode,
                         align_corners=align_corners)
  if mode == "bilinear":  # Measured: faster jitted; bicubic's 16 taps compile slower than eager.
    fn = jax.jit(fn)
  # eps = 1e-6: with the default 1e-4 the central differences of the cubic
  # "VJP of VJP" check carry truncation errors of ~1e-5 relative. Reverse
  # mode only: the sampler has a custom VJP, so forward mode is unsupported.
  check_grads(fn, (image, grid), order=2, modes=("rev",), eps=1e-6)


@pytest.mark.parametrize("mode", ("bilinear", "bicubic"))
def test_grad_of_grad_matches_finite_differences(x64, rng, mode):
  image, grid, cot = map(jnp.asarray, smooth_case(rng, align_corners=False))
  direction = jnp.asarray(rng.normal(size=grid.shape))

  def f(s):
    return jnp.sum(cot * stnjax.grid_sample(image, grid + s * direction, mode=mode))

  second = jax.grad(jax.grad(f))(0.0)
  h = 1e-4
  finite = (f(h) - 2 * f(0.0) + f(-h)) / h**2
  assert np.isfinite(second)
  assert abs(float(second)) > 1e-2  # Bilinear's xy cross term makes it non-zero.
  np.testing.assert_allclose(second, finite, rtol=1e-5, atol=1e-5)
  # Also against finite differences of the (exact) first derivative.
  df = jax.grad(f)
  np.testing.assert_allclose(second, (df(h) - df(-h)) / (2 * h), rtol=1e-6, atol=1e-6)


def test_translation_gradient_at_identity_is_not_zero():
  # The dm-pix pitfall: with `ceil` as the upper tap, a grid exactly on pixel
  # centres gets a zero coordinate gradient. align_corners=True and size 5 put
  # the identity grid exactly on pixel centres (0, 0.5, ..., 4 in float32).
  size = 5
  rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  image = jnp.asarray((cols + 10.0 * rows)[..., None], jnp.float32)
  grid = stnjax.affine_grid(jnp.eye(2, 3), (size, size), align_corners=True)
  np.testing.assert_array_equal(grid[0, :, 0] * 2 + 2, np.arange(size))  # Exact pixel centres.

  def loss(theta):
    grid = stnjax.affine_grid(theta, (size, size), align_corners=True)
    out = stnjax.grid_sample(image, grid, align_corners=True)
    return jnp.sum(out[:-1, :-1])  # Interior: the upper taps exist.

  grad = jax.jit(jax.grad(loss))(jnp.eye(2, 3))
  # d x_pix / d tx = (W - 1) / 2 = 2; image slope 1 along x, 10 along y; 16 pixels.
  assert float(grad[0, 2]) == pytest.approx(16 * 2 * 1.0, rel=1e-6)
  assert float(grad[1, 2]) == pytest.approx(16 * 2 * 10.0, rel=1e-6)


@pytest.mark.parametrize("align_corners", ALIGNS)
def test_translation_gradient_at_identity_on_a_ramp(x64, align_corners):
  # At the identity the grid sits on pixel centres up to rounding, i.e. on the
  # kinks of the bilinear kernel. On a linear ramp the left and right
  # differences agree, so the (sub-)gradient is well defined whichever way
  # the rounding goes: d out / d tx = slope_x * d x_pix / d tx.
  height, width = 5, 6
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  image = np.broadcast_to((2.0 * cols + 3.0 * rows)[..., None], (2, height, width, 3))

  def loss(theta):
    grid = stnjax.affine_grid(theta, (height, width), align_corners=align_corners)
    out = stnjax.grid_sample(image, grid, align_corners=align_corners)
    return jnp.sum(out[:, 1:-1, 1:-1])  # Interior: both neighbours exist.

  grad = np.asarray(jax.jit(jax.grad(loss))(jnp.eye(2, 3)))
  pixels_per_unit_x = (width - 1) / 2 if align_corners else width / 2
  pixels_per_unit_y = (height - 1) / 2 if align_corners else height / 2
  interior = 2 * 3 * (height - 2) * (width - 2)  # Batch x channels x pixels.
  np.testing.assert_allclose(grad[0, 2], interior * 2.0 * pixels_per_unit_x, rtol=1e-10)
  np.testing.assert_allclose(grad[1, 2], interior * 3.0 * pixels_per_unit_y, rtol=1e-10)
  # Same in PyTorch.
  theta_t = torch.tensor(np.eye(2, 3)[None], requires_grad=True)
  grid_t = F.affine_grid(theta_t.expand(2, 2, 3), (2, 3, height, width),
                         align_corners=align_corners)
  out_t = F.grid_sample(torch.tensor(np.moveaxis(image, -1, 1)), grid_t,
                        align_corners=align_corners)
  out_t[:, :, 1:-1, 1:-1].sum().backward()
  np.testing.assert_allclose(grad, theta_t.grad.numpy()[0], rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("align_corners", ALIGNS)
def test_grid_gradient_on_pixel_centres_is_a_one_sided_derivative(x64, rng, align_corners):
  # At the identity every sample sits on a pixel centre, up to rounding: a
  # kink of the bilinear kernel. Which one-sided derivative a point gets
  # depends on the last bit of its pixel coordinate, so stnjax and PyTorch
  # (whose 2-D CPU kernel unnormalises with a fused multiply-add) can pick
  # different sides at some points, even given the same grid. Each picks one
  # of the two, per point and axis.
  height, width = 5, 7
  image = rng.normal(size=(2, height, width, 3))
  cot = rng.normal(size=(2, height, width, 3))
  grid = F.affine_grid(torch.eye(2, 3, dtype=torch.float64).expand(2, 2, 3),
                       (2, 3, height, width), align_corners=align_corners).numpy()
  padded = np.pad(image, ((0, 0), (1, 1), (1, 1), (0, 0)))  # Zeros padding.
  core = padded[:, 1:-1, 1:-1]
  scale = [(size - 1) / 2 if align_corners else size / 2 for size in (width, height)]
  sides = {  # d loss / d grid, (x, y), right/down and left/up differences.
      "forward": [np.sum(cot * (padded[:, 1:-1, 2:] - core), -1) * scale[0],
                  np.sum(cot * (padded[:, 2:, 1:-1] - core), -1) * scale[1]],
      "backward": [np.sum(cot * (core - padded[:, 1:-1, :-2]), -1) * scale[0],
                   np.sum(cot * (core - padded[:, :-2, 1:-1]), -1) * scale[1]]}
  d_grid = stnjax_grid_sample(image, grid, cot, align_corners=align_corners)[2]
  d_grid_torch = torch_grid_sample(image, grid, cot, align_corners=align_corners)[2]
  for got in (d_grid, d_grid_torch):
    for axis in range(2):
      forward = np.isclose(got[..., axis], sides["forward"][axis], rtol=0, atol=1e-9)
      backward = np.isclose(got[..., axis], sides["backward"][axis], rtol=0, atol=1e-9)
      assert np.all(forward | backward)
  assert not np.allclose(sides["forward"][0], sides["backward"][0])  # The sides differ.


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_pixels_that_are_not_taps_do_not_poison_gradients(mode):
  height, width = 6, 6
  image = np.random.default_rng(0).normal(size=(height, width, 1)).astype(np.float32)
  # Out-of-range taps are clamped to the edge before the gather: put inf/NaN there.
  image[2, 0] = np.inf
  image[3, width - 1] = np.nan
  image[5, 2] = -np.inf  # Far from every tap.
  pixels = np.array([
      [2.0, -3.5],          # Row 2, all taps left of the image (clamp to column 0).
      [3.0, width + 2.5],   # Row 3, all taps right of the image (clamp to column W - 1).
      [1.5, 2.4],           # Interior points whose taps avoid the bad pixels.
      [2.6, 2.5],
  ])
  grid = jnp.asarray(pixel_grid(pixels[:, 1], pixels[:, 0], width, height, False)[None],
                     jnp.float32)  # (1, 4, 2)
  image = jnp.asarray(image)

  def loss(image, grid):
    return jnp.sum(stnjax.grid_sample(image, grid, mode=mode) ** 2)

  out = sample(image, grid, mode=mode)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_array_equal(out[0, :2, 0], [0.0, 0.0])
  d_image, d_grid = jax.jit(jax.grad(loss, argnums=(0, 1)))(image, grid)
  assert bool(jnp.all(jnp.isfinite(d_image))) and bool(jnp.all(jnp.isfinite(d_grid)))
  assert float(d_image[2, 0, 0]) == 0.0 and float(d_image[3, width - 1, 0]) == 0.0
  assert float(jnp.abs(d_image).sum()) > 0  # Interior points do receive gradient.


@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_nan_grid_entry_acts_as_minus_one_with_zero_gradient(x64, rng, mode, padding_mode):
  image, grid_ref, _ = random_case(rng)
  nan_x, nan_y = (1, 1, 0, 0), (0, 2, 3, 1)  # An x coordinate and a y coordinate.
  grid_ref[nan_x] = grid_ref[nan_y] = -1.0
  grid_nan = grid_ref.copy()
  grid_nan[nan_x] = grid_nan[nan_y] = np.nan
  kwargs = dict(mode=mode, padding_mode=padding_mode)
  out_nan = stnjax.grid_sample(image, grid_nan, **kwargs)
  out_ref = stnjax.grid_sample(image, grid_ref, **kwargs)
  np.testing.assert_allclose(out_nan, out_ref, rtol=0, atol=1e-12)

  def loss(image, grid):
    return jnp.sum(stnjax.grid_sample(image, grid, **kwargs) ** 2)

  di_nan, dg_nan = jax.grad(loss, argnums=(0, 1))(image, jnp.asarray(grid_nan))
  di_ref, dg_ref = jax.grad(loss, argnums=(0, 1))(image, jnp.asarray(grid_ref))
  assert bool(jnp.all(jnp.isfinite(dg_nan))) and bool(jnp.all(jnp.isfinite(di_nan)))
  assert float(dg_nan[nan_x]) == 0.0 and float(dg_nan[nan_y]) == 0.0
  mask = np.ones(grid_ref.shape, bool)
  mask[nan_x] = mask[nan_y] = False
  np.testing.assert_allclose(np.asarray(dg_nan)[mask], np.asarray(dg_ref)[mask], atol=1e-12)
  np.testing.assert_allclose(di_nan, di_ref, atol=1e-12)
  if mode != "nearest" and padding_mode == "zeros":  # -1 itself has a non-zero gradient.
    assert float(dg_ref[nan_x]) != 0.0


def test_nan_grid_entry_3d(x64, rng):
  image, grid_ref, _ = random_case(rng, SHAPES_3D)
  grid_ref[1, 0, 1, 2, 2] = -1.0
  grid_nan = grid_ref.copy()
  grid_nan[1, 0, 1, 2, 2] = np.nan
  out_nan = stnjax.grid_sample(image, grid_nan)
  np.testing.assert_allclose(out_nan, stnjax.grid_sample(image, grid_ref), atol=1e-12)
  grad = jax.grad(lambda g: jnp.sum(stnjax.grid_sample(image, g) ** 2))(jnp.asarray(grid_nan))
  assert bool(jnp.all(jnp.isfinite(grad))) and float(grad[1, 0, 1, 2, 2]) == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_infinite_grid_entries_give_finite_output(x64, rng, mode):
  image, grid, cot = random_case(rng)  # H = 5, W = 6, align_corners=False.
  points = {(0, 0, 0): [np.inf, 0.0], (0, 0, 1): [-np.inf, 0.0], (1, 3, 6): [0.0, np.inf],
            (1, 2, 2): [np.inf, -np.inf]}
  for index, value in points.items():
    grid[index] = value
  far = np.clip(grid, -50, 50)  # Far outside but finite: the same for zeros and border.
  for padding_mode in PADDINGS:
    kwargs = dict(mode=mode, padding_mode=padding_mode)
    out = stnjax.grid_sample(image, grid, **kwargs)
    assert bool(jnp.all(jnp.isfinite(out))), padding_mode
    if padding_mode == "zeros":
      for index in points:
        np.testing.assert_array_equal(out[index], 0.0)
    if padding_mode in ("zeros", "border"):
      np.testing.assert_allclose(out, stnjax.grid_sample(image, far, **kwargs), atol=1e-12)
    d_image, d_grid = jax.grad(lambda i, g: jnp.sum(cot * stnjax.grid_sample(i, g, **kwargs)),
                               argnums=(0, 1))(image, grid)
    assert bool(jnp.all(jnp.isfinite(d_image))) and bool(jnp.all(jnp.isfinite(d_grid)))
    if padding_mode == "zeros":  # The output is 0 around these points.
      for index in points:
        np.testing.assert_array_equal(d_grid[index], 0.0)
    if padding_mode == "border":  # Clipped coordinates have zero gradient.
      for index, value in points.items():
        np.testing.assert_array_equal(d_grid[index][np.isinf(value)], 0.0)
  if mode == "bilinear":
    # Border: +-inf x is the last/first column; y = 0 is row 2, x = 0 is column 2.5.
    out = stnjax.grid_sample(image, grid, padding_mode="border")
    np.testing.assert_allclose(out[0, 0, 0], image[0, 2, -1], atol=1e-12)
    np.testing.assert_allclose(out[0, 0, 1], image[0, 2, 0], atol=1e-12)
    np.testing.assert_allclose(out[1, 3, 6], (image[1, -1, 2] + image[1, -1, 3]) / 2, atol=1e-12)
    np.testing.assert_allclose(out[1, 2, 2], image[1, 0, -1], atol=1e-12)


# ---------------------------------------------------------------------------
# The custom VJP against autodiff of a plain reference implementation.
# ---------------------------------------------------------------------------


def reference_bilinear(image, grid, padding_mode, align_corners):
  """Plain bilinear sampling of one `(H, W, C)` image at `grid (..., 2)`: jnp + autodiff only."""
  height, width, _ = image.shape

  def unnormalize(c, size):
    return (c + 1) / 2 * (size - 1) if align_corners else ((c + 1) * size - 1) / 2

  def pad(c, size):
    if padding_mode == "border":
      return jnp.clip(c, 0, size - 1)
    if padding_mode == "reflection":
      low, high = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
      span = high - low
      c = jnp.abs(c - low)
      extra = jnp.mod(c, span)
      flips = jnp.floor(c / span)
      c = jnp.where(jnp.mod(flips, 2) == 0, low + extra, high - extra)
      return jnp.clip(c, 0, size - 1)
    return c

  x = pad(unnormalize(grid[..., 0], width), width)
  y = pad(unnormalize(grid[..., 1], height), height)
  x0, y0 = jnp.floor(x), jnp.floor(y)
  out = 0.0
  for dy, dx in itertools.product((0, 1), (0, 1)):
    xi, yi = x0 + dx, y0 + dy
    weight = (1 - jnp.abs(x - xi)) * (1 - jnp.abs(y - yi))
    inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
    values = image[jnp.clip(yi, 0, height - 1).astype(jnp.int32),
                   jnp.clip(xi, 0, width - 1).astype(jnp.int32)]
    out = out + jnp.where(inside[..., None], weight[..., None] * values, 0.0)
  return out


@pytest.mark.parametrize("padding_mode,align_corners", [("zeros", False), ("reflection", True)])
def test_custom_vjp_matches_autodiff_of_reference(x64, rng, padding_mode, align_corners):
  image, grid, cot = map(jnp.asarray, smooth_case(rng, align_corners))
  tangent_grid = jnp.asarray(rng.normal(size=grid.shape))

  def derivatives(fn):
    """Value, reverse mode and reverse-over-reverse of `fn`, as one jitted program."""

    def loss(image, grid):
      return jnp.sum(cot * fn(image, grid))

    def grid_grad_along_tangent(image, grid):
      return jnp.sum(tangent_grid * jax.grad(loss, argnums=1)(image, grid))

    @jax.jit
    def run(image, grid):
      return dict(
          out=fn(image, grid),
          grads=jax.grad(loss, argnums=(0, 1))(image, grid),
          # Hessian-vector products: the grid-grid block (H v) and the
          # image-grid block, reverse-over-reverse through the custom VJP.
          second=jax.grad(grid_grad_along_tangent, argnums=(0, 1))(image, grid),
      )

    return run(image, grid)

  ours = derivatives(functools.partial(stnjax.grid_sample, padding_mode=padding_mode,
                                       align_corners=align_corners))
  ref = derivatives(jax.vmap(functools.partial(reference_bilinear, padding_mode=padding_mode,
                                               align_corners=align_corners)))
  for name, value in ours.items():
    for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(ref[name])):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-10, err_msg=name)
  assert float(jnp.abs(ref["grads"][1]).max()) > 0.1
  assert float(jnp.abs(ref["second"][0]).max()) > 0.1
  if padding_mode == "zeros":
    assert float(jnp.abs(ref["second"][1]).max()) > 1e-3  # The xy cross term.


def test_forward_mode_is_documented_as_unsupported(x64, rng):
  # The custom VJP makes forward mode raise (module docstring); reverse over
  # reverse gives the Hessian instead.
  image, grid, _ = smooth_case(rng, align_corners=False)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda g: stnjax.grid_sample(image, g), (grid,), (grid,))


# The CPU VJP runs in batch chunks (`CpuOptions.chunk_elements`); a small
# budget forces chunking on these small cases. 6 examples of 4 x 7 points x 3
# channels = 84 elements each: a budget of 200 gives 3 chunks of 2.
_CHUNKED_CASES = (
    [(2, "bilinear", p, a) for p in PADDINGS for a in ALIGNS]
    + [(2, "bicubic", "reflection", False), (2, "nearest", "zeros", True),
       (3, "bilinear", "border", True)])


def stnjax_and_torch_with_sharing(image, grid, cot, shared, cpu_options=CpuOptions(), **kwargs):
  """`(stnjax, torch)` results of `stnjax_grid_sample` with `shared` in {"none", "grid", "image"}.

  "grid" / "image" pass stnjax the first grid / image only (broadcast over
  the batch); torch gets them broadcast and its gradient is summed to match.
  """
  ndim = grid.shape[-1]
  if shared == "grid":
    grid = grid[0]
  elif shared == "image":
    image = image[0]
  ours = stnjax_grid_sample(image, grid, cot, cpu_options=cpu_options, **kwargs)
  ref = list(torch_grid_sample(np.broadcast_to(image, cot.shape[:1] + image.shape[-ndim - 1:]),
                               np.broadcast_to(grid, cot.shape[:1] + grid.shape[-ndim - 1:]),
                               cot, **kwargs))
  if shared == "grid":
    ref[2] = ref[2].sum(0)
  elif shared == "image":
    ref[1] = ref[1].sum(0)
  return ours, ref


def second_order_grads(image, grid, cot, cpu_options=CpuOptions()):
  """d/d(image, grid) of sum(d/d grid of sum(cot * grid_sample(image, grid) ** 2))."""
  sample = functools.partial(sampling.grid_sample_with_options, cpu_options=cpu_options)

  def grid_grad_sum(image, grid):
    return jnp.sum(jax.grad(lambda g: jnp.sum(cot * sample(image, g) ** 2))(grid))
  return jax.grad(grid_grad_sum, argnums=(0, 1))(image, grid)


@pytest.mark.parametrize("ndim,mode,padding_mode,align_corners", _CHUNKED_CASES)
@pytest.mark.parametrize("shared", ("none", "grid", "image"))
def test_chunked_vjp_matches_torch(x64, rng, ndim, mode, padding_mode, align_corners, shared):
  batch, spatial, out_spatial, channels = SHAPES_2D if ndim == 2 else SHAPES_3D
  image, grid, cot = random_case(rng, ((6,), spatial, out_spatial, channels))
  # 3-D: 2 x 3 x 4 points x 2 channels = 48 elements per example.
  options = CpuOptions(chunk_elements=100 if ndim == 3 else 200)
  assert _cpu_kernels.num_chunks(6, math.prod(out_spatial) * channels,
                                 options.chunk_elements) == 3
  (out, d_image, d_grid), (ref_out, ref_d_image, ref_d_grid) = stnjax_and_torch_with_sharing(
      image, grid, cot, shared, cpu_options=options, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-10)
  np.testing.assert_allclose(d_image, ref_d_image, rtol=0, atol=1e-10)
  np.testing.assert_allclose(d_grid, ref_d_grid, rtol=0, atol=1e-10)
  assert np.abs(ref_d_image).max() > 0.1
  if mode != "nearest":
    assert np.abs(ref_d_grid).max() > 0.1


def test_chunked_vjp_with_examples_larger_than_the_budget(x64, rng):
  # 84 elements per example, budget 50: one example per chunk (this used to
  # raise StopIteration, e.g. for two 300x300x3 images at the real budget).
  image, grid, cot = random_case(rng, ((3,), (5, 6), (4, 7), 3))
  whole = stnjax_grid_sample(image, grid, cot)
  assert _cpu_kernels.num_chunks(3, 84, 50) == 3
  chunked = stnjax_grid_sample(image, grid, cot, cpu_options=CpuOptions(chunk_elements=50))
  for a, b in zip(chunked, whole):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
  assert np.abs(whole[1]).max() > 0.1 and np.abs(whole[2]).max() > 0.1


@pytest.mark.parametrize("shared", ("none", "grid", "image"))
def test_chunked_single_channel_vjp_matches_torch(x64, rng, shared):
  # Single-channel 2-D VJPs have their own budgets (_cpu_kernels.vjp_chunks):
  # 6 examples of 4 x 7 points, at most 60 points per chunk: 3 chunks of 2.
  image, grid, cot = random_case(rng, ((6,), (5, 6), (4, 7), 1))
  options = CpuOptions(one_piece_bytes=0, single_channel_chunk_elements=60)
  spec = _interp.Spec((5, 6), "bilinear", "zeros", False)
  assert _cpu_kernels.vjp_chunks(np.empty((6, 28)), spec, options) == 3
  (out, d_image, d_grid), (ref_out, ref_d_image, ref_d_grid) = stnjax_and_torch_with_sharing(
      image, grid, cot, shared, cpu_options=options, mode="bilinear", padding_mode="zeros", align_corners=False)
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-10)
  np.testing.assert_allclose(d_image, ref_d_image, rtol=0, atol=1e-10)
  np.testing.assert_allclose(d_grid, ref_d_grid, rtol=0, atol=1e-10)
  assert np.abs(ref_d_image).max() > 0.1 and np.abs(ref_d_grid).max() > 0.1


# Accelerators gather and scatter with the batch as a batching dimension; CPU
# folds it into flat indices (`CpuOptions.flat_batch`). Switching it off runs
# the accelerator form here.
@pytest.mark.parametrize("ndim,mode,padding_mode,align_corners", [
    (2, "bilinear", "zeros", False), (2, "bicubic", "border", True),
    (2, "nearest", "reflection", False), (3, "bilinear", "reflection", True)])
@pytest.mark.parametrize("shared", ("none", "grid", "image"))
def test_batched_gather_form_matches_torch(x64, rng, ndim, mode, padding_mode, align_corners,
                                           shared):
  batch, spatial, out_spatial, channels = SHAPES_2D if ndim == 2 else SHAPES_3D
  image, grid, cot = random_case(rng, ((3,), spatial, out_spatial, channels))
  got, ref = stnjax_and_torch_with_sharing(
      image, grid, cot, shared, cpu_options=CpuOptions(flat_batch=False), mode=mode,
      padding_mode=padding_mode, align_corners=align_corners)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
  assert np.abs(ref[1]).max() > 0.1


def test_batched_gather_form_second_order_matches_flat(x64, rng):
  image, grid, cot = map(jnp.asarray, random_case(rng, ((3,), (5, 6), (4, 7), 3)))
  flat = second_order_grads(image, grid, cot)
  batched = second_order_grads(image, grid, cot, CpuOptions(flat_batch=False))
  for a, b in zip(batched, flat):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
  assert float(jnp.abs(flat[1]).max()) > 0.1


# No accelerator here: lowering for one with `jax.export` needs no device. The
# GPU and TPU programs must take the batched-gather form (the batch as the
# gathers' and scatters' batching dimension) and none of the CPU-only code:
# fusion boundaries (`optimization_barrier`), complex row pairs, flat indices.
# The CPU lowering of the same functions is the contrast: the checks tell the
# two forms apart.
@pytest.mark.parametrize("shape", ((4, 28, 28, 1), (4, 9, 11, 3), (2, 5, 6, 7, 2)),
                         ids=("2d-1ch", "2d-3ch", "3d-2ch"))
def test_accelerator_lowering_is_the_batched_gather_form(shape):
  ndim = len(shape) - 2
  image = jax.ShapeDtypeStruct(shape, jnp.float32)
  theta = jax.ShapeDtypeStruct((shape[0], ndim, ndim + 1), jnp.float32)

  def sample(image, theta):
    return stnjax.grid_sample(image, stnjax.affine_grid(theta, shape[1:-1]))

  def loss(image, theta, cotangent):
    return jnp.vdot(sample(image, theta), cotangent)

  batched = ("operand_batching_dims = [0]", "input_batching_dims = [0]")
  for fn, args in ((sample, (image, theta)),
                   (jax.grad(loss, argnums=(0, 1)), (image, theta, image))):
    for platform in ("cuda", "rocm", "tpu", "cpu"):
      # On CPU single-channel 2-D sampling (values and cotangents) and the 2-D
      # affine grid are C++ kernels (tests/test_cpu_ffi.py).
      kernels = platform == "cpu" and _cpu_ffi.status().available
      kernel = kernels and shape[-1] == 1
      checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _cpu_ffi.TARGETS]
      module = jax.export.export(jax.jit(fn), platforms=(platform,),
                                 disabled_checks=checks if kernels else [])(*args).mlir_module()
      # A gradient needs no sampled values: only the VJP's kernels remain.
      target = _cpu_ffi.TARGET if fn is sample else _cpu_ffi.GRID_VJP_TARGET
      assert (target in module) == kernel, platform
      assert (_cpu_ffi.AFFINE_TARGET in module) == (kernels and ndim == 2), platform
      indexing = re.findall(r'"stablehlo\.(?:gather|scatter)".*?dimension_numbers = ([^>]*>)',
                            module)
      if kernel:
        continue
      assert indexing, platform
      is_batched = [any(b in numbers for b in batched) for numbers in indexing]
      if platform == "cpu":
        assert not any(is_batched)
        # Boundaries: the VJP's cotangent; the 2-D single-channel row pairs.
        if fn is not sample or shape[-1] == 1:
          assert "optimization_barrier" in module
      else:
        assert all(is_batched), (platform, indexing)
        assert "optimization_barrier" not in module and "complex" not in module, platform


# On CPU, single-channel 2-D bilinear sampling reads each image row's two taps
# with one index (_cpu_kernels.sample_image_pairs), and so does its VJP for
# the grid cotangent (_cpu_kernels.image_pairs_coords_vjp); with `pair_table`
# both read complex pairs from a table of adjacent pixels instead
# (sample_row_pairs, row_pairs_coords_vjp).
# Their forward pass in float32 is the C++ kernel's unless it is switched off
# (tests/test_cpu_ffi.py compares the two).
NO_KERNEL = CpuOptions(sampler_kernel="off")
FOUR_TAPS = NO_KERNEL._replace(row_pairs=False)
PAIR_SOURCES = {"image": NO_KERNEL, "table": NO_KERNEL._replace(pair_table=True)}


def uses_row_pairs(image, grid, **kwargs):
  """Whether the CPU sampler and its VJP read row pairs from `pair_table`'s source."""
  options = kwargs.get("cpu_options", CpuOptions())
  names = (("sample_row_pairs", "row_pairs_coords_vjp") if options.pair_table else
           ("sample_image_pairs", "image_pairs_coords_vjp"))
  sample = functools.partial(sampling.grid_sample_with_options, **kwargs)
  # Run eagerly: a traced function can come from JAX's caches without calling Python.
  with jax.disable_jit():
    with mock.patch.object(_cpu_kernels, names[0], wraps=getattr(_cpu_kernels, names[0])) as fwd:
      out, vjp = jax.vjp(sample, image, grid)
    with mock.patch.object(_cpu_kernels, names[1], wraps=getattr(_cpu_kernels, names[1])) as bwd:
      vjp(jnp.ones_like(out))
  assert bool(fwd.call_count) == bool(bwd.call_count), (fwd.call_count, bwd.call_count)
  return fwd.call_count > 0


def row_pairs_and_four_taps(image, grid, cotangent, options=CpuOptions()):
  """`(output, d_image, d_grid)` on the row-pair path, then with it switched off (four taps)."""
  assert uses_row_pairs(image, grid, cpu_options=options)
  pairs = stnjax_grid_sample(image, grid, cotangent, jit=True, cpu_options=options)
  assert not uses_row_pairs(image, grid, cpu_options=FOUR_TAPS)
  return pairs, stnjax_grid_sample(image, grid, cotangent, jit=True, cpu_options=FOUR_TAPS)


@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("align_corners", ALIGNS)
@pytest.mark.parametrize("shared", ("none", "grid", "image"))
@pytest.mark.parametrize("source", PAIR_SOURCES)
def test_row_pair_path_matches_torch(x64, rng, padding_mode, align_corners, shared, source):
  image, grid, cot = random_case(rng, ((3,), (5, 6), (4, 7), 1))
  grid[0, 0, :2] = [[40.0, 0.2], [-7.0, 0.3]]  # Far outside.
  kwargs = dict(padding_mode=padding_mode, align_corners=align_corners,
                cpu_options=PAIR_SOURCES[source])
  assert uses_row_pairs(image, grid, **kwargs)
  got, ref = stnjax_and_torch_with_sharing(image, grid, cot, shared, **kwargs)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
  assert np.abs(ref[0]).max() > 0.1


def test_row_pair_output_is_not_copied(rng):
  # The row-pair loop writes one flat vector, whose reshape to (N, H, W, 1) is
  # a bitcast (_cpu_kernels.own_loop_1d). From an (N, H * W) loop XLA:CPU lays
  # that reshape out with the channel axis major and copies it to the result.
  # The C++ kernel's output (N, P) reshapes to (N, H, W, 1) as a bitcast too.
  image = rng.normal(size=(3, 6, 7, 1)).astype(np.float32)
  grid = rng.uniform(-1, 1, size=(3, 5, 8, 2)).astype(np.float32)
  assert uses_row_pairs(image, grid, cpu_options=NO_KERNEL)
  for options in (NO_KERNEL, CpuOptions()):
    sample = lambda i, g: sampling.grid_sample_with_options(i, g, cpu_options=options)
    entry = jax.jit(sample).lower(image, grid).compile().as_text().split("\nENTRY")[1]
    assert re.search(r"copy\S* = ", entry) is None, entry


@pytest.mark.parametrize("shape,out_shape", [((2, 5, 6, 1), (4, 7)), ((1, 9, 4, 1), (11, 3)),
                                             ((3, 1, 8, 1), (2, 5)), ((2, 4, 2, 1), (3, 5))])
@pytest.mark.parametrize("source", PAIR_SOURCES)
def test_row_pair_path_matches_four_tap_path(rng, shape, out_shape, source):
  image = jnp.asarray(rng.normal(size=shape), jnp.float32)
  theta = jnp.asarray(np.eye(2, 3) + 0.4 * rng.normal(size=(shape[0], 2, 3)), jnp.float32)
  grid = np.array(stnjax.affine_grid(theta, out_shape))
  grid[0, 0, :3] = [[np.inf, 0.0], [0.0, -np.inf], [np.nan, 0.5]]  # NaN is -1.
  cotangent = rng.normal(size=grid.shape[:-1] + (1,)).astype(np.float32)
  pairs, four_taps = row_pairs_and_four_taps(image, grid, cotangent, PAIR_SOURCES[source])
  for name, a, b in zip(("output", "d_image", "d_grid"), pairs, four_taps):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
    assert float(np.abs(a).max()) > 0.1, name
  # Really two programs: sums in another order. (The image cotangent is the
  # same scatter-add per tap on both paths.)
  assert not np.array_equal(pairs[0], four_taps[0])
  assert not np.array_equal(pairs[2], four_taps[2])


def test_image_pairs_need_two_columns(rng):
  # A pair read from the image is two pixels of one row; a one-column image
  # takes the four taps (the pair table, with its zero border, takes it too).
  image = rng.normal(size=(2, 5, 1, 1)).astype(np.float32)
  grid = rng.uniform(-1.5, 1.5, size=(2, 3, 4, 2)).astype(np.float32)
  assert not uses_row_pairs(image, grid, cpu_options=NO_KERNEL)
  assert uses_row_pairs(image, grid, cpu_options=PAIR_SOURCES["table"])
  cot = rng.normal(size=(2, 3, 4, 1)).astype(np.float32)
  got, ref = stnjax_and_torch_with_sharing(image, grid, cot, "none", align_corners=False)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared", ("none", "grid", "image"))
@pytest.mark.parametrize("source", PAIR_SOURCES)
def test_row_pair_borders(rng, shared, source):
  # The image pairs' clipped columns and masked rows, and the pair table's
  # zero border (top rows and left pairs clipped to [-2, H] and [-2, W]).
  # Sample every combination of positions around those bounds and the
  # image's edges, for a batch whose examples lie next to each other in
  # memory, and compare with the four-tap path (which masks each tap).
  # Pixels are in [1, 2], so any tap read in the wrong place shows.
  height, width = 4, 5
  images = rng.uniform(1, 2, size=(3, height, width, 1)).astype(np.float32)
  cols = np.array([-40, -3.5, -2.5, -1.75, -1.25, -0.5, 0.0, width - 1.5, width - 1.0,
                   width - 0.75, width - 0.25, width + 0.5, width + 1.5, width + 40])
  rows = np.array([-40, -3.5, -2.5, -1.75, -1.25, -0.5, 0.0, height - 1.5, height - 1.0,
                   height - 0.75, height - 0.25, height + 0.5, height + 1.5, height + 40])
  grid = pixel_grid(*np.meshgrid(cols, rows), width, height, False).astype(np.float32)
  grids = np.stack([grid, grid[::-1], grid[:, ::-1]])
  image, grid = {"none": (images, grids), "grid": (images, grid),
                 "image": (images[0], grids)}[shared]
  cotangent = rng.uniform(1, 2, size=grids.shape[:-1] + (1,)).astype(np.float32)
  pairs, four_taps = row_pairs_and_four_taps(image, grid, cotangent, PAIR_SOURCES[source])
  for name, a, b in zip(("output", "d_image", "d_grid"), pairs, four_taps):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
  out, d_image, d_grid = pairs
  assert (out == 0).mean() > 0.5 and out.max() > 1  # Mostly outside; some inside.
  corners = d_image.reshape(-1, height, width)[:, [0, -1]][:, :, [0, -1]]
  assert (corners != 0).all()  # The corners' taps pass through the border.
  assert (d_grid == 0).mean() > 0.3 and np.abs(d_grid).max() > 1


@pytest.mark.parametrize("source,padding_mode,align_corners", (
    ("image", "zeros", False), ("image", "reflection", True), ("table", "zeros", False)))
def test_row_pair_vjp_second_order(x64, rng, padding_mode, align_corners, source):
  # The row-pair VJP is itself differentiated for second order (no custom
  # rule below it): finite differences, then its chunked form and the
  # four-tap path (which has its own tests) must agree with it.
  image, grid, cot = smooth_case(rng, align_corners)
  image, cot = image[..., :1], cot[..., :1]
  options = PAIR_SOURCES[source]
  kwargs = dict(padding_mode=padding_mode, align_corners=align_corners)
  assert uses_row_pairs(image, grid, cpu_options=options, **kwargs)
  sample = jax.jit(functools.partial(sampling.grid_sample_with_options, cpu_options=options,
                                     **kwargs))
  check_grads(sample, (image, grid), order=2, modes=("rev",), eps=1e-6)

  def second_order(cpu_options):
    def grid_grad_sum(image, grid):
      loss = lambda g: jnp.sum(cot * sampling.grid_sample_with_options(
          image, g, cpu_options=cpu_options, **kwargs) ** 2)
      return jnp.sum(jax.grad(loss)(grid))
    return jax.jit(jax.grad(grid_grad_sum, argnums=(0, 1)))(image, grid)

  # Two chunks: never one piece, and at most half the batch's elements each.
  spec = _interp.Spec(image.shape[1:3], "bilinear", padding_mode, align_corners)
  half = cot[: len(cot) // 2].size
  chunks = options._replace(one_piece_bytes=0, single_channel_chunk_elements=half)
  assert _cpu_kernels.vjp_chunks(cot.reshape(len(cot), -1), spec, chunks) == 2
  whole = second_order(options)
  chunked = second_order(chunks)
  four_taps = second_order(chunks._replace(row_pairs=False))
  for a, b, c in zip(whole, chunked, four_taps):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)
    np.testing.assert_allclose(c, a, rtol=0, atol=1e-10)
    assert float(jnp.abs(a).max()) > 0.1


@pytest.mark.parametrize("source", PAIR_SOURCES)
def test_row_pair_path_reads_no_pixel_outside_the_taps(x64, source):
  # Every pixel but a 2x2 block (rows 1-2, the last two columns) and the
  # first column is inf. Taps left of column 0 or right of the last column
  # must read 0, not the neighbouring rows' pixels next to them in memory
  # (inf for row 0's last pixel, finite for the others).
  height, width = 4, 5
  image = np.full((height, width, 1), np.inf)
  image[1:3, -2:, 0] = [[1.0, 2.0], [3.0, 4.0]]
  image[:, 0, 0] = [5.0, 6.0, 7.0, 8.0]
  rows = np.array([1.25, 1.5, 2.0, 0.5])
  cols = np.array([width - 0.75, width - 1.5, -0.5, -0.25])  # Right, inside, left, left.
  grid = jnp.asarray(pixel_grid(cols, rows, width, height, False)[None])  # (1, 4, 2).
  options = PAIR_SOURCES[source]
  assert uses_row_pairs(image, grid, cpu_options=options)
  out = np.asarray(sampling.grid_sample_with_options(image, grid, cpu_options=options))[0, :, 0]
  expected = [0.75 * (0.75 * 2.0) + 0.25 * (0.75 * 4.0),  # Right column's taps only.
              0.5 * (1.5 + 3.5),  # Between the last two columns, rows 1 and 2.
              0.5 * 7.0,  # Column 0 at weight 0.5, row 2 only.
              0.5 * (0.75 * 5.0 + 0.75 * 6.0)]  # Rows 0 and 1 of column 0.
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


_SHARDED_SAMPLING = textwrap.dedent(r"""
    import re, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import stnjax
    assert jax.device_count() == 4, jax.devices()
    from stnjax import sampling
    options = sampling.CpuOptions(flat_batch={flat})
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    image = rng.normal(size=(8, 9, 10, 3)).astype(np.float32)
    theta = (np.eye(2, 3) + 0.2 * rng.normal(size=(8, 2, 3))).astype(np.float32)
    cot = rng.normal(size=(8, 7, 6, 3)).astype(np.float32)

    def sample_and_vjp(image, theta, cot):
      out, vjp = jax.vjp(lambda i, t: sampling.grid_sample_with_options(
          i, stnjax.affine_grid(t, (7, 6)), cpu_options=options), image, theta)
      return (out,) + vjp(cot)

    sharded = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (image, theta, cot)]
    hlo = jax.jit(sample_and_vjp).lower(*sharded).compile().as_text()
    collectives = re.findall(r"(all-gather|all-reduce|all-to-all|collective-permute"
                             r"|reduce-scatter)[-a-z]*\(", hlo)
    print("collectives:", collectives)
    for a, b in zip(jax.jit(sample_and_vjp)(*sharded), jax.jit(sample_and_vjp)(image, theta, cot)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
""")


@pytest.mark.parametrize("flat", (False, True))
def test_sharded_batch_is_sampled_where_it_lives(flat):
  # 4 CPU devices, batch sharded: the results equal one device's. The batched
  # form (accelerators) partitions with no collective at all; the flat form
  # (CPU) is correct but all-gathers the images.
  # Without the C++ kernels, which XLA runs on whole arrays (it gathers a
  # sharded batch first; inside `shard_map` each device runs them on its shard).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", STNJAX_CPU_KERNEL="0")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SAMPLING.format(flat=flat)],
                          check=True, env=env, capture_output=True, text=True, timeout=300)
  collectives = result.stdout.split("collectives:")[1]
  if flat:
    assert "all-gather" in collectives
  else:
    assert collectives.strip() == "[]"


def test_chunked_vjp_second_order_matches_unchunked(x64, rng):
  image, grid, cot = map(jnp.asarray, random_case(rng, ((6,), (5, 6), (4, 7), 3)))
  whole = second_order_grads(image, grid, cot)
  chunked = second_order_grads(image, grid, cot, CpuOptions(chunk_elements=200))
  for a, b in zip(chunked, whole):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
  assert float(jnp.abs(whole[1]).max()) > 0.1


@pytest.mark.parametrize("n,per_example,budget,expected", [
    (256, 3600, 2**18, 4),  # Needs 4 (3.5 rounded up); 4 divides 256.
    (256, 784, 2**18, 1),  # Fits in one piece.
    (100, 3600, 2**18, 2),  # 100 * 3600 needs 2 chunks of 50.
    (90, 3600, 2**18, 2),  # Needs 2 (1.24 rounded up).
    (97, 3600, 2**18, 1),  # Prime batch: no divisor within 2x of the need, one piece.
    (12, 10, 25, 6),  # Needs 5; 6 is the smallest divisor >= 5.
    (2, 300 * 300 * 3, 2**18, 2),  # Each example exceeds the budget: one chunk each.
    (5, 300, 250, 5),  # Needs 6 > 5 examples.
])
def test_num_chunks(n, per_example, budget, expected):
  assert _cpu_kernels.num_chunks(n, per_example, budget) == expected


@pytest.mark.parametrize("cotangent_shape,dtype,spatial,expected", [
    ((256, 42 * 42), np.float32, (42, 42), 1),  # 27.6 MiB in one piece: within the limit.
    ((256, 60 * 60), np.float32, (60, 60), 8),  # 56.2 MiB: chunks of <= 2**17 elements.
    ((256, 42 * 42), np.float64, (42, 42), 4),  # Twice the bytes: chunks of <= 2**17.
    ((256, 42 * 42, 3), np.float32, (42, 42), 8),  # Multi-channel: the element budget.
    ((256, 8 * 8 * 8), np.float32, (8, 8, 8), 1),  # Volumes: the element budget (fits).
    ((256, 12 * 12 * 12), np.float32, (12, 12, 12), 2),  # 3-D: the element budget, 2 chunks.
])
def test_cpu_vjp_chunks(cotangent_shape, dtype, spatial, expected):
  spec = _interp.Spec(spatial, "bilinear", "zeros", False)
  cotangent = np.empty(cotangent_shape, dtype)
  assert _cpu_kernels.vjp_chunks(cotangent, spec) == expected


# ---------------------------------------------------------------------------
# Transformations and batching.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ndim,mode,padding_mode,align_corners", [
    (2, "bilinear", "reflection", False), (3, "bilinear", "zeros", True)])
def test_jit_matches_eager(x64, rng, ndim, mode, padding_mode, align_corners):
  image, grid, cot = random_case(rng, SHAPES_2D if ndim == 2 else SHAPES_3D)
  fn = functools.partial(stnjax.grid_sample, mode=mode, padding_mode=padding_mode,
                         align_corners=align_corners)
  np.testing.assert_allclose(jax.jit(fn)(image, grid), fn(image, grid), rtol=0, atol=1e-12)

  def loss(fn, image, grid):
    return jnp.sum(cot * fn(image, grid))

  eager = jax.grad(loss, argnums=(1, 2))(fn, image, grid)
  jitted = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(fn, image, grid)
  for e, j in zip(eager, jitted):
    np.testing.assert_allclose(j, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_vmap_and_python_loop_match_batched_call(x64, rng, mode):
  image, grid, cot = random_case(rng)
  kwargs = dict(mode=mode, padding_mode="reflection")
  batched = stnjax.grid_sample(image, grid, **kwargs)
  assert batched.shape == (2, 4, 7, 3)
  single = functools.partial(stnjax.grid_sample, **kwargs)
  np.testing.assert_allclose(jax.jit(jax.vmap(single))(image, grid), batched, rtol=0, atol=1e-12)
  looped = np.stack([sample(image[b], grid[b], **kwargs) for b in range(2)])
  np.testing.assert_allclose(looped, batched, rtol=0, atol=1e-12)
  if mode == "bilinear":  # Gradients too.
    loss = lambda i, g, c: jnp.sum(c * single(i, g))  # noqa: E731
    batched_grads = jax.grad(loss, argnums=(0, 1))(image, grid, cot)
    vmapped_grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(image, grid, cot)
    for b, v in zip(batched_grads, vmapped_grads):
      np.testing.assert_allclose(v, b, rtol=0, atol=1e-12)


def test_vmap_and_loop_match_batched_call_3d(x64, rng):
  image, grid, _ = random_case(rng, SHAPES_3D)
  batched = stnjax.grid_sample(image, grid)
  assert batched.shape == (2, 2, 3, 4, 2)
  np.testing.assert_allclose(jax.jit(jax.vmap(stnjax.grid_sample))(image, grid), batched,
                             rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.stack([sample(image[b], grid[b]) for b in range(2)]), batched,
                             rtol=0, atol=1e-12)


def test_shared_grid_broadcasts_over_images(x64, rng):
  # (Its gradient, the sum over the batch, is checked against torch above.)
  image, grid, _ = random_case(rng)
  single = grid[0]  # No batch dims.
  kwargs = dict(mode="bicubic", padding_mode="border")
  out = stnjax.grid_sample(image, single, **kwargs)
  assert out.shape == (2, 4, 7, 3)
  np.testing.assert_allclose(out, stnjax.grid_sample(image, np.broadcast_to(single, grid.shape),
                                                     **kwargs), rtol=0, atol=1e-12)
  np.testing.assert_allclose(stnjax.grid_sample(image, single[None], **kwargs), out,
                             rtol=0, atol=1e-12)
  vmapped = jax.jit(jax.vmap(functools.partial(stnjax.grid_sample, **kwargs),
                             in_axes=(0, None)))(image, single)
  np.testing.assert_allclose(vmapped, out, rtol=0, atol=1e-12)


def test_shared_image_and_multiple_batch_dims_broadcast(rng):
  image = rng.normal(size=(2, 1, 5, 6, 3)).astype(np.float32)
  grid = rng.uniform(-1.5, 1.5, (1, 3, 4, 7, 2)).astype(np.float32)
  out = sample(image, grid, padding_mode="border")
  assert out.shape == (2, 3, 4, 7, 3)
  for a, b in itertools.product(range(2), range(3)):
    np.testing.assert_allclose(out[a, b], sample(image[a, 0], grid[0, b], padding_mode="border"),
                               rtol=0, atol=1e-6)
  # One image (no batch dims) shared by a batch of grids.
  out = sample(image[0, 0], grid[0])
  assert out.shape == (3, 4, 7, 3)
  np.testing.assert_allclose(out, np.stack([sample(image[0, 0], g) for g in grid[0]]),
                             rtol=0, atol=1e-6)
  # Batch dimensions of size 1 are kept.
  out = sample(image[:1], grid[:, :1])
  assert out.shape == (1, 1, 4, 7, 3)
  np.testing.assert_allclose(out[0, 0], sample(image[0, 0], grid[0, 0]), rtol=0, atol=1e-6)


def test_mismatched_batch_dims_raise():
  image = jnp.zeros((2, 5, 6, 1))
  grid = jnp.zeros((3, 4, 4, 2))
  with pytest.raises(ValueError, match=r"image.*\(2,\).*grid.*\(3,\)"):
    stnjax.grid_sample(image, grid)
  with pytest.raises(ValueError, match=r"image.*\(2, 3\).*grid.*\(4,\)"):
    stnjax.grid_sample(jnp.zeros((2, 3, 5, 6, 1)), jnp.zeros((4, 4, 4, 2)))


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_bad_ranks_raise():
  with pytest.raises(ValueError, match=r"image.*\(5, 6\)"):
    stnjax.grid_sample(jnp.zeros((5, 6)), jnp.zeros((4, 4, 2)))
  with pytest.raises(ValueError, match=r"grid.*\(4, 2\)"):
    stnjax.grid_sample(jnp.zeros((5, 6, 1)), jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match=r"image.*\(4, 5, 1\)"):  # 3-D grid, 2-D image.
    stnjax.grid_sample(jnp.zeros((4, 5, 1)), jnp.zeros((2, 2, 2, 3)))
  with pytest.raises(ValueError, match=r"grid.*\(2, 2, 3\)"):  # 3-D grid missing a dim.
    stnjax.grid_sample(jnp.zeros((3, 4, 5, 1)), jnp.zeros((2, 2, 3)))


@pytest.mark.parametrize("last", (1, 4))
def test_grid_last_axis_must_be_2_or_3(last):
  with pytest.raises(ValueError, match=rf"grid.*\(4, 4, {last}\)"):
    stnjax.grid_sample(jnp.zeros((5, 6, 1)), jnp.zeros((4, 4, last)))
  with pytest.raises(ValueError, match=r"grid.*\(\)"):
    stnjax.grid_sample(jnp.zeros((5, 6, 1)), jnp.zeros(()))


def test_unknown_mode_or_padding_raises():
  image, grid = jnp.zeros((5, 6, 1)), jnp.zeros((4, 4, 2))
  with pytest.raises(ValueError, match=r"mode.*'linear'"):
    stnjax.grid_sample(image, grid, mode="linear")
  with pytest.raises(ValueError, match=r"padding_mode.*'wrap'"):
    stnjax.grid_sample(image, grid, padding_mode="wrap")


def test_integer_inputs_raise_type_error():
  with pytest.raises(TypeError, match=r"grid.*int32.*\(4, 4, 2\)"):
    stnjax.grid_sample(jnp.zeros((5, 6, 1)), jnp.zeros((4, 4, 2), jnp.int32))
  with pytest.raises(TypeError, match=r"image.*int32.*\(5, 6, 1\)"):
    stnjax.grid_sample(jnp.zeros((5, 6, 1), jnp.int32), jnp.zeros((4, 4, 2)))


def test_empty_batch_output_or_channels_give_empty_output():
  cases = [((0, 6, 7, 2), (0, 4, 5, 2), (0, 4, 5, 2)),  # No examples.
           ((0, 6, 7, 2), (4, 5, 2), (0, 4, 5, 2)),  # No images, one shared grid.
           ((2, 6, 7, 0), (2, 4, 5, 2), (2, 4, 5, 0)),  # No channels.
           ((2, 6, 7, 3), (2, 0, 5, 2), (2, 0, 5, 3)),  # No output rows.
           ((0, 3, 4, 5, 1), (0, 2, 2, 2, 3), (0, 2, 2, 2, 1))]  # 3-D.
  for image_shape, grid_shape, out_shape in cases:
    image, grid = jnp.ones(image_shape), jnp.zeros(grid_shape)
    out = stnjax.grid_sample(image, grid)
    assert out.shape == out_shape and out.dtype == jnp.float32
    d_image, d_grid = jax.grad(lambda i, g: jnp.sum(stnjax.grid_sample(i, g)),
                               argnums=(0, 1))(image, grid)
    assert d_image.shape == image_shape and d_grid.shape == grid_shape
  with pytest.raises(ValueError, match=r"image.*empty spatial axis.*\(2, 0, 7, 3\)"):
    stnjax.grid_sample(jnp.zeros((2, 0, 7, 3)), jnp.zeros((2, 4, 5, 2)))


def test_bicubic_with_3d_grid_raises():
  with pytest.raises(ValueError, match=r"bicubic.*\(2, 2, 2, 3\)"):
    stnjax.grid_sample(jnp.zeros((3, 4, 5, 1)), jnp.zeros((2, 2, 2, 3)), mode="bicubic")
