"""Transform parameterisations: build `theta` / homographies from few parameters.

All matrices act on normalised coordinates and are *pull* maps (output
coordinate -> source coordinate), the convention of `affine_grid`. Hence a
scale `s < 1` samples a smaller window of the input: it *zooms in* (the
content appears magnified by 1/s), and a translation `tx > 0` moves the
sampling window right, so the content appears to move *left*.

Angles are in radians. With x to the right and y *down* (array rows), a
positive angle turns the sampling grid clockwise on screen, so the content
appears rotated counter-clockwise: `rts_theta(pi / 2, 1, 0, 0)` equals
`jnp.rot90` on a square image.

Scalar arguments broadcast against each other (any leading shape).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stnjax import _batching
from stnjax import grids

# Parameterisations understood by `identity_params` and `transform_grid`.
TRANSFORMS = ("affine", "projective", "tps", "attention", "rts")
TPS_LATTICE = 4  # The default TPS: 4 x 4 = 16 control points.


def _broadcast_params(**params) -> list[jax.Array]:
  """Float arrays broadcast to one shape; the error names each argument and its shape."""
  arrays = {k: jnp.asarray(v, jnp.result_type(float, v)) for k, v in params.items()}
  shape = _batching.broadcast_batch({k: a.shape for k, a in arrays.items()},
                                    what="The parameters' shapes", label="")
  return [jnp.broadcast_to(a, shape) for a in arrays.values()]


def identity_theta(ndim: int = 2, dtype=jnp.float32) -> jax.Array:
  """The identity affine matrix, `(2, 3)` or `(3, 4)`."""
  return jnp.eye(ndim, ndim + 1, dtype=dtype)


def attention_theta(scale: jax.Array, tx: jax.Array, ty: jax.Array) -> jax.Array:
  """The paper's attention transform `[[s, 0, tx], [0, s, ty]]`: isotropic scale + translation.

  Args:
    scale, tx, ty: arrays broadcasting to a common shape `S`.

  Returns:
    `S + (2, 3)`.
  """
  scale, tx, ty = _broadcast_params(scale=scale, tx=tx, ty=ty)
  zero = jnp.zeros_like(scale)
  return jnp.stack([jnp.stack([scale, zero, tx], -1), jnp.stack([zero, scale, ty], -1)], -2)


def rts_theta(angle: jax.Array, scale: jax.Array, tx: jax.Array, ty: jax.Array) -> jax.Array:
  """Rotation-scale-translation `[[s cos a, -s sin a, tx], [s sin a, s cos a, ty]]`.

  Args:
    angle: radians (see the module docstring for the direction).
    scale, tx, ty: as in `attention_theta`.

  Returns:
    `S + (2, 3)` for the broadcast shape `S` of the arguments.
  """
  angle, scale, tx, ty = _broadcast_params(angle=angle, scale=scale, tx=tx, ty=ty)
  cos, sin = scale * jnp.cos(angle), scale * jnp.sin(angle)
  return jnp.stack([jnp.stack([cos, -sin, tx], -1), jnp.stack([sin, cos, ty], -1)], -2)


def affine_to_homography(theta: jax.Array) -> jax.Array:
  """`(..., 2, 3)` affine -> `(..., 3, 3)` homography with last row `[0, 0, 1]`."""
  theta = jnp.asarray(theta)
  if theta.ndim < 2 or theta.shape[-2:] != (2, 3):
    raise ValueError(f"`theta` must have shape (..., 2, 3), got {theta.shape}.")
  last = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0], theta.dtype), theta.shape[:-2] + (1, 3))
  return jnp.concatenate([theta, last], axis=-2)


def homography_from_points(target: jax.Array, source: jax.Array) -> jax.Array:
  """The homography mapping 4 `target` points onto 4 `source` points (pull map).

  Solves the 8x8 direct linear system with `h_33 = 1`. Feed the result to
  `projective_grid`: output pixels at `target[i]` then sample the input at
  `source[i]`. Points are `(x, y)`, normalised.

  Args:
    target: `(..., 4, 2)` points in the output.
    source: `(..., 4, 2)` where they sample the input. The leading batch
      dimensions of `target` and `source` broadcast against each other (e.g.
      the image corners `(4, 2)` as targets for a batch of sources).

  Returns:
    `(..., 3, 3)`, with the broadcast batch shape.
  """
  target, source = jnp.asarray(target), jnp.asarray(source)
  if target.shape[-2:] != (4, 2) or source.shape[-2:] != (4, 2):
    raise ValueError(f"`target` and `source` must have shape (..., 4, 2), got {target.shape} "
                     f"and {source.shape}.")
  batch = _batching.broadcast_batch({"target": target.shape[:-2], "source": source.shape[:-2]})
  target = jnp.broadcast_to(target, batch + (4, 2))
  source = jnp.broadcast_to(source, batch + (4, 2))
  x, y = target[..., 0], target[..., 1]
  u, v = source[..., 0], source[..., 1]
  one, zero = jnp.ones_like(x), jnp.zeros_like(x)
  rows_u = jnp.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
  rows_v = jnp.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
  system = jnp.concatenate([rows_u, rows_v], axis=-2)  # (..., 8, 8)
  rhs = jnp.concatenate([u, v], axis=-1)
  h = _solve(system, rhs)
  return jnp.concatenate([h, jnp.ones_like(h[..., :1])], -1).reshape(h.shape[:-1] + (3, 3))


def _solve(a: jax.Array, b: jax.Array) -> jax.Array:
  """`x` with `a @ x = b` for `(..., n, n)`, `(..., n)`: Gaussian elimination with partial pivoting.

  Written out in `jnp` rather than `jnp.linalg.solve`, whose CPU LAPACK call
  hangs a jitted program sharded over several CPU devices (the P training
  batches of a data-parallel run; tests/test_transforms.py). Same pivoting
  as LAPACK's LU, so as stable; differentiable through its arithmetic.
  """
  n = a.shape[-1]
  rows = jnp.broadcast_to(jnp.arange(n), a.shape[:-1])
  m = jnp.concatenate([a, b[..., None]], axis=-1)  # The augmented matrix.
  for col in range(n):
    pivot = jnp.argmax(jnp.abs(m[..., col:, col]), axis=-1)[..., None] + col
    swap = jnp.where(rows == col, pivot, jnp.where(rows == pivot, col, rows))
    m = jnp.take_along_axis(m, swap[..., None], axis=-2)
    pivot_row = m[..., col, :] / m[..., col, col, None]
    m = m - m[..., :, col, None] * pivot_row[..., None, :]  # Clears the column, pivot row too.
    m = m.at[..., col, :].set(pivot_row)
  return m[..., n]


def corners(dtype=np.float32) -> np.ndarray:
  """The 4 image corners `(x, y)` in normalised coordinates, `(4, 2)`: TL, TR, BR, BL."""
  return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype)


def identity_params(transform: str, *, tps_lattice: int = TPS_LATTICE) -> np.ndarray:
  """The flat identity parameters of `transform` (float32 numpy, see the module table)."""
  if transform == "affine":
    p = np.eye(2, 3).ravel()
  elif transform == "projective":
    p = np.eye(3).ravel()[:8]
  elif transform == "tps":
    p = grids.tps_control_points(tps_lattice).ravel()
  elif transform == "attention":
    p = np.array([1.0, 0.0, 0.0])
  elif transform == "rts":
    p = np.array([0.0, 1.0, 0.0, 0.0])
  else:
    raise ValueError(f"`transform` must be one of {TRANSFORMS}, got {transform!r}.")
  return p.astype(np.float32)


def transform_grid(transform: str, params: jax.Array, out_shape: Sequence[int], *,
                   align_corners: bool = False) -> jax.Array:
  """Sampling grid `(..., H_out, W_out, 2)` from flat parameters `(..., P)` of `transform`.

  The parameterisations (a spatial transformer's regression outputs, per example):

  =============  ======  =========================================================
  transform      params  meaning / identity
  =============  ======  =========================================================
  "affine"       6       `theta (2, 3)` row-major; identity `eye(2, 3)`
  "projective"   8       the homography's first 8 entries row-major, `h_33 = 1`
                         fixed (the projective group has 8 degrees of freedom);
                         identity `eye(3)[:8]`
  "tps"          2K      K source control points `(x, y)`, by default the 4x4
                         lattice (`tps_control_points(4)`, x fastest, 32 params);
                         identity = the lattice itself
  "attention"    3       `(s, tx, ty)`: isotropic scale + translation; identity
                         (1, 0, 0)
  "rts"          4       `(angle, s, tx, ty)` (radians); identity (0, 1, 0, 0)
  =============  ======  =========================================================

  Leading batch dimensions of `params` (any, sizes 1 included) are the grid's.
  """
  params = jnp.asarray(params)
  size = identity_params(transform).size if transform != "tps" else None
  if transform == "tps":
    if params.shape[-1] % 2:
      raise ValueError(f"`params` of a TPS transform must hold (x, y) pairs, got {params.shape}.")
    points = params.reshape(params.shape[:-1] + (params.shape[-1] // 2, 2))
    return grids.tps_grid(points, out_shape, align_corners=align_corners)
  if transform not in TRANSFORMS:
    raise ValueError(f"`transform` must be one of {TRANSFORMS}, got {transform!r}.")
  if params.shape[-1:] != (size,):
    raise ValueError(f"`params` of a {transform!r} transform must have shape (..., {size}), "
                     f"got {params.shape}.")
  if transform == "projective":
    h = jnp.concatenate([params, jnp.ones_like(params[..., :1])], axis=-1)
    return grids.projective_grid(h.reshape(h.shape[:-1] + (3, 3)), out_shape,
                                 align_corners=align_corners)
  if transform == "affine":
    theta = params.reshape(params.shape[:-1] + (2, 3))
  elif transform == "attention":
    theta = attention_theta(params[..., 0], params[..., 1], params[..., 2])
  else:  # rts
    theta = rts_theta(params[..., 0], params[..., 1], params[..., 2], params[..., 3])
  return grids.affine_grid(theta, out_shape, align_corners=align_corners)
