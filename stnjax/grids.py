"""Sampling grids: affine, projective and thin-plate-spline "pull" maps.

A grid maps each *output* pixel to the *source* coordinate it samples
(`grid_sample(image, grid)[i, j] = image(grid[i, j])`). Output pixels are
placed on the normalised base grid of `out_shape` exactly as
`torch.nn.functional.affine_grid` does:

* `align_corners=True`: `linspace(-1, 1, W_out)` (corner-pixel centres);
* `align_corners=False`: pixel centres `(2j + 1) / W_out - 1`;
* an axis of size 1 sits at 0 in both cases.

The last axis of every grid is `(x, y)` (2-D) or `(x, y, z)` (3-D): x runs
along width, y along height, z along depth. `out_shape` is spatial only and
in array order: `(H_out, W_out)` or `(D_out, H_out, W_out)`.

All functions take one transform and accept any number of leading batch
dimensions on it.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stnjax import _batching
from stnjax import _checks
from stnjax import _cpu_ffi

# Projective denominators with |w| below this are pushed to +-_PROJECTIVE_EPS.
_PROJECTIVE_EPS = 1e-6


def _check_out_shape(out_shape: Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
  names = "(D_out, H_out, W_out)" if ndim == 3 else "(H_out, W_out)"
  error = ValueError(f"`out_shape` must be a tuple of {ndim} positive integer sizes {names} "
                     f"for {what}, got {out_shape!r}.")
  try:
    sizes = tuple(out_shape)
  except TypeError:
    raise error from None
  if len(sizes) != ndim or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in sizes):
    raise error
  return tuple(int(s) for s in sizes)


def _check_float(x: jax.Array, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"`{name}` must be floating point, got dtype {x.dtype} (shape {x.shape}).")
  return x


def base_coordinates(size: int, align_corners: bool) -> np.ndarray:
  """Normalised coordinates of the `size` output pixels along one axis (float64 numpy)."""
  if size <= 1:
    return np.zeros((size,))
  line = np.linspace(-1.0, 1.0, size)
  return line if align_corners else line * (size - 1) / size


def base_grid(out_shape: Sequence[int], *, align_corners: bool = False) -> np.ndarray:
  """The identity grid `(*out_shape, ndim)`, last axis `(x, y[, z])` (float64 numpy)."""
  align_corners = _checks.static_bool(align_corners, "align_corners")
  axes = [base_coordinates(s, align_corners) for s in out_shape]
  mesh = np.meshgrid(*axes, indexing="ij")  # Array order (z,) y, x.
  return np.stack(mesh[::-1], axis=-1)  # Reverse to (x, y[, z]).


def _base_points(out_shape: tuple[int, ...], align_corners: bool, dtype) -> jax.Array:
  """The base grid as `(P, n + 1)` homogeneous rows `[x, y(, z), 1]`, built by XLA.

  Only the per-axis coordinates (`base_coordinates`, float64, a few values
  per output row or column) are made on the host, so a huge `out_shape`
  costs nothing until the grid is computed (e.g. under `jax.eval_shape`);
  the values are those of `base_grid` cast to `dtype`.
  """
  axes = [jnp.asarray(base_coordinates(s, align_corners), dtype) for s in out_shape]
  mesh = jnp.meshgrid(*axes, indexing="ij")[::-1]  # (x, y[, z]).
  points = [m.reshape(-1) for m in mesh] + [jnp.ones((math.prod(out_shape),), dtype)]
  return jnp.stack(points, axis=-1)


def _homogeneous(points: np.ndarray) -> np.ndarray:
  """`(..., n)` points -> `(P, n + 1)` rows `[p, 1]` (float64 numpy)."""
  points = points.reshape(-1, points.shape[-1])
  return np.concatenate([points, np.ones((len(points), 1))], axis=1)


def _apply_matrix(matrix: jax.Array, points: jax.Array) -> list[jax.Array]:
  """`matrix @ points.T` row by row: one `(P,)` plane per row of `matrix (m, k)`.

  `points` is `(P, k)`: homogeneous points (k = n + 1) for affine and
  projective grids, the TPS basis (k = K control points) for TPS grids. Each
  row is its own matrix-vector product, so under `vmap` it becomes one plain
  `(batch, k) @ (k, P)` GEMM whose gradient is again a GEMM. Broadcast
  multiply-adds make the theta gradient a reduction on XLA:CPU (about 3x
  slower), a batched einsum a slow batched matmul, and one GEMM for all
  rows with the rows sliced out after a slower warp (docs/performance.md,
  "Grids").
  """
  return [jnp.dot(matrix[i], points.T, precision=jax.lax.Precision.HIGHEST)
          for i in range(matrix.shape[0])]


def affine_grid(theta: jax.Array, out_shape: Sequence[int], *,
                align_corners: bool = False) -> jax.Array:
  """Affine sampling grid, as `torch.nn.functional.affine_grid`.

  `source = theta @ [x_t, y_t, 1]` for every output coordinate `(x_t, y_t)`
  of the base grid (`[x_t, y_t, z_t, 1]` in 3-D). `theta` is expressed in
  normalised coordinates, so the identity `jnp.eye(2, 3)` returns the image
  for any output size.

  Args:
    theta: `(..., 2, 3)` for 2-D or `(..., 3, 4)` for 3-D.
    out_shape: `(H_out, W_out)` or `(D_out, H_out, W_out)`.
    align_corners: see the module docstring.

  Returns:
    `(..., H_out, W_out, 2)` or `(..., D_out, H_out, W_out, 3)`.

  Example:
    >>> import jax.numpy as jnp, stnjax
    >>> stnjax.affine_grid(jnp.eye(2, 3), (1, 3), align_corners=True)[0, :, 0]
    Array([-1.,  0.,  1.], dtype=float32)
  """
  theta = _check_float(theta, "theta")
  if theta.ndim < 2 or theta.shape[-2:] not in ((2, 3), (3, 4)):
    raise ValueError(f"`theta` must have shape (..., 2, 3) or (..., 3, 4), got {theta.shape}.")
  ndim = theta.shape[-2]
  out_shape = _check_out_shape(out_shape, ndim, f"a theta of shape {theta.shape}")
  align_corners = _checks.static_bool(align_corners, "align_corners")
  one = lambda t: _affine_grid_one(t, out_shape, align_corners)
  return _batching.batched_apply(one, (theta,), (2,), ("theta",))


def _affine_grid_gemm(theta: jax.Array, out_shape: tuple[int, ...],
                      align_corners: bool) -> jax.Array:
  """One affine grid `(*out_shape, ndim)` as `_apply_matrix`'s GEMMs."""
  base = _base_points(out_shape, align_corners, theta.dtype)
  return jnp.stack(_apply_matrix(theta, base), axis=-1).reshape(out_shape + (len(out_shape),))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _affine_grid_one(theta: jax.Array, out_shape: tuple[int, ...],
                     align_corners: bool) -> jax.Array:
  """One affine grid of `theta (ndim, ndim + 1)`.

  A 2-D float32 grid on CPU is the C++ kernel's (`_cpu_ffi.affine_grid`,
  which writes it once; docs/performance.md, "Grids"), elsewhere
  `_affine_grid_gemm`. The tangent, and so the gradient, is always the GEMM.
  """
  gemm = functools.partial(_affine_grid_gemm, out_shape=out_shape, align_corners=align_corners)
  if not _cpu_ffi.affine_applies(theta):
    return gemm(theta)
  xs, ys = (base_coordinates(size, align_corners) for size in out_shape[::-1])
  return jax.lax.platform_dependent(
      theta, cpu=lambda t: _cpu_ffi.affine_grid(t, xs, ys), default=gemm)


