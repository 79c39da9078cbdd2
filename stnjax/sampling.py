"""`grid_sample`: sample images at normalised coordinates, PyTorch-exact.

Conventions (the same as `torch.nn.functional.grid_sample`, but channels-last):

* Images are channels-last: `(H, W, C)` in 2-D, `(D, H, W, C)` in 3-D, with
  any number of leading batch dimensions.
* A grid holds one *source* coordinate per *output* pixel (a "pull", or
  backward, map): `out[i, j] = image(grid[i, j])`. The output's spatial shape
  is the grid's, so a transformer can down- or up-sample.
* The grid's last axis is `(x, y)` in 2-D and `(x, y, z)` in 3-D: **x indexes
  width (the last spatial axis), y height, z depth**, the reverse of the
  array's axis order.
* Coordinates are normalised to [-1, 1]. With `align_corners=True`, -1 and +1
  are the *centres* of the corner pixels: `x_pix = (x + 1) / 2 * (W - 1)`.
  With `align_corners=False` (the default, as in PyTorch >= 1.3), -1 and +1
  are the outer *edges* of the corner pixels: `x_pix = ((x + 1) * W - 1) / 2`.
  Pixel `j` has its centre at `x_pix = j`.
* Out-of-range coordinates follow `padding_mode`: `"zeros"` (each tap that
  falls outside contributes 0; weights are not renormalised), `"border"`
  (the coordinate is clipped to `[0, size - 1]`), `"reflection"` (reflected
  about the corner-pixel centres with `align_corners=True`, about the image
  edges otherwise, then clipped). With `mode="bicubic"`, padding is applied to
  each of the 16 taps, as in PyTorch.

Defined behaviour where PyTorch is inconsistent:

* A NaN grid coordinate is treated as -1 in every mode. (torch 2.13's 2-D
  CPU kernel does this only for bilinear and nearest with border/reflection
  padding, and returns NaN otherwise, or 0 for nearest with zeros padding;
  its 3-D kernel samples as if NaN were beyond the far edge.) Its gradient
  is 0.
* An infinite coordinate is treated as +-2**24 pixels (far outside the
  image; with reflection padding, reflected from there); PyTorch returns
  NaN for it. Finite coordinates, however large, give PyTorch's values
  (zeros and border padding clamp them to +-2**24 pixels, which changes
  neither value nor gradient there).
* The gradient of a clipped coordinate is 0 exactly at the bounds as well as
  beyond them (PyTorch's generic and CUDA kernels; reflection flips its sign).

Gradients are exact sub-gradients of the piecewise-polynomial kernels: the two
bilinear taps are `floor(x)` and `floor(x) + 1` (never `ceil`), so the gradient
with respect to the grid is non-zero at integer pixel positions; `nearest` has
zero gradient with respect to the grid. At an integer pixel position the
bilinear gradient is the one-sided difference towards `floor(x) + 1`; a
coordinate one rounding error below it gets the other side. The identity
transform puts its samples on pixel centres up to rounding, so there the
grid gradient can differ from PyTorch's at some points (PyTorch's grids
and unnormalisation round differently in the last bit; see the README).
Values gathered at taps outside the image are removed with `jnp.where`, so
inf/NaN pixels that are not taps never reach the output or its gradients.

Differentiation: `grid_sample` has a hand-written VJP (`jax.custom_vjp`),
so use reverse mode (`jax.grad`, `jax.vjp`, `jax.jacrev`); forward mode
(`jax.jvp`, `jax.jacfwd`, `jax.hessian`) raises a TypeError. The VJP is
written in differentiable `jnp`/`lax`, so reverse-over-reverse works to any
order (for a Hessian, use `jax.jacrev(jax.jacrev(f))`). It is tested against
autodiff of a plain reference implementation and against PyTorch.

Implementation notes (measured on a 2-core CPU, see `scripts/bench_sampler.py`):

* Batch dimensions are flattened to one: each tap is one gather over the
  whole batch. On accelerators the batch is the gather's batching dimension
  (`operand_batching_dims`), so a batch sharded across devices is sampled
  where it lives, with no collective (tested on 4 CPU devices). On CPU the
  example offset is folded into a flat index instead, which XLA:CPU
  scatters faster; a batch sharded across CPU devices is then all-gathered
  (correct, not free). The result equals `jax.vmap` of the single-example
  call (tested).
* The VJP recomputes the taps from `(image, grid)`: the grid cotangent is
  `<output cotangent, tap value>` times the analytic derivative of each tap
  weight, the image cotangent a scatter-add per tap. Nothing of size
  `(points, channels)` is kept from the forward pass.
* On CPU, single-channel 2-D bilinear sampling reads the two taps of each
  image row as one complex number from a table of adjacent-pixel pairs
  with a border of zeros (`_sample_row_pairs`): two gathers per point
  instead of four, and no masks. Its VJP reads the pairs the same way for
  the grid cotangent (`_row_pairs_coords_vjp`); the image cotangent is the
  generic scatter-add per tap.
* On CPU a large VJP runs over chunks of the batch (`lax.scan`): XLA:CPU
  materialises each tap's scatter updates, and fresh buffers of tens of MB
  cost more in page faults than the arithmetic (`_cpu_vjp_chunks` says
  when). Other platforms take the whole batch at once
  (`lax.platform_dependent`).
"""

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from stnjax import _batching
from stnjax import _checks
from stnjax import _fusion

