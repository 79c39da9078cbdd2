"""Flax (linen) models of the paper: spatial transformers, FCN/CNN baselines, ST-FCN/ST-CNN.

Conventions:

* Images and feature maps are channels-last, batched: `(B, H, W, C)`, float.
* A `SpatialTransformer` regresses transform parameters from its input with a
  localisation network and a final `Dense` "regression" layer initialised to
  the identity (zero kernel, bias = identity parameters), builds a *pull* grid
  over its output size (normalised coordinates, last axis `(x, y)`,
  `align_corners=False` by default, see `stnjax.grids`) and samples its input
  bilinearly with `stnjax.grid_sample`. Untrained, it returns its input.
* Classifiers return logits `(B, num_classes)`. ST classifiers also `sow`
  each transformer's output under `("intermediates", "st_output")` and its
  parameters under `("intermediates", "theta")`; read them with
  `model.apply(variables, x, mutable=["intermediates"])`.

The regression layer's outputs are the flat parameters of
`stnjax.transforms.transform_grid` (its docstring tables them per transform).

Model names understood by `create_model` (the paper's Table 1 and the
addition experiment): `fcn`, `cnn`, `st_fcn_{aff,proj,tps,att,rts}`,
`st_cnn_{aff,proj,tps,att,rts}`, and `<n>st_fcn_*` / `<n>st_cnn_*` with `n`
parallel transformers whose outputs are concatenated along channels (the
paper's 2xST-FCN for MNIST addition is `2st_fcn_aff` etc.).

Architecture choices (Jaderberg et al. 2015, Appendix A, and the public
re-implementations; UNVERIFIED: not stated there):

* FCN: `Dense(w) -> ReLU -> Dense(w) -> ReLU -> Dense(num_classes)`.
* CNN: `Conv(w, 9x9) -> ReLU -> maxpool 2 -> Conv(w, 7x7) -> ReLU -> maxpool 2
  -> Dense(num_classes)`.
* Padding (`padding`, one knob for every convolution of a model): "VALID"
  (the default) leaves convolutions unpadded, as the public re-implementations
  that state the layout do (luuf/stn-placement, hvy's chainer
  spatial-transformer-networks, the Lasagne recipe): 28 -> 20 -> 10 -> 4 -> 2
  for the CNN, 7-8x fewer multiply-adds than "SAME" at 400k parameters.
  "SAME" pads every convolution (the earlier stnjax layout). Max pools keep a
  partial last window (ceil: 13 -> 7) in both, so that every paper input
  leaves a spatial map: the ST-CNN's classifier on RTS sees the 21x21 pooled
  transformer output, 21 -> 13 -> 7 -> 1 -> 1, where floor pooling
  (13 -> 6) would leave the 7x7 convolution nothing to cover; its second
  convolution then acts as a fully connected layer over the 7x7 map.
  "VALID_MIN2" pads only a classifier convolution whose unpadded output would
  be smaller than 2x2 (that one: 21 -> 13 -> 7 -> 7 -> 4); the localisation
  nets stay unpadded.
* ST-FCN localisation: three `Dense(32) -> ReLU` layers (the paper says "fully
  connected layers of 32 units"; the number of layers is UNVERIFIED).
* ST-CNN localisation: `avgpool 2 -> Conv(20, 5x5) -> ReLU -> maxpool 2 ->
  Conv(20, 5x5) -> ReLU -> Dense(20) -> ReLU`, padded as the classifier
  (luuf/stn-placement leaves it unpadded too: 28 -> 14 -> 10 -> 5 -> 1).
* The width `w` of the classifier is the one free knob: `create_model` picks
  it so that the whole model has about `param_budget` parameters (the paper:
  about 400k for every model in a table row).
* With `st_pool=2` (the paper's RTS and TC models) the transformer samples at
  input resolution and its output is average-pooled by 2 before the
  classifier.
* Convolutions are `Conv` (Flax's `nn.Conv` with `stnjax.layers.
  conv_general_dilated`) and max pools `stnjax.layers.max_pool`: the same
  parameters and values as Flax's layers, with faster gradients on CPU.
"""

import functools
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stnjax import layers
from stnjax import sampling
# Parameters -> grid live in `transforms`; re-exported here for older callers.
from stnjax.transforms import TPS_LATTICE
from stnjax.transforms import TRANSFORMS
from stnjax.transforms import identity_params
from stnjax.transforms import transform_grid

