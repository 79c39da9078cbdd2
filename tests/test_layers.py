"""stnjax.layers: the conv and max-pool drop-ins equal their Flax/lax originals."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from stnjax import layers
from stnjax import models
from stnjax import xla_cpu

NHWC = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, w, padding, strides=(1, 1)):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def ours_conv(x, w, padding, strides=(1, 1), cpu_form="row_matmuls"):
  return layers.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                     cpu_form=cpu_form)


# (input H, W, C), kernel (kh, kw, O): a single input channel with few outputs
# (the fused multiply-add forward) and with many (XLA's forward), a few
# channels, wide patches (5 * 5 * 12 = 300) and a 7x7 kernel; multi-channel
# inputs take the form under test on CPU.
CONV_CASES = [((9, 10, 1), (5, 5, 3)), ((9, 10, 1), (3, 3, 40)), ((7, 8, 4), (3, 3, 2)),
              ((6, 6, 12), (5, 5, 2)), ((9, 9, 6), (7, 7, 5))]
# The last pads wider than a 3x3 or 5x5 kernel reaches (its input gradient's
# width convolution then crops).
PADDINGS = ["SAME", "VALID", ((1, 2), (0, 3)), ((4, 0), (1, 5))]


@pytest.mark.parametrize("cpu_form", layers.CPU_CONV_FORMS)
@pytest.mark.parametrize("in_shape,kernel", CONV_CASES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_conv_matches_lax_values_and_vjp(x64, rng, in_shape, kernel, padding, cpu_form):
  x = jnp.asarray(rng.normal(size=(2,) + in_shape))
  w = jnp.asarray(rng.normal(size=kernel[:2] + (in_shape[-1], kernel[-1])))
  out, vjp = jax.vjp(lambda x, w: ours_conv(x, w, padding, cpu_form=cpu_form), x, w)
  ref, ref_vjp = jax.vjp(lambda x, w: lax_conv(x, w, padding), x, w)
  cotangent = jnp.asarray(rng.normal(size=ref.shape))
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
  for a, b in zip(vjp(cotangent), ref_vjp(cotangent)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
  assert float(jnp.abs(ref).max()) > 0.1


@pytest.mark.parametrize("cpu_form", layers.CPU_CONV_FORMS)
def test_conv_second_order_matches_lax(x64, rng, cpu_form):
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 3)))
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)))
  ours = functools.partial(ours_conv, cpu_form=cpu_form)

  def second(conv):
    def loss(x, w):
      return jnp.sum(jnp.tanh(conv(x, w, "SAME")))
    return jax.grad(lambda x, w: jnp.sum(jax.grad(loss, argnums=0)(x, w) ** 2), argnums=(0, 1))(
        x, w)

  for a, b in zip(second(ours), second(lax_conv)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_conv_falls_back_to_lax_for_strides_and_negative_padding(x64, rng):
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 1)))
  w = jnp.asarray(rng.normal(size=(3, 3, 1, 2)))
  np.testing.assert_allclose(ours_conv(x, w, "SAME", (2, 2)), lax_conv(x, w, "SAME", (2, 2)),
                             rtol=0, atol=1e-12)
  crop = ((-1, 1), (0, -2))
  np.testing.assert_allclose(ours_conv(x, w, crop), lax_conv(x, w, crop), rtol=0, atol=1e-12)


def test_models_conv_has_flax_parameters_and_values(rng):
  x = jnp.asarray(rng.normal(size=(2, 12, 12, 1)), jnp.float32)
  ours, ref = models.Conv(6, (5, 5), padding="SAME"), nn.Conv(6, (5, 5), padding="SAME")
  params = ref.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape,
                                                                                 params)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (2, 7, 9, 3), (2, 5, 5, 1)])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 0), (0, 1))])
def test_max_pool_matches_flax(x64, rng, shape, padding):
  x = jnp.asarray(rng.normal(size=shape))  # Continuous values: no ties.
  out, vjp = jax.vjp(lambda x: layers.max_pool(x, (2, 2), (2, 2), padding), x)
  ref, ref_vjp = jax.vjp(lambda x: nn.max_pool(x, (2, 2), (2, 2), padding), x)
  assert out.shape == ref.shape
  np.testing.assert_array_equal(out, ref)
  cotangent = jnp.asarray(rng.normal(size=ref.shape))
  np.testing.assert_allclose(vjp(cotangent)[0], ref_vjp(cotangent)[0], rtol=0, atol=1e-12)


def test_max_pool_other_windows(x64, rng):
  x = jnp.asarray(rng.normal(size=(2, 9, 3)))  # 1-D, window 3 = stride.
  np.testing.assert_array_equal(layers.max_pool(x, (3,), (3,), "SAME"),
                                nn.max_pool(x, (3,), (3,), "SAME"))
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 2)))  # Overlapping windows: Flax's own path.
  np.testing.assert_array_equal(layers.max_pool(x, (3, 3), (1, 1), "VALID"),
                                nn.max_pool(x, (3, 3), (1, 1), "VALID"))
  np.testing.assert_array_equal(layers.max_pool(x, (2, 2)), nn.max_pool(x, (2, 2)))  # Stride 1.


def test_max_pool_ties_share_the_gradient():
  x = jnp.ones((1, 2, 2, 1))
  grad = jax.grad(lambda x: jnp.sum(layers.max_pool(x, (2, 2), (2, 2))))(x)
  np.testing.assert_allclose(grad, 0.25)
  # Three tied maxima: a third each (nested pairwise maxima would give 1/4, 1/4, 1/2).
  x = jnp.array([2.0, 2.0, 2.0, 1.0]).reshape(1, 2, 2, 1)
  grad = jax.grad(lambda x: jnp.sum(layers.max_pool(x, (2, 2), (2, 2))))(x)
  np.testing.assert_allclose(grad.ravel(), [1 / 3, 1 / 3, 1 / 3, 0], rtol=1e-6)


@pytest.mark.parametrize("shape,window", [((2, 9, 3), (3,)), ((2, 4, 6, 4, 3), (2, 3, 2))])
def test_max_pool_1d_and_3d_match_flax_forward_and_reverse_mode(x64, rng, shape, window):
  x = jnp.asarray(rng.normal(size=shape))
  pool = lambda pool_fn: lambda x: pool_fn(x, window, window, "SAME")
  out, vjp = jax.vjp(pool(layers.max_pool), x)
  ref, ref_vjp = jax.vjp(pool(nn.max_pool), x)
  np.testing.assert_array_equal(out, ref)
  cotangent = jnp.asarray(rng.normal(size=out.shape))
  np.testing.assert_allclose(vjp(cotangent)[0], ref_vjp(cotangent)[0], rtol=1e-12)
  tangent = jnp.asarray(rng.normal(size=shape))
  np.testing.assert_allclose(jax.jvp(pool(layers.max_pool), (x,), (tangent,))[1],
                             jax.jvp(pool(nn.max_pool), (x,), (tangent,))[1], rtol=1e-12)


def test_conv_form_is_checked():
  x, w = jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 2))
  with pytest.raises(ValueError, match="cpu_form"):
    ours_conv(x, w, "SAME", cpu_form="gemm")


def conv_kernel_shapes(grad, x, w, platform="cpu"):
  """The kernel operand's shape of each convolution `grad` lowers to on `platform`."""
  module = jax.export.export(jax.jit(grad), platforms=(platform,))(x, w).mlir_module()
  return [match.group(1) for match in re.finditer(
      r"stablehlo\.convolution.*: \(tensor<[^>]*>, tensor<([0-9x]*)xf32>\)", module)]


