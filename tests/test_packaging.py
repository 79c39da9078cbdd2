"""The core install: `import stnjax` needs only jax and numpy.

Datasets, checkpoints, figures and the PyTorch reference are extras
(pyproject.toml): importing the package, or running the sampler, must not
pull them in.
"""

import fnmatch
import pathlib
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11.

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTRAS_ONLY = ("tensorflow_datasets", "orbax", "matplotlib", "torch", "flax", "optax", "PIL")

_PROBE = f"""
import sys
import jax.numpy as jnp
import stnjax
image = jnp.ones((2, 4, 5, 1))
grid = stnjax.affine_grid(jnp.eye(2, 3), (3, 3))
stnjax.grid_sample(image, grid).block_until_ready()
print(" ".join(m for m in {EXTRAS_ONLY!r} if m in sys.modules))
"""


def test_import_stnjax_pulls_in_no_extra():
  result = subprocess.run([sys.executable, "-c", _PROBE], check=True, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
  assert result.stdout.strip() == "", f"imported by `import stnjax`: {result.stdout.strip()}"


def test_core_dependencies_are_jax_and_numpy():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  names = {dep.split(">")[0].split("=")[0].split("[")[0] for dep in project["dependencies"]}
  assert names == {"jax", "jaxlib", "numpy"}
  extras = project["optional-dependencies"]
  assert {"models", "data", "train", "figures", "all", "test"} <= set(extras)


def test_the_cpu_kernel_sources_ship_with_the_package():
  # stnjax._cpu_ffi compiles them on first use, from the installed package.
  from stnjax import _cpu_ffi  # pylint: disable=g-import-not-at-top
  package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
      "package-data"]["stnjax"]
  files = _cpu_ffi.SOURCES + _cpu_ffi.HEADERS
  assert sorted(files) == sorted(_cpu_ffi.CSRC.iterdir())  # Every file in csrc is one of them.
  for path in files:
    relative = str(path.relative_to(ROOT / "stnjax"))
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in package_data), relative
