"""MNIST loader: IDX parsing, SHA-256 verification, source resolution, the stnjax_mnist TFDS dataset."""

import gzip
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

import test_data_support as support
from stnjax import data
from stnjax.data import mnist

SMALL = mnist.TEST_LABELS  # 10,008 bytes decompressed: cheap to copy and corrupt.


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory):
  return support.tfds_cache(tmp_path_factory)


@pytest.fixture(scope="session")
def idx_arrays():
  return data.read_mnist_dir(support.mnist_dir())


def _linked_copy(tmp_path, replace=None):
  """A directory with the four real files (symlinked), except `replace`d names left out."""
  source = support.mnist_dir()
  directory = tmp_path / "mnist"
  directory.mkdir()
  for name in mnist.FILES:
    if replace and name in replace:
      continue
    path = mnist.find_idx_file(source, name)
    os.symlink(path, directory / path.name)
  return directory


def _real_bytes(name):
  path = mnist.find_idx_file(support.mnist_dir(), name)
  raw = path.read_bytes()
  return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def test_load_mnist_splits(mnist_cache, idx_arrays):
  _, splits = mnist_cache
  assert set(splits) == {"train", "validation", "test"}
  sizes = {"train": 50_000, "validation": 10_000, "test": 10_000}
  for name, split in splits.items():
    images, labels = split  # Split is a NamedTuple: unpacks as (images, labels).
    assert images.shape == (sizes[name], 28, 28) and images.dtype == np.uint8
    assert labels.shape == (sizes[name],) and labels.dtype == np.int32
    assert labels.min() == 0 and labels.max() == 9
    assert images.max() == 255 and not images.flags.writeable
  # The well-known first labels of each file.
  np.testing.assert_array_equal(splits["train"].labels[:8], [5, 0, 4, 1, 9, 2, 1, 3])
  np.testing.assert_array_equal(splits["test"].labels[:8], [7, 2, 1, 0, 4, 1, 4, 9])
  # train = first 50k, validation = last 10k of the training file, in file order.
  train_images = idx_arrays[mnist.TRAIN_IMAGES]
  np.testing.assert_array_equal(splits["train"].images, train_images[:50_000])
  np.testing.assert_array_equal(splits["validation"].images, train_images[50_000:])
  np.testing.assert_array_equal(splits["validation"].labels, idx_arrays[mnist.TRAIN_LABELS][50_000:])
  np.testing.assert_array_equal(splits["test"].images, idx_arrays[mnist.TEST_IMAGES])


def test_tfds_data_source_reads_the_cache(mnist_cache):
  data_dir, splits = mnist_cache
  full = tfds.data_source("stnjax_mnist", data_dir=os.fspath(data_dir), split="train+validation")
  assert len(full) == 60_000
  example = full[50_123]
  assert example["index"] == 50_123 and example["label"] == splits["validation"].labels[123]
  np.testing.assert_array_equal(example["image"], splits["validation"].images[123])


def test_gzipped_and_plain_files_read_the_same(tmp_path):
  plain = tmp_path / SMALL
  plain.write_bytes(_real_bytes(SMALL))
  regzipped = tmp_path / f"other-{SMALL}.gz"
  regzipped.write_bytes(gzip.compress(_real_bytes(SMALL), compresslevel=1))
  a = data.read_idx_file(plain)
  b = data.read_idx_file(regzipped, SMALL)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (10_000,) and a.dtype == np.uint8


def test_corrupted_file_names_file_and_expected_digest(tmp_path):
  directory = _linked_copy(tmp_path, replace={SMALL})
  raw = bytearray(_real_bytes(SMALL))
  raw[5000] ^= 1  # One label changed: same size, different content.
  (directory / f"{SMALL}.gz").write_bytes(gzip.compress(bytes(raw)))
  with pytest.raises(data.MnistFileError) as info:
    data.read_mnist_dir(directory)
  message = str(info.value)
  assert f"{SMALL}.gz" in message
  assert mnist.expected_sha256()[SMALL] in message and "expected SHA-256" in message


