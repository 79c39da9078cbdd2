"""CPU-only kernels of `grid_sample`, and the options that tune them.

XLA:CPU emits each gathered element as a scalar load, materialises every
scatter's updates and every gather read by more than one loop, and fuses an
elementwise producer into each of its consumers. On CPU only (other
platforms take `_interp` as it is, through `lax.platform_dependent` in
`sampling`), single-channel 2-D bilinear float32 sampling with zeros or
border padding, its values and its VJP, is C++ kernels with hardware
gathers (`_cpu_ffi`), where they are available; everywhere else three
`jnp` paths work around XLA:CPU:

* row pairs: single-channel 2-D bilinear sampling reads the two taps of an
  image row with one index computation, in the forward pass and for the
  grid cotangent: from the image itself, with the image's borders folded
  into the weights (one loop), or as one complex number from a table of
  adjacent-pixel pairs (`pair_table`; a second loop, which builds the table);
* chunked VJP: a large VJP runs over chunks of the batch in a `lax.scan`,
  so that its scatter buffers stay small and reused instead of fresh pages;
* fusion boundaries (`own_loop_on_cpu`): values that fused loops would
  recompute (the VJP's cotangent, the pair table), materialise (the row
  pairs' grid cotangent) or slow down (the row-pair output, a
  single-channel convolution in `layers`) get a loop of their own.

Every choice is a field of `CpuOptions`, passed down as a static argument;
`python -m scripts.bench.bench_ablations` times each against its
alternative, and docs/performance.md explains them.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from stnjax import _cpu_ffi
from stnjax import _interp as interp


class CpuOptions(NamedTuple):
  """Which CPU paths `grid_sample` takes, and their sizes (hashable: a static argument).

  The defaults are what `stnjax.grid_sample` uses; tests and benchmarks pass
  others to `sampling.grid_sample_with_options`.
  """
  # The C++ kernels for single-channel 2-D bilinear float32 sampling with
  # zeros or border padding (`_cpu_ffi`), where they are available: "auto"
  # (the best instruction set the CPU has), a cap ("avx512", "avx2",
  # "scalar"), or "off" (the jnp paths below).
  sampler_kernel: str = "auto"
  # The VJP from the C++ kernels too (with `sampler_kernel`), else the jnp VJP.
  vjp_kernel: bool = True
  # Gather/scatter with the example offset folded into a flat index (else
  # the accelerators' batched form, `operand_batching_dims`).
  flat_batch: bool = True
  # Single-channel 2-D bilinear: each image row's two taps read as a pair, with one index.
  row_pairs: bool = True
  # The grid cotangent from row pairs too (with `row_pairs`).
  row_pairs_vjp: bool = True
  # Row pairs read from a table of adjacent-pixel pairs rather than from the image.
  pair_table: bool = False
  # The row-pair output's own loop: "flat" (one 1-D loop, whose reshape to
  # (N, H, W, 1) is a bitcast), "rows" (a loop over (N, H * W), followed by
  # a layout copy) or "fused" (no loop of its own).
  output_loop: str = "flat"
  # The VJP's output cotangent computed once in a loop of its own, rather
  # than recomputed inside every tap's fusion.
  cotangent_loop: bool = True
  # VJPs run in batch chunks of at most this many cotangent elements
  # (points x channels), so that the scatter buffers stay small.
  chunk_elements: int = 2**18
  # Single-channel 2-D VJPs run in one piece while their temporaries,
  # about `one_piece_words_per_point` words per point, fit in this many
  # bytes (the common STN-on-its-input case stays whole up to 42x42 at
  # batch 256), and above it in chunks of this many elements.
  one_piece_bytes: int = 28 * 2**20
  single_channel_chunk_elements: int = 2**17
  # XLA's temporary allocation for a single-channel image + grid VJP in one
  # piece, in words per point (`compiled.memory_analysis()`: 13 to 16).
  one_piece_words_per_point: int = 16


DEFAULT_OPTIONS = CpuOptions()


def own_loop_on_cpu(x: jax.Array) -> jax.Array:
  """Returns `x` unchanged; on CPU, computed in a loop of its own (then read from memory).

  The boundary is a conditional, which XLA keeps as a separate computation:
  its predicate is a constant passed through `lax.optimization_barrier`,
  and with it the conditional survives XLA:CPU's simplifier
  (tests/test_cpu_kernels.py checks the compiled HLO), whereas a barrier on
  `x` alone does not stop the fusion. Its branches, `x` and `-(-x)`, are
  bitwise equal (negation flips the sign bit only), so the value is `x`
  whichever runs. The predicate does not depend on `x`, so under `jax.vmap`
  it stays a conditional rather than a select. Other platforms get `x` as
  is. Differentiable (the cotangent passes through the same boundary).
  """
  def boundary(x):
    keep = lax.optimization_barrier(jnp.bool_(True))
    return lax.cond(keep, lambda x: x, lambda x: -(-x), x)

  return lax.platform_dependent(x, cpu=boundary, default=lambda x: x)


def own_loop_1d(x: jax.Array) -> jax.Array:
  """`own_loop_on_cpu(x)`, with the loop over `x` as one flat vector.

  A loop over `(N, P)` is followed by a copy: XLA:CPU lays out its reshape
  to `(N, H, W, 1)` with the size-1 channel axis major and copies it to the
  result's layout; from a 1-D loop the reshape is a bitcast.
  """
  return own_loop_on_cpu(x.reshape(-1)).reshape(x.shape)


def uses_row_pairs(image: jax.Array, spec: interp.Spec, options: CpuOptions) -> bool:
  """Whether CPU sampling reads row pairs: 2-D bilinear, one channel, f32/f64, flat, W >= 2.

  (The pair table takes W = 1 too.)
  """
  return (options.row_pairs and spec.flat_batch and spec.mode == "bilinear"
          and len(spec.spatial) == 2 and image.ndim == 2
          and image.dtype in (jnp.float32, jnp.float64)
          and (options.pair_table or spec.spatial[1] >= 2))


def row_pair_table(image: jax.Array, spec: interp.Spec) -> jax.Array:
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
  return own_loop_on_cpu(jax.lax.complex(pad(2, 1), pad(1, 2))).reshape(-1)


class _RowPairTaps(NamedTuple):
  """Where and how each output point reads the pair table: arrays of shape `(M, P)`."""
  index: jax.Array  # int32 flat table index of the top row's pair; the bottom row's is + W + 3.
  row_weights: tuple[jax.Array, jax.Array]  # The top and bottom row's weights.
  col_weights: tuple[jax.Array, jax.Array]  # The left and right pixel's weights.


def _row_pair_taps(coords, spec: interp.Spec, num_images: int, first=0,
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
    index = interp.flat_index(index, (height + 4) * row_stride, first, count)
  return _RowPairTaps(index, (top + 1 - rows, rows - top), (left + 1 - cols, cols - left))


def sample_row_pairs(image, coords, spec: interp.Spec):
  """Bilinear sampling of single-channel images with one gather per image row.

  For XLA:CPU, which emits each gathered element as a scalar load: the two
  taps of a row, `(y, x0)` and `(y, x0 + 1)`, are adjacent pixels, so they
  are read as one complex number from a table of horizontally adjacent pixel
  pairs (`row_pair_table`). Two gathers per point instead of four. Each row
  contributes `Re(pair * (wy * wx0 - i * wy * wx1)) = wy * (wx0 * left + wx1 * right)`:
  one complex multiply, so that each gather has a single consumer and XLA
  fuses it into the sampler's loop. The values equal `interp.sample`'s to float
  round-off (the four products are summed in another order).

  The table has a border of zeros (pixels outside the image are 0), so no
  value needs a mask (`_row_pair_taps`).

  Args:
    image: `(N, H * W)`, float32 or float64 (the table is complex64/128).
    coords: pixel-coordinate planes `(G, P)`, (rows, columns).
    spec: a 2-D bilinear spec with `flat_batch`.

  Returns:
    `(max(G, N), P)`.
  """
  pairs = row_pair_table(image, spec).reshape(1, -1)  # One "image" holding every table.
  taps = _row_pair_taps(coords, spec, image.shape[0])
  (wx0, wx1), out = taps.col_weights, 0.0
  for dy, wy in enumerate(taps.row_weights):
    pair = interp.gather_rows(pairs, taps.index + dy * (spec.spatial[1] + 3), flat=False)
    out = out + jax.lax.real(pair * jax.lax.complex(wy * wx0, -(wy * wx1)))
  return out


class _ImagePairs(NamedTuple):
  """Where and how each output point reads its two row pairs from the image: `(M, P)` arrays."""
  index: tuple[jax.Array, jax.Array]  # Per row: flat image index of the pair's left pixel.
  keep_left: tuple[jax.Array, jax.Array]  # Per row: whether the left pixel is a tap in the image.
  keep_right: tuple[jax.Array, jax.Array]  # The same for the right pixel.
  row_weights: tuple[jax.Array, jax.Array]  # The top and bottom row's weights.
  col_weights: tuple[jax.Array, jax.Array]  # The left and right pixel's weights.
  col_slopes: tuple[jax.Array, jax.Array]  # Their derivatives d weight / d column.


def _image_pairs(coords, spec: interp.Spec, num_images: int, first=0,
                 count: int | None = None) -> _ImagePairs:
  """The image pairs at pixel `coords` `(G, P)` (rows, columns) for examples `first + [0, M)`.

  M as in `_row_pair_taps`. A row's pair is the pixels x and x + 1 with
  x = clip(floor(col), 0, W - 2), so both lie in that row. Inside, they are
  the point's two taps; at the left (right) border only the pair's left
  (right) pixel is a tap, the second (first), and it takes that tap's
  weight; a pixel that is no tap, or lies in a row outside the image, is
  masked (so an inf or NaN there never reaches the output).
  """
  height, width = spec.spatial
  rows, cols = coords
  top, left = jnp.floor(rows), jnp.floor(cols)
  first_row, first_col = top.astype(jnp.int32), left.astype(jnp.int32)
  start = jnp.clip(first_col, 0, width - 2)
  shift = first_col - start  # 0: both pixels are taps; -1 (1): only the left (right) one.
  inside = shift == 0
  if num_images > 1:
    count = max(num_images, rows.shape[0]) if count is None else count
  index, keep_left, keep_right = [], [], []
  for row in (first_row, first_row + 1):
    row_index = jnp.clip(row, 0, height - 1) * width + start
    if num_images > 1:  # Example b's pixels start at b * H * W.
      row_index = interp.flat_index(row_index, height * width, first, count)
    in_image = interp.in_range(row, height)
    index.append(row_index)
    keep_left.append(in_image & (inside | (shift == -1)))
    keep_right.append(in_image & (inside | (shift == 1)))
  wx0, wx1, one = left + 1 - cols, cols - left, jnp.ones_like(cols)
  return _ImagePairs(tuple(index), tuple(keep_left), tuple(keep_right),
                     (top + 1 - rows, rows - top),
                     (jnp.where(inside, wx0, wx1), jnp.where(inside, wx1, wx0)),
                     (jnp.where(inside, -one, one), jnp.where(inside, one, -one)))


def _read_image_pairs(image, pairs: _ImagePairs) -> list[tuple[jax.Array, jax.Array]]:
  """Each row's masked `(left, right)` pixels from the images `(N, H * W)`."""
  flat = image.reshape(1, -1)  # One "image" holding the batch (indices are flat).
  return [(jnp.where(keep_left, interp.gather_rows(flat, index, flat=False), 0.0),
           jnp.where(keep_right, interp.gather_rows(flat, index + 1, flat=False), 0.0))
          for index, keep_left, keep_right in zip(pairs.index, pairs.keep_left, pairs.keep_right)]


