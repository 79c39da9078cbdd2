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

* A NaN grid coordinate is treated as -1 in every mode. (PyTorch's 2-D CPU
  kernel does this only with border/reflection padding; with zeros padding,
  bicubic mode, or in 3-D it returns NaN.) Its gradient is 0.
* Coordinates are clamped to +-2**24 pixels (so +-inf are simply far outside
  the image) before padding; PyTorch returns NaN for an infinite coordinate.
* The gradient of a clipped coordinate is 0 exactly at the bounds as well as
  beyond them (PyTorch's generic and CUDA kernels; reflection flips its sign).

Gradients are exact sub-gradients of the piecewise-polynomial kernels: the two
bilinear taps are `floor(x)` and `floor(x) + 1` (never `ceil`), so the gradient
with respect to the grid is non-zero at integer pixel positions; `nearest` has
zero gradient with respect to the grid. Values gathered at taps outside the
image are removed with `jnp.where`, so inf/NaN pixels that are not taps never
reach the output or its gradients. All derivatives come from JAX autodiff
(any order, forward or reverse mode).
"""

import functools
import math

import jax
import jax.numpy as jnp

from stnjax import _batching

MODES = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")

_CUBIC_A = -0.75  # PyTorch's (and OpenCV's) cubic convolution constant.
_FAR = float(2**24)  # Pixel coordinates are clamped to +-_FAR (float32 integers are exact up to here).


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


def _cubic_weights(t: jax.Array) -> jax.Array:
  """Cubic-convolution weights of the taps at offsets -1, 0, 1, 2 for fraction `t`."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _axis_taps(coord, size, mode, padding_mode, align_corners):
  """Taps along one array axis.

  Args:
    coord: normalised coordinates `(P,)` along this axis.
    size: the image's size along this axis.

  Returns:
    `(index, weight, valid)`, each `(P, T)` with T = 1, 2 or 4 taps: the
    clamped integer pixel index of each tap, its interpolation weight, and
    whether it lies inside the image (taps outside contribute 0).
  """
  coord = jnp.clip(unnormalize(coord, size, align_corners), -_FAR, _FAR)
  if mode == "bicubic":
    base = jnp.floor(coord)
    weight = _cubic_weights(coord - base)
    position = _pad(base[:, None] + jnp.arange(-1.0, 3.0, dtype=coord.dtype), size,
                    padding_mode, align_corners)
  else:
    coord = _pad(coord, size, padding_mode, align_corners)
    if mode == "nearest":
      position = jnp.round(coord)[:, None]  # Rounds half to even, like std::nearbyint.
      weight = jnp.ones_like(position)
    else:
      base = jnp.floor(coord)
      position = jnp.stack([base, base + 1], axis=-1)
      weight = jnp.stack([base + 1 - coord, coord - base], axis=-1)
  valid = (position >= 0) & (position <= size - 1)
  index = jnp.clip(position, 0, size - 1).astype(jnp.int32)
  return index, weight, valid


def _sample_one(image: jax.Array, grid: jax.Array, *, mode: str, padding_mode: str,
                align_corners: bool) -> jax.Array:
  """`grid_sample` for one image `(*spatial, C)` and one grid `(*out_spatial, ndim)`."""
  spatial, channels = image.shape[:-1], image.shape[-1]
  ndim = len(spatial)
  out_spatial = grid.shape[:-1]
  coords = grid.reshape(-1, ndim)
  coords = jnp.where(jnp.isnan(coords), -1.0, coords).astype(coords.dtype)

  # Combine the per-axis taps into (P, T) flat indices, weights and masks.
  # Grid column k is the coordinate along array axis ndim - 1 - k.
  strides = [math.prod(spatial[axis + 1:]) for axis in range(ndim)]
  flat_index = flat_weight = flat_valid = None
  for axis in range(ndim):
    index, weight, valid = _axis_taps(coords[:, ndim - 1 - axis], spatial[axis], mode,
                                      padding_mode, align_corners)
    index = index * strides[axis]
    if flat_index is None:
      flat_index, flat_weight, flat_valid = index, weight, valid
    else:
      p = index.shape[0]
      flat_index = (flat_index[:, :, None] + index[:, None, :]).reshape(p, -1)
      flat_weight = (flat_weight[:, :, None] * weight[:, None, :]).reshape(p, -1)
      flat_valid = (flat_valid[:, :, None] & valid[:, None, :]).reshape(p, -1)

  values = image.reshape(-1, channels).at[flat_index].get(mode="promise_in_bounds")  # (P, T, C)
  values = jnp.where(flat_valid[..., None], values, 0)
  flat_weight = jnp.where(flat_valid, flat_weight, 0)
  out = jnp.einsum("pt,ptc->pc", flat_weight.astype(values.dtype), values)
  return out.reshape(out_spatial + (channels,))


def grid_sample(image: jax.Array, grid: jax.Array, *, mode: str = "bilinear",
                padding_mode: str = "zeros", align_corners: bool = False) -> jax.Array:
  """Samples `image` at the normalised source coordinates in `grid`.

  Matches `torch.nn.functional.grid_sample` (values and gradients) with
  channels-last layout. See the module docstring for the full conventions.

  Args:
    image: `(..., H, W, C)` (2-D) or `(..., D, H, W, C)` (3-D), floating point.
    grid: `(..., H_out, W_out, 2)` holding `(x, y)`, or
      `(..., D_out, H_out, W_out, 3)` holding `(x, y, z)`; floating point,
      normalised to [-1, 1]. Leading batch dimensions of `image` and `grid`
      broadcast against each other.
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

    >>> x = (2 + 0.5) / 4 * 2 - 1  # Pixel centre j is at ((j + 0.5) / W) * 2 - 1.
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
  if not jnp.issubdtype(grid.dtype, jnp.floating):
    raise TypeError(f"`grid` must be floating point, got dtype {grid.dtype} (shape {grid.shape}).")
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise TypeError(f"`image` must be floating point, got dtype {image.dtype} (shape "
                    f"{image.shape}); cast it first, e.g. `image.astype(jnp.float32)`.")
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
  dtype = jnp.result_type(image.dtype, grid.dtype)
  fn = functools.partial(_sample_one, mode=mode, padding_mode=padding_mode,
                         align_corners=align_corners)
  return _batching.batched_apply(fn, (image.astype(dtype), grid.astype(dtype)),
                                 (ndim + 1, ndim + 1), ("image", "grid"))
