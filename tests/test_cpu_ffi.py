"""The C++ CPU sampler kernel (`stnjax._cpu_ffi`): the jnp sampler's values on every ISA.

Every instruction set does the same float32 operations in the same order
(no fused multiply-adds), so their values are equal bit for bit; the jnp
path (`sampler_kernel="off"`), which XLA may compile with fused
multiply-adds, and torch agree to float32 rounding.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stnjax
from stnjax import _cpu_ffi
from stnjax import _interp
from stnjax import sampling
from stnjax.sampling import CpuOptions

ROOT = pathlib.Path(__file__).resolve().parents[1]
OFF = CpuOptions(sampler_kernel="off")

pytestmark = pytest.mark.skipif(not _cpu_ffi.status().available,
                                reason=f"CPU sampler kernel: {_cpu_ffi.status().reason}")


def isas_of_this_cpu():
  order = ("scalar", "avx2", "avx512")
  return order[:order.index(_cpu_ffi.cpu_isa()) + 1]


def assert_close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)  # A few ulps of values up to ~5.


def sample(image, grid, options, **kwargs):
  fn = lambda i, g: sampling.grid_sample_with_options(i, g, cpu_options=options, **kwargs)
  return np.asarray(jax.jit(fn)(image, grid))


def uses_kernel(image, grid, options=CpuOptions(), **kwargs):
  fn = lambda i, g: sampling.grid_sample_with_options(i, g, cpu_options=options, **kwargs)
  return _cpu_ffi.TARGET in jax.jit(fn).lower(image, grid).as_text()


def awkward_grid(rng, shape):
  """Coordinates inside, on and beyond the edges, plus NaN and +-inf."""
  grid = rng.uniform(-1.4, 1.4, size=shape).astype(np.float32)
  flat = grid.reshape(-1)
  flat[:8] = [np.nan, np.inf, -np.inf, 1e30, -1.0, 1.0, 0.0, -1e30]
  return grid


@pytest.mark.parametrize("isa", ("auto", "avx512", "avx2", "scalar"))
@pytest.mark.parametrize("padding_mode", ("zeros", "border"))
@pytest.mark.parametrize("align_corners", (False, True))
def test_every_isa_gives_the_same_bits_and_the_jnp_values(rng, isa, padding_mode, align_corners):
  # 3 x 7 x 5 = 105 points per example: vector tails of every length occur.
  image = rng.normal(size=(4, 6, 9, 1)).astype(np.float32)
  grid = awkward_grid(rng, (4, 7, 5, 2))
  kwargs = dict(padding_mode=padding_mode, align_corners=align_corners)
  options = CpuOptions(sampler_kernel=isa)
  assert uses_kernel(image, grid, options, **kwargs)
  got, want = sample(image, grid, options, **kwargs), sample(image, grid, OFF, **kwargs)
  np.testing.assert_array_equal(got, sample(image, grid, CpuOptions(sampler_kernel="scalar"),
                                            **kwargs))
  assert_close(got, want)
  assert np.abs(want).max() > 0.5 and np.count_nonzero(want == 0) < want.size // 2


@pytest.mark.parametrize("isa", ("avx512", "avx2", "scalar"))
def test_shared_images_grids_and_many_chunks(rng, isa):
  # 256 examples x 33 x 35 points: many 8192-point chunks, which split examples.
  options = CpuOptions(sampler_kernel=isa)
  image = rng.normal(size=(256, 12, 10, 1)).astype(np.float32)
  grid = awkward_grid(rng, (256, 33, 35, 2))
  for i, g in ((image, grid), (image[0], grid), (image, grid[0])):
    assert_close(sample(i, g, options), sample(i, g, OFF))


def test_one_pixel_wide_and_one_row_images(rng):
  for spatial in ((1, 1), (1, 5), (5, 1)):
    image = rng.normal(size=(3, *spatial, 1)).astype(np.float32)
    grid = awkward_grid(rng, (3, 4, 6, 2))
    for isa in isas_of_this_cpu():
      options = CpuOptions(sampler_kernel=isa)
      assert_close(sample(image, grid, options), sample(image, grid, OFF))


def test_matches_torch_in_float32(rng):
  torch = pytest.importorskip("torch")
  image = rng.normal(size=(5, 11, 13, 1)).astype(np.float32)
  grid = rng.uniform(-1.3, 1.3, size=(5, 9, 8, 2)).astype(np.float32)
  for padding_mode in ("zeros", "border"):
    for align_corners in (False, True):
      got = sample(image, grid, CpuOptions(), padding_mode=padding_mode,
                   align_corners=align_corners)
      want = torch.nn.functional.grid_sample(
          torch.from_numpy(np.moveaxis(image, -1, 1)), torch.from_numpy(grid),
          padding_mode=padding_mode, align_corners=align_corners).numpy()
      np.testing.assert_allclose(got[..., 0], want[:, 0], rtol=0, atol=2e-6)


def test_vmap_over_the_kernel(rng):
  image = rng.normal(size=(3, 2, 6, 7, 1)).astype(np.float32)
  grid = awkward_grid(rng, (3, 2, 4, 5, 2))
  want = sample(image, grid, OFF)
  assert_close(jax.vmap(stnjax.grid_sample)(image, grid), want)
  shared = jax.vmap(stnjax.grid_sample, in_axes=(None, 0))(image[0], grid)  # One image per grid.
  assert_close(shared, sample(np.broadcast_to(image[0], image.shape), grid, OFF))


def test_gradients_are_the_jnp_paths(rng):
  image = rng.normal(size=(4, 6, 9, 1)).astype(np.float32)
  grid = rng.uniform(-1.2, 1.2, size=(4, 5, 7, 2)).astype(np.float32)
  cot = rng.normal(size=(4, 5, 7, 1)).astype(np.float32)

  def grads(options):
    loss = lambda i, g: jnp.vdot(sampling.grid_sample_with_options(i, g, cpu_options=options), cot)
    return jax.jit(jax.grad(loss, (0, 1)))(image, grid)

  for got, want in zip(grads(CpuOptions()), grads(OFF)):
    assert_close(got, want)


def test_takes_only_what_it_implements(rng):
  spec = lambda **kw: _interp.Spec(**{**dict(spatial=(6, 9), mode="bilinear", padding_mode="zeros",
                                             align_corners=False), **kw})
  one_channel = jnp.zeros((2, 54), jnp.float32)
  assert _cpu_ffi.applies(one_channel, spec(), "auto")
  assert not _cpu_ffi.applies(one_channel, spec(), "off")
  assert not _cpu_ffi.applies(one_channel, spec(padding_mode="reflection"), "auto")
  assert not _cpu_ffi.applies(one_channel, spec(mode="nearest"), "auto")
  assert not _cpu_ffi.applies(one_channel, spec(mode="bicubic"), "auto")
  assert not _cpu_ffi.applies(jnp.zeros((2, 54, 3), jnp.float32), spec(), "auto")
  assert not _cpu_ffi.applies(jnp.zeros((2, 54), jnp.bfloat16), spec(), "auto")
  image = rng.normal(size=(2, 6, 9, 1)).astype(np.float32)
  grid = rng.uniform(-1, 1, size=(2, 3, 4, 2)).astype(np.float32)
  assert uses_kernel(image, grid)
  assert not uses_kernel(image, grid, padding_mode="reflection")
  assert not uses_kernel(np.repeat(image, 2, axis=-1), grid)
  assert not uses_kernel(image, grid, OFF)


def _probe(env):
  """Runs a small grid_sample in a fresh process; returns (status, uses the kernel)."""
  code = ("import jax, jax.numpy as jnp, stnjax; from stnjax import _cpu_ffi\n"
          "f = jax.jit(lambda i, g: stnjax.grid_sample(i, g))\n"
          "text = f.lower(jnp.ones((2, 4, 5, 1)), jnp.zeros((2, 3, 3, 2))).as_text()\n"
          "print(_cpu_ffi.status().available, _cpu_ffi.TARGET in text)\n"
          "print(_cpu_ffi.status().reason)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, **env}, check=True)
  return result.stdout.splitlines()


def test_switched_off_by_the_environment():
  flags, reason = _probe({_cpu_ffi.ENV_SWITCH: "0"})
  assert flags == "False False" and _cpu_ffi.ENV_SWITCH in reason


def test_a_failed_build_falls_back_with_the_reason(tmp_path):
  flags, reason = _probe({"CXX": str(tmp_path / "no-such-compiler"),
                          "STNJAX_CACHE_DIR": str(tmp_path / "cache")})
  assert flags == "False False" and "no-such-compiler" in reason


def test_builds_into_the_cache_dir(tmp_path):
  flags, _ = _probe({"STNJAX_CACHE_DIR": str(tmp_path)})
  assert flags == "True True"
  assert [p.name for p in tmp_path.iterdir()] == [_cpu_ffi.library_path().name]


def test_export_names_the_kernel_and_runs_with_its_check_disabled(rng):
  # A serialised CPU function with the kernel needs the target registered
  # where it is loaded, so jax.export asks for the check to be disabled.
  image = rng.normal(size=(2, 6, 9, 1)).astype(np.float32)
  grid = rng.uniform(-1, 1, size=(2, 3, 4, 2)).astype(np.float32)
  fn = jax.jit(lambda i, g: stnjax.grid_sample(i, g))
  with pytest.raises(ValueError, match=_cpu_ffi.TARGET):
    jax.export.export(fn, platforms=("cpu",))(image, grid)
  checks = [jax.export.DisabledSafetyCheck.custom_call(_cpu_ffi.TARGET)]
  exported = jax.export.export(fn, platforms=("cpu",), disabled_checks=checks)(image, grid)
  assert_close(exported.call(image, grid), sample(image, grid, OFF))


def test_inside_shard_map_with_a_batch_sharded_over_two_devices():
  # The kernel's result varies over the mesh axis as its operands do (one
  # shared grid, images sharded), as the training loop's data-parallel step needs.
  code = """
import jax, jax.numpy as jnp, numpy as np, stnjax
from jax.sharding import NamedSharding, PartitionSpec as P
from stnjax import _cpu_ffi, sampling
mesh = jax.make_mesh((2,), ("data",))
rng = np.random.default_rng(0)
image = rng.normal(size=(4, 6, 9, 1)).astype(np.float32)
image = jax.device_put(image, NamedSharding(mesh, P("data")))
grid = jnp.asarray(rng.uniform(-1.2, 1.2, size=(5, 7, 2)).astype(np.float32))
def run(options):
  sample = lambda i, g: sampling.grid_sample_with_options(i, g, cpu_options=options)
  fn = jax.jit(jax.shard_map(sample, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data")))
  return fn, np.asarray(fn(image, grid))
kernel, got = run(sampling.CpuOptions())
_, want = run(sampling.CpuOptions(sampler_kernel="off"))
print(_cpu_ffi.TARGET in kernel.lower(image, grid).as_text(), np.abs(got - want).max() < 1e-5,
      np.abs(want).max() > 0.5)
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, check=True,
                          env={**os.environ, "JAX_NUM_CPU_DEVICES": "2"})
  assert result.stdout.split() == ["True", "True", "True"], result.stdout + result.stderr
