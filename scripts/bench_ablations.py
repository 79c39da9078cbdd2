"""Ablations behind docs/performance.md: each design choice vs its alternative.

  python scripts/bench_ablations.py [--rounds 3] [--repeats 20]

Each row times two functions, first the current code and second the
alternative it replaced (row 1: writing vs reading memory), in one process, interleaved over --rounds rounds of
--repeats timed calls (median over rounds of per-round medians), all jitted
and synchronised:

1. fresh memory: a jitted function that writes four new 25 MB arrays, vs one
   that only reads 25 MB (the cost of page faults on this machine).
2. channel sums: the sampler's theta gradient at 256x28x28x32 with its one
   variadic reduction (`sampling._sum_channels`) vs a `jnp.sum` per tap.
3. chunked VJP: the sampler's image + theta gradient at 256x60x60x1 with the
   CPU chunking vs the whole batch in one piece.
4. gather form: the same gradient at 256x28x28x1 (one chunk) with CPU's
   flat gather/scatter indices vs the accelerators' batched form
   (`operand_batching_dims`, `sampling._CPU_FLAT_BATCH = False`).
5. grid gradient: the theta gradient of `affine_grid` alone (256 60x60
   grids) as one GEMM per coordinate plane vs broadcast multiply-adds.
6. conv input gradient: the 5x5, 1 -> 10 channel convolution at batch 64 on
   28x28 (the STN tutorial's first layer), `layers.conv_general_dilated` vs
   `lax.conv_general_dilated`, gradient to the input.
7. single-channel conv forward: the same layer's forward pass.
8. max pool: a training step of the STN tutorial network
   (`scripts/bench_train.py`) with `layers.max_pool` vs `flax.linen.max_pool`.
9. tap bounds: the sampler's forward pass at 256x28x28x1 on the four-tap
   path (`sampling._sample`, row pairs off) with int32 tap positions tested
   by one unsigned compare per axis (`sampling._taps`) vs float positions
   tested by two compares (`float_compare_taps`, the previous code).
10. reduced samples: a mean squared error of the sampler's output at
    256x60x60x1 (forward only, four-tap path), with the last tap added
    through a select (`sampling._sample`) vs every tap's value masked
    (`masked_values_sample`, the previous code).
11. fusion boundary, layer: the STN tutorial's first localisation layer
    (7x7, 1 -> 8 channels) and its 2x2 max pool, forward, at batch 32 on
    28x28, with the convolution in a loop of its own
    (`_fusion.own_loop_on_cpu`) vs fused into the pool.
12. fusion boundaries, training step: row 8's step with both of stnjax's
    boundaries (that convolution; the sampler VJP's cotangent) vs none.
13. row pairs: the sampler's forward pass at 256x28x28x1 (and 256x42x42x1)
    with one complex gather per image row (`sampling._sample_row_pairs`)
    vs the four-tap path.
14. flat output loop: the same forward with the row-pair sampler in a loop
    over its flat output, then reshaped to `(N, H, W, 1)`, vs fused into
    that reshape (a loop over `(N, H, W, 1)`).
15. 1-D output loop: the same forward at 256x28x28x1 (and 42x42, 60x60)
    with that loop over one flat vector (`sampling._own_loop_1d`), whose
    reshape is a bitcast, vs over `(N, H * W)`, which XLA:CPU follows with
    a copy to `(N, H, W, 1)`.
16. zero-bordered pair table: the same forward at 256x28x28x1 (and 42x42,
    60x60) with the table's zero border and clipped positions
    (`sampling._sample_row_pairs`) vs pairs inside the image rows only and
    a select per row (`masked_row_pairs`, the previous code).
17. row-pair grid cotangent: the sampler's theta gradient and image + theta
    gradient at 256x28x28x1 (and 42x42, 60x60) with the VJP reading two
    complex pairs per point for the grid cotangent
    (`sampling._row_pairs_coords_vjp`) vs four pixels (`sampling._sample_vjp`
    without pair tables, the previous code). The forward pass and the image
    cotangent's scatter-adds are the same on both sides.

--rows SUBSTRING runs only the rows whose name contains it.
"""

import argparse
import itertools
import math
import os
import statistics
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bench_train
import timing
import stnjax
from stnjax import _fusion
from stnjax import grids
from stnjax import layers
from stnjax import models
from stnjax import sampling


def ms(fn, repeats):
  return 1e3 * timing.median_seconds(lambda _: jax.block_until_ready(fn()), warmup=3,
                                     repeats=repeats)


