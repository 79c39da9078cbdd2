"""Shared test configuration: strict JAX numerics, float64 and seeded RNG fixtures."""

import zlib

import jax
import numpy as np
import pytest

# Equinox-style strictness: an implicit rank promotion (e.g. (N, P) * (N, P, C))
# is almost always a bug, in the library or in a test. Set at import, before
# any test module traces anything.
jax.config.update("jax_numpy_rank_promotion", "raise")


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