# The width convolution of the input gradient of a 7x7, 20 -> 5 convolution:
# a (1, 7) kernel with 5 inputs and 7 * 20 outputs.
WIDTH_CONV_KERNEL = "1x7x5x140"


def test_accelerators_keep_xla_convolution():
  x = jax.ShapeDtypeStruct((2, 12, 12, 20), jnp.float32)
  w = jax.ShapeDtypeStruct((7, 7, 20, 5), jnp.float32)
  grad = jax.grad(lambda x, w: jnp.sum(ours_conv(x, w, "VALID") ** 2), argnums=(0, 1))
  for platform in ("cuda", "tpu", "cpu"):
    kernels = conv_kernel_shapes(grad, x, w, platform)
    assert (WIDTH_CONV_KERNEL in kernels) == (platform == "cpu"), (platform, kernels)
    assert len(kernels) == (1 if platform == "cpu" else 3), (platform, kernels)


@pytest.mark.parametrize("cpu_form,convolutions,width_convolutions",
                         [("row_matmuls", 1, 1), ("xla", 3, 1), ("lax", 3, 0)])
def test_cpu_forms_lower_the_expected_convolutions(cpu_form, convolutions, width_convolutions):
  # "row_matmuls": forward and kernel gradient as matrix products; "xla": as
  # XLA's convolutions; both with the width convolution for the input
  # gradient in place of XLA's transposed convolution ("lax").
  x = jax.ShapeDtypeStruct((2, 12, 12, 20), jnp.float32)
  w = jax.ShapeDtypeStruct((7, 7, 20, 5), jnp.float32)
  grad = jax.grad(lambda x, w: jnp.sum(ours_conv(x, w, "VALID", cpu_form=cpu_form) ** 2),
                  argnums=(0, 1))
  kernels = conv_kernel_shapes(grad, x, w)
  assert len(kernels) == convolutions and kernels.count(WIDTH_CONV_KERNEL) == width_convolutions


