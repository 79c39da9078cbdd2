"""Benchmark: stnjax.grid_sample vs torch grid_sample vs jax.scipy map_coordinates.

Batch 256 of affine-warped images (bilinear, zeros padding,
align_corners=False), three workloads:

  forward        sample(image, affine_grid(theta))
  grad theta     forward + backward to theta only (the STN-on-input case)
  grad both      forward + backward to image and theta (STN on feature maps)

Each timing is the median of --repeats runs after --warmup runs; JAX
functions are jit-compiled and synchronised with block_until_ready. The
ratio column is torch_time / stnjax_time (> 1: stnjax is faster). Prints a
Markdown table and, with --out, writes it with the raw numbers as JSON.

  python scripts/bench_sampler.py [--out results/bench_sampler_cpu.json]
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import stnjax
from stnjax.sampling import unnormalize

SHAPES = ((28, 28, 1), (42, 42, 1), (60, 60, 1), (28, 28, 32))
WORKLOADS = ("forward", "grad theta", "grad both")


def median_ms(fn, warmup, repeats):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def stnjax_sample(image, theta):
  h, w = image.shape[1:3]
  return stnjax.grid_sample(image, stnjax.affine_grid(theta, (h, w)))


def map_coordinates_sample(image, theta):
  """The same warp with jax.scipy.ndimage.map_coordinates, vmapped over batch and channels."""
  h, w = image.shape[1:3]
  grid = stnjax.affine_grid(theta, (h, w))
  rows = unnormalize(grid[..., 1], h, align_corners=False)
  cols = unnormalize(grid[..., 0], w, align_corners=False)

  def one(channel, r, c):  # (H, W), (H, W), (H, W)
    return jax.scipy.ndimage.map_coordinates(channel, [r, c], order=1, mode="constant")

  per_channel = jax.vmap(one, in_axes=(-1, None, None), out_axes=-1)
  return jax.vmap(per_channel)(image, rows, cols)


def jax_fns(sample):
  def loss(image, theta, cotangent):
    return jnp.vdot(sample(image, theta), cotangent)

  return {
      "forward": jax.jit(sample),
      "grad theta": jax.jit(jax.grad(loss, argnums=1)),
      "grad both": jax.jit(jax.grad(loss, argnums=(0, 1))),
  }


def time_jax(fns, image, theta, cotangent, warmup, repeats):
  out = {}
  for name, fn in fns.items():
    args = (image, theta) if name == "forward" else (image, theta, cotangent)
    out[name] = median_ms(lambda: jax.block_until_ready(fn(*args)), warmup, repeats)
  return out


def time_torch(image, theta, cotangent, warmup, repeats):
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

  with torch.no_grad():
    forward = median_ms(lambda: run(False, False), warmup, repeats)
  return {
      "forward": forward,
      "grad theta": median_ms(lambda: run(False, True), warmup, repeats),
      "grad both": median_ms(lambda: run(True, True), warmup, repeats),
  }, f"torch {torch.__version__} ({device}, {torch.get_num_threads()} threads)"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--out", default=None, help="JSON file for the results (optional).")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  device = jax.devices()[0]
  rows, torch_info = [], "torch not installed"
  for h, w, c in SHAPES:
    image = rng.random((args.batch, h, w, c), np.float32)
    theta = (np.eye(2, 3, dtype=np.float32)
             + rng.normal(0, 0.2, (args.batch, 2, 3)).astype(np.float32))
    cotangent = rng.normal(size=(args.batch, h, w, c)).astype(np.float32)
    arrays = [jax.device_put(a) for a in (image, theta, cotangent)]
    ours = time_jax(jax_fns(stnjax_sample), *arrays, args.warmup, args.repeats)
    mapc = time_jax(jax_fns(map_coordinates_sample), *arrays, args.warmup, args.repeats)
    try:
      torch_ms, torch_info = time_torch(image, theta, cotangent, args.warmup, args.repeats)
    except ImportError:
      torch_ms = {k: float("nan") for k in WORKLOADS}
    for name in WORKLOADS:
      rows.append({
          "shape": f"{args.batch}x{h}x{w}x{c}", "workload": name,
          "stnjax_ms": ours[name], "torch_ms": torch_ms[name],
          "map_coordinates_ms": mapc[name], "ratio_torch_over_stnjax": torch_ms[name] / ours[name],
      })
      print(f"# {rows[-1]['shape']} {name}: stnjax {ours[name]:.2f} ms, torch "
            f"{torch_ms[name]:.2f} ms, map_coordinates {mapc[name]:.2f} ms", flush=True)

  machine = (f"{device.device_kind} ({device.platform}), {platform.processor() or platform.machine()}, "
             f"jax {jax.__version__}, {torch_info}")
  print(f"\nMachine: {machine}\n")
  print("| input (NxHxWxC) | workload | stnjax ms | torch ms | map_coordinates ms | torch / stnjax |")
  print("|---|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['shape']} | {r['workload']} | {r['stnjax_ms']:.2f} | {r['torch_ms']:.2f} | "
          f"{r['map_coordinates_ms']:.2f} | {r['ratio_torch_over_stnjax']:.2f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": machine, "batch": args.batch, "repeats": args.repeats, "rows": rows}, f,
                indent=1)


if __name__ == "__main__":
  main()
