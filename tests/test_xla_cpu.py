"""stnjax.xla_cpu: the XLA flag is set only before JAX starts, never over a user's, and XLA takes it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from stnjax import xla_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints what configure() did and a convolution's value and input gradient.
PROBE = textwrap.dedent("""
    import json, os, warnings
    import jax, jax.numpy as jnp, numpy as np
    from stnjax import layers, xla_cpu
    if os.environ.get("START_FIRST"):
      jax.numpy.zeros(1).block_until_ready()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      configured = xla_cpu.configure()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 9, 4)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 4, 5)), jnp.float32)
    conv = lambda x, w: layers.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out, grads = jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))(x, w)
    print(json.dumps({"configured": configured, "in_effect": xla_cpu.in_effect(),
                      "form": xla_cpu.convolution_form(), "xla_flags": os.environ.get("XLA_FLAGS"),
                      "warnings": [str(w.message) for w in caught], "loss": float(out),
                      "grad_sums": [float(jnp.abs(g).sum()) for g in grads]}))
""")


def run_probe(xla_flags=None, start_first=False, cpu_devices=None):
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "START_FIRST", "JAX_NUM_CPU_DEVICES")}
  if cpu_devices is not None:
    env["JAX_NUM_CPU_DEVICES"] = str(cpu_devices)
  env["JAX_PLATFORMS"] = "cpu"
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  if start_first:
    env["START_FIRST"] = "1"
  done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def unset():
  return run_probe(start_first=True)  # Started first: configure() must not set anything.


def test_configure_before_start_appends_the_flag_and_xla_accepts_it(unset):
  got = run_probe(xla_flags="--xla_cpu_enable_fast_math=false")
  assert got["configured"] and got["in_effect"] and got["form"] == "xla"
  assert got["xla_flags"].split() == ["--xla_cpu_enable_fast_math=false", *xla_cpu.FLAGS]
  assert got["warnings"] == []
  # Same convolution, other CPU form and library: float32 round-off apart.
  assert got["loss"] == pytest.approx(unset["loss"], rel=1e-5)
  assert got["grad_sums"] == pytest.approx(unset["grad_sums"], rel=1e-5)


def test_configure_with_several_cpu_devices_adds_the_eigen_flag(unset):
  got = run_probe(cpu_devices=2)
  assert got["configured"] and got["in_effect"]
  assert got["xla_flags"].split() == [*xla_cpu.FLAGS, *xla_cpu.DATA_PARALLEL_FLAGS]
  assert got["loss"] == pytest.approx(unset["loss"], rel=1e-5)
  # A user's own Eigen threading is kept.
  got = run_probe(xla_flags=f"{xla_cpu.EIGEN_FLAG}=true", cpu_devices=2)
  assert got["xla_flags"].split() == [f"{xla_cpu.EIGEN_FLAG}=true", *xla_cpu.FLAGS]


def test_configure_after_start_warns_and_changes_nothing(unset):
  assert not unset["configured"] and not unset["in_effect"]
  assert unset["form"] == "row_matmuls" and unset["xla_flags"] is None
  assert len(unset["warnings"]) == 1 and "before the first JAX computation" in unset["warnings"][0]


def test_configure_keeps_a_users_own_ynnpack_setting():
  got = run_probe(xla_flags=f"{xla_cpu.YNNPACK_FLAG}=individual_dot")
  assert not got["configured"] and not got["in_effect"] and got["form"] == "row_matmuls"
  assert got["xla_flags"] == f"{xla_cpu.YNNPACK_FLAG}=individual_dot"


def test_in_effect_reads_xla_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", " ".join(("--xla_cpu_enable_fast_math=false",) + xla_cpu.FLAGS))
  assert xla_cpu.in_effect() and xla_cpu.convolution_form() == "xla"
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  assert not xla_cpu.in_effect() and xla_cpu.convolution_form() == "row_matmuls"
