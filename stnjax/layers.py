"""Faster drop-ins for two Flax/lax layers that are slow to differentiate on CPU.

* `conv_general_dilated`: `lax.conv_general_dilated`, faster on CPU for
  plain 2-D convolutions (stride 1, no dilation, no groups, channels last).
  Pass it to Flax as `nn.Conv(..., conv_general_dilated=layers.
  conv_general_dilated)`: same parameters, same values up to float
  round-off. On CPU a hand-written VJP replaces XLA's transposed
  convolution, the slow part: a multi-channel input's gradient is one
  convolution along the width and shifted row sums (for an output narrower
  than `kw - 1`, one matrix product and shifted blocks), a single-channel
  input's (a network's first layer) a matrix product with the kernel and a
  sum of shifted copies ("col2im"). With `xla_cpu.FLAGS` in effect
  (YNNPACK off convolutions) XLA's own convolution computes the forward pass
  and the kernel gradient; without them YNNPACK's convolution is slower than
  its matrix product, and `kh` matrix products of width-only patches do
  (`xla_cpu.convolution_form()`). Other platforms keep XLA's convolution. A
  single-channel input with few output channels is convolved as fused
  multiply-adds in a loop of their own (`_cpu_kernels.own_loop_on_cpu`).
  A wide layer on maps much larger than its kernel (the paper CNN's 7x7,
  86 -> 86 on RTS's 17x17 maps) goes through FFTs instead: one small matrix
  product per frequency, eight times fewer products (`default_cpu_form`).
  Re-run: `python -m scripts.bench.bench_ablations --rows conv`.
* `max_pool`: `flax.linen.max_pool` for non-overlapping windows (window ==
  stride) as a reshape and elementwise maxima of each window's elements
  (`_window_max`). JAX differentiates `lax.reduce_window` max through a
  variadic reduce-window over index arrays; the elementwise form
  differentiates elementwise and fuses with the layers around it, which
  makes the STN tutorial's and the paper CNNs' training steps faster
  (`python -m scripts.bench.bench_ablations --rows max_pool`). Ties within
  a window share the gradient equally (the window's maximum is still the
  value).

`python -m scripts.bench.bench_train` measures the effect on a whole training step.
"""

import functools
import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from stnjax import _cpu_kernels
from stnjax import xla_cpu

