"""Benchmark: stnjax.grid_sample vs torch grid_sample vs jax.scipy map_coordinates.

Batch 256 of affine-warped images (bilinear, zeros padding,
align_corners=False), four workloads:

  forward        sample(image, affine_grid(theta))
  grad theta     forward + backward to theta only (the STN-on-input case)
  grad both      forward + backward to image and theta (STN on feature maps)
  sample only    sample(image, grid) with the same affine grid made beforehand
                 (each library's own, outside the timed call): the sampler
                 alone, as for a grid from elsewhere (TPS, a user's own)

JAX functions are jit-compiled and synchronised with block_until_ready.
Each (implementation, workload) is timed in --rounds rounds of --repeats runs
(after --warmup runs), the rounds of all implementations interleaved so that
a noisy machine slows them alike; the reported time is the median of the
round medians. Round r runs the implementations in the r-th of their orders
(all permutations, in turn; 6 rounds cover them), so that no implementation
always follows the same one: on a small machine a benchmark runs slower
after other work (docs/performance.md, "Measuring on a small CPU"). The
ratio column is torch_time / stnjax_time (> 1: stnjax is faster). Prints a
Markdown table and, with --out, writes it with the raw numbers (per-round
medians, the rounds' orders) and the provenance as JSON.

The benchmark restarts itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, the
setting `scripts/run.sh` gives the main job, unless GLIBC_TUNABLES is set
(`GLIBC_TUNABLES= python -m scripts.bench.bench_sampler` keeps glibc's
defaults, under which large outputs can land in fresh 4 KiB pages).
--pin-xla-threads pins XLA:CPU's worker threads one per CPU first, a
diagnostic for a machine that runs the benchmark at two speeds
(`timing.pin_xla_worker_threads`).

--xla_cpu_flags on calls `stnjax.xla_cpu.configure()` first, as the
training scripts do; off (the default) measures the library as imported.

  python -m scripts.bench.bench_sampler [--out results/bench/sampler.json] [--pin-xla-threads]
      [--xla_cpu_flags on]
"""

import argparse
import itertools
import os
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import stnjax
from scripts.bench import timing
from stnjax.sampling import unnormalize

SHAPES = ((28, 28, 1), (42, 42, 1), (60, 60, 1), (28, 28, 32))
WORKLOADS = ("forward", "grad theta", "grad both", "sample only")


def median_ms(fn, warmup, repeats):
  return 1e3 * timing.median_seconds(lambda _: fn(), warmup=warmup, repeats=repeats)


def stnjax_sample(image, theta):
  h, w = image.shape[1:3]
  return stnjax.grid_sample(image, stnjax.affine_grid(theta, (h, w)))


def map_coordinates_sample(image, theta):
  """The same warp with jax.scipy.ndimage.map_coordinates, vmapped over batch and channels."""
  return map_coordinates_grid_sample(image, stnjax.affine_grid(theta, image.shape[1:3]))


def map_coordinates_grid_sample(image, grid):
  """`grid_sample(image, grid)` (normalised (x, y) grid) with map_coordinates."""
  h, w = image.shape[1:3]
  rows = unnormalize(grid[..., 1], h, align_corners=False)
  cols = unnormalize(grid[..., 0], w, align_corners=False)

  def one(channel, r, c):  # (H, W), (H, W), (H, W)
    return jax.scipy.ndimage.map_coordinates(channel, [r, c], order=1, mode="constant")

  per_channel = jax.vmap(one, in_axes=(-1, None, None), out_axes=-1)
  return jax.vmap(per_channel)(image, rows, cols)


def jax_fns(sample, grid_sample):
  def loss(image, theta, cotangent):
    return jnp.vdot(sample(image, theta), cotangent)

  return {
      "forward": jax.jit(sample),
      "grad theta": jax.jit(jax.grad(loss, argnums=1)),
      "grad both": jax.jit(jax.grad(loss, argnums=(0, 1))),
      "sample only": jax.jit(grid_sample),
  }


def jax_runners(fns, image, theta, cotangent):
  """Zero-argument callables, one per workload, that run and synchronise."""
  grid = jax.block_until_ready(jax.jit(stnjax.affine_grid, static_argnums=1)(
      theta, image.shape[1:3]))
  out = {}
  for name, fn in fns.items():
    args = {"forward": (image, theta), "sample only": (image, grid)}.get(
        name, (image, theta, cotangent))
    out[name] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
  return out