def sample_loss(image, theta, cotangent):
  grid = stnjax.affine_grid(theta, image.shape[1:3])
  return jnp.vdot(stnjax.grid_sample(image, grid), cotangent)


def random_batch(h, w, c):
  """A seeded generator, 256 random `(h, w, c)` images and near-identity thetas."""
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.random((256, h, w, c), np.float32))
  theta = jnp.asarray(np.eye(2, 3, dtype=np.float32) + rng.normal(0, 0.2, (256, 2, 3)), jnp.float32)
  return rng, image, theta


def sampler_case(h, w, c, argnums):
  rng, image, theta = random_batch(h, w, c)
  cotangent = jnp.asarray(rng.normal(size=(256, h, w, c)), jnp.float32)
  fn = jax.jit(jax.grad(sample_loss, argnums=argnums))  # Traced (and patched) on first call.
  return lambda: fn(image, theta, cotangent)


def per_tap_sums(arrays):
  return [jnp.sum(x, axis=-1) for x in arrays] if arrays[0].ndim == 3 else arrays


def float_compare_taps(coords, spec):
  """`sampling._taps` as it was (bilinear only): float positions, `0 <= p <= size - 1`."""
  strides = [math.prod(spec.spatial[a + 1:]) for a in range(len(spec.spatial))]
  per_axis = []
  for coord in coords:
    base, one = jnp.floor(coord), jnp.ones_like(coord)
    per_axis.append(([base, base + 1], [base + 1 - coord, coord - base], [-one, one]))
  taps = []
  for combo in itertools.product(*(range(2) for _ in coords)):
    valid, index = True, 0
    for a, t in enumerate(combo):
      position = per_axis[a][0][t]
      valid = valid & (position >= 0) & (position <= spec.spatial[a] - 1)
      index = index + jnp.clip(position, 0, spec.spatial[a] - 1).astype(jnp.int32) * strides[a]
    weights = [per_axis[a][1][t] for a, t in enumerate(combo)]
    slopes = tuple(
        math.prod(per_axis[a][2][t] if b == a else w for b, w in enumerate(weights))
        for a, t in enumerate(combo))
    taps.append(sampling._Tap(valid, index, math.prod(weights), slopes))
  return taps


def masked_values_sample(image, coords, spec):
  """`sampling._sample` as it was: every tap's value masked, then all summed."""
  out = 0.0
  for tap in sampling._taps(coords, spec):
    values = sampling._gather_rows(image, tap.index, spec.flat_batch)
    valid, weight = sampling._per_point(tap.valid, values), sampling._per_point(tap.weight, values)
    out = out + weight * jnp.where(valid, values, 0)
  return out


def masked_row_pairs(image, coords, spec):
  """`sampling._sample_row_pairs` as it was: pairs x0 in [-1, W - 1] only, a select per row."""
  (height, width), n = spec.spatial, image.shape[0]
  rows, cols = coords
  pixels = image.reshape(n, height, width)
  pairs = jax.lax.complex(jnp.pad(pixels, ((0, 0), (0, 0), (1, 0))),
                          jnp.pad(pixels, ((0, 0), (0, 0), (0, 1))))
  pairs = _fusion.own_loop_on_cpu(pairs).reshape(1, -1)
  top, left = jnp.floor(rows), jnp.floor(cols)
  first_row, first_col = top.astype(jnp.int32), left.astype(jnp.int32)
  pair_col = first_col + 1
  some_pair = sampling._in_range(pair_col, width + 1)
  pair_col = jnp.clip(pair_col, 0, width)
  col_weights = (left + 1 - cols, cols - left)
  row_weights = (top + 1 - rows, rows - top)
  out = 0.0
  for dy in (0, 1):
    row = first_row + dy
    valid = sampling._in_range(row, height) & some_pair
    index = jnp.clip(row, 0, height - 1) * (width + 1) + pair_col
    if n > 1:
      index = sampling._flat_index(index, height * (width + 1), 0, max(n, rows.shape[0]))
    pair = sampling._gather_rows(pairs, index, flat=False)
    weight = jax.lax.complex(row_weights[dy] * col_weights[0], -(row_weights[dy] * col_weights[1]))
    out = out + jax.lax.real(jnp.where(valid, pair, 0) * weight)
  return out


def mse_case(h, w, c):
  rng, image, theta = random_batch(h, w, c)
  target = jnp.asarray(rng.random((256, h, w, c), np.float32))
  fn = jax.jit(lambda image, theta: jnp.mean(
      (stnjax.grid_sample(image, stnjax.affine_grid(theta, (h, w))) - target) ** 2))
  return lambda: fn(image, theta)


