"""A fusion boundary for XLA:CPU, for values that fused loops would recompute or slow down.

XLA:CPU fuses an elementwise producer into each of its consumers. Where the
producer is large (dozens of taps), its consumer reads it many times, or the
consumer's loop shape is a poor one for it, the fused loops run far slower
than the producer alone. stnjax marks four such values: the single-channel
convolution (`layers._conv2d`), the sampler VJP's cotangent
(`sampling._interpolate_bwd`), and the row-pair sampler's pair table and
flat output (`sampling._sample_row_pairs`, `sampling._own_loop_1d`); the
training benchmark in docs/performance.md and scripts/bench_ablations.py
give the numbers.
"""

import jax
import jax.numpy as jnp
from jax import lax


def own_loop_on_cpu(x: jax.Array) -> jax.Array:
  """Returns `x` unchanged; on CPU, computed in a loop of its own (then read from memory).

  The boundary is a conditional, which XLA keeps as a separate computation:
  its predicate is a constant passed through `lax.optimization_barrier`,
  and with it the conditional survives XLA:CPU's simplifier (jax 0.10.2;
  tests/test_fusion.py checks the compiled HLO), whereas a barrier on `x`
  alone does not stop the fusion. Its branches, `x` and `-(-x)`, are
  bitwise equal (negation flips the sign bit only), so the value is `x`
  whichever runs. The predicate does not depend
  on `x`, so under `jax.vmap` it stays a conditional rather than a select.
  Other platforms get `x` as is. Differentiable (the cotangent passes
  through the same boundary).
  """
  def boundary(x):
    keep = lax.optimization_barrier(jnp.bool_(True))
    return lax.cond(keep, lambda x: x, lambda x: -(-x), x)

  return lax.platform_dependent(x, cpu=boundary, default=lambda x: x)