_NHWC = ("NHWC", "HWIO", "NHWC")


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

  Without `xla_cpu.FLAGS`, XLA:CPU's own convolution of a wide layer (7x7,
  86 -> 86 channels) runs far below its matrix product's speed, forward and
  kernel gradient; patches along the width only hold `kw` (not `kh * kw`)
  copies of the input, which keeps them near the cache. Autodiff of this
  form gives the kernel gradient as matrix products too (`python -m
  scripts.bench.bench_ablations --rows conv`).
  """
  kh, kw, cin, cout = w.shape
  x = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  patches = jnp.concatenate([x[:, :, j:j + wo, :] for j in range(kw)], axis=-1)
  out = jnp.dot(patches[:, 0:ho], w[0].reshape(kw * cin, cout))
  for i in range(1, kh):
    out = out + jnp.dot(patches[:, i:i + ho], w[i].reshape(kw * cin, cout))
  return out


def _fft_length(n: int) -> int:
  """The smallest length >= `n` with no prime factor above 5 (a fast FFT size)."""
  while True:
    rest = n
    for p in (2, 3, 5):
      while rest % p == 0:
        rest //= p
    if rest == 1:
      return n
    n += 1


def _fft_saving(x_shape, w_shape, padding) -> float:
  """Real products per channel pair of the direct convolution over those of `_conv_by_fft`."""
  h, wd = (size + lo + hi for size, (lo, hi) in zip(x_shape[1:3], padding))
  kh, kw = w_shape[:2]
  lh, lw = _fft_length(h), _fft_length(wd)
  return (h - kh + 1) * (wd - kw + 1) * kh * kw / (4 * lh * (lw // 2 + 1))


def _conv_by_fft(x, w, padding):
  """The convolution through 2-D real FFTs: one `(2C, 2O)` matrix product per frequency.

  The valid cross-correlation of an `H x W` input is the circular one of
  any size >= `H x W` cut to its first `Ho x Wo` outputs, and the circular one
  is, per frequency, `X conj(K)` summed over input channels: `4 * Lh * (Lw //
  2 + 1)` real products per channel pair instead of `Ho * Wo * kh * kw`.
  Autodiff turns both gradients into the same transforms and products. In
  float32 the error relative to the output's largest magnitude is about the
  direct sum's (`tests/test_layers.py`); small outputs carry the same
  absolute error as large ones.
  """
  x = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  n, h, wd, cin = x.shape
  kh, kw, _, cout = w.shape
  lh, lw = _fft_length(h), _fft_length(wd)
  bins = lh * (lw // 2 + 1)
  # Channels first for the transforms, then frequencies first for the products.
  xf = jnp.fft.rfft2(jnp.transpose(x, (0, 3, 1, 2)), s=(lh, lw)).reshape(n, cin, bins)
  kf = jnp.fft.rfft2(jnp.transpose(w, (2, 3, 0, 1)), s=(lh, lw)).reshape(cin, cout, bins)
  xf, kf = jnp.transpose(xf, (2, 0, 1)), jnp.transpose(kf, (2, 0, 1))
  # (xr + i xi)(kr - i ki) = [xr, xi] @ [[kr, -ki], [ki, kr]]: real products run faster.
  xs = jnp.concatenate([xf.real, xf.imag], axis=-1)
  ks = jnp.concatenate([jnp.concatenate([kf.real, -kf.imag], axis=-1),
                        jnp.concatenate([kf.imag, kf.real], axis=-1)], axis=1)
  ys = lax.dot_general(xs, ks, (((2,), (1,)), ((0,), (0,))))
  yf = jnp.transpose(lax.complex(ys[..., :cout], ys[..., cout:]), (1, 2, 0))
  y = jnp.fft.irfft2(yf.reshape(n, cout, lh, lw // 2 + 1), s=(lh, lw))
  return jnp.transpose(y[:, :, :h - kh + 1, :wd - kw + 1], (0, 2, 3, 1))


def _conv_multichannel(x, w, padding, cpu_form):
  """A plain convolution of a multi-channel input: on CPU in `cpu_form`, elsewhere XLA's."""
  if cpu_form == "lax":
    return _conv(x, w, padding)
  if cpu_form == "fft":
    return lax.platform_dependent(x, w, cpu=lambda x, w: _conv_by_fft(x, w, padding),
                                  default=lambda x, w: _conv(x, w, padding))
  forward = _conv_as_row_matmuls if cpu_form == "row_matmuls" else _conv
  cpu = lambda x, w: _conv2d(x, w, padding, forward, _input_grad_multichannel, False)
  return lax.platform_dependent(x, w, cpu=cpu, default=lambda x, w: _conv(x, w, padding))


