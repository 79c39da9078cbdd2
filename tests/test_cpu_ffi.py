"""The C++ CPU kernels (`stnjax._cpu_ffi`): the jnp values and cotangents on every ISA.

Every instruction set does the same float32 operations in the same order
(no fused multiply-adds), so their results are equal bit for bit; the jnp
paths (`sampler_kernel="off"`, `vjp_kernel=False`, the affine grid's GEMM),
which XLA may compile with fused multiply-adds and sum in another order,
and torch agree to float32 rounding.
"""

import os
import pathlib
import re
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stnjax
from stnjax import _cpu_ffi
from stnjax import _interp
from stnjax import grids
from stnjax import sampling
from stnjax.sampling import CpuOptions

ROOT = pathlib.Path(__file__).resolve().parents[1]
OFF = CpuOptions(sampler_kernel="off")
JNP_VJP = CpuOptions(vjp_kernel=False)

pytestmark = pytest.mark.skipif(not _cpu_ffi.status().available,
                                reason=f"CPU kernels: {_cpu_ffi.status().reason}")


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


def grads(image, grid, cot, options, argnums=(0, 1), **kwargs):
  loss = lambda i, g: jnp.vdot(sampling.grid_sample_with_options(
      i, g, cpu_options=options, **kwargs), cot)
  fn = jax.jit(jax.grad(loss, argnums))
  return [np.asarray(x) for x in fn(image, grid)], fn.lower(image, grid).compile().as_text()


@pytest.mark.parametrize("padding_mode", ("zeros", "border"))
@pytest.mark.parametrize("align_corners", (False, True))
def test_vjp_kernels_give_the_same_bits_on_every_isa_and_the_jnp_cotangents(
    rng, padding_mode, align_corners):
  image = rng.normal(size=(4, 6, 9, 1)).astype(np.float32)
  grid = awkward_grid(rng, (4, 7, 5, 2))
  cot = rng.normal(size=(4, 7, 5, 1)).astype(np.float32)
  kwargs = dict(padding_mode=padding_mode, align_corners=align_corners)
  want, jnp_text = grads(image, grid, cot, JNP_VJP, **kwargs)
  scalar, text = grads(image, grid, cot, CpuOptions(sampler_kernel="scalar"), **kwargs)
  assert _cpu_ffi.GRID_VJP_TARGET in text and _cpu_ffi.IMAGE_VJP_TARGET in text
  assert _cpu_ffi.GRID_VJP_TARGET not in jnp_text
  for isa in isas_of_this_cpu():
    for got, bits in zip(grads(image, grid, cot, CpuOptions(sampler_kernel=isa), **kwargs)[0],
                         scalar):
      np.testing.assert_array_equal(got, bits)
  for got, expected in zip(scalar, want):
    assert np.isfinite(got).all()
    assert_close(got, expected)
    assert np.abs(expected).max() > 0.5
  # NaN, +-inf and far coordinates (points 0, 1 and 3's y: `awkward_grid`) get a zero gradient.
  points_bar = scalar[1].reshape(-1, 2)
  np.testing.assert_array_equal(points_bar[[0, 1]], 0.0)
  assert points_bar[3, 1] == 0.0


def test_vjp_kernels_with_shared_images_grids_and_many_chunks(rng):
  # 256 examples x 33 x 35 points: many chunks; a shared image sums 8 parts.
  image = rng.normal(size=(256, 12, 10, 1)).astype(np.float32)
  grid = awkward_grid(rng, (256, 33, 35, 2))
  cot = rng.normal(size=(256, 33, 35, 1)).astype(np.float32)
  for i, g in ((image, grid), (image[0], grid), (image, grid[0])):
    want, _ = grads(i, g, cot, JNP_VJP)
    for isa in isas_of_this_cpu():
      got, _ = grads(i, g, cot, CpuOptions(sampler_kernel=isa))
      for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_vjp_kernels_under_vmap(rng):
  image = rng.normal(size=(3, 2, 6, 7, 1)).astype(np.float32)
  grid = awkward_grid(rng, (3, 2, 4, 5, 2))
  cot = rng.normal(size=(3, 2, 4, 5, 1)).astype(np.float32)

  def per_example(options, in_axes):
    loss = lambda i, g, c: jnp.vdot(sampling.grid_sample_with_options(i, g, cpu_options=options), c)
    return jax.vmap(jax.grad(loss, (0, 1)), in_axes=in_axes)

  for in_axes, args in (((0, 0, 0), (image, grid, cot)), ((None, 0, 0), (image[0], grid, cot))):
    for got, want in zip(per_example(CpuOptions(), in_axes)(*args),
                         per_example(JNP_VJP, in_axes)(*args)):
      assert_close(got, want)