def sample_image_pairs(image, coords, spec: interp.Spec):
  """`sample_row_pairs` without the table: each row's two taps read from the image.

  The reads of a row share one index and the border masks are one select per
  pixel, so sampling is a single loop: on several cores every loop costs a
  hand-off to a worker thread, and building the pair table is one more.
  Needs W >= 2 (`uses_row_pairs`). Arguments and result as for
  `sample_row_pairs`.
  """
  pairs = _image_pairs(coords, spec, image.shape[0])
  (w_left, w_right), out = pairs.col_weights, 0.0
  for wy, (left, right) in zip(pairs.row_weights, _read_image_pairs(image, pairs)):
    out = out + wy * (w_left * left + w_right * right)
  return out


def image_pairs_coords_vjp(image, coords, cotangent, spec: interp.Spec, first=0):
  """The coordinate cotangent of `sample_image_pairs` for cotangent rows `first + [0, n)`.

  Arguments and result as for `row_pairs_coords_vjp`, with the images
  `(N, H * W)` in place of their pair tables. A row `w_left * left +
  w_right * right` has d / d column `s_left * left + s_right * right`
  (`_ImagePairs.col_slopes`); d / d row is the bottom row minus the top.
  """
  pairs = _image_pairs(coords, spec, image.shape[0], first, cotangent.shape[0])
  (w_left, w_right), (s_left, s_right) = pairs.col_weights, pairs.col_slopes
  pixels = _read_image_pairs(image, pairs)
  rows = [w_left * left + w_right * right for left, right in pixels]
  cols = [s_left * left + s_right * right for left, right in pixels]
  (wy0, wy1) = pairs.row_weights
  return _in_one_loop(cotangent * (rows[1] - rows[0]), cotangent * (wy0 * cols[0] + wy1 * cols[1]))


