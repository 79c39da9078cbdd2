"""Distorted-MNIST variants of the STN paper, as pure JAX functions that run on device.

Jaderberg et al., *Spatial Transformer Networks*, NIPS 2015, Appendix A.4
(and its public reproductions where the paper is silent). Every
variant's parameters live in one place, the frozen `VARIANTS` registry; each
entry cites its source and lists its UNVERIFIED assumptions in `unverified`.

Conventions:

* Inputs are MNIST digits, uint8 `(28, 28)` in [0, 255] (a "pool"
  `(N, 28, 28)`, kept on the device). Outputs are float images in [0, 1],
  channels-last `(B, S, S, C)` (C = 1; C = 2 for `addition`), labels int32
  `(B,)`.
* Warps are built on stnjax's grids and `stnjax.grid_sample` (bilinear,
  zeros padding, `align_corners=False`: the background is black). They are
  *pull* maps, so a digit drawn at size factor `s` uses a theta scale of
  `1 / s` (times the canvas/digit size ratio).
* Pixel coordinates in the parameters are `(x, y)` = (column, row), in
  continuous pixel units whose origin is the top-left *edge* of the image:
  pixel `(i, j)` covers `[j, j + 1) x [i, i + 1)`; its centre is
  `(j + 0.5, i + 0.5)`.
* Angles are in degrees; a positive angle turns the digit clockwise on
  screen (x right, y down). The distributions are symmetric, so the sign
  convention does not change the data distribution.

Randomness: every function takes explicit keys. `sample_train_batch` draws
pool indices and distortions from one key, so deriving the key from
`(seed, step)` (`jax.random.fold_in(jax.random.key(seed), step)`) gives a
reproducible stream that a resumed run continues exactly. `distort` takes
one key per example; `distorted_mnist.generate_eval_set` derives example `i`'s key as
`fold_in(key, i)`, so any chunking gives the same set.

Variants and their parameters: `stnjax.data.variants` (the registry and the
placement rules). The fixed evaluation sets: `stnjax.data.distorted_mnist`.
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

import stnjax
from stnjax.data.variants import KINDS  # pylint: disable=unused-import
from stnjax.data.variants import MNIST_SIZE
from stnjax.data.variants import QuadRule
from stnjax.data.variants import VARIANTS  # pylint: disable=unused-import
from stnjax.data.variants import Variant
from stnjax.data.variants import get_variant

# ---------------------------------------------------------------------------
# Parameter draws (one example; vmapped by `distort`).


def _ink_box(digit: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """Centre `(x, y)` and half-extent `(w/2, h/2)` of the bilinear support of the ink, in pixels.

  Ink columns `j0..j1` are non-zero in `digit (28, 28)`; bilinear
  interpolation spreads pixel `j` over `(j - 0.5, j + 1.5)`, so the support
  is `[j0 - 0.5, j1 + 1.5]`. An empty digit gets the whole 28x28 box.
  """
  size = digit.shape[-1]
  idx = jnp.arange(size)

  def bounds(has_ink):
    lo = jnp.min(jnp.where(has_ink, idx, size))
    hi = jnp.max(jnp.where(has_ink, idx, -1))
    empty = hi < lo
    lo = jnp.where(empty, 0.0, lo - 0.5)
    hi = jnp.where(empty, float(size), hi + 1.5)
    return lo.astype(dtype), hi.astype(dtype)

  ink = digit > 0
  x0, x1 = bounds(jnp.any(ink, axis=0))
  y0, y1 = bounds(jnp.any(ink, axis=1))
  return jnp.stack([x0 + x1, y0 + y1]) / 2, jnp.stack([x1 - x0, y1 - y0]) / 2


def _uniform(key, shape, dtype, bounds):
  return jax.random.uniform(key, shape, dtype, bounds[0], bounds[1])


def _draw_rotate(v: Variant, key, digit, dtype) -> dict[str, jax.Array]:
  del digit
  return {"angle": _uniform(key, (), dtype, v.angle_range_deg)}


def _draw_rts(v: Variant, key, digit, dtype) -> dict[str, jax.Array]:
  k_angle, k_scale, k_center = jax.random.split(key, 3)
  angle = _uniform(k_angle, (), dtype, v.angle_range_deg)
  scale = _uniform(k_scale, (), dtype, v.scale_range)
  pivot, half = _ink_box(digit, dtype)
  cos, sin = jnp.abs(jnp.cos(jnp.deg2rad(angle))), jnp.abs(jnp.sin(jnp.deg2rad(angle)))
  extent = scale * jnp.stack([cos * half[0] + sin * half[1], sin * half[0] + cos * half[1]])
  middle = v.image_size / 2
  lo = jnp.minimum(extent, middle)
  hi = jnp.maximum(v.image_size - extent, middle)
  center = lo + jax.random.uniform(k_center, (2,), dtype) * (hi - lo)
  return {"angle": angle, "scale": scale, "center": center, "pivot": pivot}


def projective_target(scale: jax.Array, corner_offsets: jax.Array, image_size: int) -> jax.Array:
  """Where P draws the digit box's corners: `(..., 4, 2)`, normalised `(x, y)`, in the order of
  `stnjax.transforms.corners()` (scale about the centre, then each corner moved by its offset)."""
  corners = jnp.broadcast_to(jnp.asarray(stnjax.transforms.corners(), corner_offsets.dtype),
                             corner_offsets.shape)
  return jnp.asarray(scale)[..., None, None] * corners + corner_offsets * (2 / image_size)


def quad_is_well_formed(quad: jax.Array, scale: jax.Array, rule: "QuadRule") -> jax.Array:
  """Whether the projective warp that draws the digit box as `quad` keeps the digit legible.

  `quad` `(..., 4, 2)` lists where the box corners land (`projective_target`),
  `scale` is the draw's scale. True when, as `rule` sets out, the quad is
  convex with the box's orientation (no fold, no mirror), its interior angles
  lie in `[min_angle_deg, 180 - min_angle_deg]`, its area is at least
  `min_area_fraction` of the scaled box's, and the box-to-quad homography's
  weights `w` at the four corners are positive with `max w / min w <=
  max_perspective` (the local area scale of the warp goes as `w ** -3`, so a
  larger ratio squeezes part of the digit into a streak).
  """
  edges = jnp.roll(quad, -1, axis=-2) - quad              # edge i runs from corner i to i + 1
  incoming = jnp.roll(edges, 1, axis=-2)                  # the edge that ends at corner i
  turn = incoming[..., 0] * edges[..., 1] - incoming[..., 1] * edges[..., 0]
  norms = jnp.linalg.norm(incoming, axis=-1) * jnp.linalg.norm(edges, axis=-1)
  cos_exterior = jnp.sum(incoming * edges, axis=-1) / jnp.maximum(norms, 1e-12)
  interior_deg = 180.0 - jnp.degrees(jnp.arccos(jnp.clip(cos_exterior, -1.0, 1.0)))
  area = 0.5 * jnp.sum(quad[..., 0] * jnp.roll(quad[..., 1], -1, axis=-1)
                       - jnp.roll(quad[..., 0], -1, axis=-1) * quad[..., 1], axis=-1)
  corners = jnp.asarray(stnjax.transforms.corners(), quad.dtype)
  forward = stnjax.homography_from_points(jnp.broadcast_to(corners, quad.shape), quad)
  w = forward[..., 2, :2] @ corners.T + forward[..., 2, 2:]  # (..., 4)
  box_area = 4.0 * jnp.asarray(scale, quad.dtype) ** 2     # corners() spans [-1, 1] (area 4)
  return (jnp.all(turn > 0, axis=-1)
          & jnp.all(interior_deg >= rule.min_angle_deg, axis=-1)
          & jnp.all(interior_deg <= 180.0 - rule.min_angle_deg, axis=-1)
          & (area >= rule.min_area_fraction * box_area)
          & jnp.all(w > 0, axis=-1)
          & (jnp.max(w, axis=-1) <= rule.max_perspective * jnp.min(w, axis=-1)))


def _draw_projective(v: Variant, key, digit, dtype) -> dict[str, jax.Array]:
  """Scale, then corner offsets redrawn until the quad is well formed (`quad_is_well_formed`).

  With `v.quad_rule=None`, one draw is taken as it comes (the literal protocol).

  The redraws are `quad_rule.max_draws` candidates drawn at once; the first
  well-formed one is taken (if none is, the undistorted scaled box; with the
  paper's parameters a minority of candidates is rejected, so all 16 failing
  is vanishingly rare).
  """
  del digit
  k_scale, k_corners = jax.random.split(key)
  scale = _uniform(k_scale, (), dtype, v.scale_range)
  rule = v.quad_rule
  if rule is None:  # The protocol taken literally: one draw, folds and all.
    return {"scale": scale,
            "corner_offsets": v.corner_std_px * jax.random.normal(k_corners, (4, 2), dtype)}
  candidates = v.corner_std_px * jax.random.normal(k_corners, (rule.max_draws, 4, 2), dtype)
  scales = jnp.full((rule.max_draws,), scale)
  ok = quad_is_well_formed(projective_target(scales, candidates, v.image_size), scales, rule)
  first = jnp.argmax(ok)
  offsets = jnp.where(ok[first], candidates[first], jnp.zeros_like(candidates[first]))
  return {"scale": scale, "corner_offsets": offsets}


def _draw_tps(v: Variant, key, digit, dtype) -> dict[str, jax.Array]:
  del digit
  k_scale, k_points = jax.random.split(key)
  n = v.tps_lattice ** 2
  return {"scale": _uniform(k_scale, (), dtype, v.scale_range),
          "control_offsets": v.tps_std_px * jax.random.normal(k_points, (n, 2), dtype)}


def _draw_offset(v: Variant, key) -> jax.Array:
  """Integer top-left `(x, y)` of the 28x28 digit box, uniform in [0, S - 28]."""
  return jax.random.randint(key, (2,), 0, v.image_size - MNIST_SIZE + 1, jnp.int32)


def _draw_clutter(v: Variant, key, index, pool_size) -> dict[str, jax.Array]:
  k_index, k_crop, k_paste = jax.random.split(key, 3)
  n = v.num_clutter
  # Another digit than the main one: shift by 1..N-1 (any digit if the pool has one).
  shift = jax.random.randint(k_index, (n,), 1, max(pool_size, 2), jnp.int32)
  crop_lo, crop_hi = v.clutter_crop_range
  return {
      "clutter_index": (index + shift) % pool_size,
      "clutter_crop": jax.random.randint(k_crop, (n, 2), crop_lo, crop_hi + 1, jnp.int32),
      "clutter_offset": jax.random.randint(k_paste, (n, 2), 0,
                                           v.image_size - v.clutter_size + 1, jnp.int32),
  }


# ---------------------------------------------------------------------------
# Rendering (batched; a pure function of the parameters and the pool).


def similarity_theta(angle_deg, scale, center, pivot, *, out_size: int,
                     in_size: int = MNIST_SIZE) -> jax.Array:
  """Pull-map theta that draws the source point `pivot` at `center`, rotated and scaled.

  Forward (source -> output, pixels): `p = center + scale * R(angle) (q - pivot)`.
  The returned theta is its inverse in normalised coordinates
  (`align_corners=False`), for `stnjax.affine_grid(theta, (out_size, out_size))`.

  Args:
    angle_deg: `(...)` degrees, clockwise on screen.
    scale: `(...)` digit size factor.
    center: `(..., 2)` output position `(x, y)`, pixels of the `out_size` canvas.
    pivot: `(..., 2)` source position `(x, y)`, pixels of the `in_size` image.
    out_size, in_size: canvas and source sides in pixels.

  Returns:
    `(..., 2, 3)`.
  """
  angle = -jnp.deg2rad(angle_deg)  # rts_theta rotates the grid: the inverse rotation.
  k = out_size / (in_size * scale)
  c_n = 2 * center / out_size - 1
  b_n = 2 * pivot / in_size - 1
  cos, sin = k * jnp.cos(angle), k * jnp.sin(angle)
  tx = b_n[..., 0] - (cos * c_n[..., 0] - sin * c_n[..., 1])
  ty = b_n[..., 1] - (sin * c_n[..., 0] + cos * c_n[..., 1])
  return stnjax.rts_theta(angle, k, tx, ty)


def _to_float(digits: jax.Array, dtype) -> jax.Array:
  return digits.astype(dtype)[..., None] / 255  # (..., 28, 28, 1) in [0, 1]


def _translate(images, top_left, out_size, dtype):
  """Pastes `images (..., 28, 28, 1)` with their pixel (0, 0) at integer `top_left (..., 2)`.

  Nearest sampling at integer offsets: an exact copy (no interpolation blur).
  """
  half = MNIST_SIZE / 2
  center = top_left.astype(dtype) + half
  theta = similarity_theta(jnp.zeros(center.shape[:-1], dtype), jnp.ones(center.shape[:-1], dtype),
                           center, jnp.full_like(center, half), out_size=out_size)
  grid = stnjax.affine_grid(theta, (out_size, out_size))
  return stnjax.grid_sample(images, grid, mode="nearest")


def _render_rts(params, digits, out_size, dtype):
  theta = similarity_theta(params["angle"], params["scale"], params["center"], params["pivot"],
                           out_size=out_size)
  return stnjax.grid_sample(_to_float(digits, dtype),
                            stnjax.affine_grid(theta, (out_size, out_size)))


def render(variant: "str | Variant", params: Mapping[str, jax.Array], pool_images: jax.Array,
           *, dtype=jnp.float32) -> jax.Array:
  """Draws the distorted images described by `params` (as returned by `distort`).

  Deterministic: the same parameters give the same images.

  Args:
    variant: a `VARIANTS` name or a `Variant`.
    params: batched parameters, leading axis B; `params["index"]` holds the
      pool index of each digit (`(B,)`, or `(B, 2)` for addition).
    pool_images: uint8 `(N, 28, 28)`.
    dtype: float dtype of the output.

  Returns:
    `(B, S, S, C)` of `dtype` in [0, 1].
  """
  v = get_variant(variant)
  digits = pool_images[params["index"]]
  size = v.image_size
  if v.kind == "plain":
    return _to_float(digits, dtype)
  if v.kind in ("rotate", "rts"):
    if v.kind == "rotate":
      middle = jnp.full(params["angle"].shape + (2,), MNIST_SIZE / 2, dtype)
      params = dict(params, scale=jnp.ones_like(params["angle"]), center=middle, pivot=middle)
    return _render_rts(params, digits, size, dtype)
  if v.kind == "projective":
    corners = jnp.asarray(stnjax.transforms.corners(), dtype)[None]  # (1, 4, 2)
    target = projective_target(params["scale"], params["corner_offsets"], size)
    homography = stnjax.homography_from_points(target, jnp.broadcast_to(corners, target.shape))
    grid = stnjax.projective_grid(homography, (size, size))
    return stnjax.grid_sample(_to_float(digits, dtype), grid)
  if v.kind == "tps":
    lattice = jnp.asarray(stnjax.tps_control_points(v.tps_lattice), dtype)[None]  # (1, k*k, 2)
    points = (lattice + params["control_offsets"] * (2 / size)) / params["scale"][:, None, None]
    grid = stnjax.tps_grid(points, (size, size))
    return stnjax.grid_sample(_to_float(digits, dtype), grid)
  if v.kind in ("translate", "clutter"):
    canvas = _translate(_to_float(digits, dtype), params["offset"], size, dtype)
    if v.kind == "translate":
      return canvas
    # Cut each 6x6 crop straight from the pool and scatter-max it into the canvas:
    # integer crops and pastes need no sampler, and this is ~50x cheaper than
    # sampling a full canvas per patch.
    line = jnp.arange(v.clutter_size)
    crop, paste = params["clutter_crop"], params["clutter_offset"]  # (B, n, 2) as (x, y)
    rows, cols = line[None, None, :, None], line[None, None, None, :]  # (1, 1, 6, 1), (1, 1, 1, 6)
    patches = pool_images[params["clutter_index"][..., None, None],
                          crop[..., 1, None, None] + rows, crop[..., 0, None, None] + cols]
    batch = jnp.arange(canvas.shape[0])[:, None, None, None]
    clutter = jnp.zeros(canvas.shape[:-1], dtype).at[
        batch, paste[..., 1, None, None] + rows, paste[..., 0, None, None] + cols].max(
            patches.astype(dtype) / 255)
    return jnp.maximum(canvas, clutter[..., None])
  if v.kind == "addition":
    b = params["index"].shape[0]
    flat = {k: params[k].reshape((2 * b,) + params[k].shape[2:])
            for k in ("angle", "scale", "center", "pivot")}
    images = _render_rts(flat, digits.reshape(2 * b, MNIST_SIZE, MNIST_SIZE), size, dtype)
    return images.reshape(b, 2, size, size).transpose(0, 2, 3, 1)
  raise AssertionError(v.kind)


# ---------------------------------------------------------------------------
# Batched distortion, training batches, evaluation sets.


def _typed_keys(keys, name: str, batch_shape: tuple[int, ...]) -> jax.Array:
  """Typed PRNG keys of shape `batch_shape`; raw uint32 `(*batch_shape, 2)` keys are wrapped."""
  keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) and keys.dtype == jnp.uint32:
    if keys.shape[-1:] == (2,):
      keys = jax.random.wrap_key_data(keys)
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) or keys.shape != batch_shape:
    raise ValueError(f"`{name}` must be typed PRNG keys of shape {batch_shape} (jax.random.key) "
                     f"or raw uint32 keys of shape {batch_shape + (2,)}, got {keys.dtype} "
                     f"{keys.shape}.")
  return keys


def _check_pool(pool_images, pool_labels) -> int:
  if pool_images.ndim != 3 or pool_images.shape[1:] != (MNIST_SIZE, MNIST_SIZE) \
      or pool_images.dtype != jnp.uint8 or pool_images.shape[0] < 1:
    raise ValueError(f"`pool_images` must be uint8 (N, 28, 28) with N >= 1, got "
                     f"{pool_images.dtype} {pool_images.shape}.")
  if pool_labels.shape != pool_images.shape[:1] or not jnp.issubdtype(pool_labels.dtype,
                                                                      jnp.integer):
    raise ValueError(f"`pool_labels` must be integer ({pool_images.shape[0]},) to match "
                     f"`pool_images`, got {pool_labels.dtype} {pool_labels.shape}.")
  return pool_images.shape[0]


def distort(variant: "str | Variant", keys: jax.Array, indices: jax.Array,
            pool_images: jax.Array, pool_labels: jax.Array, *,
            dtype=jnp.float32) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Distorts the pool digits at `indices`, one key per example.

  Example `b` depends only on `keys[b]`, `indices[b]` and the pool (TC cuts
  its clutter from other pool digits; addition draws its second digit from
  the pool).

  Args:
    variant: a `VARIANTS` name or a `Variant`.
    keys: `(B,)` typed PRNG keys (`jax.random.key`), or raw uint32 `(B, 2)`,
      one per example.
    indices: int `(B,)`, pool index of each example's digit.
    pool_images: uint8 `(N, 28, 28)` in [0, 255].
    pool_labels: integer `(N,)` in [0, 9].
    dtype: float dtype of the draws and images (float64 needs x64 enabled).

  Returns:
    `images (B, S, S, C)` of `dtype` in [0, 1]; `labels` int32 `(B,)` (the
    sum for addition); `params`, a dict of the drawn parameters, leading
    axis B: always `index` (pool indices, `(B,)`, or `(B, 2)` for addition)
    and, by kind: `angle` (degrees), `scale`, `center` and `pivot` (`(x, y)`
    pixels; rts, addition), `corner_offsets` (`(4, 2)` pixels; P),
    `control_offsets` (`(16, 2)` pixels; E), `offset` (integer top-left
    `(x, y)` of the digit box; T, TC), `clutter_index`, `clutter_crop` and
    `clutter_offset` (TC), `digit_labels` (`(B, 2)`; addition).
  """
  v = get_variant(variant)
  pool_images, pool_labels = jnp.asarray(pool_images), jnp.asarray(pool_labels)
  n = _check_pool(pool_images, pool_labels)
  indices = jnp.asarray(indices)
  if indices.ndim != 1 or not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"`indices` must be integer (B,), got {indices.dtype} {indices.shape}.")
  keys = _typed_keys(keys, "keys", indices.shape)
  indices = indices.astype(jnp.int32)
  digits = pool_images[indices]
  labels = pool_labels[indices].astype(jnp.int32)
  params: dict[str, Any] = {"index": indices}
  if v.kind == "rotate":
    params |= jax.vmap(functools.partial(_draw_rotate, v, dtype=dtype))(keys, digits)
  elif v.kind == "rts":
    params |= jax.vmap(functools.partial(_draw_rts, v, dtype=dtype))(keys, digits)
  elif v.kind == "projective":
    params |= jax.vmap(functools.partial(_draw_projective, v, dtype=dtype))(keys, digits)
  elif v.kind == "tps":
    params |= jax.vmap(functools.partial(_draw_tps, v, dtype=dtype))(keys, digits)
  elif v.kind in ("translate", "clutter"):
    split = jax.vmap(jax.random.split)(keys)
    k_offset, k_clutter = split[:, 0], split[:, 1]
    params["offset"] = jax.vmap(functools.partial(_draw_offset, v))(k_offset)
    if v.kind == "clutter":
      params |= jax.vmap(functools.partial(_draw_clutter, v, pool_size=n))(k_clutter, indices)
  elif v.kind == "addition":
    split = jax.vmap(functools.partial(jax.random.split, num=3))(keys)
    k_first, k_second, k_index = split[:, 0], split[:, 1], split[:, 2]
    second = jax.vmap(lambda k: jax.random.randint(k, (), 0, n, jnp.int32))(k_index)
    draw = jax.vmap(functools.partial(_draw_rts, v, dtype=dtype))
    first_params, second_params = draw(k_first, digits), draw(k_second, pool_images[second])
    params = {k: jnp.stack([first_params[k], second_params[k]], axis=1) for k in first_params}
    params["index"] = jnp.stack([indices, second], axis=1)
    params["digit_labels"] = pool_labels[params["index"]].astype(jnp.int32)
    labels = params["digit_labels"].sum(axis=1, dtype=jnp.int32)
  images = render(v, params, pool_images, dtype=dtype)
  return images, labels, params


