"""Benchmark: distorted-MNIST generation cost per variant.

For each variant, prints the median milliseconds to generate one training
batch (`stnjax.data.sample_train_batch`, batch 256, jitted, a new key every
call, synchronised with block_until_ready) and the median seconds to generate
a whole 10k evaluation set (`stnjax.data.generate_eval_set`: float64, rounded
to uint8, chunks of 1000, copied to host), both after one warm-up call, plus
the first call's time (compilation included). Prints a Markdown table and,
with --out, writes the rows and the provenance as JSON.

  python -m scripts.bench.bench_data [--repeats 20] [--variants r,rts] [--mnist_dir DIR]
      [--out results/bench/data.json]
"""

import argparse
import platform
import time

import jax

from scripts.bench import timing
from stnjax import data


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default=",".join(data.VARIANTS))
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=20, help="timed training batches")
  parser.add_argument("--eval_repeats", type=int, default=3, help="timed 10k evaluation sets")
  parser.add_argument("--mnist_dir", default=None, help="directory of the IDX files")
  parser.add_argument("--data_dir", default=None, help="TFDS data directory (the cache)")
  parser.add_argument("--out", default=None, help="JSON file for the results (optional)")
  args = parser.parse_args()

  splits = data.load_mnist(args.data_dir, mnist_dir=args.mnist_dir)
  pool = jax.device_put(tuple(splits["train"]))
  test_images, test_labels = splits["test"]
  root = jax.random.key(0)

  rows = []
  for name in args.variants.split(","):
    def train_batch(step, name=name):
      key = jax.random.fold_in(root, step)
      jax.block_until_ready(data.sample_train_batch(name, key, *pool, args.batch_size))

    def eval_set(i, name=name):
      data.generate_eval_set(name, test_images, test_labels, seed=i)

    start = time.perf_counter()
    train_batch(10**6)
    first_batch = time.perf_counter() - start
    batch_ms = 1e3 * timing.median_seconds(train_batch, repeats=args.repeats)
    start = time.perf_counter()
    eval_set(10**6)
    first_eval = time.perf_counter() - start
    eval_s = timing.median_seconds(eval_set, repeats=args.eval_repeats)
    rows.append((name, batch_ms, first_batch, eval_s, first_eval))
    print(f"{name}: {batch_ms:.2f} ms/batch, {eval_s:.2f} s/10k", flush=True)

  print()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}")
  print(f"| variant | ms per {args.batch_size}-batch (median) | first batch, compile incl. (s) "
        f"| s per 10k eval set (median) | first 10k set, compile incl. (s) |")
  print("|---|---|---|---|---|")
  for name, batch_ms, first_batch, eval_s, first_eval in rows:
    print(f"| {name} | {batch_ms:.1f} | {first_batch:.1f} | {eval_s:.2f} | {first_eval:.1f} |")
  keys = ("variant", "batch_ms", "first_batch_s", "eval_set_s", "first_eval_set_s")
  timing.write_results(args.out, {"batch_size": args.batch_size,
                                  "rows": [dict(zip(keys, row)) for row in rows]})


if __name__ == "__main__":
  main()
