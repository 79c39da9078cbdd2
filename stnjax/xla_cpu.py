"""The XLA:CPU settings stnjax's scripts use, and the one place that reads them.

jaxlib 0.10 hands every convolution to YNNPACK on CPU; on the CPUs measured
(docs/performance.md names them and gives the measurement), YNNPACK runs the
paper models' 7x7, 86-channel convolution well below the speed of XLA's own
(Eigen) convolution. `FLAGS` takes convolutions out of YNNPACK's share and
leaves it the dot products. `VECTOR_FLAGS` lets the loops XLA emits use
512-bit vectors where the CPU has them (the sampler's gradient loops ran
faster on the Intel Xeon measured; docs/performance.md gives the figures). When a process trains data parallel over several CPU
devices (one per core, as scripts/run.sh does), `DATA_PARALLEL_FLAGS` also
asks XLA for single-threaded Eigen operations, so that the devices do not
split them over the thread pool they share; in jaxlib 0.10.2 an Eigen
convolution's contraction is still split (docs/performance.md, "Two devices
on two cores"). XLA reads its flags once, when JAX starts its CPU backend,
so `configure()` must run before the first JAX computation: stnjax's scripts
call it first thing; a library user calls it the same way, or sets
`XLA_FLAGS` themselves.

`layers.conv_general_dilated` picks its CPU form from `convolution_form()`:
with `FLAGS` in effect XLA's convolution computes the forward pass and the
kernel gradient, otherwise row matrix products do; the input gradient is a
width convolution and shifted row sums either way.

XLA:CPU allocates each call's buffers afresh; with glibc's default malloc the
large ones land in fresh 4 KiB pages, each a page fault, which slows the
paper models' training step (docs/performance.md, "Memory").
`restart_with_huge_pages()` re-executes a script with `GLIBC_TUNABLES`, so
that glibc backs those blocks with transparent huge pages; stnjax's
training and benchmark scripts call it first thing. A library user sets
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment before Python
starts (glibc reads it only then).
"""

import os
import sys
import warnings

# Removes "individual_convolution" from XLA:CPU's YNNPACK fusion types.
YNNPACK_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
FLAGS = (f"{YNNPACK_FLAG}=-individual_convolution",)
# XLA:CPU's LLVM backend prefers 256-bit vectors by default; 512 lets the
# loops it emits (the sampler's) use AVX-512 where the CPU has it.
VECTOR_FLAG = "--xla_cpu_prefer_vector_width"
VECTOR_FLAGS = (f"{VECTOR_FLAG}=512",)
# With several CPU devices: asks for single-threaded Eigen operations.
EIGEN_FLAG = "--xla_cpu_multi_thread_eigen"
DATA_PARALLEL_FLAGS = (f"{EIGEN_FLAG}=false",)
# The first jaxlib measured with them; older ones may not know the flag, and
# XLA aborts on an unknown flag.
MIN_JAXLIB = (0, 10)
# glibc >= 2.35 madvises its mmap'd blocks for transparent huge pages (the
# kernel's THP mode "madvise" or "always"); older glibc ignores the tunable.
GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"


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

  Appends `VECTOR_FLAGS` too unless `XLA_FLAGS` sets the vector width, and
  with `cpu_devices` > 1 (default: `JAX_NUM_CPU_DEVICES`)
  `DATA_PARALLEL_FLAGS`, unless `XLA_FLAGS` sets Eigen's threading itself. Leaves `XLA_FLAGS` alone (and returns whether it already holds
  `FLAGS`) when it sets the YNNPACK fusion types itself, when jaxlib
  predates `MIN_JAXLIB`, or when JAX's backend has started (then also
  warns: the flags would not be read).
  """
  current = os.environ.get("XLA_FLAGS", "")
  cpu_devices = _cpu_devices_from_env() if cpu_devices is None else cpu_devices
  extra = VECTOR_FLAGS if VECTOR_FLAG not in current else ()
  if cpu_devices > 1 and EIGEN_FLAG not in current:
    extra += DATA_PARALLEL_FLAGS
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


def restart_with_huge_pages(tunables: str = GLIBC_TUNABLES) -> None:
  """Re-executes this script with `GLIBC_TUNABLES=tunables` on Linux, unless the variable is set.

  Call it from a script's `if __name__ == "__main__":` block only: it
  replaces the process (same interpreter, arguments and environment), and
  glibc reads its tunables once, at process start. Any value already set,
  the empty one included, is kept (`GLIBC_TUNABLES= python ...` runs with
  glibc's defaults), so the restarted script does not restart again.
  Without a script to run again (`python -c`, an interactive session) it
  does nothing.
  """
  if "GLIBC_TUNABLES" in os.environ or not sys.platform.startswith("linux"):
    return
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  # Run as `python -m package.module`: restart the module, not its file.
  command = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
  if command[0] in ("", "-c"):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *command, *sys.argv[1:]],
            dict(os.environ, GLIBC_TUNABLES=tunables))
