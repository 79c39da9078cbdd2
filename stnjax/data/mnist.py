"""MNIST from the four standard IDX files, through tensorflow-datasets, without TensorFlow.

TFDS's own `mnist` builder needs TensorFlow for its `Image` feature. This
module owns a small builder, `stnjax_mnist`, whose features are plain
`tfds.features.Tensor`s: TFDS builds and reads it as `array_record` with no
TensorFlow installed (`tfds.data_source("stnjax_mnist")`, or `tfds.load` where
TensorFlow is installed).

Where the IDX files come from, first match wins:

1. the `mnist_dir` argument (`load_mnist(mnist_dir=...)`, a config field);
2. the `STNJAX_MNIST_DIR` environment variable;
3. in a source checkout (`pyproject.toml` next to the `stnjax` package),
   `../shared/data/mnist` relative to the checkout's root, if it exists (the
   project machines' offline copy);
4. a download of the four `.gz` files from `MNIST_URL` (needs internet).

A directory may hold each file gzipped (`train-images-idx3-ubyte.gz`, by any
gzip tool) or not (`train-images-idx3-ubyte`). Every file is verified by the
SHA-256 of its *decompressed* content against `SHA256SUMS`, a copy of the
canonical sums shipped in this package; a wrong, truncated or missing file
raises `MnistFileError` (a `ValueError`) naming the file and what was
expected, before anything is written to the TFDS cache. TFDS writes into a
temporary `incomplete.*` directory that is renamed on success and deleted on
failure, so the cache never holds a half-written dataset.

Splits (digits in the original file order):

* `train`: training digits 0..49,999 (the pool training batches draw from);
* `validation`: training digits 50,000..59,999 (held out for tuning);
* `test`: the 10,000 test digits.

The standard 60k training set is `train` followed by `validation`
(`tfds.data_source("stnjax_mnist", split="train+validation")`).

The cache lives in the TFDS data directory: the `data_dir` argument, else
`$TFDS_DATA_DIR`, else `~/tensorflow_datasets`, at
`<data_dir>/stnjax_mnist/1.0.0/`; downloads go to
`<data_dir>/downloads/stnjax_mnist/`.
"""

import functools
import gzip
import hashlib
import importlib.resources
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
MNIST_DIR_ENV = "STNJAX_MNIST_DIR"

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

NUM_TRAIN = 50_000  # First 50k training digits: the training pool.
NUM_VALIDATION = 10_000  # Last 10k training digits: held-out validation.
NUM_TEST = 10_000
SPLITS = ("train", "validation", "test")

# IDX layout of each file: (magic number, shape). Decompressed size follows.
_IDX_LAYOUT = {
    TRAIN_IMAGES: (0x00000803, (60_000, 28, 28)),
    TRAIN_LABELS: (0x00000801, (60_000,)),
    TEST_IMAGES: (0x00000803, (10_000, 28, 28)),
    TEST_LABELS: (0x00000801, (10_000,)),
}
_GZIP_MAGIC = b"\x1f\x8b"


class MnistFileError(ValueError):
  """An MNIST IDX file is missing, truncated, corrupt or not the canonical one."""


class Split(NamedTuple):
  """One split: `images` uint8 `(N, 28, 28)` in [0, 255], `labels` int32 `(N,)` in [0, 9]."""
  images: np.ndarray
  labels: np.ndarray


def _decompressed_size(name: str) -> int:
  magic, shape = _IDX_LAYOUT[name]
  del magic
  return 4 * (1 + len(shape)) + int(np.prod(shape))


@functools.cache
def expected_sha256() -> Mapping[str, str]:
  """SHA-256 of each file's decompressed content, from the packaged `SHA256SUMS`."""
  text = importlib.resources.files("stnjax.data").joinpath("SHA256SUMS").read_text()
  sums = {}
  for line in text.splitlines():
    if line.strip():
      digest, name = line.split()
      sums[name.lstrip("*")] = digest
  if set(sums) != set(FILES):
    raise RuntimeError(f"Packaged SHA256SUMS lists {sorted(sums)}, expected {sorted(FILES)}.")
  return sums


