"""A damaged TFDS cache raises an error that names the file and how to rebuild it."""

import shutil

import numpy as np
import pytest

import test_data_support as support
from stnjax import data


def test_corrupted_cache_names_the_file_and_the_fix(tmp_path_factory, tmp_path):
  source_dir, splits = support.tfds_cache(tmp_path_factory)
  shutil.copytree(source_dir / "stnjax_mnist", tmp_path / "stnjax_mnist")
  (damaged,) = (tmp_path / "stnjax_mnist").glob("*/stnjax_mnist-test.array_record*")
  raw = bytearray(damaged.read_bytes())
  middle = len(raw) // 2
  raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])  # Flipped bytes.
  damaged.write_bytes(bytes(raw))
  with pytest.raises(data.CorruptCacheError) as info:
    data.load_mnist(tmp_path, mnist_dir=support.mnist_dir())
  message = str(info.value)
  assert str(damaged) in message and "split 'test'" in message
  assert f"Delete {damaged.parent} to rebuild it" in message
  shutil.rmtree(damaged.parent)  # As the message says: the next load rebuilds it.
  rebuilt = data.load_mnist(tmp_path, mnist_dir=support.mnist_dir())
  np.testing.assert_array_equal(rebuilt["test"].images, splits["test"].images)
