"""Faster drop-ins for two Flax/lax layers that are slow to differentiate on CPU.

* `conv_general_dilated`: `lax.conv_general_dilated`, faster on CPU for
  plain 2-D convolutions (stride 1, no dilation, no groups, channels last).
  Pass it to Flax as `nn.Conv(..., conv_general_dilated=layers.
  conv_general_dilated)`: same parameters, same values up to float
  round-off. XLA:CPU's own convolution runs far below its matrix product's
  speed, so on CPU a multi-channel input is convolved as `kh` matrix
  products of width-only patches, and autodiff of that form gives both
  gradients as matrix products (other platforms keep XLA's convolution).
  With `xla_cpu.FLAGS` in effect (YNNPACK off convolutions), XLA's own
  convolution is the faster forward pass and kernel gradient, and only the
  input gradient stays row products (`xla_cpu.convolution_form()`).
  A single-channel input (a network's first layer) keeps a hand-written
  VJP: its input gradient is a matrix product with the kernel followed by a
  sum of shifted copies ("col2im"), where XLA would lower a slow transposed
  convolution; with few output channels its forward is fused multiply-adds
  in a loop of their own (`_cpu_kernels.own_loop_on_cpu`).
  Re-run: `python -m scripts.bench.bench_ablations --rows conv`.
* `max_pool`: `flax.linen.max_pool` for non-overlapping windows (window ==
  stride) as a reshape and a max. JAX differentiates `lax.reduce_window`
  max through a variadic reduce-window over index arrays; the reshape form
  differentiates elementwise, which makes the STN tutorial's training step
  faster (`python -m scripts.bench.bench_ablations --rows max_pool`). Ties
  within a window share the gradient equally (the window's maximum is
  still the value).

`python -m scripts.bench.bench_train` measures the effect on a whole training step.
"""

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from stnjax import _cpu_kernels
from stnjax import xla_cpu

_NHWC = ("NHWC", "HWIO", "NHWC")
# The hand-written VJP is used up to this many kernel taps x input channels:
# its input gradient materialises patches of this width, which pays for
# first layers and few channels (5x5x10 in the STN tutorial) but not for
# wide layers, where XLA's transposed convolution is the better choice.
_MAX_PATCH_WIDTH = 256


def _explicit_padding(padding, in_spatial, kernel_spatial) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_spatial, kernel_spatial, (1,) * len(in_spatial), padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _is_channels_last_2d(dimension_numbers, lhs_ndim: int) -> bool:
  if lhs_ndim != 4:
    return False
  numbers = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, dimension_numbers)
  return numbers == lax.conv_dimension_numbers((1,) * 4, (1,) * 4, _NHWC)


def _conv(x, w, padding):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC)


def _conv_one_input_channel(x, w, padding):
  """The convolution of a single-channel input as kh * kw broadcast multiply-adds.

  XLA fuses them into one loop, faster than its convolution on CPU for a
  first layer (`python -m scripts.bench.bench_ablations --rows conv`).
  """
  kh, kw = w.shape[:2]
  x = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      out = out + x[:, i:i + ho, j:j + wo, :] * w[i, j, 0, :].reshape(1, 1, 1, -1)
  return out


def _conv_as_row_matmuls(x, w, padding):
  """The convolution as `kh` matrix products of width-only patches `(N, H, Wo, kw * C)`.

  XLA:CPU's own convolution of a wide layer (7x7, 86 -> 86 channels) runs far
  below its matrix product's speed, forward and backward; patches along the
  width only hold `kw` (not `kh * kw`) copies of the input, which keeps them
  near the cache. Autodiff of this form gives both gradients as matrix
  products too (`python -m scripts.bench.bench_ablations --rows conv`).
  """
  kh, kw, cin, cout = w.shape
  x = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  patches = jnp.concatenate([x[:, :, j:j + wo, :] for j in range(kw)], axis=-1)
  out = jnp.dot(patches[:, 0:ho], w[0].reshape(kw * cin, cout))
  for i in range(1, kh):
    out = out + jnp.dot(patches[:, i:i + ho], w[i].reshape(kw * cin, cout))
  return out


def _conv_multichannel(x, w, padding, cpu_form):
  """A plain convolution of a multi-channel input: on CPU in `cpu_form`, elsewhere XLA's.

  `cpu_form="xla"` is the earlier path: the col2im input gradient up to
  `_MAX_PATCH_WIDTH` patch columns, XLA's own convolution beyond.
  """
  if cpu_form == "xla":
    wide = math.prod(w.shape[:3]) > _MAX_PATCH_WIDTH
    return _conv(x, w, padding) if wide else _conv2d(x, w, padding, _conv_as_matmul)
  if cpu_form == "row_matmuls":
    cpu = lambda x, w: _conv_as_row_matmuls(x, w, padding)
  else:  # "xla_row_dx": XLA:CPU's transposed convolution (the input gradient) is the slow one.
    cpu = lambda x, w: _conv2d(x, w, padding, _conv_as_row_matmuls)
  return lax.platform_dependent(x, w, cpu=cpu, default=lambda x, w: _conv(x, w, padding))


