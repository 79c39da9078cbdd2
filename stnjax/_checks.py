"""Checks of static (trace-time) arguments, with messages naming the argument."""

import jax
import numpy as np


def static_bool(value, name: str) -> bool:
  """`value` as a Python bool; `TypeError` naming `name` if it is traced or not a bool.

  A traced flag cannot choose between code paths at trace time, and a string
  such as `'no'` is truthy: both are refused rather than silently misread.
  """
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"`{name}` must be a Python bool known at trace time, got a traced value "
                    f"{value}; mark it static (e.g. `jax.jit(f, static_argnames=('{name}',))`).")
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__}).")