@_affine_grid_one.defjvp
def _affine_grid_one_jvp(out_shape, align_corners, primals, tangents):
  (theta,), (theta_dot,) = primals, tangents
  return (_affine_grid_one(theta, out_shape, align_corners),
          _affine_grid_gemm(theta_dot, out_shape, align_corners))


def projective_grid(homography: jax.Array, out_shape: Sequence[int], *,
                    align_corners: bool = False) -> jax.Array:
  """Projective (homography) sampling grid.

  `[u, v, w] = homography @ [x_t, y_t, 1]`, source `(u / w, v / w)`, all in
  normalised coordinates. Safe divide: where `|w| < 1e-6` the denominator is
  replaced by `+-1e-6` (sign of w, + at 0), so points on or near the horizon
  map far outside the image instead of producing inf/NaN, and their gradient
  with respect to w is 0. Points with w < 0 (behind the camera) are sampled
  like any other point. `homography = [[theta], [0, 0, 1]]` equals
  `affine_grid(theta)`.

  Args:
    homography: `(..., 3, 3)`.
    out_shape: `(H_out, W_out)`.
    align_corners: see the module docstring.

  Returns:
    `(..., H_out, W_out, 2)`.
  """
  homography = _check_float(homography, "homography")
  if homography.ndim < 2 or homography.shape[-2:] != (3, 3):
    raise ValueError(f"`homography` must have shape (..., 3, 3), got {homography.shape}.")
  out_shape = _check_out_shape(out_shape, 2, "a projective grid")
  base = _base_points(out_shape, _checks.static_bool(align_corners, "align_corners"),
                      homography.dtype)

  def one(h):
    u, v, w = _apply_matrix(h, base)
    safe_w = jnp.where(jnp.abs(w) < _PROJECTIVE_EPS,
                       jnp.where(w < 0, -_PROJECTIVE_EPS, _PROJECTIVE_EPS), w)
    return jnp.stack([u / safe_w, v / safe_w], axis=-1).reshape(out_shape + (2,))

  return _batching.batched_apply(one, (homography,), (2,), ("homography",))