MODES = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")

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


class _Spec(NamedTuple):
  """Static description of one `_interpolate` call (hashable, for `custom_vjp`)."""
  spatial: tuple[int, ...]  # Image spatial shape, array order ((D,) H, W).
  mode: str
  padding_mode: str
  align_corners: bool
  flat_batch: bool = False  # Gather/scatter with flat indices over the batch (see below).


class _Tap(NamedTuple):
  """One interpolation tap for every output point: arrays of shape `(G, P)`."""
  valid: jax.Array  # Whether the tap lies inside the image (else it contributes 0).
  index: jax.Array  # int32 pixel of the flattened image (clipped, so always in bounds).
  weight: jax.Array  # Interpolation weight.
  slopes: tuple[jax.Array, ...]  # d weight / d coordinate, one per array axis.


def _in_range(position: jax.Array, size: int) -> jax.Array:
  """`0 <= position < size` for int32 positions, as one unsigned compare (negatives wrap)."""
  return jax.lax.bitcast_convert_type(position, jnp.uint32) < size


def _axis_taps(coord: jax.Array, size: int, spec: _Spec):
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


def _taps(coords: tuple[jax.Array, ...], spec: _Spec) -> list[_Tap]:
  """All tap combinations: 4 (bilinear), 8 (trilinear), 16 (bicubic) or 1 (nearest)."""
  ndim = len(spec.spatial)
  strides = [math.prod(spec.spatial[a + 1:]) for a in range(ndim)]
  per_axis = [_axis_taps(coords[a], spec.spatial[a], spec) for a in range(ndim)]
  taps = []
  for combo in itertools.product(*(range(len(positions)) for positions, _, _ in per_axis)):
    valid, index = True, 0
    for a, t in enumerate(combo):
      position = per_axis[a][0][t]
      valid = valid & _in_range(position, spec.spatial[a])
      index = index + jnp.clip(position, 0, spec.spatial[a] - 1) * strides[a]
    weights = [per_axis[a][1][t] for a, t in enumerate(combo)]
    slopes = tuple(
        math.prod(per_axis[a][2][t] if b == a else w for b, w in enumerate(weights))
        for a, t in enumerate(combo))
    taps.append(_Tap(valid, index, math.prod(weights), slopes))
  return taps


# The core works on images flattened per example: `(N, S, C)`, or `(N, S)` for
# one channel, S = prod(spatial). Dropping a size-1 channel axis avoids layout
# copies that XLA:CPU inserts around gathers and scatters of `(..., 1)` arrays
# (a few ms per batch). N = 1 is an image shared by every grid. Otherwise each
# tap is one gather over the batch, in one of two equivalent forms:
#
# * batched (`operand_batching_dims`, accelerators): SPMD partitioning keeps
#   a batch sharded across devices where it lives, with no collective;
# * flat (CPU, `_CPU_FLAT_BATCH`): the example offset is folded into the
#   index of the `(N * S, C)` image. XLA:CPU scatters faster this way (image
#   + theta gradient of 256 28x28 images: 1.51 vs 1.82 ms in
#   scripts/bench_ablations.py), but a batch sharded across CPU devices is
#   all-gathered. Tests switch it off to run the batched form on CPU (the
#   chunked CPU VJP, `_grid_vjp_chunked`, is always flat).
_CPU_FLAT_BATCH = True


def _flat_index(index: jax.Array, size: int, first, count: int) -> jax.Array:
  """Pixel `index (G, P)` of examples `first + [0, count)` -> flat-image rows `(count, P)`."""
  return index + ((first + jnp.arange(count, dtype=jnp.int32)) * size)[:, None]


def _gather_rows(image: jax.Array, index: jax.Array, flat: bool, first=0,
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
      index = _flat_index(index, size, first, num_images if count is None else count)
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=offset_dims, collapsed_slice_dims=(0,), start_index_map=(0,))
    return jax.lax.gather(image.reshape((-1,) + window), index[..., None], dims, (1,) + window,
                          mode=mode)
  dims = jax.lax.GatherDimensionNumbers(
      offset_dims=offset_dims, collapsed_slice_dims=(1,), start_index_map=(1,),
      operand_batching_dims=(0,), start_indices_batching_dims=(0,))
  index = jnp.broadcast_to(index, (num_images, index.shape[1]))
  return jax.lax.gather(image, index[..., None], dims, (1, 1) + window, mode=mode)


