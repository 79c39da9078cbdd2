"""_cpu_kernels.own_loop_on_cpu: the value, its gradient and its batching are exactly the identity's."""
import jax
import jax.numpy as jnp
import numpy as np

from stnjax import _cpu_kernels


def _bits(x):
  return np.asarray(x).view(np.uint32)


def test_returns_every_value_bitwise_unchanged():
  x = jnp.array([0.0, -0.0, 1.5, -2.25, jnp.inf, -jnp.inf, jnp.nan, 3e-39], jnp.float32)
  for fn in (_cpu_kernels.own_loop_on_cpu, jax.jit(_cpu_kernels.own_loop_on_cpu)):
    np.testing.assert_array_equal(_bits(fn(x)), _bits(x))


def test_is_a_conditional_on_cpu_and_vmaps_without_becoming_a_select():
  x = jnp.arange(12.0).reshape(3, 4)
  hlo = jax.jit(jax.vmap(_cpu_kernels.own_loop_on_cpu)).lower(x).compile().as_text()
  assert "conditional(" in hlo
  np.testing.assert_array_equal(jax.vmap(_cpu_kernels.own_loop_on_cpu)(x), x)


def test_gradients_pass_through_to_any_order():
  x = jnp.array([0.5, -1.0, 2.0])
  c = jnp.array([3.0, -4.0, 5.0])
  f = lambda x: jnp.sum(_cpu_kernels.own_loop_on_cpu(x) ** 3 * c)
  np.testing.assert_allclose(jax.grad(f)(x), 3 * x**2 * c)
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(jax.grad(f)(x)))(x), 6 * x * c)
