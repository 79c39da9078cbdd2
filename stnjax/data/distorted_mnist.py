"""Fixed, versioned distorted-MNIST evaluation sets as the TFDS dataset `distorted_mnist`.

One builder config per variant of `stnjax.data.VARIANTS`
(`distorted_mnist/none`, `/r`, `/rts`, `/p`, `/e`, `/t`, `/tc`,
`/addition`), two splits each:

* `validation`: the 10k held-out training digits (training digits
  50,000..59,999), distorted with seed `SEEDS["validation"]`;
* `test`: the 10k MNIST test digits, distorted with seed `SEEDS["test"]`.

Example `i` of a split is digit `i` of that split (file order), distorted by
`stnjax.data.generate_eval_set` (float64, rounded to uint8); TC clutter and
the addition's second digit come from the same split's digits. Training
batches are not stored: they are drawn afresh on the device
(`sample_train_batch`).

Versioning: `DistortedMnist.VERSION` names the generation procedure, and
`EVAL_SHA256` records, for that version, the SHA-256 of every generated set
(`eval_set_sha256`: the uint8 image bytes, then the int32 little-endian
label bytes). The builder regenerates the sets from MNIST and refuses to
write a set whose hash differs (`EvalSetMismatchError`), so every cache
holds the same bytes; a change to the distortions that changes a set must
bump `VERSION` and the hashes. The tests regenerate every set and check the
hashes, and check jit against op-by-op generation.

Features (all `tfds.features.Tensor`, array_record, no TensorFlow needed):
`image` uint8 `(S, S, C)` in [0, 255]; `label` int64 (the sum for
addition); `index` int64, the position of the example's digit in the
split; `params`, the drawn distortion parameters of the example (float32,
or int64 for integer ones; see `stnjax.data.distort`) when the variant has
any.

    import tensorflow_datasets as tfds
    from stnjax import data  # registers the builders
    test = tfds.data_source("distorted_mnist/rts", split="test")
    images, labels = data.load_eval_set("rts", "test")  # numpy, cached per process
"""

import functools
import hashlib
import os
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from stnjax.data import distortions
from stnjax.data import mnist

EVAL_SPLITS = ("validation", "test")
SEEDS = {"validation": 1, "test": 2}

# SHA-256 of each generated set for VERSION 1.1.0 (eval_set_sha256), computed
# with jax/jaxlib 0.10.2 on CPU (x86-64), jit and op-by-op.
EVAL_SHA256 = {
    "none": {
        "validation": "947bbf90290e557028dfe1f47ee851c05bda4088e95681177fb232e1102a4097",
        "test": "45a60edfded3b2bb860a7fd195c83431011e7f04318268b4f2de30030af9444e",
    },
    "r": {
        "validation": "248775660cf80444057a3e03972dc68d048eae5c093902bbf2fa8cbefd2a65b1",
        "test": "e617333ea995ddc1695e5dfb3fbb68fa99c1eafe8938e07621ff459eb68d75e1",
    },
    "rts": {
        "validation": "ffbe4b7689cc59b18971f79dc1c856149e307bc9c5517efd68ae8ede4ccb3f4f",
        "test": "3b9cd857b3677b62428ecbf003260ad324e1178234e99d2a6429b31f1ee37fde",
    },
    "p": {
        "validation": "035e5ee58480493638b2044c2a9e0926babd6e58fdd2d67b1f9656379055c139",
        "test": "82d9524f6b81a1c93b231b2dfb0ef8bfadda0281b528b328766b9b9e2b8136d3",
    },
    "e": {
        "validation": "37fc5f21cd9812aa30217ea1303280fc65131a45bbc8a4430f920993cdcfe62e",
        "test": "4319bfc152602aed767936cccbe8d74ecff9b9ee06e9d2cb177decd79ea38faf",
    },
    "t": {
        "validation": "200abf8998def8e317045a8de762805fcdd33fd92b7674d4b4a3881b36b3af6b",
        "test": "8e30f81d7adbdab8c92023ff23017487ca3b3bdc455fcef05c53aa5565ea828c",
    },
    "tc": {
        "validation": "1905ef52e50afc89bab016907360afe3d8dd19535ecf29b53c4d1bd9dff4bd08",
        "test": "a453988ec9622c516d2f05171293ff9862f5ece15e4e1191cc324483ba252663",
    },
    "addition": {
        "validation": "7d260b0b1dbc386af0c8d9864650aa93ae4f447f8441f925f2460f1bac3ab312",
        "test": "6fad37780cc2e33fcf2157c17af5fca1b0fe2948402d10c63f84448369f05546",
    },
}