def find_idx_file(directory: str | os.PathLike, name: str) -> Path:
  """The path of IDX file `name` (gzipped `name.gz` or plain `name`) in `directory`.

  Raises:
    MnistFileError: if neither exists.
  """
  directory = Path(directory)
  for candidate in (directory / f"{name}.gz", directory / name):
    if candidate.is_file():
      return candidate
  raise MnistFileError(
      f"Missing MNIST file {name!r}: neither {name}.gz nor {name} is in {str(directory)!r}. "
      f"Expected the four standard IDX files {', '.join(FILES)} (gzipped or not).")


def read_idx_file(path: str | os.PathLike, name: str | None = None) -> np.ndarray:
  """Reads and verifies one MNIST IDX file (gzipped or not).

  Args:
    path: the file; gzip is detected from its first bytes, not its name.
    name: which standard file it must be (one of `FILES`); defaults to the
      file name without `.gz`.

  Returns:
    uint8 images `(N, 28, 28)` in [0, 255] or uint8 labels `(N,)` in [0, 9].

  Raises:
    MnistFileError: the file cannot be decompressed (truncated or corrupt
      gzip stream), or its decompressed content does not have the canonical
      SHA-256 (the message gives expected and received digest and size).
  """
  path = Path(path)
  if name is None:
    name = path.name.removesuffix(".gz")
  if name not in _IDX_LAYOUT:
    raise ValueError(f"`name` must be one of {FILES}, got {name!r} (file {str(path)!r}).")
  expected_digest = expected_sha256()[name]
  expected_size = _decompressed_size(name)
  raw = path.read_bytes()
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise MnistFileError(
          f"MNIST file {str(path)!r} is not a valid gzip stream ({e}): truncated or corrupt. "
          f"Expected {name}, {expected_size:,} bytes once decompressed, SHA-256 "
          f"{expected_digest}.") from None
  digest = hashlib.sha256(raw).hexdigest()
  if digest != expected_digest:
    raise MnistFileError(
        f"MNIST file {str(path)!r} does not hold the canonical {name}: its (decompressed) "
        f"content has SHA-256 {digest} and {len(raw):,} bytes; expected SHA-256 "
        f"{expected_digest} and {expected_size:,} bytes.")
  magic, shape = _IDX_LAYOUT[name]
  header = np.frombuffer(raw, ">u4", count=1 + len(shape))
  assert header[0] == magic and tuple(header[1:]) == shape, (name, header)  # Implied by the hash.
  return np.frombuffer(raw, np.uint8, offset=4 * len(header)).reshape(shape)


