"""Ablations behind docs/performance.md: each design choice vs its alternative.

  python -m scripts.bench.bench_ablations [--rounds 3] [--repeats 20] [--rows SUBSTRING]
      [--xla_cpu_flags off|on] [--out results/bench/ablations.json]

Each row times two jitted, synchronised functions in one process, first the
current code and second the alternative, interleaved over --rounds rounds of
--repeats timed calls (median over rounds of per-round medians). The
alternatives are named options or functions, never patched internals: the
sampler's CPU paths are fields of `CpuOptions`, passed to
`sampling.grid_sample_with_options`; the affine grid is compared with its
GEMM form; the layers with their Flax and `lax` counterparts. The rows of
the jnp paths' options run with the C++ kernels off (`JNP`).

Rows (name: current vs alternative):

* C++ kernels (`sampler_kernel`): sampling a precomputed grid, forward,
  theta and image + theta gradient at 256x{28,42,60}x{28,42,60}x1 with the
  kernels vs the jnp paths; the sampling kernel with the CPU's best
  instruction set vs AVX2.
* C++ VJP (`vjp_kernel`): theta and image + theta gradient with the
  kernels' VJP vs the jnp VJP (the forward pass is the kernel's in both).
* affine grid: `affine_grid` (the C++ kernel on CPU) vs its GEMM form
  (`grids._affine_grid_gemm` under `vmap`, as other platforms compute it),
  256 grids of 28x28, 42x42 and 60x60.
* fresh memory: a function that writes four new 25 MB arrays vs one that
  only reads 25 MB (the price of page faults on this machine).
* chunked VJP (`single_channel_chunk_elements`): image + theta gradient at
  256x60x60x1 in batch chunks vs in one piece.
* gather form (`flat_batch`): image + theta gradient at 256x28x28x1 with
  flat gather/scatter indices vs the accelerators' batched form.
* row pairs (`row_pairs`): forward at 256x{28,42}x{28,42}x1 with the two
  taps of an image row read with one index vs four taps.
* pair source (`pair_table`): sampling a precomputed grid, forward, theta
  and image + theta gradient at 256x{28,42,60}x{28,42,60}x1 with row pairs
  read from the image vs from a table of adjacent-pixel pairs.
* output loop (`output_loop`): the row-pair forward in a 1-D loop of its own
  vs a loop over `(N, H * W)` and vs fused into the reshape.
* row-pair grid cotangent (`row_pairs_vjp`): theta / image + theta gradient
  with the row pairs vs four taps.
* cotangent loop (`cotangent_loop`): image + theta gradient at 256x28x28x32
  with the output cotangent in a loop of its own vs fused into every tap.
* conv input gradient / forward: `layers.conv_general_dilated` vs
  `lax.conv_general_dilated`, 5x5, 1 -> 10 channels, batch 64, 28x28.
* paper-size convs (`cpu_form`): forward and both gradients of the paper
  CNN's layers in the default form (`layers.default_cpu_form`) vs each
  other form; the 7x7 layer's forward vs `lax`'s (with `--xla_cpu_flags on`
  both are XLA's convolution: comparing files run with `on` and `off`
  gives YNNPACK's speed against Eigen's on that layer).
* conv input gradient form (`layers._input_grad_multichannel`): position
  sums vs the width convolution for a 4x4 output, and the reverse for 11x11.
* max pool: the STN tutorial's training step (`bench_train`) with
  `layers.max_pool` vs `flax.linen.max_pool`.

Prints a Markdown table (ratio = alternative / current: > 1, the current
code is faster) and, with --out, writes the rows and their provenance as
JSON.
"""

import argparse
import functools
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import stnjax
from scripts.bench import bench_train
from scripts.bench import timing
from stnjax import grids
from stnjax import layers
from stnjax import sampling
from stnjax import xla_cpu
from stnjax._cpu_kernels import CpuOptions

DEFAULT = CpuOptions()
JNP = CpuOptions(sampler_kernel="off")  # The jnp paths, without the C++ kernels.


def ms(fn, repeats):
  return 1e3 * timing.median_seconds(lambda _: jax.block_until_ready(fn()), warmup=3,
                                     repeats=repeats)