# Model-name suffix -> transform type.
TRANSFORM_SUFFIXES = {"aff": "affine", "proj": "projective", "tps": "tps",
                      "att": "attention", "rts": "rts"}

# The paper's localisation networks (Jaderberg et al. 2015, Appendix A).
FC_LOCALISATION_FEATURES = (32, 32, 32)
CONV_LOCALISATION_FEATURES = (20, 20)
CONV_LOCALISATION_KERNEL = (5, 5)
CONV_LOCALISATION_DENSE = 20
CONV_LOCALISATION_DOWNSAMPLE = 2
PADDINGS = ("VALID", "SAME", "VALID_MIN2")

# `nn.Conv` with a faster input gradient on CPU (same parameters and values;
# see stnjax/layers.py).
Conv = functools.partial(nn.Conv, conv_general_dilated=layers.conv_general_dilated)


def _check_images(x: jax.Array, name: str = "x") -> None:
  if x.ndim != 4:
    raise ValueError(f"`{name}` must be a batch of channels-last images (B, H, W, C), "
                     f"got shape {x.shape}.")


def _classifier_padding(padding: str, in_size: Sequence[int], kernel_size: Sequence[int]) -> str:
  """"VALID_MIN2": unpadded, unless that would leave a map smaller than 2x2 (then "SAME")."""
  if padding != "VALID_MIN2":
    return padding
  small = any(n - k + 1 < 2 for n, k in zip(in_size, kernel_size))
  return "SAME" if small else "VALID"


def _check_fits(x: jax.Array, kernel_size: tuple[int, int], padding: str, where: str) -> None:
  """An unpadded convolution needs a feature map at least as large as its kernel."""
  if padding not in PADDINGS:
    raise ValueError(f"`padding` of {where} must be one of {PADDINGS}, got {padding!r}.")
  if padding == "VALID" and (x.shape[1] < kernel_size[0] or x.shape[2] < kernel_size[1]):
    raise ValueError(f"{where}: a {kernel_size[0]}x{kernel_size[1]} 'VALID' convolution does "
                     f"not fit its {x.shape[1]}x{x.shape[2]} input feature map; use a larger "
                     f"input or padding='SAME'.")


class SpatialTransformer(nn.Module):
  """Localisation net + identity-initialised regression + grid generator + bilinear sampler.

  Attributes:
    localisation: any module mapping `(B, H, W, C)` to features `(B, ...)`
      (flattened before the regression layer).
    transform: one of `TRANSFORMS` (see the module docstring for parameters).
    output_size: `(H_out, W_out)` of the sampled output; `None` = input size.
    align_corners, padding_mode: passed to the grid and `stnjax.grid_sample`.
    tps_lattice: `k` of the `k x k` TPS control lattice.

  Returns from `__call__(x)` with `x (B, H, W, C)` (any channel count: images
  or feature maps): `(y (B, H_out, W_out, C), params (B, P))`.
  """
  localisation: nn.Module
  transform: str = "affine"
  output_size: tuple[int, int] | None = None
  align_corners: bool = False
  padding_mode: str = "zeros"
  tps_lattice: int = TPS_LATTICE

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    _check_images(x)
    identity = identity_params(self.transform, tps_lattice=self.tps_lattice)
    out_size = tuple(x.shape[1:3]) if self.output_size is None else tuple(self.output_size)
    if len(out_size) != 2 or any(int(s) < 1 for s in out_size):
      raise ValueError(f"`output_size` must be two positive sizes (H_out, W_out), "
                       f"got {self.output_size}.")
    features = self.localisation(x)
    features = features.reshape(features.shape[0], -1)
    params = nn.Dense(identity.size, kernel_init=nn.initializers.zeros,
                      bias_init=lambda key, shape, dtype=jnp.float32: jnp.asarray(identity, dtype),
                      name="regression")(features)
    grid = transform_grid(self.transform, params, out_size, align_corners=self.align_corners)
    y = sampling.grid_sample(x, grid.astype(x.dtype), padding_mode=self.padding_mode,
                             align_corners=self.align_corners)
    return y, params