def _scatter_add_rows(target: jax.Array, index: jax.Array, updates: jax.Array, flat: bool,
                      first=0) -> jax.Array:
  """The transpose of `_gather_rows`: adds `updates (M, P[, C])` to `target (N, S[, C])`."""
  num_images, size, window = target.shape[0], target.shape[1], target.shape[2:]
  mode = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
  update_window_dims = (2,) if window else ()
  index = jnp.broadcast_to(index, updates.shape[:2])
  if num_images == 1 or flat:  # Into the one shared image (every grid's taps), or the flat batch.
    if num_images > 1:
      index = _flat_index(index, size, first, updates.shape[0])
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


def _per_point(x: jax.Array, values: jax.Array) -> jax.Array:
  """Broadcasts a per-point `(G, P)` array against `values (G, P[, C])`."""
  return x[..., None] if values.ndim == 3 else x


def _sum_channels(arrays: list[jax.Array]) -> list[jax.Array]:
  """Sums each `(G, P, C)` array over C (`(G, P)` ones are returned as they are).

  One variadic reduction for all of them, which XLA:CPU's YNN reduction
  fusions do not claim (they re-gathered the tap values for every element
  when the VJP ran on a whole batch of 256 28x28x32 images). With the
  chunked VJP the gain over a `jnp.sum` per tap is nil to small: 1.00x and
  1.06x in two runs, theta gradient at 256x28x28x32
  (scripts/bench_ablations.py).
  """
  if arrays[0].ndim == 2:
    return arrays
  zero = jnp.zeros((), arrays[0].dtype)
  return list(jax.lax.reduce(tuple(arrays), (zero,) * len(arrays),
                             lambda a, b: tuple(x + y for x, y in zip(a, b)), (2,)))


def _uses_row_pairs(image: jax.Array, spec: _Spec) -> bool:
  """Whether CPU sampling takes `_sample_row_pairs`: 2-D bilinear, one channel, f32/f64.

  `spec.flat_batch` marks the CPU form (see `_interpolate`).
  """
  return (spec.flat_batch and spec.mode == "bilinear" and len(spec.spatial) == 2
          and image.ndim == 2 and image.dtype in (jnp.float32, jnp.float64))


def _row_pair_table(image: jax.Array, spec: _Spec) -> jax.Array:
  """The zero-bordered tables of horizontally adjacent pixel pairs, flat.

  `pairs[b, y + 2, x0 + 2] = image[b, y, x0] + i * image[b, y, x0 + 1]` for
  rows y in [-2, H + 1] and pairs x0 in [-2, W], pixels outside the image
  being 0: `(N, H * W)` real -> `(N * (H + 4) * (W + 3),)` complex64/128.
  Built in a loop of its own: fused into the gathers that read it, each read
  of a pair would be two loads again.
  """
  (height, width), n = spec.spatial, image.shape[0]
  pixels = image.reshape(n, height, width)
  pad = lambda left, right: jnp.pad(pixels, ((0, 0), (2, 2), (left, right)))
  return _fusion.own_loop_on_cpu(jax.lax.complex(pad(2, 1), pad(1, 2))).reshape(-1)


class _RowPairTaps(NamedTuple):
  """Where and how each output point reads the pair table: arrays of shape `(M, P)`."""
  index: jax.Array  # int32 flat table index of the top row's pair; the bottom row's is + W + 3.
  row_weights: tuple[jax.Array, jax.Array]  # The top and bottom row's weights.
  col_weights: tuple[jax.Array, jax.Array]  # The left and right pixel's weights.


def _row_pair_taps(coords, spec: _Spec, num_images: int, first=0,
                   count: int | None = None) -> _RowPairTaps:
  """The pair-table taps at pixel `coords` `(G, P)` (rows, columns) for examples `first + [0, M)`.

  M = `count` if given, else max(G, `num_images`). The top row and the left
  pair are clipped to y0 in [-2, H] and x0 in [-2, W]: a clipped row or pair
  lies outside the image, and so does the one it is moved to, which reads
  zeros. So no tap needs a mask, and the bottom row's pair is the top's
  plus one table row.
  """
  height, width = spec.spatial
  rows, cols = coords
  top, left = jnp.floor(rows), jnp.floor(cols)
  row_stride = width + 3
  index = ((jnp.clip(top.astype(jnp.int32), -2, height) + 2) * row_stride
           + jnp.clip(left.astype(jnp.int32), -2, width) + 2)
  if num_images > 1:  # Example b's table starts at b * (H + 4) * (W + 3).
    count = max(num_images, rows.shape[0]) if count is None else count
    index = _flat_index(index, (height + 4) * row_stride, first, count)
  return _RowPairTaps(index, (top + 1 - rows, rows - top), (left + 1 - cols, cols - left))