def random_batch(h, w, c):
  """A seeded generator, 256 random `(h, w, c)` images and near-identity thetas."""
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.random((256, h, w, c), np.float32))
  theta = jnp.asarray(np.eye(2, 3, dtype=np.float32) + rng.normal(0, 0.2, (256, 2, 3)), jnp.float32)
  return rng, image, theta


def sample(image, theta, options):
  grid = stnjax.affine_grid(theta, image.shape[1:3])
  return sampling.grid_sample_with_options(image, grid, cpu_options=options)


def gradient_case(h, w, c, argnums, options):
  """The gradient of `<sample(image, theta), cotangent>` to `argnums`, jitted."""
  rng, image, theta = random_batch(h, w, c)
  cotangent = jnp.asarray(rng.normal(size=(256, h, w, c)), jnp.float32)
  fn = jax.jit(jax.grad(lambda i, t, g: jnp.vdot(sample(i, t, options), g), argnums=argnums))
  return lambda: fn(image, theta, cotangent)


def forward_case(h, w, c, options):
  _, image, theta = random_batch(h, w, c)
  fn = jax.jit(lambda i, t: sample(i, t, options))
  return lambda: fn(image, theta)


def sample_only_case(h, w, c, options):
  """Sampling at a grid made beforehand (`bench_sampler`'s "sample only"), jitted."""
  _, image, theta = random_batch(h, w, c)
  grid = jax.block_until_ready(stnjax.affine_grid(theta, (h, w)))
  fn = jax.jit(lambda i, g: sampling.grid_sample_with_options(i, g, cpu_options=options))
  return lambda: fn(image, grid)


def affine_grid_case(size, gemm):
  """256 affine grids: `stnjax.affine_grid`, or its GEMM form (as off CPU)."""
  _, _, theta = random_batch(size, size, 1)
  gemm_grid = grids._affine_grid_gemm  # pylint: disable=protected-access
  fn = jax.jit(jax.vmap(lambda t: gemm_grid(t, (size, size), False)) if gemm
               else lambda t: stnjax.affine_grid(t, (size, size)))
  return lambda: fn(theta)


def sampler_rows():
  """(name, option, ours, alternative) for the sampler's CPU options."""
  gradients = (("theta grad", 1), ("image+theta grad", (0, 1)))
  for size in (28, 42, 60):
    cases = (("sample only", sample_only_case), ("forward", forward_case),
             *((name, functools.partial(gradient_case, argnums=a)) for name, a in gradients))
    for workload, case in cases:
      yield (f"{workload} 256x{size}x{size}x1: C++ kernels vs jnp", "sampler_kernel",
             case(size, size, 1, options=DEFAULT), case(size, size, 1, options=JNP))
    for workload, argnums in gradients:
      yield (f"{workload} 256x{size}x{size}x1: C++ VJP vs jnp VJP", "vjp_kernel",
             gradient_case(size, size, 1, argnums, DEFAULT),
             gradient_case(size, size, 1, argnums, DEFAULT._replace(vjp_kernel=False)))
    yield (f"affine grid 256x{size}x{size}: C++ kernel vs GEMMs", None,
           affine_grid_case(size, gemm=False), affine_grid_case(size, gemm=True))
  for size in (28, 60):
    yield (f"sample only 256x{size}x{size}x1: C++ kernel, best ISA vs AVX2", "sampler_kernel",
           sample_only_case(size, size, 1, DEFAULT),
           sample_only_case(size, size, 1, DEFAULT._replace(sampler_kernel="avx2")))
  yield ("image+theta grad 256x60x60x1: chunked VJP vs one piece", "single_channel_chunk_elements",
         gradient_case(60, 60, 1, (0, 1), JNP),
         gradient_case(60, 60, 1, (0, 1),
                       JNP._replace(one_piece_bytes=2**62, single_channel_chunk_elements=2**62)))
  yield ("image+theta grad 256x28x28x1: flat vs batched gather/scatter", "flat_batch",
         gradient_case(28, 28, 1, (0, 1), JNP),
         gradient_case(28, 28, 1, (0, 1), JNP._replace(flat_batch=False)))
  for size in (28, 42):
    yield (f"forward 256x{size}x{size}x1: row pairs vs four taps", "row_pairs",
           forward_case(size, size, 1, JNP),
           forward_case(size, size, 1, JNP._replace(row_pairs=False)))
  for size in (28, 42, 60):
    cases = (("sample only", sample_only_case), ("forward", forward_case),
             *((name, functools.partial(gradient_case, argnums=a)) for name, a in gradients))
    for workload, case in cases:
      yield (f"{workload} 256x{size}x{size}x1: row pairs from the image vs a pair table",
             "pair_table", case(size, size, 1, options=JNP),
             case(size, size, 1, options=JNP._replace(pair_table=True)))
  for size in (28, 60):
    for loop in ("rows", "fused"):
      yield (f"forward 256x{size}x{size}x1, row pairs: 1-D output loop vs {loop}", "output_loop",
             forward_case(size, size, 1, JNP),
             forward_case(size, size, 1, JNP._replace(output_loop=loop)))
  for size in (28, 42, 60):
    for workload, argnums in (("theta grad", 1), ("image+theta grad", (0, 1))):
      yield (f"{workload} 256x{size}x{size}x1: row-pair grid cotangent vs four taps",
             "row_pairs_vjp", gradient_case(size, size, 1, argnums, JNP),
             gradient_case(size, size, 1, argnums, JNP._replace(row_pairs_vjp=False)))
  yield ("image+theta grad 256x28x28x32: cotangent in its own loop vs fused", "cotangent_loop",
         gradient_case(28, 28, 32, (0, 1), JNP),
         gradient_case(28, 28, 32, (0, 1), JNP._replace(cotangent_loop=False)))


