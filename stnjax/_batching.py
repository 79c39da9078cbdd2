"""Leading-batch-dimension support shared by the grid and sampler functions.

Every public function in stnjax is written for one example and lifted to any
number of leading batch dimensions with `jax.vmap` (never a Python loop).
Batch dimensions broadcast like NumPy's: a single transform (no batch
dimensions, or batch dimensions of size 1) is shared by a batch of images.
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def split_batch(x: jax.Array, core_rank: int, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Splits `x.shape` into (batch dims, core dims); `core_rank` trailing dims are core."""
  if x.ndim < core_rank:
    raise ValueError(
        f"`{name}` must have at least {core_rank} dimensions, got shape {tuple(x.shape)}.")
  return tuple(x.shape[:x.ndim - core_rank]), tuple(x.shape[x.ndim - core_rank:])


def broadcast_batch(shapes: dict[str, tuple[int, ...]], *, what: str = "Batch dimensions",
                    label: str = "batch dims ") -> tuple[int, ...]:
  """Broadcasts named batch shapes; the error names every argument and its batch shape.

  `what` and `label` word the error (`{what} do not broadcast: `{name}`
  {label}{shape}, ...`) for shapes that are not batch shapes.
  """
  try:
    return tuple(jnp.broadcast_shapes(*shapes.values()))
  except ValueError:
    described = ", ".join(f"`{k}` {label}{v}" for k, v in shapes.items())
    raise ValueError(f"{what} do not broadcast: {described}.") from None


def batched_apply(fn: Callable[..., jax.Array], args: Sequence[jax.Array],
                  core_ranks: Sequence[int], names: Sequence[str]) -> jax.Array:
  """Applies the single-example `fn(*args)` over broadcast leading batch dims.

  Args:
    fn: function of unbatched arrays returning one array.
    args: arrays, each with `core_ranks[i]` trailing core dimensions and any
      number of leading batch dimensions.
    core_ranks: number of trailing (per-example) dimensions of each argument.
    names: argument names, for error messages.

  Returns:
    `fn`'s output with the broadcast batch shape prepended.
  """
  batch_shapes, cores = zip(*(split_batch(a, r, n) for a, r, n in zip(args, core_ranks, names)))
  batch = broadcast_batch(dict(zip(names, batch_shapes)))
  if not batch:
    return fn(*args)
  n = math.prod(batch)
  flat_args, in_axes = [], []
  for a, b, core in zip(args, batch_shapes, cores):
    if math.prod(b) == 1:  # One example shared by the whole batch: no copy.
      flat_args.append(a.reshape(core))
      in_axes.append(None)
    else:
      if (1,) * (len(batch) - len(b)) + b != batch:
        a = jnp.broadcast_to(a, batch + core)
      flat_args.append(a.reshape((n,) + core))
      in_axes.append(0)
  if all(axis is None for axis in in_axes):  # Every batch dimension has size 1.
    out = fn(*flat_args)
    return out.reshape(batch + out.shape)
  out = jax.vmap(fn, in_axes=tuple(in_axes))(*flat_args)
  return out.reshape(batch + out.shape[1:])