def _sample_row_pairs(image, coords, spec: _Spec):
  """Bilinear sampling of single-channel images with one gather per image row.

  For XLA:CPU, which emits each gathered element as a scalar load: the two
  taps of a row, `(y, x0)` and `(y, x0 + 1)`, are adjacent pixels, so they
  are read as one complex number from a table of horizontally adjacent pixel
  pairs (`_row_pair_table`). Two gathers per point instead of four. Each row
  contributes `Re(pair * (wy * wx0 - i * wy * wx1)) = wy * (wx0 * left + wx1 * right)`:
  one complex multiply, so that each gather has a single consumer and XLA
  fuses it into the sampler's loop. The values equal `_sample`'s to float
  round-off (the four products are summed in another order).

  The table has a border of zeros (pixels outside the image are 0), so no
  value needs a mask (`_row_pair_taps`). Against the previous table (pairs
  x0 in [-1, W - 1] only, and a select per row on the rows' and pair's
  bounds), 256 28x28 images: 1.14x and 1.15x faster pinned to one core,
  1.03x on two cores, where the loop is no longer most of the time
  (scripts/bench_ablations.py row 16). Against four taps, 1.46x on two
  cores, 1.37x on one (row 13, measured with the previous table and a flat
  output loop over `(N, P)`).

  Args:
    image: `(N, H * W)`, float32 or float64 (the table is complex64/128).
    coords: pixel-coordinate planes `(G, P)`, (rows, columns).
    spec: a 2-D bilinear spec with `flat_batch`.

  Returns:
    `(max(G, N), P)`.
  """
  pairs = _row_pair_table(image, spec).reshape(1, -1)  # One "image" holding every table.
  taps = _row_pair_taps(coords, spec, image.shape[0])
  (wx0, wx1), out = taps.col_weights, 0.0
  for dy, wy in enumerate(taps.row_weights):
    pair = _gather_rows(pairs, taps.index + dy * (spec.spatial[1] + 3), flat=False)
    out = out + jax.lax.real(pair * jax.lax.complex(wy * wx0, -(wy * wx1)))
  return out


def _row_pairs_coords_vjp(pairs, num_images, coords, cotangent, spec: _Spec, first=0):
  """The coordinate cotangent of `_sample_row_pairs`, for cotangent rows `first + [0, n)`.

  Args:
    pairs: the flat pair tables, `_row_pair_table(image)`.
    num_images: N, the number of images the tables hold.
    coords: pixel-coordinate planes `(G, P)` (rows, columns): the rows for
      these examples, or one shared row (G = 1).
    cotangent: `(n, P)`, the output cotangent of these examples.
    spec: as for `_sample_row_pairs`.
    first: index of the first example (may be traced).

  Returns:
    `(rows_bar, cols_bar)`, `(n, P)` each: per example, not yet summed
    over a shared grid.

  Two complex gathers per point instead of `_sample_vjp`'s four real ones. A
  row's pair `left + i * right` contributes `wy * (wx0 * left + wx1 * right)`
  to the output, with `wx0 = x0 + 1 - x`, `wx1 = x - x0` and `wy` likewise
  for the rows, so d out / d column = `sum_rows wy * (right - left)` and
  d out / d row = `wx0 * (left1 - left0) + wx1 * (right1 - right0)`.
  """
  taps = _row_pair_taps(coords, spec, num_images, first, cotangent.shape[0])
  (wx0, wx1), pairs = taps.col_weights, pairs.reshape(1, -1)
  top = _gather_rows(pairs, taps.index, flat=False)
  bottom = _gather_rows(pairs, taps.index + spec.spatial[1] + 3, flat=False)
  step = bottom - top
  rows_bar = cotangent * (wx0 * jax.lax.real(step) + wx1 * jax.lax.imag(step))
  cols_bar = cotangent * sum(wy * (jax.lax.imag(p) - jax.lax.real(p))
                             for wy, p in zip(taps.row_weights, (top, bottom)))
  return rows_bar, cols_bar