def rows():
  """(name, option, ours, alternative): the last two zero-argument callables."""
  x = jnp.ones((256 * 784, 32))
  four_new = jax.jit(lambda x: (x * 2, x * 3, x * 4, x * 5))
  read_only = jax.jit(jnp.sum)
  yield ("fresh memory: write 4 new 25 MB arrays vs read 25 MB", None,
         lambda: four_new(x), lambda: read_only(x))
  yield from sampler_rows()

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
  yield ("conv 5x5 1->10 input grad 64x28x28: layers vs lax", "layers.conv_general_dilated",
         lambda: ours_grad(x, kernel, out_cotangent), lambda: lax_grad(x, kernel, out_cotangent))
  yield ("conv 5x5 1->10 forward 64x28x28: layers vs lax", "layers.conv_general_dilated",
         lambda: ours_fwd(x, kernel), lambda: lax_fwd(x, kernel))
  # The paper-size CNN's layers (unpadded, 400k parameters) at batch 128:
  # forward and both gradients of a 9x9 1->86 first layer on RTS's 42x42 and a
  # 7x7 86->86 second layer on its 17x17 maps (FFTs) and R's 10x10 (XLA's); the
  # ST-CNN's 21x21 classifier.
  paper_convs = (("9x9 1->86 128x42x42", (128, 42, 42, 1), (9, 9, 1, 86)),
                 ("7x7 86->86 128x17x17", (128, 17, 17, 86), (7, 7, 86, 86)),
                 ("7x7 86->86 128x10x10", (128, 10, 10, 86), (7, 7, 86, 86)),
                 ("7x7 87->87 128x7x7", (128, 7, 7, 87), (7, 7, 87, 87)))
  for label, x_shape, k_shape in paper_convs:
    px = jax.random.normal(jax.random.key(3), x_shape)
    pk = jax.random.normal(jax.random.key(4), k_shape) * 0.1

    def both_grads(conv):
      return jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.tanh(
          conv(x, k, (1, 1), "VALID", dimension_numbers=dims))), argnums=(0, 1)))

    ours = both_grads(layers.conv_general_dilated)
    if k_shape[2] == 1:  # One input channel: the col2im VJP against XLA's convolution.
      alternatives = [("layers vs lax", both_grads(jax.lax.conv_general_dilated))]
    else:
      current = layers.default_cpu_form(x_shape, k_shape, "VALID")
      alternatives = [(f"{current} vs {form}",
                       both_grads(functools.partial(layers.conv_general_dilated, cpu_form=form)))
                      for form in layers.CPU_CONV_FORMS if form != current]
    for what, alternative in alternatives:
      yield (f"conv {label} fwd + both grads: {what}", "cpu_form",
             lambda ours=ours, px=px, pk=pk: ours(px, pk),
             lambda alternative=alternative, px=px, pk=pk: alternative(px, pk))
    if k_shape[2] == 86:
      ours_fwd, lax_fwd = (jax.jit(lambda x, k, conv=conv: conv(x, k, (1, 1), "VALID",
                                                                 dimension_numbers=dims))
                           for conv in (layers.conv_general_dilated, jax.lax.conv_general_dilated))
      yield (f"conv {label} forward: layers vs lax", "cpu_form",
             lambda px=px, pk=pk: ours_fwd(px, pk), lambda px=px, pk=pk: lax_fwd(px, pk))
  # The multi-channel input gradient alone, as `layers` picks it, against the
  # other form: the R CNN's second layer (4x4 output, position sums) and the
  # RTS CNN's (11x11 output, width convolution), unpadded, batch 128.
  # pylint: disable=protected-access
  picked = layers._input_grad_multichannel
  forms = {"position sums": layers._input_grad_by_position_sums,
           "width conv": layers._input_grad_by_width_conv}
  # pylint: enable=protected-access
  unpadded = ((0, 0), (0, 0))
  for label, x_shape, k_shape, current in (
      ("7x7 89->89 128x10x10", (128, 10, 10, 89), (7, 7, 89, 89), "position sums"),
      ("7x7 86->86 128x17x17", (128, 17, 17, 86), (7, 7, 86, 86), "width conv")):
    px = jax.random.normal(jax.random.key(5), x_shape)
    pk = jax.random.normal(jax.random.key(6), k_shape) * 0.1
    size = x_shape[1] - k_shape[0] + 1
    pg = jax.random.normal(jax.random.key(7), (x_shape[0], size, size, k_shape[3]))
    ours = jax.jit(lambda x, k, g: picked(x, k, unpadded, g))
    other = next(name for name in forms if name != current)
    alternative = jax.jit(lambda x, k, g, f=forms[other]: f(x, k, unpadded, g))
    yield (f"conv {label} input grad: {current} vs {other}", "layers._input_grad_multichannel",
           lambda ours=ours, px=px, pk=pk, pg=pg: ours(px, pk, pg),
           lambda alternative=alternative, px=px, pk=pk, pg=pg: alternative(px, pk, pg))
  yield ("STN tutorial training step: layers.max_pool vs nn.max_pool", "layers.max_pool",
         bench_train.flax_tutorial_step(), bench_train.flax_tutorial_step(max_pool=nn.max_pool))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--rows", default="", help="run only rows whose name contains this")
  parser.add_argument("--xla_cpu_flags", choices=("off", "on"), default="off",
                      help="on: stnjax.xla_cpu.configure() first, as the training scripts do")
  parser.add_argument("--out", default=None, help="JSON file for the results (optional)")
  args = parser.parse_args()
  if args.xla_cpu_flags == "on":
    xla_cpu.configure()  # Before the backend starts.
  table = []
  for name, option, ours, alternative in rows():
    if args.rows not in name:
      continue
    first, second = [], []
    for _ in range(args.rounds):
      first.append(ms(ours, args.repeats))
      second.append(ms(alternative, args.repeats))
    a, b = statistics.median(first), statistics.median(second)
    table.append({"name": name, "option": option, "current_ms": a, "alternative_ms": b,
                  "ratio": b / a, "current_rounds_ms": first, "alternative_rounds_ms": second})
    print(f"# {name}: {a:.2f} ms vs {b:.2f} ms", flush=True)
  print(f"\njax {jax.__version__}, {jax.devices()[0].platform}; {args.rounds} rounds of "
        f"{args.repeats}; stnjax.xla_cpu flags in effect: {xla_cpu.in_effect()}\n")
  print("| current vs alternative | option | current ms | alternative ms | ratio |")
  print("|---|---|---:|---:|---:|")
  for r in table:
    print(f"| {r['name']} | {r['option'] or ''} | {r['current_ms']:.2f} | "
          f"{r['alternative_ms']:.2f} | {r['ratio']:.2f} |")
  timing.write_results(args.out, {"rounds": args.rounds, "repeats": args.repeats,
                                  "xla_cpu_flags": xla_cpu.in_effect(), "rows": table})


if __name__ == "__main__":
  main()