class FCLocalisation(nn.Module):
  """ST-FCN localisation: flatten, then `Dense(f) -> ReLU` for each `f` in `features`."""
  features: Sequence[int] = FC_LOCALISATION_FEATURES

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for f in self.features:
      x = nn.relu(nn.Dense(f)(x))
    return x


class ConvLocalisation(nn.Module):
  """ST-CNN localisation: avgpool, convs with ReLU and a 2x maxpool between, dense + ReLU."""
  features: Sequence[int] = CONV_LOCALISATION_FEATURES
  kernel_size: tuple[int, int] = CONV_LOCALISATION_KERNEL
  dense: int = CONV_LOCALISATION_DENSE
  downsample: int = CONV_LOCALISATION_DOWNSAMPLE
  padding: str = "VALID"

  @nn.compact
  def __call__(self, x):
    _check_images(x)
    if self.downsample > 1:
      d = (self.downsample, self.downsample)
      x = nn.avg_pool(x, d, strides=d, padding="SAME")
    for i, f in enumerate(self.features):
      if i:
        x = layers.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
      _check_fits(x, self.kernel_size, self.padding, "ConvLocalisation")
      x = nn.relu(Conv(f, self.kernel_size, padding=self.padding)(x))
    x = x.reshape(x.shape[0], -1)
    return nn.relu(nn.Dense(self.dense)(x))


