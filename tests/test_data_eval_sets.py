"""Fixed evaluation sets: recorded SHA-256, jit vs op-by-op, chunking, TFDS round trip."""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import test_data_support as support
from stnjax import data
from stnjax.data import distorted_mnist


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory):
  return support.tfds_cache(tmp_path_factory)


@pytest.mark.parametrize("variant", list(data.VARIANTS))
def test_eval_sets_match_recorded_sha256(mnist_cache, variant):
  splits = mnist_cache[1]
  v = data.get_variant(variant)
  sets = {split: support.eval_set(splits, variant, split) for split in data.EVAL_SPLITS}
  for split, (images, labels, params) in sets.items():
    assert images.shape == (10_000,) + v.shape and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.int32
    assert data.eval_set_sha256(images, labels) == data.EVAL_SHA256[variant][split], split
    first = params["index"][:, 0] if v.kind == "addition" else params["index"]
    np.testing.assert_array_equal(first, np.arange(10_000))  # Example i is digit i.
    if v.kind == "addition":
      np.testing.assert_array_equal(labels, splits[split].labels[params["index"]].sum(axis=1))
    else:
      np.testing.assert_array_equal(labels, splits[split].labels)
  if variant == "none":
    np.testing.assert_array_equal(sets["test"][0][..., 0], splits["test"].images)
  else:  # Validation and test draw their distortions from different seeds.
    assert distorted_mnist.SEEDS["validation"] != distorted_mnist.SEEDS["test"]
    drawn = [k for k in sets["test"][2] if k != "index"]
    assert drawn and all(not np.array_equal(sets["validation"][2][k], sets["test"][2][k])
                         for k in drawn), drawn


# The full sets were generated jitted in chunks of 1000; here 7 examples are
# generated op by op in one chunk: same bytes, so neither jit nor chunking
# changes an example. P (a linear solve per example) and E (the TPS basis) are
# the most rounding-sensitive warps; none, T and TC are exact integer copies,
# and R/RTS/addition only a rotation. (Op-by-op generation costs ~5 s per
# variant here, so the suite runs it for these two.)
@pytest.mark.parametrize("variant", ["p", "e"])
def test_jit_eager_and_chunking_give_the_same_bytes(mnist_cache, variant):
  splits = mnist_cache[1]
  images, labels, _ = support.eval_set(splits, variant, "test")
  indices = np.array([0, 1, 2, 3, 4999, 9998, 9999])  # Any subset, any chunking: same examples.
  digits = splits["test"]
  eager = data.generate_eval_set(variant, digits.images, digits.labels,
                                 seed=distorted_mnist.SEEDS["test"], indices=indices, jit=False)
  np.testing.assert_array_equal(eager[0], images[indices])
  np.testing.assert_array_equal(eager[1], labels[indices])


def test_mismatched_hash_is_refused(mnist_cache, monkeypatch):
  splits = mnist_cache[1]
  monkeypatch.setitem(data.EVAL_SHA256, "none", {"test": "0" * 64, "validation": "0" * 64})
  with pytest.raises(data.EvalSetMismatchError, match="distorted_mnist/none test"):
    distorted_mnist.generate_split("none", "test", splits["test"])


def test_tfds_round_trip(mnist_cache):
  """Builds distorted_mnist/r (both splits) with TFDS, reads it back, compares with memory."""
  data_dir, splits = mnist_cache
  variant = "r"  # The cheapest to write; the other variants' features differ only in shape.
  loaded = data.load_eval_set(variant, "test", data_dir)
  images, labels, params = support.eval_set(splits, variant, "test")
  np.testing.assert_array_equal(loaded.images, images)
  np.testing.assert_array_equal(loaded.labels, labels)
  for split in data.EVAL_SPLITS:
    images, labels, params = support.eval_set(splits, variant, split)
    source = tfds.data_source(f"distorted_mnist/{variant}", data_dir=os.fspath(data_dir),
                              split=split)
    assert len(source) == 10_000
    for i in (0, 4321, 9999):
      example = source[i]
      np.testing.assert_array_equal(example["image"], images[i])
      assert example["label"] == labels[i] and example["index"] == i
      np.testing.assert_allclose(example["params"]["angle"], params["angle"][i], rtol=1e-6)
  as_float = data.load_eval_set(variant, "test", data_dir, dtype=np.float32)
  assert as_float.images.dtype == np.float32 and as_float.images.max() == 1.0
  np.testing.assert_allclose(as_float.images * 255, loaded.images, atol=1e-4)


def test_addition_examples_encode_all_parameters(mnist_cache):
  """The addition builder's example layout (2 channels, second_index, int and float params)."""
  splits = mnist_cache[1]
  builder = distorted_mnist.DistortedMnist(config="addition", data_dir=os.fspath(mnist_cache[0]))
  images, labels, params = support.eval_set(splits, "addition", "test")
  first = {k: v[:3] for k, v in params.items()}
  examples = list(builder._generate_examples(images[:3], labels[:3], first))  # pylint: disable=protected-access
  features = builder.info.features
  for i, example in examples:
    encoded = features.encode_example(example)  # Raises on any shape/dtype mismatch.
    decoded = features.deserialize_example_np(features.serialize_example(encoded))
    np.testing.assert_array_equal(decoded["image"], images[i])
    assert decoded["params"]["second_index"] == params["index"][i, 1]
    np.testing.assert_array_equal(decoded["params"]["digit_labels"], params["digit_labels"][i])


def test_load_eval_set_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match=r"`split` must be one of \('validation', 'test'\), got 'train'"):
    data.load_eval_set("rts", "train", tmp_path)
  with pytest.raises(ValueError, match="`variant` must be one of"):
    data.load_eval_set("Q", "test", tmp_path)


def _ink_kept(images, digits):
  """Each distorted image's ink as a fraction of its source digit's."""
  return (images.reshape(len(images), -1).sum(axis=1, dtype=np.float64)
          / digits.reshape(len(digits), -1).sum(axis=1, dtype=np.float64))


def test_no_p_image_loses_its_digit(mnist_cache):
  splits = mnist_cache[1]
  for split in data.EVAL_SPLITS:
    images, _, params = support.eval_set(splits, "p", split)
    kept = _ink_kept(images, splits[split].images)
    assert kept.min() > 0.15, (split, kept.min(), np.argmin(kept))
  # The same test digits with the protocol taken literally (no redraw): the
  # check above would catch the folded and squeezed quads.
  literal = dataclasses.replace(data.get_variant("p"), quad_rule=None)
  digits = splits["test"]
  images, _ = data.generate_eval_set(literal, digits.images, digits.labels,
                                     seed=distorted_mnist.SEEDS["test"])
  lost = _ink_kept(images, digits.images) < 0.15
  assert 100 < lost.sum() < 500, lost.sum()