def fft_count(in_shape, kernel, platform="cpu"):
  """How many FFTs the default form's gradient of a "VALID" convolution lowers to."""
  x = jax.ShapeDtypeStruct(in_shape, jnp.float32)
  w = jax.ShapeDtypeStruct(kernel, jnp.float32)
  grad = jax.grad(lambda x, w: jnp.sum(ours_conv(x, w, "VALID", cpu_form=None) ** 2),
                  argnums=(0, 1))
  return jax.export.export(jax.jit(grad), platforms=(platform,))(x, w).mlir_module().count(
      "stablehlo.fft")


def test_default_cpu_form_takes_ffts_where_they_save_most():
  # The paper CNN's 7x7, 86 -> 86 layer: on RTS's 17x17 maps the FFTs need
  # 8.2x fewer products, on R's 10x10 maps 3.3x; with 8 channels the
  # transforms would dominate.
  assert fft_count((2, 17, 17, 86), (7, 7, 86, 86)) > 0
  assert fft_count((2, 10, 10, 86), (7, 7, 86, 86)) == 0
  assert fft_count((2, 17, 17, 8), (7, 7, 8, 8)) == 0
  assert fft_count((2, 17, 17, 86), (7, 7, 86, 86), platform="cuda") == 0


def test_fft_conv_float32_round_off(x64, rng):
  x = rng.normal(size=(3, 17, 17, 86))
  w = rng.normal(size=(7, 7, 86, 86)) * 0.02
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  out, vjp = jax.vjp(lambda x, w: ours_conv(x, w, "VALID", cpu_form="fft"), f32(x), f32(w))
  ref, ref_vjp = jax.vjp(lambda x, w: lax_conv(x, w, "VALID"), jnp.asarray(x), jnp.asarray(w))
  cotangent = rng.normal(size=ref.shape)
  assert out.dtype == jnp.float32
  for a, b in zip((out,) + vjp(f32(cotangent)), (ref,) + ref_vjp(jnp.asarray(cotangent))):
    # About 3e-7 measured, as XLA's direct float32 convolution.
    assert float(jnp.abs(a - b).max()) < 2e-6 * float(jnp.abs(b).max())


def test_padded_conv_input_grad_computes_only_the_input_columns():
  # A "SAME" 7x7 convolution of a 12x12 input: the width convolution yields
  # 12 columns, not the 18 of a cotangent padded by 6 on both sides.
  x = jax.ShapeDtypeStruct((2, 12, 12, 20), jnp.float32)
  w = jax.ShapeDtypeStruct((7, 7, 20, 5), jnp.float32)
  grad = jax.grad(lambda x, w: jnp.sum(ours_conv(x, w, "SAME", cpu_form="xla") ** 2),
                  argnums=(0, 1))
  module = jax.export.export(jax.jit(grad), platforms=("cpu",))(x, w).mlir_module()
  outputs = re.findall(rf"tensor<{WIDTH_CONV_KERNEL}xf32>\) -> tensor<([0-9x]*)xf32>", module)
  assert outputs == ["2x12x12x140"]


def test_default_cpu_form_follows_the_xla_flags(monkeypatch):
  x = jax.ShapeDtypeStruct((2, 12, 12, 20), jnp.float32)
  w = jax.ShapeDtypeStruct((7, 7, 20, 5), jnp.float32)
  counts = {}
  for flags in ("", " ".join(xla_cpu.FLAGS)):
    monkeypatch.setenv("XLA_FLAGS", flags)  # Read when tracing: a new function each time.
    grad = jax.grad(lambda x, w: jnp.sum(ours_conv(x, w, "VALID", cpu_form=None) ** 2),
                    argnums=(0, 1))
    counts[flags] = len(conv_kernel_shapes(grad, x, w))
  assert list(counts.values()) == [1, 3]


@pytest.mark.parametrize("max_channels,cpu_convolutions", [(32, 1), (2, 2)])
def test_single_channel_paths(x64, rng, max_channels, cpu_convolutions):
  # A 5x5, 1 -> 3 convolution: with `max_multiply_add_channels` >= 3 the CPU
  # forward is multiply-adds (only the kernel gradient is a convolution),
  # below it XLA's convolution; the input gradient is col2im either way, and
  # accelerators keep XLA's three convolutions. Values equal lax's.
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 1)))
  w = jnp.asarray(rng.normal(size=(5, 5, 1, 3)))
  conv = functools.partial(layers.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                           dimension_numbers=NHWC, max_multiply_add_channels=max_channels)
  grad = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
  ref = jax.grad(lambda x, w: jnp.sum(lax_conv(x, w, "SAME") ** 2), argnums=(0, 1))
  for a, b in zip(grad(x, w), ref(x, w)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
  x32, w32 = (jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, w))
  assert len(conv_kernel_shapes(grad, x32, w32)) == cpu_convolutions
  assert len(conv_kernel_shapes(grad, x32, w32, "cuda")) == 3