def _conv_as_matmul(x, w, padding):
  """The same convolution as shifted slices and one matrix product (im2col)."""
  kh, kw, cin, cout = w.shape
  x = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  patches = jnp.concatenate(
      [x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(patches, w.reshape(kh * kw * cin, cout))


# A single-channel input is convolved as multiply-adds up to this many output
# channels; wider first layers (9x9, 1 -> 86 in the paper's CNN) are faster
# as XLA's convolution (`python -m scripts.bench.bench_ablations --rows conv`).
_MAX_MULTIPLY_ADD_CHANNELS = 32


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x, w, padding, input_grad_form):
  """XLA's convolution and kernel gradient; the input gradient by autodiff of `input_grad_form`.

  `input_grad_form` is `_conv_as_matmul` (the transpose of im2col: a matrix
  product, then the shifted patches summed back) or `_conv_as_row_matmuls`,
  where XLA:CPU would lower a slow transposed convolution. A single-channel
  input with few output channels is convolved as multiply-adds instead.
  """
  if x.shape[-1] == 1 and w.shape[-1] <= _MAX_MULTIPLY_ADD_CHANNELS:
    # XLA:CPU fuses these multiply-adds into each consumer (the max pool after
    # a network's first layer), where they run several times slower than
    # alone: computed in a loop of their own instead.
    return _cpu_kernels.own_loop_on_cpu(_conv_one_input_channel(x, w, padding))
  return _conv(x, w, padding)


def _conv2d_fwd(x, w, padding, input_grad_form):
  return _conv2d(x, w, padding, input_grad_form), (x, w)


def _conv2d_bwd(padding, input_grad_form, residuals, cotangent):
  x, w = residuals
  x_bar = jax.vjp(lambda x: input_grad_form(x, w, padding), x)[1](cotangent)[0]
  w_bar = jax.vjp(lambda w: _conv(x, w, padding), w)[1](cotangent)[0]
  return x_bar, w_bar


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


CPU_CONV_FORMS = ("row_matmuls", "xla_row_dx", "xla")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, *,
                         cpu_form: str | None = None):
  """`lax.conv_general_dilated`, faster on CPU for plain channels-last 2-D convolutions.

  Same signature and values. Plain means: `(N, H, W, C)` input, `(kh, kw,
  C, O)` kernel, unit strides and dilations, no feature or batch groups,
  default precision and result type. Everything else goes to
  `lax.conv_general_dilated` unchanged. `cpu_form` picks the CPU path of a
  multi-channel input: "row_matmuls" (the module docstring), "xla_row_dx"
  (XLA's convolution and kernel gradient, the row products' input
  gradient) or "xla" (XLA's forward, the col2im input gradient up to 256
  patch columns; for ablations); None takes `xla_cpu.convolution_form()`,
  which follows the process's XLA flags. Every path is written with
  differentiable ops, so higher-order reverse-mode derivatives work.
  """
  plain = (_is_channels_last_2d(dimension_numbers, jnp.ndim(lhs))
           and tuple(window_strides) == (1, 1)
           and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
           and feature_group_count == 1 and batch_group_count == 1
           and precision is None and preferred_element_type is None)
  explicit = _explicit_padding(padding, jnp.shape(lhs)[1:3], jnp.shape(rhs)[:2]) if plain else ()
  if not plain or any(p < 0 for pair in explicit for p in pair):  # Negative padding crops.
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  if cpu_form is None:
    cpu_form = xla_cpu.convolution_form()
  if cpu_form not in CPU_CONV_FORMS:
    raise ValueError(f"`cpu_form` must be one of {CPU_CONV_FORMS}, got {cpu_form!r}.")
  if jnp.shape(lhs)[-1] > 1:
    return _conv_multichannel(lhs, rhs, explicit, cpu_form)
  return _conv2d(lhs, rhs, explicit, _conv_as_matmul)


def max_pool(inputs: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = "VALID") -> jax.Array:
  """`flax.linen.max_pool` for `(N, ..., C)` inputs; non-overlapping windows use a reshape.

  Same arguments and values as `flax.linen.max_pool` (strides default to 1).
  With `strides == window_shape` the windows tile the padded input, which is
  reshaped to `(N, out_1, w_1, ..., C)` and reduced with `max`; padding
  follows `lax.reduce_window` (-inf; "SAME" puts the odd pixel at the end).
  Overlapping windows call `flax.linen.max_pool`.
  """
  window_shape = tuple(int(w) for w in window_shape)
  strides = (1,) * len(window_shape) if strides is None else tuple(int(s) for s in strides)
  if strides != window_shape:
    return nn.max_pool(inputs, window_shape, strides=strides, padding=padding)
  spatial = inputs.shape[1:-1]
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(spatial, window_shape, strides, padding)
  else:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  x = jnp.pad(inputs, ((0, 0),) + tuple(pads) + ((0, 0),), constant_values=-jnp.inf)
  out = [(size - w) // w + 1 for size, w in zip(x.shape[1:-1], window_shape)]
  x = x[(slice(None),) + tuple(slice(0, o * w) for o, w in zip(out, window_shape))]
  shape = [x.shape[0]]
  for o, w in zip(out, window_shape):
    shape += [o, w]
  x = x.reshape(shape + [x.shape[-1]])
  return jnp.max(x, axis=tuple(range(2, 2 * len(window_shape) + 1, 2)))