def test_vjp_kernels_match_torch_in_float32(rng):
  torch = pytest.importorskip("torch")
  image = rng.normal(size=(5, 11, 13, 1)).astype(np.float32)
  grid = rng.uniform(-1.3, 1.3, size=(5, 9, 8, 2)).astype(np.float32)
  cot = rng.normal(size=(5, 9, 8, 1)).astype(np.float32)
  for padding_mode in ("zeros", "border"):
    for align_corners in (False, True):
      (d_image, d_grid), _ = grads(image, grid, cot, CpuOptions(), padding_mode=padding_mode,
                                   align_corners=align_corners)
      image_t = torch.from_numpy(np.moveaxis(image, -1, 1)).requires_grad_()
      grid_t = torch.from_numpy(grid).requires_grad_()
      out = torch.nn.functional.grid_sample(image_t, grid_t, padding_mode=padding_mode,
                                            align_corners=align_corners)
      (out * torch.from_numpy(np.moveaxis(cot, -1, 1))).sum().backward()
      np.testing.assert_allclose(d_image[..., 0], image_t.grad.numpy()[:, 0], rtol=0, atol=1e-5)
      np.testing.assert_allclose(d_grid, grid_t.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_a_gradient_runs_only_the_cotangent_it_needs(rng):
  image = rng.normal(size=(2, 6, 9, 1)).astype(np.float32)
  grid = rng.uniform(-1, 1, size=(2, 3, 4, 2)).astype(np.float32)
  cot = rng.normal(size=(2, 3, 4, 1)).astype(np.float32)
  calls = lambda text: set(re.findall(r'custom_call_target="(stnjax_\w+)"', text))
  _, grid_only = grads(image, grid, cot, CpuOptions(), argnums=1)
  _, image_only = grads(image, grid, cot, CpuOptions(), argnums=0)
  assert _cpu_ffi.GRID_VJP_TARGET in calls(grid_only)
  assert _cpu_ffi.IMAGE_VJP_TARGET not in calls(grid_only)
  assert calls(image_only) == {_cpu_ffi.IMAGE_VJP_TARGET}  # Not even the forward pass.


def test_second_derivatives_through_the_vjp_kernels_are_the_jnp_ones(rng):
  # The kernels' VJP has its own VJP: the jnp VJP's.
  image = rng.normal(size=(3, 6, 9, 1)).astype(np.float32)
  theta = (np.eye(2, 3) + rng.normal(0, 0.2, size=(3, 2, 3))).astype(np.float32)
  cot = rng.normal(size=(3, 5, 7, 1)).astype(np.float32)

  def second_order(options):
    def loss(image, theta):
      grid = stnjax.affine_grid(theta, (5, 7))
      return jnp.sum(cot * sampling.grid_sample_with_options(image, grid, cpu_options=options) ** 2)

    def grad_norm(image, theta):
      return sum(jnp.sum(g ** 2) for g in jax.grad(loss, (0, 1))(image, theta))

    return jax.jit(jax.grad(grad_norm, (0, 1)))(image, theta)

  for got, want in zip(second_order(CpuOptions()), second_order(JNP_VJP)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.abs(want).max() > 0.1


AFFINE_SHAPES = ((28, 28), (5, 7), (1, 3), (3, 1), (13, 9), (2, 17))


@pytest.mark.parametrize("align_corners", (False, True))
def test_affine_grid_kernel_same_bits_on_every_isa_and_the_gemm_values(rng, align_corners):
  theta = rng.normal(size=(5, 2, 3)).astype(np.float32)
  for shape in AFFINE_SHAPES:
    xs, ys = (grids.base_coordinates(size, align_corners) for size in shape[::-1])
    scalar = np.asarray(_cpu_ffi.affine_grid(theta, xs, ys, "scalar"))
    for isa in isas_of_this_cpu():
      np.testing.assert_array_equal(_cpu_ffi.affine_grid(theta, xs, ys, isa), scalar)
    gemm = jax.vmap(lambda t: grids._affine_grid_gemm(t, shape, align_corners))(theta)
    np.testing.assert_allclose(scalar, gemm, rtol=1e-6, atol=1e-6)
    # stnjax.affine_grid is the kernel's, with any batch dims.
    np.testing.assert_array_equal(stnjax.affine_grid(theta, shape, align_corners=align_corners),
                                  scalar)
    np.testing.assert_array_equal(
        stnjax.affine_grid(theta[1], shape, align_corners=align_corners), scalar[1])
    np.testing.assert_array_equal(jax.vmap(jax.vmap(
        lambda t: stnjax.affine_grid(t, shape, align_corners=align_corners)))(theta[None]),
        scalar[None])


def test_affine_grid_kernel_applies_to_2d_float32_on_cpu(rng):
  lowered = lambda theta, shape: jax.jit(lambda t: stnjax.affine_grid(t, shape)).lower(
      theta).as_text()
  assert _cpu_ffi.AFFINE_TARGET in lowered(np.eye(2, 3, dtype=np.float32), (4, 5))
  assert _cpu_ffi.AFFINE_TARGET not in lowered(np.eye(3, 4, dtype=np.float32), (3, 4, 5))
  assert _cpu_ffi.AFFINE_TARGET not in lowered(np.eye(2, 3, dtype=np.float16), (4, 5))


def test_affine_grid_derivatives_are_the_gemms(rng):
  # The values are the kernel's, the tangent (forward and reverse mode) the GEMM's.
  theta = rng.normal(size=(3, 2, 3)).astype(np.float32)
  gemm = lambda t: jax.vmap(lambda u: grids._affine_grid_gemm(u, (4, 5), False))(t)
  kernel = lambda t: stnjax.affine_grid(t, (4, 5))
  want = jax.jacrev(gemm)(theta)
  np.testing.assert_allclose(jax.jacfwd(kernel)(theta), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jacrev(kernel)(theta), want, rtol=1e-6, atol=1e-6)
  cot = rng.normal(size=(3, 4, 5, 2)).astype(np.float32)
  text = jax.jit(jax.grad(lambda t: jnp.vdot(kernel(t), cot))).lower(theta).as_text()
  assert "dot_general" in text and _cpu_ffi.AFFINE_TARGET not in text  # Linear: no primal needed.


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
  big = jax.ShapeDtypeStruct((1, 4097 * 4096), jnp.float32)  # Above 2**24 pixels.
  assert not _cpu_ffi.applies(big, spec(spatial=(4097, 4096)), "auto")
  assert _cpu_ffi.applies(jax.ShapeDtypeStruct((1, 2**24), jnp.float32),
                          spec(spatial=(4096, 4096)), "auto")
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


_HELPER_PROBE = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # One CPU: no helper threads.
import jax, numpy as np, stnjax
rng = np.random.default_rng(0)
image = rng.normal(size=(64, 12, 10, 1)).astype(np.float32)
theta = (np.eye(2, 3) + 0.3 * rng.normal(size=(64, 2, 3))).astype(np.float32)
cot = rng.normal(size=(64, 33, 35, 1)).astype(np.float32)
def loss(i, t):
  return (stnjax.grid_sample(i, stnjax.affine_grid(t, (33, 35))) * cot).sum()
fn = jax.jit(lambda i, t: (stnjax.grid_sample(i, stnjax.affine_grid(t, (33, 35))),
                           jax.grad(loss, (0, 1))(i, t), jax.grad(loss, (0, 1))(i[0], t)))
np.savez(sys.argv[1], *jax.tree.leaves(fn(image, theta)))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs for helper threads")
def test_helper_threads_change_no_bit(tmp_path):
  # This process splits each kernel's chunks with helper threads (csrc/parallel.h);
  # a process on one CPU has none. Values, both cotangents (a shared image's
  # too) and the affine grid must be the same bits.
  subprocess.run([sys.executable, "-c", _HELPER_PROBE, str(tmp_path / "one_cpu.npz")],
                 capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
  serial = np.load(tmp_path / "one_cpu.npz")
  code = _HELPER_PROBE.replace("os.sched_setaffinity", "(lambda *a: None)")
  subprocess.run([sys.executable, "-c", code, str(tmp_path / "all_cpus.npz")],
                 capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
  parallel = np.load(tmp_path / "all_cpus.npz")
  assert len(serial.files) == 5
  for name in serial.files:
    np.testing.assert_array_equal(parallel[name], serial[name])


def test_concurrent_callers_share_the_helpers(rng):
  # Python threads calling kernels at once each get their own, complete result.
  images = rng.normal(size=(4, 128, 20, 20, 1)).astype(np.float32)
  grid = awkward_grid(rng, (128, 20, 20, 2))
  fn = jax.jit(lambda i: sampling.grid_sample_with_options(i, grid, cpu_options=CpuOptions()))
  want = [sample(i, grid, OFF) for i in images]
  results = [None] * len(images)

  def run(k):
    for _ in range(20):
      results[k] = np.asarray(fn(images[k]))

  threads = [threading.Thread(target=run, args=(k,)) for k in range(len(images))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for got, w in zip(results, want):
    assert_close(got, w)


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
