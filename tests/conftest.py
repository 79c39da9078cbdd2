"""Shared test configuration: strict JAX numerics, one compilation cache per run, fixtures."""

import os
import shutil
import tempfile
import zlib

import jax
import numpy as np
import pytest

# Equinox-style strictness: an implicit rank promotion (e.g. (N, P) * (N, P, C))
# is almost always a bug, in the library or in a test. Set at import, before
# any test module traces anything.
jax.config.update("jax_numpy_rank_promotion", "raise")

# Many tests compile the same programs (each `train_and_evaluate` builds its
# step afresh; parametrised tests share forward passes). A persistent
# compilation cache shared by the run's processes compiles each once: the
# controller makes an empty directory, pytest-xdist's workers inherit its
# path, and it is removed at the end, so every run starts cold and no state
# outlives it. An executable from the cache is the one the compiler made
# (same HLO, options and flags make the key); on two workers the train,
# reproduce and models tests take about a quarter less time with it. A
# JAX_COMPILATION_CACHE_DIR set by the user is left alone.
_SHARED_CACHE = "STNJAX_TEST_COMPILATION_CACHE"  # The directory, for the workers.
_OWN_CACHE = pytest.StashKey[str]()  # The directory this process made and removes.


def pytest_configure(config):
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  if not hasattr(config, "workerinput"):  # The controller, or a run without xdist.
    config.stash[_OWN_CACHE] = tempfile.mkdtemp(prefix="stnjax-xla-cache-")
    os.environ[_SHARED_CACHE] = config.stash[_OWN_CACHE]
  jax.config.update("jax_compilation_cache_dir", os.environ[_SHARED_CACHE])
  # Every program, small ones too: parametrised tests share many
  # (test_grid_sample.py, test_grids.py and test_layers.py: 116 s with
  # this, 144 s with no cache, 154 s with JAX's default threshold of 1 s;
  # one run each).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):
  if _OWN_CACHE in config.stash:
    shutil.rmtree(config.stash[_OWN_CACHE], ignore_errors=True)


@pytest.fixture
def x64():
  """Runs the test with 64-bit JAX types; the previous setting is restored afterwards.

  `jax.enable_x64` is a context manager scoped to this fixture, so float64
  never leaks into tests that expect JAX's default float32.
  """
  with jax.enable_x64(True):
    yield


@pytest.fixture
def rng(request):
  """A numpy Generator seeded from the test id: deterministic and distinct per test case."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
