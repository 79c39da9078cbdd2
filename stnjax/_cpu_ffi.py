"""stnjax's C++ CPU kernels (`csrc/`): single-channel bilinear `grid_sample` and the affine grid.

XLA:CPU reads each gathered pixel with a scalar load and computes a small
affine grid as GEMMs and a copy; on x86 these kernels read 8 or 16 pixels
with one hardware gather (AVX2, AVX-512) and write the grid in place
(docs/performance.md, "C++ kernels on CPU", gives the figures). Three
sampler kernels (the values, the grid cotangent, the image cotangent) and
one for the 2-D affine grid; each result equals the jnp path's to float
round-off, and each instruction set gives the same bits.

The kernels are compiled on first use with the system's C++ compiler
(`CXX`, else `c++`) against jaxlib's XLA FFI headers, cached under
`$STNJAX_CACHE_DIR` (default `~/.cache/stnjax`) by a hash of their
sources, flags and jaxlib version, and registered with `jax.ffi`. Where
they cannot be (not x86-64 Linux, no compiler, a failed build) or
`STNJAX_CPU_KERNEL=0` is set, stnjax takes the jnp paths; `status()` says
which and why. The environment is read once, when a kernel is first needed.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CSRC = pathlib.Path(__file__).with_name("csrc")
SOURCES = (CSRC / "cpu_kernels.cc",)
HEADERS = (CSRC / "parallel.h", CSRC / "simd.h", CSRC / "kernels.inc")
TARGET = "stnjax_grid_sample_2d_f32"
GRID_VJP_TARGET = "stnjax_grid_sample_2d_grid_vjp_f32"
IMAGE_VJP_TARGET = "stnjax_grid_sample_2d_image_vjp_f32"
AFFINE_TARGET = "stnjax_affine_grid_2d_f32"
# Every custom call target the kernels register (`jax.export` must be told of each).
TARGETS = (TARGET, GRID_VJP_TARGET, IMAGE_VJP_TARGET, AFFINE_TARGET)
ENV_SWITCH = "STNJAX_CPU_KERNEL"
# No -march: the ISA-specific loops carry their own target attributes and
# are picked at run time, so the library runs on any x86-64 CPU.
CXX_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
# The kernel's `isa` attribute: the best the CPU has, or a cap (tests, benchmarks).
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
PADDINGS = {"zeros": 0, "border": 1}
MAX_PIXELS = 2**24  # Pixel indices are exact in float32 up to here (csrc/kernels.inc).


class Status(NamedTuple):
  """Whether the kernels are in use, and if not, why; `library` is the built file."""
  available: bool
  reason: str
  library: pathlib.Path | None = None


def cache_dir() -> pathlib.Path:
  """Where built kernels are kept: `$STNJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/stnjax`.

  `$XDG_CACHE_HOME` defaults to `~/.cache`.
  """
  if os.environ.get("STNJAX_CACHE_DIR"):
    return pathlib.Path(os.environ["STNJAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "stnjax"


def _compiler() -> str:
  return os.environ.get("CXX", "c++")


def library_path() -> pathlib.Path:
  """The cached library for these sources, compiler, flags and jaxlib."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  key = hashlib.sha256()
  for part in (*(f.read_bytes() for f in SOURCES + HEADERS), _compiler().encode(),
               " ".join(CXX_FLAGS).encode(), jaxlib.__version__.encode()):
    key.update(part)
  return cache_dir() / f"cpu_kernels_{key.hexdigest()[:16]}.so"


def build() -> pathlib.Path:
  """Compiles the kernels into `library_path()` unless it is there; returns the path.

  Raises RuntimeError with the compiler's output when the build fails. A
  concurrent build (several processes) is safe: each writes its own file
  and renames it into place.
  """
  path = library_path()
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    built = pathlib.Path(tmp) / path.name
    command = [_compiler(), *CXX_FLAGS, "-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o",
               str(built)]
    try:
      result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
      raise RuntimeError(f"Could not run the C++ compiler {command[0]!r}: {error}") from error
    if result.returncode != 0:
      raise RuntimeError(f"Building the CPU kernels failed ({' '.join(command)}):\n"
                         f"{result.stderr[-4000:]}")
    os.replace(built, path)
  return path


@functools.cache
def status() -> Status:
  """Builds, loads and registers the kernels once per process; says whether they are in use."""
  if os.environ.get(ENV_SWITCH, "1").strip() == "0":
    return Status(False, f"{ENV_SWITCH}=0 is set")
  if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
    return Status(False,
                  f"the kernels are for x86-64 Linux, not {sys.platform} {platform.machine()}")
  try:
    path = build()
    library = ctypes.cdll.LoadLibrary(str(path))
    for target, handler in ((TARGET, library.StnjaxGridSample2dF32),
                            (GRID_VJP_TARGET, library.StnjaxGridSample2dGridVjpF32),
                            (IMAGE_VJP_TARGET, library.StnjaxGridSample2dImageVjpF32),
                            (AFFINE_TARGET, library.StnjaxAffineGrid2dF32)):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
  except (RuntimeError, OSError) as error:
    return Status(False, str(error))
  return Status(True, "built and registered", path)


def cpu_isa() -> str:
  """The instruction set the kernels use on this CPU ("avx512", "avx2" or "scalar")."""
  if not status().available:
    raise RuntimeError(f"The CPU kernels are not available: {status().reason}")
  library = ctypes.cdll.LoadLibrary(str(status().library))
  library.StnjaxGridSampleCpuIsa.restype = ctypes.c_int64
  return {v: k for k, v in ISAS.items()}[library.StnjaxGridSampleCpuIsa()]