def variant_key(variant: "str | distortions.Variant", seed: int) -> jax.Array:
  """The root key of a variant's evaluation set: `fold_in(key(seed), crc32(name))`."""
  v = distortions.get_variant(variant)
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(v.name.encode()) & 0x7FFFFFFF)


@functools.partial(jax.jit, static_argnames=("variant",))
def _eval_chunk(variant, key, indices, pool_images, pool_labels):
  return _eval_chunk_eager(variant, key, indices, pool_images, pool_labels)


def _eval_chunk_eager(variant, key, indices, pool_images, pool_labels):
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, indices)
  images, labels, params = distortions.distort(variant, keys, indices, pool_images, pool_labels,
                                   dtype=jnp.float64)
  return jnp.round(jnp.clip(images, 0, 1) * 255).astype(jnp.uint8), labels, params


def generate_eval_set(variant: "str | distortions.Variant", images: np.ndarray, labels: np.ndarray, *,
                      seed: int, indices: np.ndarray | None = None, chunk_size: int = 1000,
                      jit: bool = True, return_params: bool = False):
  """A fixed evaluation set: digit `i` distorted with key `fold_in(variant_key(variant, seed), i)`.

  For reproducibility across machines and backends, the parameters and the
  warp are computed in float64 (x64 enabled for the call; threefry pinned to
  its partitionable form) and the result is rounded to uint8: float32
  rounding differences (jit vs eager, CPU vs GPU) would otherwise flip
  pixels that land near a rounding boundary.

  Args:
    variant: a `VARIANTS` name or a `Variant`.
    images: uint8 `(N, 28, 28)`: the split's digits; also the pool for TC
      clutter and the addition's second digit.
    labels: integer `(N,)`.
    seed: the split's seed.
    indices: which examples to generate (default all `N`, in order); example
      `i` is the same whatever else is generated with it.
    chunk_size: examples per device call (memory bound only).
    jit: compile (default) or run op by op; both give the same bytes.
    return_params: also return the drawn parameters (numpy, float64 / int32;
      see `distort`).

  Returns:
    uint8 `(M, S, S, C)` images in [0, 255] (`round(255 * x)`) and int32
    `(M,)` labels, M = `len(indices)` (and the parameters if `return_params`).
  """
  v = distortions.get_variant(variant)
  indices = np.arange(len(images)) if indices is None else np.asarray(indices)
  if indices.ndim != 1:
    raise ValueError(f"`indices` must be 1-D, got shape {indices.shape}.")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
  fn = functools.partial(_eval_chunk, v) if jit else functools.partial(_eval_chunk_eager, v)
  chunks = []
  with jax.enable_x64(True), jax.threefry_partitionable(True):
    key = variant_key(v, seed)
    pool_images = jnp.asarray(images)
    pool_labels = jnp.asarray(labels, jnp.int32)
    for start in range(0, len(indices), chunk_size):
      chunk = jnp.asarray(indices[start:start + chunk_size], jnp.int32)
      chunks.append(jax.tree.map(np.asarray, fn(key, chunk, pool_images, pool_labels)))
  if not chunks:
    raise ValueError("`indices` (or `images`) is empty: nothing to generate.")
  out_images, out_labels, params = jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)
  return (out_images, out_labels, params) if return_params else (out_images, out_labels)


class EvalSetMismatchError(ValueError):
  """A regenerated evaluation set does not have its recorded SHA-256."""


def eval_set_sha256(images: np.ndarray, labels: np.ndarray) -> str:
  """SHA-256 of an evaluation set: uint8 image bytes (C order), then int32 LE label bytes."""
  images = np.ascontiguousarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"`images` must be uint8, got {images.dtype} {images.shape}.")
  digest = hashlib.sha256(images.tobytes())
  digest.update(np.ascontiguousarray(labels, "<i4").tobytes())
  return digest.hexdigest()


