"""Writes one PNG per distorted-MNIST variant: a grid of training examples with labels.

Each panel is one example of `stnjax.data.sample_train_batch` (drawn from
the 50k training pool with a fixed key), titled with its label and the main
drawn parameters (angle in degrees, scale = the digit's size factor). The
addition variant shows its two channels side by side, titled `a+b=sum`.

  python scripts/show_datasets.py [--out_dir docs/images] [--variants r,rts] \
      [--mnist_dir DIR] [--data_dir TFDS_DIR]
"""

import argparse
import os

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from stnjax import data  # pylint: disable=g-import-not-at-top,wrong-import-position


def _caption(variant: data.Variant, params: dict[str, np.ndarray], label: int, i: int) -> str:
  if variant.kind == "addition":
    a, b = params["digit_labels"][i]
    return f"{a}+{b}={label}"
  parts = [str(label)]
  if "angle" in params:
    parts.append(f"{params['angle'][i]:+.0f}°")
  if "scale" in params:
    parts.append(f"×{params['scale'][i]:.2f}")
  return " ".join(parts)


def _panel(image: np.ndarray) -> np.ndarray:
  """`(S, S, C)` -> a 2-D panel; channels side by side with a grey separator."""
  if image.shape[-1] == 1:
    return image[..., 0]
  separator = np.full((image.shape[0], 1), 0.5, image.dtype)
  columns = []
  for c in range(image.shape[-1]):
    columns += [image[..., c], separator]
  return np.concatenate(columns[:-1], axis=1)


def show(variant_name: str, pool_images, pool_labels, out_dir: str, *, rows: int, cols: int,
         seed: int) -> str:
  variant = data.get_variant(variant_name)
  key = jax.random.fold_in(jax.random.key(seed), 0)
  images, labels, params = data.sample_train_batch(variant.name, key, pool_images, pool_labels,
                                                   rows * cols, return_params=True)
  images, labels = np.asarray(images), np.asarray(labels)
  params = jax.tree.map(np.asarray, params)
  width = 1.6 * cols * (2 if variant.channels == 2 else 1)
  fig, axes = plt.subplots(rows, cols, figsize=(width, 1.75 * rows + 0.5), squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.imshow(_panel(images[i]), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(_caption(variant, params, int(labels[i]), i), fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  size = f"{variant.image_size}x{variant.image_size}x{variant.channels}"
  fig.suptitle(f"{variant.paper_name} ({variant.name}): {size}. {variant.description}",
               fontsize=8, wrap=True)
  fig.tight_layout()
  path = os.path.join(out_dir, f"{variant.name}.png")
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out_dir", default="docs/images")
  parser.add_argument("--variants", default=",".join(data.VARIANTS),
                      help="comma-separated variant names (default: all)")
  parser.add_argument("--mnist_dir", default=None, help="directory of the IDX files")
  parser.add_argument("--data_dir", default=None, help="TFDS data directory (the cache)")
  parser.add_argument("--rows", type=int, default=4)
  parser.add_argument("--cols", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  pool_images, pool_labels = data.load_mnist(args.data_dir, mnist_dir=args.mnist_dir)["train"]
  pool_images, pool_labels = jax.device_put(pool_images), jax.device_put(pool_labels)
  for name in args.variants.split(","):
    print(show(name, pool_images, pool_labels, args.out_dir, rows=args.rows, cols=args.cols,
               seed=args.seed))


if __name__ == "__main__":
  main()