def _conv_as_matmul(x, w, padding):
  """The same convolution as shifted slices and one matrix product (im2col)."""
  kh, kw, cin, cout = w.shape
  x = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  patches = jnp.concatenate(
      [x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(patches, w.reshape(kh * kw * cin, cout))


def _input_grad_by_col2im(x, w, padding, cotangent):
  """The input gradient as the transpose of im2col: one matrix product, then shifted sums."""
  return jax.vjp(lambda x: _conv_as_matmul(x, w, padding), x)[1](cotangent)[0]


def _input_grad_by_width_conv(x, w, padding, cotangent):
  """The input gradient as one convolution along the width and `kh` shifted row sums.

  Output row `r` of kernel row `i` feeds input row `r + i`: one `(1, kw)`
  convolution of the cotangent, padded along the width only, computes every
  kernel row's contribution at once (`kh * C` output channels), and `kh`
  shifted slices add them up. The width padding `(kw - 1 - left, kw - 1 -
  right)` yields exactly the input's columns, so a padded ("SAME")
  convolution's gradient computes none of the columns its padding adds.
  XLA's transposed convolution pads the cotangent along both axes and
  computes over the zeros; row matrix products write `kw` times the input
  gradient before summing.
  """
  kh, kw, cin, cout = w.shape
  (top, _), (left, right) = padding
  # k[0, j, o, (i, c)] = w[i, kw - 1 - j, c, o]: the width taps flipped.
  k = jnp.transpose(w[:, ::-1], (1, 3, 0, 2)).reshape(1, kw, cout, kh * cin)
  z = _conv(cotangent, k, ((0, 0), (kw - 1 - left, kw - 1 - right)))
  n, ho, width, _ = z.shape
  z = z.reshape(n, ho, width, kh, cin)
  padded = sum(jnp.pad(z[:, :, :, i], ((0, 0), (i, kh - 1 - i), (0, 0), (0, 0)))
               for i in range(kh))
  return padded[:, top:top + x.shape[1]]


def _input_grad_by_position_sums(x, w, padding, cotangent):
  """The input gradient as one matrix product and one shifted block per output position.

  `cotangent (N, Ho, Wo, O) @ (O, kh * kw * C)` gives each output position's
  `(kh, kw, C)` block of input gradient; the `Ho * Wo` blocks, each padded
  to its place, add up. The products are exactly the needed ones, and the
  sum has few terms when the output is small.
  """
  kh, kw, cin, cout = w.shape
  n, ho, wo, _ = cotangent.shape
  blocks = jnp.dot(cotangent, jnp.transpose(w, (3, 0, 1, 2)).reshape(cout, kh * kw * cin))
  blocks = blocks.reshape(n, ho, wo, kh, kw, cin)
  padded = sum(jnp.pad(blocks[:, r, s], ((0, 0), (r, ho - 1 - r), (s, wo - 1 - s), (0, 0)))
               for r in range(ho) for s in range(wo))
  (top, _), (left, _) = padding
  return padded[:, top:top + x.shape[1], left:left + x.shape[2]]


def _input_grad_multichannel(x, w, padding, cotangent):
  """A multi-channel input's gradient: by position sums for an output narrower than
  `kw - 1`, else by the width convolution.

  The width convolution computes `(Wo + kw - 1) / Wo` times the needed
  products (its edge columns see padding), over twice as many below that
  width; the position sums compute none in vain but write `kh * kw` values
  per output position (`python -m scripts.bench.bench_ablations --rows conv`).
  """
  if cotangent.shape[2] < w.shape[1] - 1:
    return _input_grad_by_position_sums(x, w, padding, cotangent)
  return _input_grad_by_width_conv(x, w, padding, cotangent)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv2d(x, w, padding, forward, input_grad, multiply_adds):
  """`forward(x, w, padding)` and its kernel gradient; the input gradient by `input_grad`.

  `forward` is XLA's convolution or `_conv_as_row_matmuls`; `input_grad` is
  `_input_grad_by_col2im` or `_input_grad_multichannel`, where XLA:CPU
  would lower a slow transposed convolution. With `multiply_adds` (a
  single-channel input with few output channels) the value is computed as
  multiply-adds instead, the kernel gradient still through `forward`.
  """
  if multiply_adds:
    # XLA:CPU fuses these multiply-adds into each consumer (the max pool after
    # a network's first layer), where they run several times slower than
    # alone: computed in a loop of their own instead.
    return _cpu_kernels.own_loop_on_cpu(_conv_one_input_channel(x, w, padding))
  return forward(x, w, padding)


def _conv2d_fwd(x, w, padding, forward, input_grad, multiply_adds):
  return _conv2d(x, w, padding, forward, input_grad, multiply_adds), (x, w)


def _conv2d_bwd(padding, forward, input_grad, multiply_adds, residuals, cotangent):
  del multiply_adds  # The gradients are the same either way.
  x, w = residuals
  x_bar = input_grad(x, w, padding, cotangent)
  w_bar = jax.vjp(lambda w: forward(x, w, padding), w)[1](cotangent)[0]
  return x_bar, w_bar


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


CPU_CONV_FORMS = ("row_matmuls", "xla", "fft", "lax")


def default_cpu_form(lhs_shape, rhs_shape, padding, fft_min_saving: float = 8.0,
                     fft_min_channels: int = 16) -> str:
  """The `cpu_form` a plain `(N, H, W, C)` convolution takes when none is given.

  "fft" where it needs `fft_min_saving` times fewer products than the direct
  sum (`_fft_saving`) and both channel counts are at least
  `fft_min_channels`, else `xla_cpu.convolution_form()`. The threshold
  sits just below the paper CNN's 7x7, 86 -> 86 layer on RTS's 17x17 maps
  (8.2, faster through FFTs) and well above R's 10x10 (3.3, slower):
  `python -m scripts.bench.bench_ablations --rows "conv 7x7 86->86"`.
  """
  padding = _explicit_padding(padding, tuple(lhs_shape[1:3]), tuple(rhs_shape[:2]))
  wide = min(rhs_shape[2:]) >= fft_min_channels
  if wide and _fft_saving(lhs_shape, rhs_shape, padding) >= fft_min_saving:
    return "fft"
  return xla_cpu.convolution_form()


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, *,
                         cpu_form: str | None = None, max_multiply_add_channels: int = 32):
  """`lax.conv_general_dilated`, faster on CPU for plain channels-last 2-D convolutions.

  Same signature; same values up to float round-off. Plain means: `(N, H,
  W, C)` input, `(kh, kw, C, O)` kernel, unit strides and dilations, no
  feature or batch groups, default precision and result type. Everything
  else goes to `lax.conv_general_dilated` unchanged. `cpu_form` picks the CPU path of a
  multi-channel input's forward pass and kernel gradient: "row_matmuls"
  (width-only patches) or "xla" (XLA's convolution), both with the
  width-convolution input gradient, "fft" (all three through FFTs) or
  "lax" (`lax.conv_general_dilated` as is, for ablations). None takes
  `default_cpu_form(...)`: "fft" where it saves most (the paper CNN's 7x7
  layer on RTS's 17x17 maps, not on R's 10x10), else
  `xla_cpu.convolution_form()`, which follows the process's XLA flags. On
  CPU a single-channel input with at most `max_multiply_add_channels`
  output channels is convolved as multiply-adds (wider first layers, such
  as the paper CNN's 9x9, 1 -> 86, are faster as XLA's convolution:
  `python -m scripts.bench.bench_ablations --rows conv`). Every path is
  written with differentiable ops, so higher-order reverse-mode derivatives
  work.
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
    cpu_form = default_cpu_form(jnp.shape(lhs), jnp.shape(rhs), explicit)
  if cpu_form not in CPU_CONV_FORMS:
    raise ValueError(f"`cpu_form` must be one of {CPU_CONV_FORMS}, got {cpu_form!r}.")
  if jnp.shape(lhs)[-1] > 1:
    return _conv_multichannel(lhs, rhs, explicit, cpu_form)
  multiply_adds = jnp.shape(rhs)[-1] <= max_multiply_add_channels
  cpu = lambda x, w: _conv2d(x, w, explicit, _conv, _input_grad_by_col2im, multiply_adds)
  return lax.platform_dependent(lhs, rhs, cpu=cpu, default=lambda x, w: _conv(x, w, explicit))


def max_pool(inputs: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = "VALID") -> jax.Array:
  """`flax.linen.max_pool` for `(N, ..., C)` inputs; non-overlapping windows use a reshape.

  Same arguments and values as `flax.linen.max_pool` (strides default to 1).
  With `strides == window_shape` the windows tile the padded input, which is
  reshaped to `(N, out_1, w_1, ..., C)` and reduced by `_window_max`;
  padding follows `lax.reduce_window` (-inf; "SAME" puts the odd pixel at
  the end). Overlapping windows call `flax.linen.max_pool`.
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
  return _window_max(x)


def _window_taps(x):
  """The elements of each window of `x (N, o_1, w_1, ..., o_d, w_d, C)`: `w_1 * ... * w_d`
  arrays `(N, o_1, ..., o_d, C)`, offsets in row-major order."""
  windows = x.shape[2:-1:2]
  taps = []
  for offsets in itertools.product(*(range(w) for w in windows)):
    taps.append(x[(slice(None),) + tuple(i for o in offsets for i in (slice(None), o))])
  return taps


@jax.custom_jvp
def _window_max(x):
  """The max over the window axes of `x (N, o_1, w_1, ..., o_d, w_d, C)`.

  Written as elementwise maxima of the window's elements, with the JVP
  below: `jnp.max` over the window axes differentiates through a reduction
  (the count of tied maxima) that XLA:CPU hands to YNNPACK, which then
  materialises every input of that fusion; elementwise, the pool's forward
  and backward fuse with the layers around them. The forward runs in a loop
  of its own on CPU (`own_loop_on_cpu`): fused into its consumers (the
  next convolution's kernel gradient transposes it), the maxima would be
  recomputed there.
  """
  return _cpu_kernels.own_loop_on_cpu(functools.reduce(jnp.maximum, _window_taps(x)))


@_window_max.defjvp
def _window_max_jvp(primals, tangents):
  """Each window's maxima share its tangent equally (as `jnp.max`'s JVP); linear, so
  reverse mode transposes it."""
  (x,), (x_dot,) = primals, tangents
  y = _window_max(x)
  hits = [tap == y for tap in _window_taps(x)]
  count = sum(hit.astype(y.dtype) for hit in hits)
  y_dot = sum(jnp.where(hit, tap_dot, 0) for hit, tap_dot in zip(hits, _window_taps(x_dot)))
  return y, y_dot / count
