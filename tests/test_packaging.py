"""The core install: `import stnjax` needs only jax and numpy.

Datasets, checkpoints, figures and the PyTorch reference are extras
(pyproject.toml): importing the package, or running the sampler, must not
pull them in.
"""

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


def test_the_cpu_kernel_source_ships_with_the_package():
  # stnjax._cpu_ffi compiles it on first use, from the installed package.
  from stnjax import _cpu_ffi  # pylint: disable=g-import-not-at-top
  package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
      "package-data"]
  assert _cpu_ffi.SOURCE.is_file()
  assert str(_cpu_ffi.SOURCE.relative_to(ROOT / "stnjax").parent / "*.cc") in package_data["stnjax"]