class FCN(nn.Module):
  """Fully connected classifier: `Dense(h) -> ReLU` per hidden width, then `Dense(num_classes)`."""
  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Conv classifier: `Conv(f, k) -> ReLU -> maxpool 2` per layer, then `Dense(num_classes)`.

  Convolutions are padded by `padding` ("VALID" or "SAME"); pools keep a
  partial last window (see the module docstring).
  """
  features: Sequence[int]
  kernel_sizes: Sequence[tuple[int, int]]
  num_classes: int
  padding: str = "VALID"

  @nn.compact
  def __call__(self, x):
    _check_images(x)
    if len(self.features) != len(self.kernel_sizes):
      raise ValueError(f"`features` {self.features} and `kernel_sizes` {self.kernel_sizes} "
                       "must have the same length.")
    for f, k in zip(self.features, self.kernel_sizes):
      padding = _classifier_padding(self.padding, x.shape[1:3], k)
      _check_fits(x, tuple(k), padding, "CNN")
      x = nn.relu(Conv(f, tuple(k), padding=padding)(x))
      x = layers.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(x)


class STClassifier(nn.Module):
  """Parallel spatial transformers -> channel concat -> optional avgpool -> classifier.

  Every transformer sees the whole input (all channels). Each transformer's
  output and parameters are sown into `("intermediates", "st_output")` and
  `("intermediates", "theta")` (tuples, one entry per transformer).
  """
  transformers: Sequence[SpatialTransformer]
  classifier: nn.Module
  pool: int = 1

  @nn.compact
  def __call__(self, x):
    _check_images(x)
    outputs = []
    for st in self.transformers:
      y, params = st(x)
      self.sow("intermediates", "st_output", y)
      self.sow("intermediates", "theta", params)
      outputs.append(y)
    y = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=-1)
    if self.pool > 1:
      y = nn.avg_pool(y, (self.pool, self.pool), strides=(self.pool, self.pool), padding="SAME")
    return self.classifier(y)


_NAME = re.compile(r"^(?:(\d*)st_)?(fcn|cnn)(?:_([a-z]+))?$")


def parse_model_name(name: str) -> tuple[int, str, str | None]:
  """`name` -> (number of transformers, classifier "fcn"/"cnn", transform or None)."""
  m = _NAME.match(name)
  if m is None:
    raise ValueError(f"`name` must look like 'fcn', 'cnn', 'st_cnn_aff' or '2st_fcn_tps', "
                     f"got {name!r}.")
  count, classifier, suffix = m.groups()
  num_st = 0 if m.group(0).startswith(classifier) else int(count or 1)
  if num_st and suffix not in TRANSFORM_SUFFIXES:
    raise ValueError(f"`name` {name!r}: a spatial-transformer model needs a transform suffix, "
                     f"one of {sorted(TRANSFORM_SUFFIXES)}.")
  if not num_st and suffix is not None:
    raise ValueError(f"`name` {name!r}: a transform suffix needs an 'st_' prefix.")
  return num_st, classifier, TRANSFORM_SUFFIXES.get(suffix)


def _build(name: str, input_shape: tuple[int, int, int], num_classes: int, width: int,
           st_pool: int, padding: str) -> nn.Module:
  num_st, classifier_kind, transform = parse_model_name(name)
  if classifier_kind == "fcn":
    classifier = FCN(hidden=(width, width), num_classes=num_classes)
  else:
    classifier = CNN(features=(width, width), kernel_sizes=((9, 9), (7, 7)),
                     num_classes=num_classes, padding=padding)
  if not num_st:
    return classifier
  if classifier_kind == "fcn":
    loc = FCLocalisation()
  else:
    loc = ConvLocalisation(padding="VALID" if padding == "VALID_MIN2" else padding)
  sts = tuple(SpatialTransformer(localisation=loc, transform=transform,
                                 output_size=tuple(input_shape[:2]))
              for _ in range(num_st))
  return STClassifier(transformers=sts, classifier=classifier, pool=st_pool)


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
  """Number of parameters of `model` on inputs `(1, *input_shape)` (no computation: eval_shape)."""
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(shapes["params"])))


def solve_width(name: str, input_shape: Sequence[int], num_classes: int, param_budget: int, *,
                st_pool: int = 1, padding: str = "VALID", max_width: int = 4096) -> int:
  """The classifier width whose model has the parameter count closest to `param_budget`."""
  input_shape = tuple(int(s) for s in input_shape)
  count = lambda w: count_params(_build(name, input_shape, num_classes, w, st_pool, padding),
                                 input_shape)
  lo, hi = 1, max_width
  if count(lo) >= param_budget:
    raise ValueError(f"`param_budget`={param_budget} is below the smallest {name!r} model "
                     f"({count(lo)} parameters) on inputs {input_shape}.")
  while hi - lo > 1:  # Invariant: count(lo) < budget <= count(hi) (count grows with w).
    mid = (lo + hi) // 2
    if count(mid) < param_budget:
      lo = mid
    else:
      hi = mid
  return min((lo, hi), key=lambda w: abs(count(w) - param_budget))


def create_model(name: str, input_shape: Sequence[int], num_classes: int, *,
                 width: int | None = None, param_budget: int | None = None,
                 st_pool: int = 1, padding: str = "VALID") -> nn.Module:
  """Builds one of the paper's models (see the module docstring for names).

  Args:
    name: e.g. "fcn", "cnn", "st_fcn_aff", "st_cnn_tps", "2st_fcn_proj".
    input_shape: `(H, W, C)` of one input image.
    num_classes: number of output logits.
    width: classifier width (hidden units of the FCN, filters of both CNN
      convolutions). Exactly one of `width` and `param_budget` must be given.
    param_budget: pick the width whose total parameter count is closest to
      this (the paper: about 400k for all models of a table row).
    st_pool: average-pool factor applied to the transformer output before the
      classifier (the paper: 2 for RTS and TC, 1 otherwise). Ignored without
      transformers.
    padding: "VALID" (unpadded convolutions, the public re-implementations'
      layout) or "SAME", for every convolution of the model.

  Returns:
    A flax module mapping `(B, H, W, C)` float images to `(B, num_classes)` logits.
  """
  parse_model_name(name)
  input_shape = tuple(int(s) for s in input_shape)
  if len(input_shape) != 3 or min(input_shape) < 1:
    raise ValueError(f"`input_shape` must be (H, W, C) with positive sizes, got {input_shape}.")
  if num_classes < 1:
    raise ValueError(f"`num_classes` must be positive, got {num_classes}.")
  if st_pool < 1:
    raise ValueError(f"`st_pool` must be >= 1, got {st_pool}.")
  if padding not in PADDINGS:
    raise ValueError(f"`padding` must be one of {PADDINGS}, got {padding!r}.")
  if (width is None) == (param_budget is None):
    raise ValueError(f"Give exactly one of `width` ({width}) and `param_budget` ({param_budget}).")
  if width is None:
    width = solve_width(name, input_shape, num_classes, param_budget, st_pool=st_pool,
                        padding=padding)
  if width < 1:
    raise ValueError(f"`width` must be positive, got {width}.")
  return _build(name, input_shape, num_classes, int(width), st_pool, padding)
