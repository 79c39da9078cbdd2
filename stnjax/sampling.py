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

Implementation: batch dimensions are flattened to one, so each tap is one
gather over the whole batch, and the VJP recomputes the taps from
`(image, grid)` rather than keeping anything of size `(points, channels)`
from the forward pass. The interpolation itself is `stnjax._interp`; on CPU,
`lax.platform_dependent` takes the paths of `stnjax._cpu_kernels` instead
(C++ kernels for single-channel bilinear float32 sampling and its VJP, whose
own VJP is the `jnp` one, so higher orders still work; flat gather indices,
row pairs for one channel, a chunked VJP), which give the same values to
float round-off (tested). docs/sampler.md and docs/performance.md say more.
"""

import functools
import math

import jax
import jax.numpy as jnp

from stnjax import _batching
from stnjax import _checks
from stnjax import _cpu_kernels
from stnjax import _interp
from stnjax._cpu_kernels import CpuOptions
from stnjax._interp import unnormalize

MODES = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _interpolate(image, grid, spec: _interp.Spec, options: CpuOptions):
  """Samples `image (N, prod(spatial)[, C])` at the normalised `grid (G, P, ndim)`.

  Returns `(max(G, N), P[, C])` (no C for a single-channel image). The VJP is
  hand-written (see the module docstring); it is itself differentiable, so
  higher orders work. `options` tunes the CPU paths only.
  """
  def default(image, grid):
    return _interp.sample(image, _interp.pixel_coordinates(_interp.grid_planes(grid), spec), spec)

  return jax.lax.platform_dependent(
      image, grid, cpu=functools.partial(_cpu_kernels.forward, spec=spec, options=options),
      default=default)


def _interpolate_fwd(image, grid, spec, options):
  return _interpolate(image, grid, spec, options), (image, grid)


def _interpolate_bwd(spec, options, residuals, cotangent):
  image, grid = residuals

  def whole(image, grid, cotangent):  # Accelerators: the whole batch, batched gathers.
    image_bar, planes_bar = _interp.grid_vjp(image, _interp.grid_planes(grid), cotangent, spec,
                                             jnp.zeros_like(image))
    return image_bar, jnp.stack(planes_bar, axis=-1)

  cpu = functools.partial(_cpu_kernels.backward, spec=spec, options=options)
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
  return grid_sample_with_options(image, grid, mode=mode, padding_mode=padding_mode,
                                  align_corners=align_corners)


def grid_sample_with_options(image: jax.Array, grid: jax.Array, *, mode: str = "bilinear",
                             padding_mode: str = "zeros", align_corners: bool = False,
                             cpu_options: CpuOptions = _cpu_kernels.DEFAULT_OPTIONS
                             ) -> jax.Array:
  """`grid_sample` with explicit CPU paths and sizes (`_cpu_kernels.CpuOptions`).

  For tests and benchmarks: every option gives the same values to float
  round-off; only the speed on CPU changes. Other platforms ignore them.
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
  spec = _interp.Spec(tuple(spatial), mode, padding_mode, align_corners)
  out = _interpolate(image, grid, spec, cpu_options)  # (max(G, N), P[, C])
  return out.reshape(out_shape)