def _check_split(split: str) -> str:
  if split not in EVAL_SPLITS:
    raise ValueError(f"`split` must be one of {EVAL_SPLITS}, got {split!r}.")
  return split


def generate_split(variant, split: str, digits: mnist.Split, *, return_params: bool = False,
                   verify: bool = True, **kwargs):
  """Generates the `split` set of `variant` from that split's MNIST digits.

  Args:
    variant: a `VARIANTS` name or `Variant`.
    split: "validation" or "test".
    digits: the split's MNIST digits (`load_mnist()[split]`).
    return_params: also return the parameters.
    verify: check the result against `EVAL_SHA256` (when recorded).
    **kwargs: passed to `generate_eval_set` (e.g. `jit=False`).

  Raises:
    EvalSetMismatchError: `verify` and the set's hash is not the recorded one.
  """
  v = distortions.get_variant(variant)
  out = generate_eval_set(v, digits.images, digits.labels,
                                      seed=SEEDS[_check_split(split)],
                                      return_params=return_params, **kwargs)
  expected = EVAL_SHA256.get(v.name, {}).get(split)
  if verify and expected is not None and "indices" not in kwargs:
    got = eval_set_sha256(out[0], out[1])
    if got != expected:
      raise EvalSetMismatchError(
          f"The regenerated distorted_mnist/{v.name} {split} set has SHA-256 {got}, but "
          f"version {DistortedMnist.VERSION} records {expected}. This jax/numpy/backend "
          f"generates a different set (e.g. a changed PRNG), so results would not be "
          f"comparable; generate on a configuration listed in stnjax/data/distorted_mnist.py.")
  return out


@functools.cache
def _param_shapes(name: str) -> dict[str, jax.ShapeDtypeStruct]:
  """Per-batch shapes/dtypes of a variant's stored parameters (`index` excluded), traced only."""
  def draw():
    keys = jax.random.split(jax.random.key(0), 2)
    pool = jnp.zeros((2, 28, 28), jnp.uint8)
    return distortions.distort(name, keys, jnp.arange(2), pool, jnp.zeros((2,), jnp.int32))[2]
  params = dict(jax.eval_shape(draw))
  index = params.pop("index")
  if len(index.shape) == 2:  # addition
    params["second_index"] = jax.ShapeDtypeStruct(index.shape[:1], index.dtype)
  return params


def _param_feature(value: jax.ShapeDtypeStruct):
  dtype = np.int64 if np.issubdtype(value.dtype, np.integer) else np.float32
  return tfds.features.Tensor(shape=value.shape[1:], dtype=dtype)