def _in_one_loop(rows_bar, cols_bar):
  """`(rows_bar, cols_bar)`, computed in one loop of their own (as one complex array).

  Both read every gathered pixel; as two loops, XLA:CPU materialises each
  gather and reads it back in both, with a hand-off to a worker thread per
  loop on several cores. As one complex array, each gather has one consumer
  and fuses into it.
  """
  both = own_loop_on_cpu(jax.lax.complex(rows_bar, cols_bar))
  return jax.lax.real(both), jax.lax.imag(both)


def row_pairs_coords_vjp(pairs, num_images, coords, cotangent, spec: interp.Spec, first=0):
  """The coordinate cotangent of `sample_row_pairs`, for cotangent rows `first + [0, n)`.

  Args:
    pairs: the flat pair tables, `row_pair_table(image)`.
    num_images: N, the number of images the tables hold.
    coords: pixel-coordinate planes `(G, P)` (rows, columns): the rows for
      these examples, or one shared row (G = 1).
    cotangent: `(n, P)`, the output cotangent of these examples.
    spec: as for `sample_row_pairs`.
    first: index of the first example (may be traced).

  Returns:
    `(rows_bar, cols_bar)`, `(n, P)` each: per example, not yet summed
    over a shared grid.

  Two complex gathers per point instead of `interp.sample_vjp`'s four real ones. A
  row's pair `left + i * right` contributes `wy * (wx0 * left + wx1 * right)`
  to the output, with `wx0 = x0 + 1 - x`, `wx1 = x - x0` and `wy` likewise
  for the rows, so d out / d column = `sum_rows wy * (right - left)` and
  d out / d row = `wx0 * (left1 - left0) + wx1 * (right1 - right0)`.
  """
  taps = _row_pair_taps(coords, spec, num_images, first, cotangent.shape[0])
  (wx0, wx1), pairs = taps.col_weights, pairs.reshape(1, -1)
  top = interp.gather_rows(pairs, taps.index, flat=False)
  bottom = interp.gather_rows(pairs, taps.index + spec.spatial[1] + 3, flat=False)
  step = bottom - top
  rows_bar = cotangent * (wx0 * jax.lax.real(step) + wx1 * jax.lax.imag(step))
  cols_bar = cotangent * sum(wy * (jax.lax.imag(p) - jax.lax.real(p))
                             for wy, p in zip(taps.row_weights, (top, bottom)))
  return rows_bar, cols_bar