def read_mnist_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads and verifies all four IDX files of `directory`.

  Every file is located and verified before any array is returned, so a bad
  file fails the whole read.

  Returns:
    `{name: array}` for each name in `FILES` (read-only numpy arrays).

  Raises:
    MnistFileError: a file is missing, truncated, corrupt or wrong.
  """
  paths = {name: find_idx_file(directory, name) for name in FILES}
  arrays = {name: read_idx_file(path, name) for name, path in paths.items()}
  return arrays


def download_mnist(target_dir: str | os.PathLike, url: str = MNIST_URL) -> Path:
  """Downloads the four gzipped IDX files into `target_dir` (skipping verified ones).

  Each file goes to a temporary name, is verified (decompressed SHA-256),
  then renamed: a failed or interrupted download leaves no file behind.

  Args:
    target_dir: directory to write into (created if needed).
    url: base URL holding `<name>.gz` for each name in `FILES` (any scheme
      `urllib` opens, `file://` included).

  Returns:
    `target_dir` as a `Path`.

  Raises:
    MnistFileError: a download failed or a downloaded file did not verify.
  """
  target_dir = Path(target_dir)
  target_dir.mkdir(parents=True, exist_ok=True)
  for name in FILES:
    final = target_dir / f"{name}.gz"
    if final.is_file():
      try:
        read_idx_file(final, name)
        continue
      except MnistFileError:
        final.unlink()
    source = url.rstrip("/") + f"/{name}.gz"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".incomplete", dir=target_dir)
    try:
      with os.fdopen(fd, "wb") as out, urllib.request.urlopen(source, timeout=60) as response:
        shutil.copyfileobj(response, out)
      read_idx_file(tmp, name)
      os.replace(tmp, final)
    except (urllib.error.URLError, OSError) as e:
      raise MnistFileError(
          f"Could not download MNIST file {name}.gz from {source!r} ({e}). Without internet "
          f"access, point stnjax at a local copy of the four IDX files: pass `mnist_dir=` or "
          f"set ${MNIST_DIR_ENV}.") from None
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  return target_dir


def checkout_mnist_dir() -> Path | None:
  """`<checkout root>/../shared/data/mnist` when stnjax runs from a source checkout and it exists."""
  root = Path(__file__).resolve().parents[2]  # <root>/stnjax/data/mnist.py
  candidate = root.parent / "shared" / "data" / "mnist"
  if (root / "pyproject.toml").is_file() and candidate.is_dir():
    return candidate
  return None


def resolve_mnist_dir(mnist_dir: str | os.PathLike | None = None) -> Path | None:
  """The local IDX directory to use, or None to download (module docstring: resolution order).

  Raises:
    ValueError: the given (or environment) directory does not exist.
  """
  source, what = mnist_dir, "`mnist_dir`"
  if source is None and os.environ.get(MNIST_DIR_ENV):
    source, what = os.environ[MNIST_DIR_ENV], f"${MNIST_DIR_ENV}"
  if source is None:
    return checkout_mnist_dir()
  path = Path(source).expanduser()
  if not path.is_dir():
    raise ValueError(f"{what} must be a directory holding the four MNIST IDX files, got "
                     f"{str(source)!r}, which is not a directory.")
  return path


class StnjaxMnist(tfds.core.GeneratorBasedBuilder):
  """MNIST (28x28 uint8) with `Tensor` features: builds and reads without TensorFlow.

  Construct with `mnist_dir=` to read a local copy of the IDX files (see the
  module docstring for the resolution order and splits). Features:
  `image` uint8 `(28, 28)` in [0, 255], `label` int64 in [0, 9], `index`
  int64, the digit's position in its IDX file (0..59,999 for train and
  validation, 0..9,999 for test). Examples keep the file order.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "MNIST from IDX files; train = first 50k, validation = last 10k."}
  # TFDS (4.9.10) derives `code_path` with `importlib_resources`, a package it
  # declares only for Python < 3.9; stating the path avoids that import.
  code_path = epath.Path(__file__)

  def __init__(self, *, mnist_dir: str | os.PathLike | None = None, url: str = MNIST_URL,
               **kwargs):
    kwargs.setdefault("file_format", "array_record")
    self._mnist_dir = mnist_dir
    self._url = url
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("The MNIST digits (LeCun, Cortes, Burges) from the four standard IDX "
                     "files, verified by SHA-256. train = training digits 0..49999, "
                     "validation = 50000..59999, test = the 10000 test digits."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28), dtype=np.uint8),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # Keep file order: validation = the last 10k.
        homepage="http://yann.lecun.com/exdb/mnist/",
        citation=("@article{lecun1998gradient, title={Gradient-based learning applied to "
                  "document recognition}, author={LeCun, Yann and Bottou, L{\\'e}on and "
                  "Bengio, Yoshua and Haffner, Patrick}, journal={Proceedings of the IEEE}, "
                  "year={1998}}"),
    )

  def _split_generators(self, dl_manager):
    directory = resolve_mnist_dir(self._mnist_dir)
    if directory is None:
      directory = download_mnist(Path(dl_manager.download_dir) / "stnjax_mnist", self._url)
    arrays = read_mnist_dir(directory)  # Verifies all four files before any example is written.
    train_images, train_labels = arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS]
    return {
        "train": self._generate_examples(train_images, train_labels, 0, NUM_TRAIN),
        "validation": self._generate_examples(train_images, train_labels, NUM_TRAIN,
                                              NUM_TRAIN + NUM_VALIDATION),
        "test": self._generate_examples(arrays[TEST_IMAGES], arrays[TEST_LABELS], 0, NUM_TEST),
    }

  def _generate_examples(self, images, labels, start, stop):
    for i in range(start, stop):
      yield i, {"image": images[i], "label": int(labels[i]), "index": i}


def _download_config():
  # No GCS look-up: stnjax datasets are never hosted there, and machines may be offline.
  return tfds.download.DownloadConfig(try_download_gcs=False)


