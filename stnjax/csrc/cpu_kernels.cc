// stnjax's CPU kernels, XLA custom calls through jax.ffi (stnjax/_cpu_ffi.py
// builds and registers them): bilinear grid_sample of single-channel float32
// images (the values and both cotangents) and the 2-D affine grid.
//
// Why: XLA:CPU reads every gathered pixel with a scalar load and computes a
// small affine grid as GEMMs and a copy (docs/performance.md, "C++ kernels on
// CPU"); these read 8 or 16 pixels per hardware gather and write the grid in
// place. The loops (kernels.inc) are compiled for AVX-512, AVX2 and scalar
// x86-64, picked at run time, and give the same bits on each.
//
// Sampler operands (leading dims `B...` are equal: jax.vmap's broadcast_all):
//   image (B..., N, H, W), grid (B..., G, P, 2) holding (x, y); N and G are
//   equal or one of them is 1 (shared); M = max(N, G). Per-point values and
//   cotangents are flat, (B..., M * P).
// Attributes: padding (0 zeros, 1 border), align_corners, isa (0 best the CPU
// has, 1 scalar, 2 AVX2, 3 AVX-512; capped at what the CPU has).
// Work is split in chunks over the calling thread and stnjax's helper threads
// (parallel.h).

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace stnjax {
namespace {

constexpr float kFar = 16777216.0f;  // 2**24: float32 integers are exact up to here.
constexpr int64_t kChunkPoints = 8192;
constexpr int64_t kChunkGridValues = 16384;  // Affine grid floats per chunk (whole rows).
// A shared image's cotangent is summed over this many parts of the batch
// (one buffer each), whatever the thread count, so the result is too.
constexpr int64_t kSharedImageParts = 8;

struct Geometry {
  int64_t height, width, points;
  bool align_corners;
};

}  // namespace

namespace scalar_kernels {
using V = Scalar;
#include "kernels.inc"
}  // namespace scalar_kernels

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2_kernels {
using V = Avx2;
#include "kernels.inc"
}  // namespace avx2_kernels
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
namespace avx512_kernels {
using V = Avx512;
#include "kernels.inc"
}  // namespace avx512_kernels
#pragma GCC pop_options

namespace {

enum Isa : int64_t { kBest = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

Isa CpuIsa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kScalar;
}

// The ISA a kernel runs with: `isa`, capped at what this CPU has.
Isa ChosenIsa(int64_t isa) {
  static const Isa cpu_isa = CpuIsa();
  return isa == kBest ? cpu_isa : static_cast<Isa>(std::min<int64_t>(isa, cpu_isa));
}

// The function of the chosen ISA and padding (kBorder) among the three namespaces'.
#define STNJAX_PICK(isa, border, name)                                                   \
  ((isa) == kAvx512 ? ((border) ? avx512_kernels::name<true> : avx512_kernels::name<false>) \
   : (isa) == kAvx2 ? ((border) ? avx2_kernels::name<true> : avx2_kernels::name<false>)     \
                    : ((border) ? scalar_kernels::name<true> : scalar_kernels::name<false>))

// ---------------------------------------------------------------- sampler

// Shapes of one sampler call; example e = b * M + m of the flat batch reads
// image row image_row(e) and grid row grid_row(e).
struct Problem {
  int64_t batch;     // prod(B...)
  int64_t images;    // N
  int64_t grids;     // G
  int64_t examples;  // M = max(N, G)
  Geometry geometry;

  int64_t image_row(int64_t e) const {
    return (e / examples) * images + (images == 1 ? 0 : e % examples);
  }
  int64_t grid_row(int64_t e) const {
    return (e / examples) * grids + (grids == 1 ? 0 : e % examples);
  }
  int64_t pixels() const { return geometry.height * geometry.width; }
  int64_t total_points() const { return batch * examples * geometry.points; }
};

// Checks image dims (B..., N, H, W), grid dims (B..., G, P, 2) and the flat
// per-point dims (B..., M * P) of `values` (the sampled values or their
// cotangent).
ffi::Error MakeProblem(ffi::Span<const int64_t> idims, ffi::Span<const int64_t> gdims,
                       ffi::Span<const int64_t> vdims, int64_t padding, bool align_corners,
                       Problem* problem) {
  const size_t rank = idims.size();
  if (rank < 3 || gdims.size() != rank || gdims[rank - 1] != 2 || vdims.size() != rank - 2) {
    return ffi::Error::InvalidArgument(
        "stnjax grid_sample kernel: expected image (..., N, H, W), grid (..., G, P, 2) and "
        "values (..., max(N, G) * P)");
  }
  Problem p{1, idims[rank - 3], gdims[rank - 3], std::max(idims[rank - 3], gdims[rank - 3]),
            Geometry{idims[rank - 2], idims[rank - 1], gdims[rank - 2], align_corners}};
  for (size_t d = 0; d + 3 < rank; ++d) {
    if (idims[d] != gdims[d] || vdims[d] != gdims[d]) {
      return ffi::Error::InvalidArgument("stnjax grid_sample kernel: batch dims differ");
    }
    p.batch *= idims[d];
  }
  if ((p.images != p.examples && p.images != 1) || (p.grids != p.examples && p.grids != 1)) {
    return ffi::Error::InvalidArgument("stnjax grid_sample kernel: N and G must match or be 1");
  }
  if (vdims[rank - 3] != p.examples * p.geometry.points) {
    return ffi::Error::InvalidArgument("stnjax grid_sample kernel: values must be max(N, G) * P");
  }
  if (padding != 0 && padding != 1) {
    return ffi::Error::InvalidArgument("stnjax grid_sample kernel: padding must be 0 or 1");
  }
  if (p.pixels() > (int64_t{1} << 24)) {  // kernels.inc computes pixel indices in float32.
    return ffi::Error::InvalidArgument("stnjax grid_sample kernel: at most 2**24 pixels");
  }
  *problem = p;
  return ffi::Error::Success();
}

ffi::Error CheckF32(std::initializer_list<ffi::DataType> types) {
  for (ffi::DataType type : types) {
    if (type != ffi::F32) {
      return ffi::Error::InvalidArgument("stnjax grid_sample kernel: arrays must be float32");
    }
  }
  return ffi::Error::Success();
}

// Calls fn(example, begin, end) for the points of each example within the
// global points [begin, end), in parallel chunks.
template <typename Fn>
void ForEachPointRange(const Problem& p, Fn fn) {
  const int64_t points = p.geometry.points;
  ParallelFor(p.total_points(), kChunkPoints, [=](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t example = begin / points, first = example * points;
      const int64_t stop = std::min(end - first, points);
      fn(example, begin - first, stop);
      begin = first + stop;
    }
  });
}

// The sampled values (B..., M * P).
ffi::Error Sample(ffi::AnyBuffer image, ffi::AnyBuffer grid,
                  ffi::Result<ffi::AnyBuffer> out, int64_t padding, bool align_corners,
                  int64_t isa) {
  Problem p;
  if (auto e = CheckF32({image.element_type(), grid.element_type()}); e.failure()) return e;
  if (auto e = MakeProblem(image.dimensions(), grid.dimensions(), out->dimensions(), padding,
                           align_corners, &p);
      e.failure()) {
    return e;
  }
  const auto range = STNJAX_PICK(ChosenIsa(isa), padding == 1, SampleRange);
  const float* image_data = static_cast<const float*>(image.untyped_data());
  const float* grid_data = static_cast<const float*>(grid.untyped_data());
  float* out_data = static_cast<float*>(out->untyped_data());
  ForEachPointRange(p, [=](int64_t e, int64_t begin, int64_t end) {
    range(image_data + p.image_row(e) * p.pixels(),
          grid_data + p.grid_row(e) * 2 * p.geometry.points,
          out_data + e * p.geometry.points, begin, end, p.geometry);
  });
  return ffi::Error::Success();
}

// The grid cotangent, per example: (B..., M, P, 2) (a shared grid's is
// summed over the examples by the caller).
ffi::Error GridVjp(ffi::AnyBuffer image, ffi::AnyBuffer grid,
                   ffi::AnyBuffer cotangent, ffi::Result<ffi::AnyBuffer> grid_bar,
                   int64_t padding, bool align_corners, int64_t isa) {
  Problem p;
  if (auto e = CheckF32({image.element_type(), grid.element_type(), cotangent.element_type()});
      e.failure()) {
    return e;
  }
  if (auto e = MakeProblem(image.dimensions(), grid.dimensions(), cotangent.dimensions(),
                           padding, align_corners, &p);
      e.failure()) {
    return e;
  }
  const auto range = STNJAX_PICK(ChosenIsa(isa), padding == 1, GridVjpRange);
  const float* image_data = static_cast<const float*>(image.untyped_data());
  const float* grid_data = static_cast<const float*>(grid.untyped_data());
  const float* cot_data = static_cast<const float*>(cotangent.untyped_data());
  float* bar_data = static_cast<float*>(grid_bar->untyped_data());
  const int64_t points = p.geometry.points;
  ForEachPointRange(p, [=](int64_t e, int64_t begin, int64_t end) {
    range(image_data + p.image_row(e) * p.pixels(), grid_data + p.grid_row(e) * 2 * points,
          cot_data + e * points, bar_data + e * 2 * points, begin, end, p.geometry);
  });
  return ffi::Error::Success();
}

// The image cotangent (B..., N, H, W). Each image's buffer takes the points
// of its examples in order; a shared image (N = 1 < M) sums
// kSharedImageParts partial buffers, each over a fixed part of the examples.
ffi::Error ImageVjp(ffi::AnyBuffer grid, ffi::AnyBuffer cotangent,
                    ffi::Result<ffi::AnyBuffer> image_bar, int64_t padding, bool align_corners,
                    int64_t isa) {
  Problem p;
  if (auto e = CheckF32({grid.element_type(), cotangent.element_type()}); e.failure()) return e;
  if (auto e = MakeProblem(image_bar->dimensions(), grid.dimensions(), cotangent.dimensions(),
                           padding, align_corners, &p);
      e.failure()) {
    return e;
  }
  const auto range = STNJAX_PICK(ChosenIsa(isa), padding == 1, ImageVjpRange);
  const float* grid_data = static_cast<const float*>(grid.untyped_data());
  const float* cot_data = static_cast<const float*>(cotangent.untyped_data());
  float* bar_data = static_cast<float*>(image_bar->untyped_data());
  const int64_t points = p.geometry.points, pixels = p.pixels();
  // Adds examples [first, last) of batch entry b into `target` (H, W).
  auto accumulate = [=](int64_t b, int64_t first, int64_t last, float* target) {
    for (int64_t m = first; m < last; ++m) {
      const int64_t e = b * p.examples + m;
      range(grid_data + p.grid_row(e) * 2 * points, cot_data + e * points, target, 0, points,
            p.geometry);
    }
  };
  if (p.images == p.examples) {  // One image per example.
    const int64_t per_chunk = std::max<int64_t>(1, kChunkPoints / std::max<int64_t>(points, 1));
    ParallelFor(p.batch * p.examples, per_chunk, [=](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        float* target = bar_data + e * pixels;
        std::fill(target, target + pixels, 0.0f);
        accumulate(e / p.examples, e % p.examples, e % p.examples + 1, target);
      }
    });
    return ffi::Error::Success();
  }
  const int64_t parts = std::min(p.examples, kSharedImageParts);
  std::vector<float> partial(static_cast<size_t>(p.batch * parts * pixels));
  float* partial_data = partial.data();
  ParallelFor(p.batch * parts, 1, [=](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t b = j / parts, k = j % parts;
      float* target = partial_data + j * pixels;
      std::fill(target, target + pixels, 0.0f);
      accumulate(b, k * p.examples / parts, (k + 1) * p.examples / parts, target);
    }
  });
  for (int64_t b = 0; b < p.batch; ++b) {
    float* target = bar_data + b * pixels;
    std::fill(target, target + pixels, 0.0f);
    for (int64_t k = 0; k < parts; ++k) {
      const float* part = partial_data + (b * parts + k) * pixels;
      for (int64_t i = 0; i < pixels; ++i) target[i] += part[i];
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- affine grid

// theta (B..., 2, 3); base (B'..., W + H), the output pixels' normalised x then
// y coordinates, with B' = B or all 1. Result (B..., H, W, 2) holding (x, y):
// out[..., i, j, r] = (x_j * theta[r, 0] + y_i * theta[r, 1]) + theta[r, 2].
ffi::Error AffineGrid(ffi::AnyBuffer theta, ffi::AnyBuffer base,
                      ffi::Result<ffi::AnyBuffer> out, int64_t isa) {
  auto tdims = theta.dimensions();
  auto bdims = base.dimensions();
  auto odims = out->dimensions();
  const size_t rank = tdims.size();
  if (theta.element_type() != ffi::F32 || base.element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument("stnjax affine_grid kernel: theta and base must be float32");
  }
  if (rank < 2 || tdims[rank - 2] != 2 || tdims[rank - 1] != 3 || bdims.size() != rank - 1 ||
      odims.size() != rank + 1 || odims[rank] != 2) {
    return ffi::Error::InvalidArgument(
        "stnjax affine_grid kernel: expected theta (..., 2, 3), base (..., W + H) and a result "
        "(..., H, W, 2)");
  }
  const int64_t height = odims[rank - 2], width = odims[rank - 1];
  if (bdims[rank - 2] != width + height) {
    return ffi::Error::InvalidArgument("stnjax affine_grid kernel: base must hold W + H values");
  }
  int64_t batch = 1, base_batch = 1;
  for (size_t d = 0; d + 2 < rank; ++d) {
    if (odims[d] != tdims[d] || (bdims[d] != tdims[d] && bdims[d] != 1)) {
      return ffi::Error::InvalidArgument("stnjax affine_grid kernel: batch dims differ");
    }
    batch *= tdims[d];
    base_batch *= bdims[d];
  }
  if (base_batch != 1 && base_batch != batch) {
    return ffi::Error::InvalidArgument(
        "stnjax affine_grid kernel: base is neither shared nor one per theta");
  }
  const int64_t rows = batch * height;
  if (rows == 0 || width == 0) return ffi::Error::Success();
  const Isa chosen = ChosenIsa(isa);
  const auto row = chosen == kAvx512 ? avx512_kernels::AffineRow
                   : chosen == kAvx2 ? avx2_kernels::AffineRow
                                     : scalar_kernels::AffineRow;
  const float* theta_data = static_cast<const float*>(theta.untyped_data());
  const float* base_data = static_cast<const float*>(base.untyped_data());
  float* out_data = static_cast<float*>(out->untyped_data());
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkGridValues / (2 * width));
  ParallelFor(rows, rows_per_chunk, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t example = r / height, i = r % height;
      const float* xs = base_data + (base_batch == 1 ? 0 : example) * (width + height);
      row(theta_data + 6 * example, xs, xs[width + i], out_data + r * 2 * width, width);
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace stnjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnjaxGridSample2dF32, stnjax::Sample,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("padding")
                                  .Attr<bool>("align_corners")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnjaxGridSample2dGridVjpF32, stnjax::GridVjp,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("padding")
                                  .Attr<bool>("align_corners")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnjaxGridSample2dImageVjpF32, stnjax::ImageVjp,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("padding")
                                  .Attr<bool>("align_corners")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnjaxAffineGrid2dF32, stnjax::AffineGrid,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("isa"));

// The ISA the kernels pick on this CPU (Isa above), for tests and benchmarks.
extern "C" int64_t StnjaxGridSampleCpuIsa() { return stnjax::CpuIsa(); }
