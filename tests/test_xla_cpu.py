"""stnjax.xla_cpu: the XLA flag is set only before JAX starts, never over a user's, and XLA takes it."""

import json
import os
import subprocess
import sys
import textwrap
import types

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
  assert got["xla_flags"].split() == ["--xla_cpu_enable_fast_math=false", *xla_cpu.FLAGS,
                                      *xla_cpu.VECTOR_FLAGS]
  assert got["warnings"] == []
  # Same convolution, other CPU form and library: float32 round-off apart.
  assert got["loss"] == pytest.approx(unset["loss"], rel=1e-5)
  assert got["grad_sums"] == pytest.approx(unset["grad_sums"], rel=1e-5)


def test_configure_with_several_cpu_devices_adds_the_eigen_flag(unset):
  got = run_probe(cpu_devices=2)
  assert got["configured"] and got["in_effect"]
  assert got["xla_flags"].split() == [*xla_cpu.FLAGS, *xla_cpu.VECTOR_FLAGS,
                                      *xla_cpu.DATA_PARALLEL_FLAGS]
  assert got["loss"] == pytest.approx(unset["loss"], rel=1e-5)
  # A user's own Eigen threading is kept.
  got = run_probe(xla_flags=f"{xla_cpu.EIGEN_FLAG}=true", cpu_devices=2)
  assert got["xla_flags"].split() == [f"{xla_cpu.EIGEN_FLAG}=true", *xla_cpu.FLAGS,
                                      *xla_cpu.VECTOR_FLAGS]
  # So is a user's own vector width.
  got = run_probe(xla_flags=f"{xla_cpu.VECTOR_FLAG}=256")
  assert got["xla_flags"].split() == [f"{xla_cpu.VECTOR_FLAG}=256", *xla_cpu.FLAGS]


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


class Restarted(Exception):
  """Raised by the fake `os.execve` in place of replacing the process."""


@pytest.fixture
def execve_calls(monkeypatch):
  calls = []

  def fake_execve(path, argv, env):
    calls.append((path, argv, env))
    raise Restarted

  monkeypatch.setattr(os, "execve", fake_execve)
  monkeypatch.setattr(sys, "platform", "linux")
  return calls


@pytest.mark.parametrize("spec_name, expected", [
    ("scripts.bench.bench_sampler", ["-m", "scripts.bench.bench_sampler"]),  # python -m
    (None, ["/repo/experiments/train.py"]),  # python file.py
])
def test_restart_sets_glibc_tunables_when_unset(monkeypatch, execve_calls, spec_name, expected):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.setenv("STNJAX_TEST_MARKER", "kept")
  monkeypatch.setattr(sys, "argv", ["/repo/experiments/train.py", "--rounds", "2"])
  main = types.ModuleType("__main__")
  main.__spec__ = types.SimpleNamespace(name=spec_name) if spec_name else None
  monkeypatch.setitem(sys.modules, "__main__", main)
  with pytest.raises(Restarted):
    xla_cpu.restart_with_huge_pages()
  [(path, argv, env)] = execve_calls
  assert path == sys.executable
  assert argv == [sys.executable, *expected, "--rounds", "2"]
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert env["STNJAX_TEST_MARKER"] == "kept"


@pytest.mark.parametrize("value", ["", "glibc.malloc.arena_max=1"])
def test_restart_keeps_a_set_value_even_empty(monkeypatch, execve_calls, value):
  monkeypatch.setenv("GLIBC_TUNABLES", value)
  xla_cpu.restart_with_huge_pages()
  assert execve_calls == []
  assert os.environ["GLIBC_TUNABLES"] == value


@pytest.mark.parametrize("argv0", ["-c", ""])
def test_restart_needs_a_script_to_run_again(monkeypatch, execve_calls, argv0):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.setattr(sys, "argv", [argv0])
  monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
  xla_cpu.restart_with_huge_pages()
  assert execve_calls == []


def test_restart_only_on_linux(monkeypatch, execve_calls):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.setattr(sys, "platform", "darwin")
  xla_cpu.restart_with_huge_pages()
  assert execve_calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="restarts on Linux only")
def test_restart_runs_the_script_again_with_the_tunable(tmp_path):
  script = tmp_path / "script.py"
  script.write_text(textwrap.dedent("""
      import os, sys
      from stnjax import xla_cpu
      print("start", os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
      if __name__ == "__main__":
        xla_cpu.restart_with_huge_pages()
  """))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  result = subprocess.run([sys.executable, str(script), "--flag"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=True)
  assert result.stdout.split("\n")[:2] == [
      "start None ['--flag']", "start glibc.malloc.hugetlb=1 ['--flag']"]
