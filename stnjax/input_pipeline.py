"""Input pipeline adapter: the only module that calls `stnjax.data`.

`load(config)` returns a `Dataset`: the uint8 training pool (host numpy, to be
uploaded once), a pure, jit-able `sample(key, pool_images, pool_labels,
batch_size)` that draws a freshly distorted training batch on the device, the
fixed evaluation sets, and the input shape / number of classes.

Sources (`config.source`):

* `"mnist"`: the distorted-MNIST variants of `stnjax.data` ("none", "R",
  "RTS", "P", "E", "T", "TC", "addition"); the MNIST IDX files are read from
  `config.mnist_dir`, else `$STNJAX_MNIST_DIR`, else `../shared/data/mnist`
  relative to the repository root; the TFDS cache (MNIST and the fixed
  evaluation sets) lives in `config.tfds_dir`, else TFDS's default.
* `"synthetic"`: a tiny, learnable stand-in with the same shapes (for tests:
  no files needed). Class `c` is a fixed random template; images are noisy,
  randomly shifted copies.

Conventions: images are float32 channels-last `(B, S, S, C)` in [0, 1];
labels int32 `(B,)`.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Synthetic stand-in: (image size, channels, classes) per variant, the shapes of stnjax.data.
SYNTHETIC_SHAPES = {"none": (28, 1, 10), "R": (28, 1, 10), "P": (28, 1, 10), "E": (28, 1, 10),
                    "RTS": (42, 1, 10), "T": (60, 1, 10), "TC": (60, 1, 10),
                    "addition": (42, 2, 19)}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Everything training needs from the data.

  Attributes:
    train_images: `(N, ...)` uint8 pool the sampler draws from (host numpy).
    train_labels: `(N,)` int32.
    sample: pure function `(key, pool_images, pool_labels, batch_size) ->
      (images float32 (B, S, S, C) in [0, 1], labels int32 (B,))`.
    eval_sets: split name -> `(images (N, S, S, C), labels (N,))` numpy;
      images uint8 or float (normalise with `to_float`).
    input_shape: `(S, S, C)`.
    num_classes: number of labels.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  sample: Callable[..., tuple[jax.Array, jax.Array]]
  eval_sets: dict[str, tuple[np.ndarray, np.ndarray]]
  input_shape: tuple[int, int, int]
  num_classes: int


def to_float(images):
  """uint8 in [0, 255] -> float32 in [0, 1]; float images are cast to float32 unchanged.

  Adds a trailing channel axis to `(N, H, W)` inputs. Works on numpy and jax arrays.
  """
  xp = jnp if isinstance(images, jax.Array) else np
  if images.dtype == xp.uint8:
    images = images.astype(xp.float32) / 255.0
  else:
    images = images.astype(xp.float32)
  if images.ndim == 3:
    images = images[..., None]
  return images


def load(config) -> Dataset:
  """Loads the data described by `config` (fields: source, variant, mnist_dir, tfds_dir, ...)."""
  if config.variant not in SYNTHETIC_SHAPES:
    raise ValueError(f"`config.data.variant` must be one of {sorted(SYNTHETIC_SHAPES)}, "
                     f"got {config.variant!r}.")
  if config.source == "mnist":
    return _load_mnist(config)
  if config.source == "synthetic":
    return _load_synthetic(config)
  raise ValueError(f"`config.data.source` must be 'mnist' or 'synthetic', got {config.source!r}.")


def _load_mnist(config) -> Dataset:
  from stnjax import data  # pylint: disable=g-import-not-at-top  (keeps synthetic runs TFDS-free)
  mnist_dir = config.get("mnist_dir") or None
  tfds_dir = config.get("tfds_dir") or None
  variant = data.get_variant(config.variant)
  pool_images, pool_labels = data.load_mnist(tfds_dir, mnist_dir=mnist_dir)["train"]

  def sample(key, images, labels, batch_size):
    x, y = data.sample_train_batch(variant.name, key, images, labels, batch_size)
    return to_float(x), y.astype(jnp.int32)

  eval_sets = {split: tuple(data.load_eval_set(variant.name, split, tfds_dir, mnist_dir=mnist_dir))
               for split in ("validation", "test")}
  return Dataset(np.asarray(pool_images), np.asarray(pool_labels, np.int32), sample, eval_sets,
                 (variant.image_size, variant.image_size, variant.channels), variant.num_classes)


def _synthetic_split(templates: np.ndarray, n: int, seed: int, max_shift: int):
  rng = np.random.default_rng(seed)
  num_classes = len(templates)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  images = templates[labels]
  shifts = rng.integers(-max_shift, max_shift + 1, (n, 2))
  images = np.stack([np.roll(im, tuple(s), axis=(0, 1)) for im, s in zip(images, shifts)])
  images = np.clip(images + rng.normal(0, 0.1, images.shape), 0, 1)
  return (images * 255).round().astype(np.uint8), labels


def _load_synthetic(config) -> Dataset:
  size, channels, num_classes = SYNTHETIC_SHAPES[config.variant]
  rng = np.random.default_rng(1234)
  templates = (rng.uniform(size=(num_classes, size, size, channels)) > 0.7).astype(np.float64)
  max_shift = 2
  pool_images, pool_labels = _synthetic_split(templates, config.synthetic_train_size, 1, 0)
  eval_sets = {"validation": _synthetic_split(templates, config.synthetic_eval_size, 2, max_shift),
               "test": _synthetic_split(templates, config.synthetic_eval_size, 3, max_shift)}

  def sample(key, images, labels, batch_size):
    k_idx, k_shift = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
    x = to_float(images[idx])
    shifts = jax.random.randint(k_shift, (batch_size, 2), -max_shift, max_shift + 1)
    x = jax.vmap(lambda im, s: jnp.roll(im, (s[0], s[1]), axis=(0, 1)))(x, shifts)
    return x, labels[idx]

  return Dataset(pool_images, pool_labels, sample, eval_sets, (size, size, channels), num_classes)