@pytest.mark.parametrize("gzipped", [True, False])
def test_truncated_file(tmp_path, gzipped):
  directory = _linked_copy(tmp_path, replace={SMALL})
  raw = _real_bytes(SMALL)
  if gzipped:
    (directory / f"{SMALL}.gz").write_bytes(gzip.compress(raw)[:-100])
  else:
    (directory / SMALL).write_bytes(raw[:-100])
  with pytest.raises(data.MnistFileError) as info:
    data.read_mnist_dir(directory)
  message = str(info.value)
  assert SMALL in message
  if gzipped:
    assert "truncated" in message and "10,008 bytes" in message
  else:
    assert "9,908 bytes" in message and "expected" in message and "10,008 bytes" in message


def test_missing_file(tmp_path):
  directory = _linked_copy(tmp_path, replace={mnist.TRAIN_LABELS})
  with pytest.raises(data.MnistFileError, match=f"Missing MNIST file '{mnist.TRAIN_LABELS}'"):
    data.read_mnist_dir(directory)


def test_failed_build_leaves_nothing_in_the_cache(tmp_path):
  directory = _linked_copy(tmp_path, replace={SMALL})
  (directory / SMALL).write_bytes(_real_bytes(SMALL)[:-1])
  data_dir = tmp_path / "tfds"
  with pytest.raises(data.MnistFileError, match=SMALL):
    mnist.prepare_mnist(data_dir, mnist_dir=directory)
  assert not (data_dir / "stnjax_mnist" / "1.0.0").exists()
  leftovers = [p for p in data_dir.rglob("*") if p.is_file() and "incomplete" in p.name.lower()]
  assert not leftovers
  assert not list(data_dir.rglob("*.array_record*"))


def test_download_verifies_and_leaves_no_partial_file(tmp_path):
  # Offline stand-in for the mirror: a file:// URL serving the real files, gzipped.
  mirror = tmp_path / "mirror"
  mirror.mkdir()
  for name in mnist.FILES:
    path = mnist.find_idx_file(support.mnist_dir(), name)
    if path.suffix == ".gz":
      os.symlink(path, mirror / path.name)
    else:
      (mirror / f"{name}.gz").write_bytes(gzip.compress(path.read_bytes(), compresslevel=1))
  target = mnist.download_mnist(tmp_path / "downloads", url=mirror.as_uri())
  assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.gz" for n in mnist.FILES)
  # A mirror serving a wrong file: error, and neither the file nor a temporary is left.
  (mirror / f"{SMALL}.gz").unlink()
  (mirror / f"{SMALL}.gz").write_bytes(gzip.compress(b"not mnist"))
  bad_target = tmp_path / "bad_downloads"
  with pytest.raises(data.MnistFileError, match=SMALL):
    mnist.download_mnist(bad_target, url=mirror.as_uri())
  assert not any(SMALL in p.name for p in bad_target.iterdir())
  with pytest.raises(data.MnistFileError, match="STNJAX_MNIST_DIR"):
    mnist.download_mnist(tmp_path / "nowhere", url=(tmp_path / "no_mirror").as_uri())


def test_source_resolution(tmp_path, monkeypatch):
  real = support.mnist_dir()
  monkeypatch.setenv(data.MNIST_DIR_ENV, os.fspath(real))
  assert mnist.resolve_mnist_dir() == real
  assert mnist.resolve_mnist_dir(tmp_path) == tmp_path  # The argument wins.
  monkeypatch.setenv(data.MNIST_DIR_ENV, os.fspath(tmp_path / "absent"))
  with pytest.raises(ValueError, match=r"\$STNJAX_MNIST_DIR"):
    mnist.resolve_mnist_dir()
  with pytest.raises(ValueError, match="`mnist_dir`"):
    mnist.resolve_mnist_dir(tmp_path / "absent")


def test_idx_directory_passed_as_data_dir_is_rejected():
  with pytest.raises(ValueError, match="mnist_dir"):
    data.load_mnist(support.mnist_dir())


def test_read_idx_file_rejects_unknown_name(tmp_path):
  path = tmp_path / "something.gz"
  shutil.copy(mnist.find_idx_file(support.mnist_dir(), SMALL), path)
  with pytest.raises(ValueError, match="`name` must be one of"):
    data.read_idx_file(path)