def check_data_dir(data_dir: str | os.PathLike | None) -> None:
  """Rejects an IDX directory passed as the TFDS `data_dir` (the cache root)."""
  if data_dir is not None and any(
      (Path(data_dir) / f).is_file() or (Path(data_dir) / f"{f}.gz").is_file() for f in FILES):
    raise ValueError(
        f"`data_dir` is the TFDS data directory (where the prepared datasets are cached), but "
        f"{str(data_dir)!r} holds MNIST IDX files: pass that directory as `mnist_dir=` (or "
        f"${MNIST_DIR_ENV}) instead.")


def prepare_mnist(data_dir: str | os.PathLike | None = None, *,
                  mnist_dir: str | os.PathLike | None = None) -> StnjaxMnist:
  """Builds the `stnjax_mnist` TFDS cache in `data_dir` if needed; returns the builder."""
  check_data_dir(data_dir)
  builder = StnjaxMnist(data_dir=None if data_dir is None else os.fspath(data_dir),
                        mnist_dir=mnist_dir)
  builder.download_and_prepare(download_config=_download_config())
  return builder


class CorruptCacheError(RuntimeError):
  """A prepared TFDS dataset's files cannot be read back (e.g. flipped bytes on disk)."""


def read_examples(builder: tfds.core.DatasetBuilder, split: str) -> list:
  """Every example of `split` of a prepared builder; `CorruptCacheError` names the files.

  array_record reports a damaged file as a bare `RuntimeError` ("Corrupted
  Riegeli/records file") naming neither the file nor a fix.
  """
  try:
    source = builder.as_data_source(split=split)
    return source.__getitems__(range(len(source)))
  except (RuntimeError, OSError) as e:
    directory = os.fspath(builder.data_dir)
    files = sorted(str(f) for f in Path(directory).glob(f"*-{split}.*"))
    raise CorruptCacheError(
        f"Cannot read the TFDS cache of {builder.info.full_name}, split {split!r} "
        f"({', '.join(files) or directory}): {e}. Delete {directory} to rebuild it from "
        f"the sources on the next load.") from e


def read_split(source) -> Split:
  """Reads a whole TFDS data source (or a list) of `{image, label}` examples into a `Split`."""
  examples = source if isinstance(source, list) else source.__getitems__(range(len(source)))
  images = np.stack([e["image"] for e in examples]) if examples else np.zeros((0, 28, 28), np.uint8)
  labels = np.array([e["label"] for e in examples], np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return Split(images, labels)


@functools.lru_cache(maxsize=4)
def _load_mnist_cached(data_dir: str | None, mnist_dir: str | None) -> dict[str, Split]:
  builder = prepare_mnist(data_dir, mnist_dir=mnist_dir)
  return {split: read_split(read_examples(builder, split)) for split in SPLITS}


def load_mnist(data_dir: str | os.PathLike | None = None, *,
               mnist_dir: str | os.PathLike | None = None) -> dict[str, Split]:
  """MNIST as numpy arrays, through the `stnjax_mnist` TFDS dataset (built on first use).

  Args:
    data_dir: the TFDS data directory holding the cache (default: TFDS's,
      `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    mnist_dir: directory with the four IDX files, used only to build the
      cache; default `$STNJAX_MNIST_DIR`, else a checkout's
      `../shared/data/mnist`, else download from `MNIST_URL`.

  Returns:
    `{"train": Split, "validation": Split, "test": Split}`: images uint8
    `(N, 28, 28)` in [0, 255], labels int32 `(N,)` in [0, 9], N = 50,000,
    10,000 and 10,000; train + validation is the standard 60k training set
    in file order. Arrays are read-only and cached per process.

  Raises:
    MnistFileError: an IDX file is missing, truncated, corrupt or wrong (only
      when the cache has to be built).
    ValueError: `data_dir` holds IDX files (it is the cache, not the source).
    CorruptCacheError: the cache's files are damaged (the message names them
      and the directory to delete).
  """
  data_dir = None if data_dir is None else os.fspath(Path(data_dir).expanduser().resolve())
  mnist_dir = None if mnist_dir is None else os.fspath(mnist_dir)
  return dict(_load_mnist_cached(data_dir, mnist_dir))