def vjp_chunks(cotangent, spec: interp.Spec, options: CpuOptions = DEFAULT_OPTIONS) -> int:
  """How many batch chunks the CPU VJP for `cotangent (N, P[, C])` runs in."""
  n, elements_per_example = cotangent.shape[0], math.prod(cotangent.shape[1:])
  if cotangent.ndim > 2 or len(spec.spatial) != 2:
    return num_chunks(n, elements_per_example, options.chunk_elements)
  words = cotangent.size * options.one_piece_words_per_point
  if words * cotangent.dtype.itemsize <= options.one_piece_bytes:
    return 1
  return num_chunks(n, elements_per_example, options.single_channel_chunk_elements)


def num_chunks(n: int, elements_per_example: int, budget: int) -> int:
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


def grid_vjp_chunked(image, grid, cotangent, spec: interp.Spec, chunks: int, coords_vjp=None):
  """`interp.grid_vjp` over `chunks` equal chunks of examples, in a `lax.scan`.

  CPU only, with flat indices (`spec.flat_batch`): every chunk scatter-adds
  into the one image cotangent carried through the loop (rows of chunk i
  start at example `i * chunk`), so no per-chunk buffer is stacked.
  """
  n = cotangent.shape[0]
  chunk = n // chunks
  grid_batched = grid[0].shape[0] > 1

  def body(carry, xs):
    image_bar, shared_grid_bar = carry
    first, part_grid, part_cotangent = xs
    image_bar, part_bar = interp.grid_vjp(image, grid if part_grid is None else part_grid,
                                    part_cotangent, spec, image_bar, first, coords_vjp)
    if grid_batched:  # Per-example planes are stacked; a shared grid accumulates.
      return (image_bar, shared_grid_bar), part_bar
    return (image_bar, tuple(a + b for a, b in zip(shared_grid_bar, part_bar))), None

  xs = (jnp.arange(chunks, dtype=jnp.int32) * chunk,
        tuple(c.reshape(chunks, chunk, -1) for c in grid) if grid_batched else None,
        cotangent.reshape(chunks, chunk, *cotangent.shape[1:]))
  init = (jnp.zeros_like(image), tuple(jnp.zeros_like(c) for c in grid))
  (image_bar, grid_bar), stacked = jax.lax.scan(body, init, xs)
  if grid_batched:
    grid_bar = tuple(c.reshape(n, -1) for c in stacked)
  return image_bar, grid_bar


