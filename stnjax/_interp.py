"""Interpolation internals shared by every platform's `grid_sample`.

Pure functions on images flattened per example, `(N, S, C)` or `(N, S)` for
one channel (S = prod(spatial); dropping a size-1 channel axis avoids the
layout copies XLA:CPU inserts around gathers of `(..., 1)` arrays), and on
grids split into one coordinate plane `(G, P)` per axis. N = 1 (G = 1) is an
image (a grid) shared by the whole batch. Each tap is one gather over the
batch, in one of two equivalent forms chosen by `Spec.flat_batch`:

* batched (`operand_batching_dims`, the default off CPU): SPMD partitioning
  keeps a batch sharded across devices where it lives, with no collective;
* flat (CPU): the example offset is folded into the index of the
  `(N * S, C)` image, which XLA:CPU scatters faster (`flat_batch` in
  `python -m scripts.bench.bench_ablations`), but a batch sharded across CPU
  devices is then all-gathered.

The padding, clipping and cubic rules follow PyTorch's
`aten/src/ATen/native/GridSampler.h`; docs/sampler.md states the conventions.
"""

import functools
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

_CUBIC_A = -0.75  # PyTorch's (and OpenCV's) cubic convolution constant.
# Pixel coordinates are clamped to +-_FAR (float32 integers are exact up to here).
_FAR = float(2**24)


def unnormalize(coord: jax.Array, size: int, align_corners: bool) -> jax.Array:
  """Maps normalised coordinates in [-1, 1] to pixel coordinates (pixel j's centre is j)."""
  if align_corners:
    return (coord + 1) / 2 * (size - 1)
  return ((coord + 1) * size - 1) / 2


def _clip(coord: jax.Array, size: int) -> jax.Array:
  """Clips to [0, size - 1]; gradient 1 strictly inside, 0 at and beyond the bounds."""
  hi = size - 1
  return jnp.where(coord <= 0, 0.0, jnp.where(coord >= hi, float(hi), coord)).astype(coord.dtype)


def _reflect(coord: jax.Array, twice_low: int, twice_high: int) -> jax.Array:
  """Reflects about [twice_low / 2, twice_high / 2] (PyTorch's `reflect_coordinates`)."""
  if twice_low == twice_high:
    return jnp.zeros_like(coord)
  low = twice_low / 2
  span = (twice_high - twice_low) / 2
  coord = coord - low
  coord = jnp.where(coord < 0, -coord, coord)  # abs with gradient -1/+1, +1 at 0 (as PyTorch).
  extra = jnp.fmod(coord, span)
  flips = jnp.floor(coord / span)
  return jnp.where(flips % 2 == 0, extra + low, span - extra + low)


def _pad(coord: jax.Array, size: int, padding_mode: str, align_corners: bool) -> jax.Array:
  """Applies `padding_mode` to pixel coordinates (zeros: unchanged; taps are masked later)."""
  if padding_mode == "border":
    return _clip(coord, size)
  if padding_mode == "reflection":
    if align_corners:
      coord = _reflect(coord, 0, 2 * (size - 1))
    else:
      coord = _reflect(coord, -1, 2 * size - 1)
    return _clip(coord, size)
  return coord