def applies(image: jax.Array, spec, isa: str) -> bool:
  """Whether the kernels sample `image (N, H * W)` under `spec` with `isa` (a `sampler_kernel`).

  Single-channel 2-D bilinear float32 with zeros or border padding, images
  of at most 2**24 pixels (the kernels compute pixel indices in float32), on
  the CPU backend, where the kernels are available.
  """
  return (isa != "off" and spec.mode == "bilinear" and len(spec.spatial) == 2
          and spec.padding_mode in PADDINGS and image.ndim == 2 and image.dtype == jnp.float32
          and spec.spatial[0] * spec.spatial[1] <= MAX_PIXELS
          and jax.default_backend() == "cpu" and status().available)


def sample(image: jax.Array, grid: jax.Array, spec, isa: str = "auto") -> jax.Array:
  """Samples `image (N, H * W)` at normalised `grid (G, P, 2)` (x, y): `(max(N, G), P)`.

  N and G are equal or one of them is 1. Under `jax.vmap` the operands are
  broadcast to the mapped size and the kernel loops over it.
  """
  height, width = spec.spatial
  shape = (max(image.shape[0], grid.shape[0]), grid.shape[1])
  # A flat result: XLA:CPU copies an (M, P) one on its way to (M, H, W, 1).
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((shape[0] * shape[1],), jnp.float32),
                          vmap_method="broadcast_all")
  out = call(image.reshape(image.shape[0], height, width), grid,
             padding=np.int64(PADDINGS[spec.padding_mode]),
             align_corners=bool(spec.align_corners), isa=np.int64(ISAS[isa]))
  return _varying_like(out, image, grid).reshape(shape)


def _flat(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[:-2] + (-1,))


def grid_vjp(image: jax.Array, grid: jax.Array, cotangent: jax.Array, spec,
             isa: str = "auto") -> jax.Array:
  """The grid cotangent of `sample`, per example: `(M, P, 2)` for `cotangent (M, P)`.

  A shared grid (G = 1 < M) gets one row per example; the caller sums them.
  """
  height, width = spec.spatial
  call = jax.ffi.ffi_call(GRID_VJP_TARGET,
                          jax.ShapeDtypeStruct(cotangent.shape + (2,), jnp.float32),
                          vmap_method="broadcast_all")
  out = call(image.reshape(image.shape[0], height, width), grid, _flat(cotangent),
             padding=np.int64(PADDINGS[spec.padding_mode]),
             align_corners=bool(spec.align_corners), isa=np.int64(ISAS[isa]))
  return _varying_like(out, image, grid, cotangent)


def image_vjp(grid: jax.Array, cotangent: jax.Array, spec, num_images: int,
              isa: str = "auto") -> jax.Array:
  """The image cotangent of `sample` at `grid (G, P, 2)`: `(num_images, H * W)`.

  `cotangent` is `(M, P)`; a shared image (`num_images` = 1 < M) gets the
  sum over the examples.
  """
  height, width = spec.spatial
  call = jax.ffi.ffi_call(IMAGE_VJP_TARGET,
                          jax.ShapeDtypeStruct((num_images, height, width), jnp.float32),
                          vmap_method="broadcast_all")
  out = call(grid, _flat(cotangent), padding=np.int64(PADDINGS[spec.padding_mode]),
             align_corners=bool(spec.align_corners), isa=np.int64(ISAS[isa]))
  return _varying_like(out, grid, cotangent).reshape(num_images, height * width)


def affine_applies(theta: jax.Array) -> bool:
  """Whether the kernel computes the 2-D affine grid of `theta (2, 3)`: float32, on CPU."""
  return (theta.shape[-2:] == (2, 3) and theta.dtype == jnp.float32
          and jax.default_backend() == "cpu" and status().available)


def affine_grid(theta: jax.Array, xs: np.ndarray, ys: np.ndarray, isa: str = "auto") -> jax.Array:
  """The 2-D affine grid `(..., H, W, 2)` of `theta (..., 2, 3)` at base coordinates `xs, ys`.

  `xs (W,)` and `ys (H,)` are the output pixels' normalised coordinates;
  each point is `(x * theta[r, 0] + y * theta[r, 1]) + theta[r, 2]` in
  float32, without fused multiply-adds.
  """
  base = np.concatenate([xs, ys]).astype(np.float32).reshape((1,) * (theta.ndim - 2) + (-1,))
  call = jax.ffi.ffi_call(
      AFFINE_TARGET, jax.ShapeDtypeStruct(theta.shape[:-2] + (len(ys), len(xs), 2), jnp.float32),
      vmap_method="expand_dims")
  return _varying_like(call(theta, base, isa=np.int64(ISAS[isa])), theta)


def _varying_like(out: jax.Array, *inputs: jax.Array) -> jax.Array:
  """`out`, varying over the manual mesh axes its inputs vary over (inside `shard_map`).

  An FFI call's result type does not say, and `lax.platform_dependent`
  requires the `jnp` branch's type.
  """
  axes = set()
  for x in inputs:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9; `vma` before.
    axes |= set(manual.varying if manual is not None else getattr(aval, "vma", ()))
  if not axes:
    return out
  pcast = getattr(jax.lax, "pcast", None)
  axes = tuple(sorted(axes))
  return pcast(out, axes, to="varying") if pcast else jax.lax.pvary(out, axes)