def forward_case(h, w, c):
  _, image, theta = random_batch(h, w, c)
  fn = jax.jit(lambda image, theta: stnjax.grid_sample(image, stnjax.affine_grid(theta, (h, w))))
  return lambda: fn(image, theta)


def multiply_add_planes(matrix, points):
  out = []
  for i in range(matrix.shape[0]):
    row = matrix[i, -1]
    for j in range(points.shape[1] - 1):
      row = row + matrix[i, j] * points[:, j]
    out.append(row)
  return out


def as_is_and_patched(case, patch):
  """`(ours, alternative)`: `case()` traced as it is and under `patch` (both traced here)."""
  ours = case()
  jax.block_until_ready(ours())
  with patch:
    alternative = case()
    jax.block_until_ready(alternative())
  return ours, alternative


def rows():
  """(name, ours, alternative): zero-argument callables."""
  x = jnp.ones((256 * 784, 32))
  four_new = jax.jit(lambda x: (x * 2, x * 3, x * 4, x * 5))
  read_only = jax.jit(jnp.sum)
  yield "fresh memory: write 4 new 25 MB arrays vs read 25 MB", lambda: four_new(x), \
      lambda: read_only(x)

  yield ("theta grad 256x28x28x32: one variadic reduce vs jnp.sum per tap",
         *as_is_and_patched(lambda: sampler_case(28, 28, 32, 1),
                            mock.patch.object(sampling, "_sum_channels", per_tap_sums)))

  yield ("image+theta grad 256x60x60x1: chunked VJP vs one piece",
         *as_is_and_patched(lambda: sampler_case(60, 60, 1, (0, 1)), mock.patch.object(
             sampling, "_CPU_SINGLE_CHANNEL_CHUNK_ELEMENTS", 2**40)))

  yield ("image+theta grad 256x28x28x1: flat vs batched gather/scatter",
         *as_is_and_patched(lambda: sampler_case(28, 28, 1, (0, 1)),
                            mock.patch.object(sampling, "_CPU_FLAT_BATCH", False)))

  theta = jnp.asarray(np.random.default_rng(0).normal(size=(256, 2, 3)), jnp.float32)
  plane_cotangent = jnp.ones((256, 60, 60, 2))

  def grid_grad():
    return jax.jit(jax.grad(lambda t, g: jnp.vdot(stnjax.affine_grid(t, (60, 60)), g)))

  ours_fn = grid_grad()
  with mock.patch.object(grids, "_apply_matrix", multiply_add_planes):
    alternative_fn = grid_grad()
    jax.block_until_ready(alternative_fn(theta, plane_cotangent))
  yield "affine_grid theta grad 256x60x60: GEMM per plane vs multiply-adds", lambda: ours_fn(theta, plane_cotangent), \
      lambda: alternative_fn(theta, plane_cotangent)

  dims = ("NHWC", "HWIO", "NHWC")
  x = jax.random.normal(jax.random.key(0), (64, 28, 28, 1))
  kernel = jax.random.normal(jax.random.key(1), (5, 5, 1, 10))
  out_cotangent = jax.random.normal(jax.random.key(2), (64, 24, 24, 10))

  def conv_fns(conv):
    forward = jax.jit(lambda x, k: conv(x, k, (1, 1), "VALID", dimension_numbers=dims))
    input_grad = jax.jit(jax.grad(lambda x, k, g: jnp.vdot(forward(x, k), g)))
    return forward, input_grad

  (ours_fwd, ours_grad), (lax_fwd, lax_grad) = (conv_fns(layers.conv_general_dilated),
                                                conv_fns(jax.lax.conv_general_dilated))
  yield "conv 5x5 1->10 input grad 64x28x28: layers vs lax", lambda: ours_grad(x, kernel, out_cotangent), \
      lambda: lax_grad(x, kernel, out_cotangent)
  yield "conv 5x5 1->10 forward 64x28x28: layers vs lax", lambda: ours_fwd(x, kernel), \
      lambda: lax_fwd(x, kernel)

  ours_step = bench_train.flax_tutorial_step()
  with mock.patch.object(bench_train.layers, "max_pool", nn.max_pool):
    alternative_step = bench_train.flax_tutorial_step()
    alternative_step()
  yield "STN tutorial training step: layers.max_pool vs nn.max_pool", ours_step, alternative_step

  four_taps = mock.patch.object(sampling, "_uses_row_pairs", lambda image, spec: False)

  def on_four_taps(case, patch):
    """`case()` traced on the four-tap path, as it is and under `patch`."""
    with four_taps:
      return as_is_and_patched(case, patch)

  yield ("forward 256x28x28x1, four taps: int taps, one unsigned compare vs float, two",
         *on_four_taps(lambda: forward_case(28, 28, 1),
                       mock.patch.object(sampling, "_taps", float_compare_taps)))
  yield ("MSE of samples 256x60x60x1, four taps: last tap by select vs masked values",
         *on_four_taps(lambda: mse_case(60, 60, 1),
                       mock.patch.object(sampling, "_sample", masked_values_sample)))

  no_boundary = mock.patch.object(_fusion, "own_loop_on_cpu", lambda x: x)

  class ConvPool(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.max_pool(models.Conv(8, (7, 7), padding="VALID")(x), (2, 2), (2, 2))

  images = jax.random.uniform(jax.random.key(5), (32, 28, 28, 1))
  conv_pool_params = ConvPool().init(jax.random.key(6), images)["params"]
  forward = lambda: jax.jit(lambda p, x: ConvPool().apply({"params": p}, x))
  ours_fn = forward()
  ours = lambda: ours_fn(conv_pool_params, images)
  alternative_fn = forward()
  with no_boundary:
    jax.block_until_ready(alternative_fn(conv_pool_params, images))  # Traced without it.
  alternative = lambda: alternative_fn(conv_pool_params, images)
  yield "conv 7x7 1->8 + max pool forward 32x28x28: own loop vs fused", ours, alternative

  ours_step = bench_train.flax_tutorial_step()
  with no_boundary:
    alternative_step = bench_train.flax_tutorial_step()
    alternative_step()
  yield "STN tutorial training step: fusion boundaries vs none", ours_step, alternative_step

  for size in (28, 42):
    yield (f"forward 256x{size}x{size}x1: row pairs vs four taps",
           *as_is_and_patched(lambda: forward_case(size, size, 1), four_taps))

  # Only the pair table keeps its boundary (it is complex; the output is real).
  fused_output = mock.patch.object(
      _fusion, "own_loop_on_cpu",
      lambda x, boundary=_fusion.own_loop_on_cpu: boundary(x) if x.dtype.kind == "c" else x)
  yield ("forward 256x28x28x1, row pairs: flat output loop vs (N, H, W, 1) loop",
         *as_is_and_patched(lambda: forward_case(28, 28, 1), fused_output))

  for size in (28, 42, 60):
    yield (f"forward 256x{size}x{size}x1, row pairs: 1-D output loop vs (N, H * W) loop",
           *as_is_and_patched(lambda: forward_case(size, size, 1),
                              mock.patch.object(sampling, "_own_loop_1d", _fusion.own_loop_on_cpu)))

  for size in (28, 42, 60):
    yield (f"forward 256x{size}x{size}x1, row pairs: zero-bordered table vs masked rows",
           *as_is_and_patched(lambda: forward_case(size, size, 1),
                              mock.patch.object(sampling, "_sample_row_pairs", masked_row_pairs)))

  no_vjp_pairs = mock.patch.object(sampling, "_vjp_pair_table", lambda image, spec: None)
  for size in (28, 42, 60):
    for workload, argnums in (("theta grad", 1), ("image+theta grad", (0, 1))):
      yield (f"{workload} 256x{size}x{size}x1: row-pair grid cotangent vs four taps",
             *as_is_and_patched(lambda: sampler_case(size, size, 1, argnums), no_vjp_pairs))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--rows", default="", help="run only rows whose name contains this")
  args = parser.parse_args()
  load_before = os.getloadavg()[0]
  table = []
  for name, ours, alternative in rows():
    if args.rows not in name:
      continue
    first, second = [], []
    for _ in range(args.rounds):
      first.append(ms(ours, args.repeats))
      second.append(ms(alternative, args.repeats))
    a, b = statistics.median(first), statistics.median(second)
    table.append((name, a, b))
    print(f"# {name}: {a:.2f} ms vs {b:.2f} ms", flush=True)
  print(f"\njax {jax.__version__}, {jax.devices()[0].platform}; load average {load_before:.2f} "
        f"before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds of {args.repeats}\n")
  print("| first vs second | first ms | second ms | second / first |")
  print("|---|---:|---:|---:|")
  for name, a, b in table:
    print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
  main()