def torch_runners(image, theta, cotangent):
  """Like `jax_runners` for torch grid_sample (NCHW), plus a description of torch."""
  import torch
  import torch.nn.functional as F

  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  image = torch.tensor(np.moveaxis(image, -1, 1), device=device)  # NCHW.
  theta = torch.tensor(theta, device=device)
  cotangent = torch.tensor(np.moveaxis(cotangent, -1, 1), device=device)

  def run(grad_image, grad_theta):
    img = image.clone().requires_grad_(grad_image)
    th = theta.clone().requires_grad_(grad_theta)
    grid = F.affine_grid(th, list(img.shape), align_corners=False)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if grad_image or grad_theta:
      (out * cotangent).sum().backward()
    sync()

  def forward():
    with torch.no_grad():
      run(False, False)

  grid = F.affine_grid(theta, list(image.shape), align_corners=False)

  def sample_only():
    with torch.no_grad():
      F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sync()

  runners = {"forward": forward, "grad theta": lambda: run(False, True),
             "grad both": lambda: run(True, True), "sample only": sample_only}
  return runners, f"torch {torch.__version__} ({device}, {torch.get_num_threads()} threads)"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=30, help="timed runs per round")
  parser.add_argument("--rounds", type=int, default=6,
                      help="interleaved rounds (6: every order of the three libraries once)")
  parser.add_argument("--out", default=None, help="JSON file for the results (optional).")
  parser.add_argument("--pin-xla-threads", action="store_true",
                      help="diagnostic: pin XLA:CPU's worker threads one per CPU "
                           "(timing.pin_xla_worker_threads; torch's threads are left as they are)")
  parser.add_argument("--xla_cpu_flags", choices=("off", "on"), default="off",
                      help="on: stnjax.xla_cpu.configure() first, as the training scripts do "
                           "(off: the library as imported)")
  args = parser.parse_args()
  if args.xla_cpu_flags == "on":
    stnjax.xla_cpu.configure()  # Before the backend starts (jax.devices() below).

  rng = np.random.default_rng(0)
  device = jax.devices()[0]
  pinned = {}
  if args.pin_xla_threads:
    jax.block_until_ready(jnp.zeros(8) + 1)  # Starts the CPU client's thread pool.
    pinned = timing.pin_xla_worker_threads()
  load_before = os.getloadavg()
  rows, torch_info = [], "torch not installed"
  for h, w, c in SHAPES:
    image = rng.random((args.batch, h, w, c), np.float32)
    theta = (np.eye(2, 3, dtype=np.float32)
             + rng.normal(0, 0.2, (args.batch, 2, 3)).astype(np.float32))
    cotangent = rng.normal(size=(args.batch, h, w, c)).astype(np.float32)
    arrays = [jax.device_put(a) for a in (image, theta, cotangent)]
    runners = {"stnjax": jax_runners(jax_fns(stnjax_sample, stnjax.grid_sample), *arrays),
               "map_coordinates": jax_runners(
                   jax_fns(map_coordinates_sample, map_coordinates_grid_sample), *arrays)}
    try:
      runners["torch"], torch_info = torch_runners(image, theta, cotangent)
    except ImportError:
      pass
    rounds = {(impl, name): [] for impl in runners for name in WORKLOADS}
    orders = list(itertools.permutations(runners))
    for r in range(args.rounds):
      for impl in orders[r % len(orders)]:
        for name, fn in runners[impl].items():
          rounds[impl, name].append(median_ms(fn, args.warmup, args.repeats))
    for name in WORKLOADS:
      ms = {impl: statistics.median(rounds[impl, name]) if rounds.get((impl, name)) else
            float("nan") for impl in ("stnjax", "torch", "map_coordinates")}
      rows.append({
          "shape": f"{args.batch}x{h}x{w}x{c}", "workload": name,
          "stnjax_ms": ms["stnjax"], "torch_ms": ms["torch"],
          "map_coordinates_ms": ms["map_coordinates"],
          "ratio_torch_over_stnjax": ms["torch"] / ms["stnjax"],
          "round_medians_ms": {impl: rounds[impl, name] for impl in runners},
          "round_orders": [orders[r % len(orders)] for r in range(args.rounds)],
      })
      print(f"# {rows[-1]['shape']} {name}: stnjax {ms['stnjax']:.2f} ms, torch "
            f"{ms['torch']:.2f} ms, map_coordinates {ms['map_coordinates']:.2f} ms", flush=True)

  tunables = os.environ.get("GLIBC_TUNABLES", "")
  machine = (f"{device.device_kind} ({device.platform}), {platform.processor() or platform.machine()}, "
             f"jax {jax.__version__}, {torch_info}, GLIBC_TUNABLES={tunables!r}"
             + (f", XLA worker threads pinned to CPUs {sorted(pinned.values())}" if pinned else ""))
  load = f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
  print(f"\nMachine: {machine}; {load}\n")
  print("| input (NxHxWxC) | workload | stnjax ms | torch ms | map_coordinates ms | torch / stnjax |")
  print("|---|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['shape']} | {r['workload']} | {r['stnjax_ms']:.2f} | {r['torch_ms']:.2f} | "
          f"{r['map_coordinates_ms']:.2f} | {r['ratio_torch_over_stnjax']:.2f} |")
  timing.write_results(args.out, {"machine": machine, "load": load, "torch": torch_info,
                                  "pinned_xla_threads": len(pinned), "batch": args.batch,
                                  "rounds": args.rounds, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
  stnjax.xla_cpu.restart_with_huge_pages()
  main()