class DistortedMnist(tfds.core.GeneratorBasedBuilder):
  """Fixed distorted-MNIST validation and test sets, one config per variant.

  Construct with `mnist_dir=` to read a local copy of the MNIST IDX files
  when `stnjax_mnist` is not yet prepared in the same data directory (see
  `stnjax.data.mnist`), and `verify=False` to skip the hash check (only to
  record new hashes).
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "First release: validation and test sets of 8 variants.",
      "1.1.0": "P redraws corner offsets that fold the quad or squeeze the digit "
               "(distortions.QuadRule); the other variants are unchanged.",
  }
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=v.name, description=v.description)
                     for v in distortions.VARIANTS.values()]
  # See StnjaxMnist.code_path: avoids TFDS's undeclared importlib_resources import.
  code_path = epath.Path(__file__)

  def __init__(self, *, mnist_dir: str | os.PathLike | None = None, verify: bool = True,
               **kwargs):
    kwargs.setdefault("file_format", "array_record")
    self._mnist_dir = mnist_dir
    self._verify = verify
    super().__init__(**kwargs)

  @property
  def variant(self) -> distortions.Variant:
    return distortions.get_variant(self.builder_config.name)

  def _info(self) -> tfds.core.DatasetInfo:
    v = self.variant
    features = {
        "image": tfds.features.Tensor(shape=v.shape, dtype=np.uint8),
        "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        "index": tfds.features.Tensor(shape=(), dtype=np.int64),
    }
    params = self._param_shapes()
    if params:
      features["params"] = tfds.features.FeaturesDict(
          {k: _param_feature(value) for k, value in sorted(params.items())})
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{v.paper_name}: {v.description} Source: {v.source} "
                     f"UNVERIFIED assumptions: {', '.join(v.unverified) or 'none'}."),
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        homepage="https://arxiv.org/abs/1506.02025",
        citation=("@inproceedings{jaderberg2015spatial, title={Spatial Transformer Networks}, "
                  "author={Jaderberg, Max and Simonyan, Karen and Zisserman, Andrew and "
                  "Kavukcuoglu, Koray}, booktitle={NIPS}, year={2015}}"),
    )

  def _param_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    return _param_shapes(self.variant.name)

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = mnist.load_mnist(self.data_dir_root, mnist_dir=self._mnist_dir)
    # Generate and verify both splits before anything is written.
    generated = {split: generate_split(self.variant, split, splits[split], return_params=True,
                                       verify=self._verify)
                 for split in EVAL_SPLITS}
    return {split: self._generate_examples(*generated[split]) for split in EVAL_SPLITS}

  def _generate_examples(self, images, labels, params):
    index = params.pop("index")
    if index.ndim == 2:  # addition: (first, second) digit; `index` is the first.
      params["second_index"] = index[:, 1]
      index = index[:, 0]
    params = {k: value.astype(np.int64 if np.issubdtype(value.dtype, np.integer) else np.float32)
              for k, value in params.items()}
    for i in range(len(images)):
      example = {"image": images[i], "label": int(labels[i]), "index": int(index[i])}
      if params:
        example["params"] = {k: value[i] for k, value in params.items()}
      yield i, example


def prepare(variant, data_dir: str | os.PathLike | None = None, *,
            mnist_dir: str | os.PathLike | None = None) -> DistortedMnist:
  """Builds `distorted_mnist/<variant>` in `data_dir` if needed; returns the builder."""
  mnist.check_data_dir(data_dir)
  builder = DistortedMnist(config=distortions.get_variant(variant).name,
                           data_dir=None if data_dir is None else os.fspath(data_dir),
                           mnist_dir=mnist_dir)
  builder.download_and_prepare(download_config=mnist._download_config())  # pylint: disable=protected-access
  return builder


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, split: str, data_dir: str | None,
                 mnist_dir: str | None) -> mnist.Split:
  builder = prepare(name, data_dir, mnist_dir=mnist_dir)
  examples = mnist.read_examples(builder, split)
  images = np.stack([e["image"] for e in examples])
  labels = np.array([e["label"] for e in examples], np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return mnist.Split(images, labels)


def load_eval_set(variant, split: str, data_dir: str | os.PathLike | None = None, *,
                  mnist_dir: str | os.PathLike | None = None,
                  dtype=np.uint8) -> mnist.Split:
  """A fixed evaluation set as numpy arrays, via `distorted_mnist/<variant>` (built on first use).

  Args:
    variant: a `VARIANTS` name (case-insensitive) or `Variant`.
    split: "validation" or "test".
    data_dir: TFDS data directory (the cache; default TFDS's).
    mnist_dir: directory of the MNIST IDX files, used only if `stnjax_mnist`
      must be built (see `stnjax.data.load_mnist`).
    dtype: `np.uint8` (default: the stored bytes, in [0, 255]) or a float
      dtype (images / 255, in [0, 1]).

  Returns:
    `Split(images (10000, S, S, C), labels int32 (10000,))`; read-only, and
    cached per process.

  Raises:
    ValueError: unknown variant or split.
    EvalSetMismatchError: building the set here gives bytes other than the
      recorded ones.
    CorruptCacheError: the cache's files are damaged (the message names them
      and the directory to delete).
  """
  v = distortions.get_variant(variant)
  _check_split(split)
  data_dir = None if data_dir is None else os.fspath(Path(data_dir).expanduser().resolve())
  out = _load_cached(v.name, split, data_dir, None if mnist_dir is None else os.fspath(mnist_dir))
  if np.dtype(dtype) == np.uint8:
    return out
  if not np.issubdtype(np.dtype(dtype), np.floating):
    raise ValueError(f"`dtype` must be uint8 or a float dtype, got {dtype!r}.")
  return mnist.Split(out.images.astype(dtype) / np.asarray(255, dtype), out.labels)
