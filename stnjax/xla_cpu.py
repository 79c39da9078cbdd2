"""The XLA:CPU settings stnjax's scripts use, and the one place that reads them.

jaxlib 0.10 hands every convolution to YNNPACK on CPU; on the CPUs measured
(docs/performance.md names them and gives the measurement), YNNPACK runs
the paper models' 7x7, 86-channel convolution well below the speed of XLA's
own (Eigen) convolution. `FLAGS` takes convolutions out of
YNNPACK's share and leaves it the dot products. When a process trains data
parallel over several CPU devices (one per core, as scripts/run.sh does),
`DATA_PARALLEL_FLAGS` also keeps each device's matrix products and
convolutions on its own thread instead of sharing Eigen's thread pool with
the other devices. XLA reads its flags once, when JAX starts its CPU
backend, so `configure()` must run before the first JAX computation:
stnjax's scripts call it first thing; a library user calls it the same way,
or sets `XLA_FLAGS` themselves.

`layers.conv_general_dilated` picks its CPU form from `convolution_form()`:
with `FLAGS` in effect XLA's convolution computes the forward pass and the
kernel gradient, otherwise row matrix products do; the input gradient is a
width convolution and shifted row sums either way.
"""

import os
import warnings

# Removes "individual_convolution" from XLA:CPU's YNNPACK fusion types.
YNNPACK_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
FLAGS = (f"{YNNPACK_FLAG}=-individual_convolution",)
# With several CPU devices: each device's Eigen operations on one thread.
EIGEN_FLAG = "--xla_cpu_multi_thread_eigen"
DATA_PARALLEL_FLAGS = (f"{EIGEN_FLAG}=false",)
# The first jaxlib measured with them; older ones may not know the flag, and
# XLA aborts on an unknown flag.
MIN_JAXLIB = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return tuple(int(part) for part in jaxlib.__version__.split(".")[:2] if part.isdigit())


def _backend_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def _cpu_devices_from_env() -> int:
  value = os.environ.get("JAX_NUM_CPU_DEVICES", "")
  return int(value) if value.strip().isdigit() else 1


def configure(cpu_devices: int | None = None) -> bool:
  """Appends `FLAGS` to `XLA_FLAGS` unless already set; returns whether they are in effect.

  With `cpu_devices` > 1 (default: `JAX_NUM_CPU_DEVICES`) appends
  `DATA_PARALLEL_FLAGS` too, unless `XLA_FLAGS` sets Eigen's threading
  itself. Leaves `XLA_FLAGS` alone (and returns whether it already holds
  `FLAGS`) when it sets the YNNPACK fusion types itself, when jaxlib
  predates `MIN_JAXLIB`, or when JAX's backend has started (then also
  warns: the flags would not be read).
  """
  current = os.environ.get("XLA_FLAGS", "")
  cpu_devices = _cpu_devices_from_env() if cpu_devices is None else cpu_devices
  extra = DATA_PARALLEL_FLAGS if cpu_devices > 1 and EIGEN_FLAG not in current else ()
  if YNNPACK_FLAG in current:
    return in_effect()
  if _jaxlib_version() < MIN_JAXLIB:
    return False
  if _backend_started():
    warnings.warn("stnjax.xla_cpu.configure() was called after JAX started its backend; "
                  f"XLA_FLAGS is left as is. Call it before the first JAX computation for {FLAGS}.",
                  stacklevel=2)
    return False
  os.environ["XLA_FLAGS"] = " ".join([current, *FLAGS, *extra]).strip()
  return True


def in_effect() -> bool:
  """Whether `XLA_FLAGS` holds `FLAGS` (read when JAX's backend starts)."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  return all(flag in flags for flag in FLAGS)


def convolution_form() -> str:
  """The CPU form `layers.conv_general_dilated` uses for a multi-channel input by default."""
  return "xla" if in_effect() else "row_matmuls"