def forward(image, grid, spec: interp.Spec, options: CpuOptions):
  """CPU sampling of `image (N, S[, C])` at the normalised `grid (G, P, ndim)`.

  The C++ kernel where it applies (`_cpu_ffi.applies`), else
  `interp.sample` or row pairs at the grid's pixel coordinates.
  """
  if _cpu_ffi.applies(image, spec, options.sampler_kernel):
    return _cpu_ffi.sample(image, grid, spec, options.sampler_kernel)
  coords = interp.pixel_coordinates(interp.grid_planes(grid), spec)
  spec = spec._replace(flat_batch=options.flat_batch)
  if not uses_row_pairs(image, spec, options):
    return interp.sample(image, coords, spec)
  out = (sample_row_pairs if options.pair_table else sample_image_pairs)(image, coords, spec)
  # Fused into the reshape to (..., H_out, W_out, 1), the loop would run over
  # that shape, and XLA:CPU computes the tail of each row as scalars.
  loop = {"flat": own_loop_1d, "rows": own_loop_on_cpu, "fused": lambda x: x}[options.output_loop]
  return loop(out)


def backward(image, grid, cotangent, spec: interp.Spec, options: CpuOptions):
  """CPU VJP of sampling at the normalised `grid (G, P, ndim)`: `(image_bar, grid_bar)`.

  The C++ kernels where they apply (`_cpu_ffi.applies` and
  `options.vjp_kernel`), else `jnp_backward`.
  """
  if options.vjp_kernel and _cpu_ffi.applies(image, spec, options.sampler_kernel):
    return _kernel_vjp(image, grid, cotangent, spec, options)
  return jnp_backward(image, grid, cotangent, spec, options)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _kernel_vjp(image, grid, cotangent, spec: interp.Spec, options: CpuOptions):
  """The VJP from the C++ kernels; its own VJP (a second derivative) is `jnp_backward`'s.

  The two cotangents are separate calls, so XLA drops the one a gradient
  does not use (the image's, for the STN-on-its-input case).
  """
  isa = options.sampler_kernel
  grid_bar = _cpu_ffi.grid_vjp(image, grid, cotangent, spec, isa)
  if grid.shape[0] == 1 < grid_bar.shape[0]:  # A shared grid: sum over the examples.
    grid_bar = jnp.sum(grid_bar, 0, keepdims=True)
  return _cpu_ffi.image_vjp(grid, cotangent, spec, image.shape[0], isa), grid_bar


def _kernel_vjp_fwd(image, grid, cotangent, spec, options):
  return _kernel_vjp(image, grid, cotangent, spec, options), (image, grid, cotangent)


def _kernel_vjp_bwd(spec, options, residuals, cotangents):
  _, vjp = jax.vjp(lambda *args: jnp_backward(*args, spec, options), *residuals)
  return vjp(cotangents)


_kernel_vjp.defvjp(_kernel_vjp_fwd, _kernel_vjp_bwd)


def jnp_backward(image, grid, cotangent, spec: interp.Spec, options: CpuOptions):
  """The jnp CPU VJP at the normalised `grid (G, P, ndim)`, in chunks when large."""
  if options.cotangent_loop:  # Every tap reads it (twice for bilinear): compute it once.
    cotangent = own_loop_on_cpu(cotangent)
  spec = spec._replace(flat_batch=options.flat_batch)
  planes = interp.grid_planes(grid)
  coords_vjp = None
  if options.row_pairs_vjp and uses_row_pairs(image, spec, options):
    if options.pair_table:
      pairs = row_pair_table(image, spec)
      coords_vjp = lambda coords, cotangent, first: row_pairs_coords_vjp(
          pairs, image.shape[0], coords, cotangent, spec, first)
    else:
      coords_vjp = lambda coords, cotangent, first: image_pairs_coords_vjp(
          image, coords, cotangent, spec, first)
  chunks = vjp_chunks(cotangent, spec, options)
  if chunks == 1:
    image_bar, planes_bar = interp.grid_vjp(image, planes, cotangent, spec, jnp.zeros_like(image),
                                            coords_vjp=coords_vjp)
  else:  # The chunked VJP offsets each chunk's rows, which only flat indices can.
    image_bar, planes_bar = grid_vjp_chunked(image, planes, cotangent,
                                             spec._replace(flat_batch=True), chunks, coords_vjp)
  return image_bar, jnp.stack(planes_bar, axis=-1)
