"""Shared helpers for the data tests (no tests here): where MNIST is, one TFDS cache per session.

Full MNIST is read from `$STNJAX_MNIST_DIR`, else `../shared/data/mnist`
relative to the repository root. Tests that need it FAIL (never skip) when
it cannot be found.
"""

import os
from pathlib import Path

import pytest

from stnjax import data
from stnjax.data import distorted_mnist
from stnjax.data import mnist

REPO_ROOT = Path(__file__).resolve().parents[1]
_STATE = {}


def mnist_dir() -> Path:
  """The directory of the four MNIST IDX files; fails the test if it is missing."""
  env = os.environ.get(mnist.MNIST_DIR_ENV)
  path = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "mnist"
  missing = [name for name in mnist.FILES
             if not (path / name).is_file() and not (path / f"{name}.gz").is_file()]
  if missing:
    pytest.fail(f"The data tests need full MNIST: no {', '.join(missing)} (.gz or plain) in "
                f"{str(path)!r}. Put the four IDX files there (../shared/data/mnist relative to "
                f"the repository root) or set ${mnist.MNIST_DIR_ENV} to their directory.",
                pytrace=False)
  return path


def tfds_cache(tmp_path_factory) -> tuple[Path, dict[str, mnist.Split]]:
  """A TFDS data dir holding `stnjax_mnist`, built once per session, and its splits."""
  if "cache" not in _STATE:
    data_dir = tmp_path_factory.mktemp("tfds_data")
    splits = data.load_mnist(data_dir, mnist_dir=mnist_dir())
    _STATE["cache"] = (data_dir, splits)
  return _STATE["cache"]


def eval_set(splits: dict[str, mnist.Split], variant: str, split: str):
  """The in-memory (images, labels, params) of one evaluation set, generated once per session."""
  key = (variant, split)
  if key not in _STATE:
    _STATE[key] = distorted_mnist.generate_split(variant, split, splits[split],
                                                 return_params=True, verify=False)
  return _STATE[key]