def tps_kernel(r2):
  """Thin-plate-spline radial basis `U = r^2 log r^2` of squared distance `r2`.

  NaN-safe at r = 0 for values and gradients (U(0) = 0, U'(0) = 0) via the
  double-`where` trick. Works on numpy (float64 precomputation) and jax arrays.
  """
  xp = np if isinstance(r2, np.ndarray) else jnp
  positive = r2 > 0
  safe = xp.where(positive, r2, 1.0)
  return xp.where(positive, safe * xp.log(safe), 0.0)


def tps_control_points(k: int) -> np.ndarray:
  """The regular `k x k` lattice of TPS control points, `(k * k, 2)` as `(x, y)`.

  Points span [-1, 1] in both axes, x varying fastest (row-major in y, x).
  Passing these to `tps_grid` gives the identity grid. `k = 4` (16 points)
  is the paper's TPS.
  """
  if k < 2:
    raise ValueError(f"A TPS lattice needs k >= 2 points per side, got k={k}.")
  line = np.linspace(-1.0, 1.0, k)
  y, x = np.meshgrid(line, line, indexing="ij")
  return np.stack([x.ravel(), y.ravel()], axis=-1)


@functools.lru_cache(maxsize=64)
def _tps_basis(k: int, out_shape: tuple[int, int], align_corners: bool) -> np.ndarray:
  """`(H_out * W_out, k * k)` float64 matrix B with `grid = B @ control_points`.

  The TPS through the lattice points `c_i` with values `v_i`:
  `f(t) = a_0 + a_x x + a_y y + sum_i w_i U(|t - c_i|^2)`, where
  `[[K, P], [P^T, 0]] [w; a] = [v; 0]`. The system depends on the lattice
  only, so it is solved once here; `f` is then linear in the values `v`.
  """
  centers = tps_control_points(k)
  n = len(centers)
  p = np.concatenate([np.ones((n, 1)), centers], axis=1)  # (n, 3)
  kernel = tps_kernel(((centers[:, None] - centers[None]) ** 2).sum(-1))
  system = np.block([[kernel, p], [p.T, np.zeros((3, 3))]])
  inverse = np.linalg.inv(system)[:, :n]  # Maps values v (padded with zeros) to [w; a].
  targets = base_grid(out_shape, align_corners=align_corners).reshape(-1, 2)
  features = np.concatenate([
      tps_kernel(((targets[:, None] - centers[None]) ** 2).sum(-1)),
      np.ones((len(targets), 1)), targets], axis=1)  # (HW, n + 3)
  return features @ inverse


def tps_grid(control_points: jax.Array, out_shape: Sequence[int], *,
             align_corners: bool = False) -> jax.Array:
  """Thin-plate-spline sampling grid with control points on a regular lattice.

  The output's `k x k` lattice points (`tps_control_points(k)`, in the
  output's normalised coordinates) sample from `control_points` in the input;
  every other output pixel follows the thin-plate spline through those
  `k * k` correspondences. `control_points = tps_control_points(k)` gives the
  identity grid. The spline system is solved once per (lattice, out_shape,
  align_corners) in float64 and cached, so the grid is one matrix product
  (linear in `control_points`; gradients never evaluate the kernel).

  Args:
    control_points: `(..., k * k, 2)` source positions `(x, y)`, normalised,
      in the lattice order of `tps_control_points(k)` (x fastest).
    out_shape: `(H_out, W_out)`.
    align_corners: see the module docstring.

  Returns:
    `(..., H_out, W_out, 2)`.
  """
  control_points = _check_float(control_points, "control_points")
  if control_points.ndim < 2 or control_points.shape[-1] != 2:
    raise ValueError(f"`control_points` must have shape (..., K, 2), got {control_points.shape}.")
  n = control_points.shape[-2]
  k = int(round(n ** 0.5))
  if k * k != n or k < 2:
    raise ValueError(f"`control_points` must hold k * k (k >= 2) points of a regular lattice, "
                     f"got {n} points (shape {control_points.shape}).")
  out_shape = _check_out_shape(out_shape, 2, "a TPS grid")
  align_corners = _checks.static_bool(align_corners, "align_corners")
  basis = jnp.asarray(_tps_basis(k, out_shape, align_corners), control_points.dtype)

  def one(points):
    return jnp.stack(_apply_matrix(points.T, basis), axis=-1).reshape(out_shape + (2,))

  return _batching.batched_apply(one, (control_points,), (2,), ("control_points",))