def _cubic_weights(t: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
  """Cubic-convolution weights (and their derivatives in t) of the taps at offsets -1, 0, 1, 2."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  def d_near(x):
    return (3 * (a + 2) * x - 2 * (a + 3)) * x

  def d_far(x):
    return (3 * a * x - 10 * a) * x + 8 * a

  weights = [far(t + 1), near(t), near(1 - t), far(2 - t)]
  derivatives = [d_far(t + 1), d_near(t), -d_near(1 - t), -d_far(2 - t)]
  return weights, derivatives


class Spec(NamedTuple):
  """Static description of one `_interpolate` call (hashable, for `custom_vjp`)."""
  spatial: tuple[int, ...]  # Image spatial shape, array order ((D,) H, W).
  mode: str
  padding_mode: str
  align_corners: bool
  flat_batch: bool = False  # Gather/scatter with flat indices over the batch (module doc).


class Tap(NamedTuple):
  """One interpolation tap for every output point: arrays of shape `(G, P)`."""
  valid: jax.Array  # Whether the tap lies inside the image (else it contributes 0).
  index: jax.Array  # int32 pixel of the flattened image (clipped, so always in bounds).
  weight: jax.Array  # Interpolation weight.
  slopes: tuple[jax.Array, ...]  # d weight / d coordinate, one per array axis.


def in_range(position: jax.Array, size: int) -> jax.Array:
  """`0 <= position < size` for int32 positions, as one unsigned compare (negatives wrap)."""
  return jax.lax.bitcast_convert_type(position, jnp.uint32) < size


def _axis_taps(coord: jax.Array, size: int, spec: Spec):
  """Taps along one array axis.

  Args:
    coord: pixel coordinates along this axis (finite; clamped to +-_FAR
      unless reflected); already padded for bilinear/nearest, raw for
      bicubic (which pads each tap).
    size: the image's size along this axis.

  Returns:
    Lists (one entry per tap) of int32 positions, weights and weight
    derivatives d weight / d coord.
  """
  if spec.mode == "nearest":
    position = jnp.round(coord)  # Rounds half to even, like std::nearbyint.
    return [position.astype(jnp.int32)], [jnp.ones_like(coord)], [jnp.zeros_like(coord)]
  base = jnp.floor(coord)
  if spec.mode == "bilinear":
    one = jnp.ones_like(coord)
    first = base.astype(jnp.int32)
    return [first, first + 1], [base + 1 - coord, coord - base], [-one, one]
  weights, derivatives = _cubic_weights(coord - base)
  positions = [_pad(base + offset, size, spec.padding_mode, spec.align_corners).astype(jnp.int32)
               for offset in (-1, 0, 1, 2)]
  return positions, weights, derivatives


def make_taps(coords: tuple[jax.Array, ...], spec: Spec) -> list[Tap]:
  """All tap combinations: 4 (bilinear), 8 (trilinear), 16 (bicubic) or 1 (nearest)."""
  ndim = len(spec.spatial)
  strides = [math.prod(spec.spatial[a + 1:]) for a in range(ndim)]
  per_axis = [_axis_taps(coords[a], spec.spatial[a], spec) for a in range(ndim)]
  taps = []
  for combo in itertools.product(*(range(len(positions)) for positions, _, _ in per_axis)):
    valid, index = True, 0
    for a, t in enumerate(combo):
      position = per_axis[a][0][t]
      valid = valid & in_range(position, spec.spatial[a])
      index = index + jnp.clip(position, 0, spec.spatial[a] - 1) * strides[a]
    weights = [per_axis[a][1][t] for a, t in enumerate(combo)]
    slopes = tuple(
        math.prod(per_axis[a][2][t] if b == a else w for b, w in enumerate(weights))
        for a, t in enumerate(combo))
    taps.append(Tap(valid, index, math.prod(weights), slopes))
  return taps





def flat_index(index: jax.Array, size: int, first, count: int) -> jax.Array:
  """Pixel `index (G, P)` of examples `first + [0, count)` -> flat-image rows `(count, P)`."""
  return index + ((first + jnp.arange(count, dtype=jnp.int32)) * size)[:, None]


def gather_rows(image: jax.Array, index: jax.Array, flat: bool, first=0,
                 count: int | None = None) -> jax.Array:
  """`image[b, index[b]]` for in-bounds `index (G, P)`: `(M, P, C)` (`(M, P)` from `(N, S)`).

  M = max(G, N); G and N are equal or one of them is 1. With `flat`, the
  taps may be for `count` examples `first, first + 1, ...` only (`first`
  may be traced; the chunked VJP): then M = count.
  """
  num_images, size, window = image.shape[0], image.shape[1], image.shape[2:]
  mode = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
  offset_dims = (2,) if window else ()
  if num_images == 1 or flat:  # A plain gather from one image, or from the flat batch.
    if num_images > 1:
      index = flat_index(index, size, first, num_images if count is None else count)
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=offset_dims, collapsed_slice_dims=(0,), start_index_map=(0,))
    return jax.lax.gather(image.reshape((-1,) + window), index[..., None], dims, (1,) + window,
                          mode=mode)
  dims = jax.lax.GatherDimensionNumbers(
      offset_dims=offset_dims, collapsed_slice_dims=(1,), start_index_map=(1,),
      operand_batching_dims=(0,), start_indices_batching_dims=(0,))
  index = jnp.broadcast_to(index, (num_images, index.shape[1]))
  return jax.lax.gather(image, index[..., None], dims, (1, 1) + window, mode=mode)


def scatter_add_rows(target: jax.Array, index: jax.Array, updates: jax.Array, flat: bool,
                      first=0) -> jax.Array:
  """The transpose of `gather_rows`: adds `updates (M, P[, C])` to `target (N, S[, C])`."""
  num_images, size, window = target.shape[0], target.shape[1], target.shape[2:]
  mode = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
  update_window_dims = (2,) if window else ()
  index = jnp.broadcast_to(index, updates.shape[:2])
  if num_images == 1 or flat:  # Into the one shared image (every grid's taps), or the flat batch.
    if num_images > 1:
      index = flat_index(index, size, first, updates.shape[0])
    dims = jax.lax.ScatterDimensionNumbers(
        update_window_dims=update_window_dims, inserted_window_dims=(0,),
        scatter_dims_to_operand_dims=(0,))
    return jax.lax.scatter_add(target.reshape((-1,) + window), index[..., None], updates, dims,
                               mode=mode).reshape(target.shape)
  dims = jax.lax.ScatterDimensionNumbers(
      update_window_dims=update_window_dims, inserted_window_dims=(1,),
      scatter_dims_to_operand_dims=(1,), operand_batching_dims=(0,),
      scatter_indices_batching_dims=(0,))
  return jax.lax.scatter_add(target, index[..., None], updates, dims, mode=mode)


def per_point(x: jax.Array, values: jax.Array) -> jax.Array:
  """Broadcasts a per-point `(G, P)` array against `values (G, P[, C])`."""
  return x[..., None] if values.ndim == 3 else x


def sum_channels(arrays: list[jax.Array]) -> list[jax.Array]:
  """Sums each `(G, P, C)` array over C (`(G, P)` ones are returned as they are).

  One variadic reduction for all of them: XLA:CPU's reduction fusions do not
  claim it, so the tap values are not re-gathered for every channel (a
  `jnp.sum` per tap was no faster; docs/performance.md).
  """
  if arrays[0].ndim == 2:
    return arrays
  zero = jnp.zeros((), arrays[0].dtype)
  return list(jax.lax.reduce(tuple(arrays), (zero,) * len(arrays),
                             lambda a, b: tuple(x + y for x, y in zip(a, b)), (2,)))


def sample(image, coords, spec: Spec):
  """Interpolates flattened images at pixel `coords`.

  Args:
    image: `(N, prod(spatial), C)`, or `(N, prod(spatial))` for one channel.
    coords: `ndim` planes `(G, P)`, one per array axis (array order), G = 1 or
      N (any G when N = 1). Kept as separate planes: interleaved `(..., ndim)`
      coordinates made XLA:CPU emit slow fusions.
    spec: the sampling spec.

  Returns:
    `(max(G, N), P[, C])`.

  The last tap is added through a select, `where(valid, out + w * v, out)`,
  the others as `w * where(valid, v, 0)` (the same values). XLA:CPU's YNN
  reduction fusions take in the elementwise producers of a reduction but
  stop at a select: with every tap's value masked, a loss that reduces the
  samples (a mean, an MSE, a vdot) splits the sampler into one materialised
  array per tap (about 2x slower; docs/performance.md). The other taps keep
  their masked values, which the VJP recomputes and XLA shares between the
  two.
  """
  taps = make_taps(coords, spec)
  out = 0.0
  for i, tap in enumerate(taps):
    values = gather_rows(image, tap.index, spec.flat_batch)
    valid, weight = per_point(tap.valid, values), per_point(tap.weight, values)
    if i < len(taps) - 1:
      out = out + weight * jnp.where(valid, values, 0)
    else:
      out = jnp.where(valid, out + weight * values, out)
  return out


def sample_vjp(image, coords, cotangent, spec: Spec, image_bar, first=0,
               coords_vjp: Callable | None = None):
  """The VJP of `sample` for cotangent rows `first + [0, len(cotangent))`.

  Args:
    image: `(N, S[, C])`, as in `sample`.
    coords: coordinate planes `(G, P)`: the rows for these examples, or one
      shared row (G = 1).
    cotangent: `(n, P[, C])`, the output cotangent of these examples (all
      of them, n = max(G, N), unless `spec.flat_batch`).
    image_bar: `(N, S[, C])`, the image cotangent so far; this call's
      contribution is scatter-added to it.
    first: index of the first example (may be traced; flat indices only).
    coords_vjp: an optional `(coords, cotangent, first) -> coords_bar` that
      computes the coordinate cotangent (per example, before the sum over a
      shared grid) another way; the CPU row-pair path passes one. The image
      cotangent is the same scatter-add per tap either way.

  Returns:
    `(image_bar, coords_bar)`, `coords_bar` shaped like `coords`.
  """
  taps = make_taps(coords, spec)
  if spec.mode == "nearest":  # Piecewise constant: zero gradient for the coordinates.
    coords_bar = tuple(jnp.zeros_like(c) for c in coords)
  else:
    if coords_vjp is not None:
      coords_bar = coords_vjp(coords, cotangent, first)
    else:
      count = cotangent.shape[0]
      values = [jnp.where(per_point(t.valid, cotangent),
                          gather_rows(image, t.index, spec.flat_batch, first, count), 0)
                for t in taps]
      dots = sum_channels([cotangent * v for v in values])  # <cotangent, tap value> per point.
      coords_bar = tuple(sum(dot * t.slopes[a] for dot, t in zip(dots, taps))
                         for a in range(len(coords)))
    # A coordinate shared by several images gets the sum of their cotangents.
    coords_bar = tuple(jnp.sum(bar, 0, keepdims=True) if c.shape[0] == 1 else bar
                       for bar, c in zip(coords_bar, coords))
  for t in taps:  # The transpose of a gather: scatter-add the weighted cotangent.
    updates = jnp.where(per_point(t.valid, cotangent),
                        per_point(t.weight, cotangent) * cotangent, 0)
    image_bar = scatter_add_rows(image_bar, t.index, updates, spec.flat_batch, first)
  return image_bar, coords_bar


def grid_planes(grid: jax.Array) -> tuple[jax.Array, ...]:
  """`grid (G, P, ndim)` -> `ndim` planes `(G, P)`, in grid-column order (x, y[, z]).

  `lax.split`: under a second derivative its transpose is a concatenate,
  which XLA folds into the grid's own stack; `grid[..., k]` transposes to
  pads that XLA:CPU materialised.
  """
  return tuple(p[..., 0] for p in jax.lax.split(grid, (1,) * grid.shape[-1], axis=2))


def pixel_coordinates(grid: tuple[jax.Array, ...], spec: Spec, with_slopes: bool = False):
  """Normalised grid planes -> pixel-coordinate planes, one per array axis.

  Args:
    grid: `ndim` planes `(G, P)` in grid-column order `(x, y[, z])`.
    spec: the sampling spec.
    with_slopes: also return each plane's elementwise derivative
      d pixel / d grid (the JVP with unit tangent, so the clip and reflection
      rules are exactly those of autodiff).

  Maps NaN to -1, unnormalises, clamps to +-_FAR (reflection: replaces
  +-inf by +-_FAR) and applies the padding (bicubic pads each tap instead).
  Returns planes in array-axis order.
  """
  ndim = len(spec.spatial)

  def to_pixels(c, size):
    c = jnp.where(jnp.isnan(c), -1.0, c)
    c = unnormalize(c, size, spec.align_corners)
    if spec.padding_mode == "reflection":
      # Reflection brings every finite coordinate (and every bicubic tap) into
      # the image, as PyTorch's does; only +-inf are replaced, by +-_FAR.
      c = jnp.nan_to_num(c, posinf=_FAR, neginf=-_FAR)
    else:  # Zeros and border give the same at +-_FAR as anywhere beyond it.
      c = jnp.clip(c, -_FAR, _FAR)
    if spec.mode != "bicubic":
      c = _pad(c, size, spec.padding_mode, spec.align_corners)
    return c

  coords, slopes = [], []
  for a, size in enumerate(spec.spatial):
    c = grid[ndim - 1 - a]  # Grid column k is the coordinate along array axis ndim - 1 - k.
    if with_slopes:
      c, slope = jax.jvp(functools.partial(to_pixels, size=size), (c,), (jnp.ones_like(c),))
      slopes.append(slope)
    else:
      c = to_pixels(c, size)
    coords.append(c)
  return (tuple(coords), tuple(slopes)) if with_slopes else tuple(coords)


def grid_vjp(image, grid, cotangent, spec: Spec, image_bar, first=0,
             coords_vjp: Callable | None = None):
  """VJP of sampling `image (N, S[, C])` at grid planes `(G, P)`; cotangent rows `first + [0, n)`.

  Returns `image_bar` (with this call's contribution added) and the grid
  cotangent planes, shaped like `grid`. `coords_vjp`: see `sample_vjp`.
  """
  coords, slopes = pixel_coordinates(grid, spec, with_slopes=True)
  image_bar, coords_bar = sample_vjp(image, coords, cotangent, spec, image_bar, first, coords_vjp)
  ndim = len(spec.spatial)
  return image_bar, tuple(coords_bar[ndim - 1 - k] * slopes[ndim - 1 - k] for k in range(ndim))