def _sample(image, coords, spec: _Spec):
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
  samples (a mean, an MSE, a vdot) split the sampler into one materialised
  array per tap: an MSE of 256 60x60 samples took 2.6x and 2.1x longer in
  two runs of scripts/bench_ablations.py, 2.7x on one core (up to 9x in
  one-off A/B runs, when the per-tap arrays were fresh memory). The other
  taps keep their masked values, which the VJP recomputes and XLA shares
  between the two.
  """
  taps = _taps(coords, spec)
  out = 0.0
  for i, tap in enumerate(taps):
    values = _gather_rows(image, tap.index, spec.flat_batch)
    valid, weight = _per_point(tap.valid, values), _per_point(tap.weight, values)
    if i < len(taps) - 1:
      out = out + weight * jnp.where(valid, values, 0)
    else:
      out = jnp.where(valid, out + weight * values, out)
  return out


def _sample_vjp(image, coords, cotangent, spec: _Spec, image_bar, first=0, pairs=None):
  """The VJP of `_sample` for cotangent rows `first + [0, len(cotangent))`.

  Args:
    image: `(N, S[, C])`, as in `_sample`.
    coords: coordinate planes `(G, P)`: the rows for these examples, or one
      shared row (G = 1).
    cotangent: `(n, P[, C])`, the output cotangent of these examples (all
      of them, n = max(G, N), unless `spec.flat_batch`).
    image_bar: `(N, S[, C])`, the image cotangent so far; this call's
      contribution is scatter-added to it.
    first: index of the first example (may be traced; flat indices only).
    pairs: on the row-pair path (`_uses_row_pairs`), the image's pair tables:
      the coordinate cotangent then reads two pairs per point instead of four
      pixels (`_row_pairs_coords_vjp`). The image cotangent is the same
      scatter-add per tap either way.

  Returns:
    `(image_bar, coords_bar)`, `coords_bar` shaped like `coords`.
  """
  taps = _taps(coords, spec)
  if spec.mode == "nearest":  # Piecewise constant: zero gradient for the coordinates.
    coords_bar = tuple(jnp.zeros_like(c) for c in coords)
  else:
    if pairs is not None:
      coords_bar = _row_pairs_coords_vjp(pairs, image.shape[0], coords, cotangent, spec, first)
    else:
      count = cotangent.shape[0]
      values = [jnp.where(_per_point(t.valid, cotangent),
                          _gather_rows(image, t.index, spec.flat_batch, first, count), 0)
                for t in taps]
      dots = _sum_channels([cotangent * v for v in values])  # <cotangent, tap value> per point.
      coords_bar = tuple(sum(dot * t.slopes[a] for dot, t in zip(dots, taps))
                         for a in range(len(coords)))
    # A coordinate shared by several images gets the sum of their cotangents.
    coords_bar = tuple(jnp.sum(bar, 0, keepdims=True) if c.shape[0] == 1 else bar
                       for bar, c in zip(coords_bar, coords))
  for t in taps:  # The transpose of a gather: scatter-add the weighted cotangent.
    updates = jnp.where(_per_point(t.valid, cotangent),
                        _per_point(t.weight, cotangent) * cotangent, 0)
    image_bar = _scatter_add_rows(image_bar, t.index, updates, spec.flat_batch, first)
  return image_bar, coords_bar


def _pixel_coordinates(grid: tuple[jax.Array, ...], spec: _Spec, with_slopes: bool = False):
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


def _grid_vjp(image, grid, cotangent, spec: _Spec, image_bar, first=0, pairs=None):
  """VJP of sampling `image (N, S[, C])` at grid planes `(G, P)`; cotangent rows `first + [0, n)`.

  Returns `image_bar` (with this call's contribution added) and the grid
  cotangent planes, shaped like `grid`. `pairs`: see `_sample_vjp`.
  """
  coords, slopes = _pixel_coordinates(grid, spec, with_slopes=True)
  image_bar, coords_bar = _sample_vjp(image, coords, cotangent, spec, image_bar, first, pairs)
  ndim = len(spec.spatial)
  return image_bar, tuple(coords_bar[ndim - 1 - k] * slopes[ndim - 1 - k] for k in range(ndim))


# On CPU the VJP runs over batch chunks of at most this many cotangent
# elements (points x channels). XLA:CPU materialises each tap's scatter
# updates and indices, and on a small machine fresh buffers of tens of MB cost
# more in page faults than the arithmetic: chunks keep them small and reused
# (scripts/bench_ablations.py, 256x60x60x1 image + theta gradient in one
# piece vs in chunks: 32.5 vs 14.8 ms and 24.6 vs 9.3 ms in two runs).
_CPU_CHUNK_ELEMENTS = 2**18

# Single-channel 2-D VJPs (e.g. an STN on its input image) get their own rule:
# - One piece while their temporaries would stay within this many bytes.
#   XLA's temporary allocation (`compiled.memory_analysis()`) for the image +
#   grid VJP in one piece is at most 16 words per point (15.2 to 15.5 in
#   float32, 13.2 to 13.5 in float64, at 28x28 to 60x60, with the row-pair
#   grid cotangent; 15 and 13 before it); larger pieces were slower through
#   allocator page faults (not with glibc's mmap and trim thresholds
#   raised), 60x60 in one piece (52.7 MiB) 2.4x (scripts/bench_ablations.py
#   row 3). At 256x42x42x1 one piece (25.8 MiB then) was 1.17x to 1.24x
#   faster than two chunks on two cores ("grad theta" 1.17x to 1.33x), 0.92x
#   to 1.00x on one. With the row-pair grid cotangent, one piece against 4
#   or 8 chunks: "grad theta" 1.38x faster, "grad both" 0.88x to 0.91x
#   (one-off A/B, docs/performance.md); theta-only is the common case (an
#   STN on its input), so 42x42 stays in one piece.
# - Above that, smaller chunks: at 256x60x60x1, 8 chunks instead of 4 are
#   1.13x faster on two cores and 1.14x on one ("grad theta" 0.99x).
# Multi-channel VJPs gain nothing from either (one piece 0.76x to 0.99x at 14
# to 22 MiB; half the element budget 0.95x to 1.01x), so they keep the
# element budget. docs/performance.md (chunk size) has the measurements.
_CPU_ONE_PIECE_BYTES = 28 * 2**20
_ONE_PIECE_WORDS_PER_POINT = 16
_CPU_SINGLE_CHANNEL_CHUNK_ELEMENTS = 2**17


def _cpu_vjp_chunks(cotangent, spec: _Spec) -> int:
  """How many batch chunks the CPU VJP for `cotangent (N, P[, C])` runs in."""
  n, elements_per_example = cotangent.shape[0], math.prod(cotangent.shape[1:])
  if cotangent.ndim > 2 or len(spec.spatial) != 2:
    return _num_chunks(n, elements_per_example, _CPU_CHUNK_ELEMENTS)
  one_piece_bytes = cotangent.size * _ONE_PIECE_WORDS_PER_POINT * cotangent.dtype.itemsize
  if one_piece_bytes <= _CPU_ONE_PIECE_BYTES:
    return 1
  return _num_chunks(n, elements_per_example, _CPU_SINGLE_CHANNEL_CHUNK_ELEMENTS)


def _num_chunks(n: int, elements_per_example: int, budget: int) -> int:
  """The fewest equal chunks of the n examples within `budget` elements (1: don't chunk).

  Examples larger than the budget get one chunk each.
  """
  needed = -(-n * elements_per_example // budget)
  if needed <= 1:
    return 1
  if needed >= n:
    return n
  chunks = next(d for d in range(needed, n + 1) if n % d == 0)
  return chunks if chunks <= 2 * needed else 1  # No good divisor: one piece.


def _grid_vjp_chunked(image, grid, cotangent, spec: _Spec, num_chunks: int, pairs=None):
  """`_grid_vjp` over `num_chunks` equal chunks of examples, in a `lax.scan`.

  CPU only, with flat indices (`spec.flat_batch`): every chunk scatter-adds
  into the one image cotangent carried through the loop (rows of chunk i
  start at example `i * chunk`), so no per-chunk buffer is stacked.
  """
  n = cotangent.shape[0]
  chunk = n // num_chunks
  grid_batched = grid[0].shape[0] > 1

  def body(carry, xs):
    image_bar, shared_grid_bar = carry
    first, part_grid, part_cotangent = xs
    image_bar, part_bar = _grid_vjp(image, grid if part_grid is None else part_grid,
                                    part_cotangent, spec, image_bar, first, pairs)
    if grid_batched:  # Per-example planes are stacked; a shared grid accumulates.
      return (image_bar, shared_grid_bar), part_bar
    return (image_bar, tuple(a + b for a, b in zip(shared_grid_bar, part_bar))), None

  xs = (jnp.arange(num_chunks, dtype=jnp.int32) * chunk,
        tuple(c.reshape(num_chunks, chunk, -1) for c in grid) if grid_batched else None,
        cotangent.reshape(num_chunks, chunk, *cotangent.shape[1:]))
  init = (jnp.zeros_like(image), tuple(jnp.zeros_like(c) for c in grid))
  (image_bar, grid_bar), stacked = jax.lax.scan(body, init, xs)
  if grid_batched:
    grid_bar = tuple(c.reshape(n, -1) for c in stacked)
  return image_bar, grid_bar


def _own_loop_1d(x: jax.Array) -> jax.Array:
  """`_fusion.own_loop_on_cpu(x)`, with the loop over `x` as one flat vector.

  A loop over `(N, P)` is followed by a copy: XLA:CPU lays out its reshape
  to `(N, H, W, 1)` with the size-1 channel axis major (`{2,1,0,3}`) and
  copies it to the result's layout. From a 1-D loop the reshape is a
  bitcast (256x28x28x1 forward: 1.11x on one core; scripts/bench_ablations.py
  row 15).
  """
  return _fusion.own_loop_on_cpu(x.reshape(-1)).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _interpolate(image, grid, spec: _Spec):
  """Samples `image (N, prod(spatial)[, C])` at normalised grid planes.

  `grid` holds `ndim` planes `(G, P)`, in grid-column order (x, y[, z]).
  Returns `(max(G, N), P[, C])` (no C for a single-channel image). The VJP is
  hand-written (see the module docstring); it is itself differentiable, so
  higher orders work.
  """
  coords = _pixel_coordinates(grid, spec)
  cpu_spec = spec._replace(flat_batch=_CPU_FLAT_BATCH)

  def cpu(image, coords):
    if not _uses_row_pairs(image, cpu_spec):
      return _sample(image, coords, cpu_spec)
    # Written from a loop of its own over the flat output. Fused into the
    # reshape to (..., H_out, W_out, 1), the loop runs over that shape:
    # XLA:CPU vectorises W_out in 8-lane steps and computes the rest of each
    # row (4 of 28 points) as scalars (256 28x28 images: 1.22x on two cores,
    # 1.17x on one; scripts/bench_ablations.py row 14).
    return _own_loop_1d(_sample_row_pairs(image, coords, cpu_spec))

  return jax.lax.platform_dependent(image, coords, cpu=cpu,
                                    default=functools.partial(_sample, spec=spec))


def _interpolate_fwd(image, grid, spec):
  return _interpolate(image, grid, spec), (image, grid)


def _vjp_pair_table(image, spec: _Spec):
  """On the row-pair path, the pair tables the VJP reads for the grid cotangent; else None."""
  return _row_pair_table(image, spec) if _uses_row_pairs(image, spec) else None


def _interpolate_bwd(spec, residuals, cotangent):
  image, grid = residuals
  num_chunks = _cpu_vjp_chunks(cotangent, spec)

  def whole(image, grid, cotangent):
    return _grid_vjp(image, grid, cotangent, spec, jnp.zeros_like(image))

  def cpu(image, grid, cotangent):
    # Every tap reads the cotangent (twice for bilinear): computed once, in
    # a loop of its own, rather than fused into and recomputed by each tap
    # (the STN tutorial's training step: 1.09x faster; see docs/performance.md).
    cotangent = _fusion.own_loop_on_cpu(cotangent)
    cpu_spec = spec._replace(flat_batch=_CPU_FLAT_BATCH)
    pairs = _vjp_pair_table(image, cpu_spec)
    if num_chunks == 1:
      return _grid_vjp(image, grid, cotangent, cpu_spec, jnp.zeros_like(image), pairs=pairs)
    return _grid_vjp_chunked(image, grid, cotangent, spec._replace(flat_batch=True), num_chunks,
                             pairs)

  # Chunking and flat indices pay on CPU only; accelerators take the whole
  # batch at once, with batched gathers and scatters.
  return jax.lax.platform_dependent(image, grid, cotangent, cpu=cpu, default=whole)


_interpolate.defvjp(_interpolate_fwd, _interpolate_bwd)


def _single_example_shapes(image: jax.Array, grid: jax.Array, mode: str) -> int:
  """Validates ranks; returns the number of spatial dimensions (2 or 3)."""
  if grid.ndim == 0 or grid.shape[-1] not in (2, 3):
    raise ValueError(f"`grid` must have last axis 2 (x, y) or 3 (x, y, z), got shape {grid.shape}.")
  ndim = grid.shape[-1]
  if grid.ndim < ndim + 1:
    raise ValueError(f"A {ndim}-D `grid` must have shape (..., {'D_out, ' if ndim == 3 else ''}"
                     f"H_out, W_out, {ndim}), got shape {grid.shape}.")
  if image.ndim < ndim + 1:
    layout = "(..., D, H, W, C)" if ndim == 3 else "(..., H, W, C)"
    raise ValueError(f"A grid with last axis {ndim} samples {ndim}-D images {layout} "
                     f"(channels last), but `image` has shape {image.shape}.")
  if mode == "bicubic" and ndim == 3:
    raise ValueError("`mode='bicubic'` is 2-D only (as in PyTorch); got a 3-D grid of shape "
                     f"{grid.shape}.")
  return ndim


def grid_sample(image: jax.Array, grid: jax.Array, *, mode: str = "bilinear",
                padding_mode: str = "zeros", align_corners: bool = False) -> jax.Array:
  """Samples `image` at the normalised source coordinates in `grid`.

  Matches `torch.nn.functional.grid_sample` (values and gradients) with
  channels-last layout. See the module docstring for the full conventions.
  Differentiable in reverse mode to any order (a custom VJP); forward mode
  (`jax.jvp`, `jax.jacfwd`) is not supported.

  Args:
    image: `(..., H, W, C)` (2-D) or `(..., D, H, W, C)` (3-D), floating point.
    grid: `(..., H_out, W_out, 2)` holding `(x, y)`, or
      `(..., D_out, H_out, W_out, 3)` holding `(x, y, z)`; floating point,
      normalised to [-1, 1]. Leading batch dimensions of `image` and `grid`
      broadcast against each other (one grid can serve a batch of images and
      vice versa).
    mode: `"bilinear"` (trilinear in 3-D), `"nearest"` or `"bicubic"` (2-D only).
    padding_mode: `"zeros"`, `"border"` or `"reflection"`.
    align_corners: whether -1/+1 are the centres (True) or outer edges
      (False) of the corner pixels.

  Returns:
    `(..., H_out, W_out, C)` or `(..., D_out, H_out, W_out, C)`, with the
    broadcast batch shape and dtype `result_type(image, grid)`.

  Examples:
    The identity grid returns the image (for either `align_corners`):

    >>> import jax.numpy as jnp, stnjax
    >>> image = jnp.arange(12.0).reshape(3, 4, 1)
    >>> grid = stnjax.affine_grid(jnp.eye(2, 3), (3, 4))
    >>> bool(jnp.allclose(stnjax.grid_sample(image, grid), image))
    True

    Sampling at pixel (row 1, column 2), i.e. x = column, y = row:

    >>> x = (2 + 0.5) / 4 * 2 - 1  # Pixel centre j is at (j + 0.5) / W * 2 - 1.
    >>> y = (1 + 0.5) / 3 * 2 - 1
    >>> stnjax.grid_sample(image, jnp.array([[[x, y]]]))[0, 0, 0]
    Array(6., dtype=float32)
  """
  image = jnp.asarray(image)
  grid = jnp.asarray(grid)
  if mode not in MODES:
    raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
  if padding_mode not in PADDING_MODES:
    raise ValueError(f"`padding_mode` must be one of {PADDING_MODES}, got {padding_mode!r}.")
  align_corners = _checks.static_bool(align_corners, "align_corners")
  if not jnp.issubdtype(grid.dtype, jnp.floating):
    raise TypeError(f"`grid` must be floating point, got dtype {grid.dtype} (shape {grid.shape}).")
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise TypeError(f"`image` must be floating point, got dtype {image.dtype} (shape "
                    f"{image.shape}); cast it first, e.g. `image.astype(jnp.float32)`.")
  ndim = _single_example_shapes(image, grid, mode)
  image_batch, (*spatial, channels) = _batching.split_batch(image, ndim + 1, "image")
  grid_batch, out_core = _batching.split_batch(grid, ndim + 1, "grid")
  batch = _batching.broadcast_batch({"image": image_batch, "grid": grid_batch})
  dtype = jnp.result_type(image.dtype, grid.dtype)
  if 0 in spatial:
    raise ValueError(f"`image` has an empty spatial axis: shape {image.shape}, spatial "
                     f"{tuple(spatial)}.")
  out_shape = batch + out_core[:-1] + (channels,)
  if math.prod(out_shape) == 0:  # An empty batch, output or channel axis: nothing to sample.
    return jnp.zeros(out_shape, dtype)

  # Flatten the batch: images to (N, prod(spatial), C), grids to (G, P, ndim).
  # An operand whose batch is all ones is shared (N or G = 1), not copied.
  n = math.prod(batch)
  num_images = 1 if math.prod(image_batch) == 1 else n
  if num_images > 1:
    image = jnp.broadcast_to(image, batch + image.shape[len(image_batch):])
  num_grids = 1 if math.prod(grid_batch) == 1 else n
  if num_grids > 1:
    grid = jnp.broadcast_to(grid, batch + out_core)
  image = image.astype(dtype).reshape((num_images, -1) + ((channels,) if channels > 1 else ()))
  grid = grid.astype(dtype).reshape(num_grids, -1, ndim)
  # Separate planes (see _sample). lax.split, whose transpose is a concatenate
  # that XLA folds into the grid's own stack; `grid[..., k]` transposes to
  # pads that XLA:CPU materialised.
  planes = tuple(p[..., 0] for p in jax.lax.split(grid, (1,) * ndim, axis=2))
  spec = _Spec(tuple(spatial), mode, padding_mode, align_corners)
  out = _interpolate(image, planes, spec)  # (max(G, N), P[, C])
  return out.reshape(out_shape)