@functools.partial(jax.jit, static_argnames=("variant", "batch_size", "return_params"))
def sample_train_batch(variant: "str | Variant", key: jax.Array, pool_images: jax.Array,
                       pool_labels: jax.Array, batch_size: int, *, return_params: bool = False):
  """A fresh training batch: random pool digits, freshly distorted, all on device (jitted).

  Args:
    variant: a `VARIANTS` name or a `Variant` (static).
    key: a PRNG key, e.g. `jax.random.fold_in(jax.random.key(seed), step)`
      (typed, or a raw uint32 `(2,)` key): the batch is a deterministic
      function of it (bitwise for one compiled program; called inside a
      larger jitted function, XLA may fuse the float32 arithmetic
      differently, so pixels can differ by round-off, about 1e-6).
    pool_images: uint8 `(N, 28, 28)` in [0, 255], e.g. the first 50k training
      digits (`load_mnist()["train"].images`), already on the device.
    pool_labels: integer `(N,)` in [0, 9].
    batch_size: B (static).
    return_params: also return the drawn parameters (see `distort`).

  Returns:
    `images` float32 `(B, S, S, C)` in [0, 1] and `labels` int32 `(B,)`
    (and `params` if `return_params`).

  Example:
    >>> key = jax.random.fold_in(jax.random.key(0), step)  # doctest: +SKIP
    >>> images, labels = sample_train_batch("rts", key, pool_images, pool_labels, 256)  # doctest: +SKIP
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
  n = _check_pool(jnp.asarray(pool_images), jnp.asarray(pool_labels))
  k_index, k_distort = jax.random.split(_typed_keys(key, "key", ()))
  indices = jax.random.randint(k_index, (batch_size,), 0, n, jnp.int32)
  images, labels, params = distort(variant, jax.random.split(k_distort, batch_size), indices,
                                   pool_images, pool_labels)
  return (images, labels, params) if return_params else (images, labels)
