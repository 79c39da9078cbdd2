// Bilinear grid_sample of single-channel float32 images on x86 CPUs, an XLA
// custom call through jax.ffi (stnjax/_cpu_ffi.py builds and registers it).
//
// Why: XLA:CPU emits every gathered pixel as a scalar load (docs/performance.md,
// "A C++ sampler kernel on CPU"); this kernel reads 16 (AVX-512) or 8 (AVX2)
// pixels per hardware gather. The arithmetic is the jnp sampler's
// (stnjax/_interp.py): NaN -> -1, unnormalise, clamp to +-2**24 pixels, border
// clip, taps floor(x) and floor(x) + 1 masked outside the image, each row
// wy * (wx0 * left + wx1 * right), no fused multiply-adds, so every ISA gives
// the same bits.
//
// Operands (leading dims `B...` are equal: jax.vmap's broadcast_all):
//   image (B..., N, H, W), grid (B..., G, P, 2) holding (x, y); N and G are
//   equal or one of them is 1 (shared). Result (B..., max(N, G) * P), flat.
// Attributes: padding (0 zeros, 1 border), align_corners, isa (0 best the CPU
// has, 1 scalar, 2 AVX2, 3 AVX-512; capped at what the CPU has).
// Work is split in chunks of points over XLA's intra-op thread pool; the
// calling thread takes chunks too, so it never waits on a task that has not
// started.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kFar = 16777216.0f;  // 2**24: float32 integers are exact up to here.
constexpr int64_t kChunkPoints = 8192;

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

struct Geometry {
  int64_t height, width, points;
  bool align_corners;
};

// One example's points [begin, end): image (H, W), grid (P, 2), out (P,).
using RangeFn = void (*)(const float*, const float*, float*, int64_t, int64_t, const Geometry&);

// ---------------------------------------------------------------- scalar

template <bool kBorder>
float ScalarPixel(float c, int64_t size, bool align) {
  c = std::isnan(c) ? -1.0f : c;
  c = align ? (c + 1.0f) * 0.5f * static_cast<float>(size - 1)
            : ((c + 1.0f) * static_cast<float>(size) - 1.0f) * 0.5f;
  c = std::min(std::max(c, -kFar), kFar);
  if (kBorder) {
    float hi = static_cast<float>(size - 1);
    c = c <= 0.0f ? 0.0f : (c >= hi ? hi : c);
  }
  return c;
}

template <bool kBorder>
void ScalarRange(const float* __restrict image, const float* __restrict grid,
                 float* __restrict out, int64_t begin, int64_t end, const Geometry& g) {
  const int32_t h = static_cast<int32_t>(g.height), w = static_cast<int32_t>(g.width);
  for (int64_t i = begin; i < end; ++i) {
    float x = ScalarPixel<kBorder>(grid[2 * i], w, g.align_corners);
    float y = ScalarPixel<kBorder>(grid[2 * i + 1], h, g.align_corners);
    float x0f = std::floor(x), y0f = std::floor(y);
    int32_t x0 = static_cast<int32_t>(x0f), y0 = static_cast<int32_t>(y0f);
    float wx0 = x0f + 1.0f - x, wx1 = x - x0f, wy0 = y0f + 1.0f - y, wy1 = y - y0f;
    int32_t xs[2] = {x0, x0 + 1}, ys[2] = {y0, y0 + 1};
    float v[2][2];
    for (int r = 0; r < 2; ++r) {
      for (int c = 0; c < 2; ++c) {
        bool inside = static_cast<uint32_t>(ys[r]) < static_cast<uint32_t>(h) &&
                      static_cast<uint32_t>(xs[c]) < static_cast<uint32_t>(w);
        v[r][c] = inside ? image[ys[r] * w + xs[c]] : 0.0f;
      }
    }
    float top = wx0 * v[0][0] + wx1 * v[0][1], bottom = wx0 * v[1][0] + wx1 * v[1][1];
    out[i] = wy0 * top + wy1 * bottom;
  }
}

// ---------------------------------------------------------------- AVX2

#pragma GCC push_options
#pragma GCC target("avx2,fma")

template <bool kBorder>
__m256 Avx2Pixel(__m256 c, int64_t size, bool align) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  const __m256 hi = _mm256_set1_ps(static_cast<float>(size - 1));
  c = _mm256_blendv_ps(c, _mm256_set1_ps(-1.0f), _mm256_cmp_ps(c, c, _CMP_UNORD_Q));
  c = align ? _mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(c, one), half), hi)
            : _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_add_ps(c, one),
                                                        _mm256_set1_ps(static_cast<float>(size))),
                                          one),
                            half);
  c = _mm256_min_ps(_mm256_max_ps(c, _mm256_set1_ps(-kFar)), _mm256_set1_ps(kFar));
  if (kBorder) {
    c = _mm256_blendv_ps(c, _mm256_setzero_ps(), _mm256_cmp_ps(c, _mm256_setzero_ps(), _CMP_LE_OQ));
    c = _mm256_blendv_ps(c, hi, _mm256_cmp_ps(c, hi, _CMP_GE_OQ));
  }
  return c;
}

// Whether 0 <= position < size, as a lane mask.
__m256i Avx2Inside(__m256i position, __m256i size) {
  return _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), position),
                             _mm256_cmpgt_epi32(size, position));
}

__m256 Avx2Gather(const float* image, __m256i index, __m256i mask) {
  return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), image, index, _mm256_castsi256_ps(mask), 4);
}

template <bool kBorder>
void Avx2Range(const float* __restrict image, const float* __restrict grid,
               float* __restrict out, int64_t begin, int64_t end, const Geometry& g) {
  const __m256i width = _mm256_set1_epi32(static_cast<int32_t>(g.width));
  const __m256i height = _mm256_set1_epi32(static_cast<int32_t>(g.height));
  const __m256i last_col = _mm256_set1_epi32(static_cast<int32_t>(g.width - 1));
  const __m256i last_row = _mm256_set1_epi32(static_cast<int32_t>(g.height - 1));
  const __m256i zero = _mm256_setzero_si256(), onei = _mm256_set1_epi32(1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i = begin; i < end; i += 8) {
    // Lanes past `end` load and store nothing; their grid reads as 0 (in bounds).
    int32_t left = static_cast<int32_t>(std::min<int64_t>(end - i, 8));
    __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lane);
    __m256i live_a = _mm256_cmpgt_epi32(_mm256_set1_epi32(2 * left), lane);
    __m256i live_b = _mm256_cmpgt_epi32(_mm256_set1_epi32(2 * left - 8), lane);
    __m256 a = _mm256_maskload_ps(grid + 2 * i, live_a);      // x0 y0 .. x3 y3
    __m256 b = _mm256_maskload_ps(grid + 2 * i + 8, live_b);  // x4 y4 .. x7 y7
    // shuffle_ps works per 128-bit half: points (0 1 4 5 | 2 3 6 7), then reordered.
    __m256 xs = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    __m256 ys = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    xs = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xs), _MM_SHUFFLE(3, 1, 2, 0)));
    ys = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ys), _MM_SHUFFLE(3, 1, 2, 0)));
    __m256 x = Avx2Pixel<kBorder>(xs, g.width, g.align_corners);
    __m256 y = Avx2Pixel<kBorder>(ys, g.height, g.align_corners);
    __m256 x0f = _mm256_floor_ps(x), y0f = _mm256_floor_ps(y);
    __m256i x0 = _mm256_cvttps_epi32(x0f), y0 = _mm256_cvttps_epi32(y0f);
    __m256i x1 = _mm256_add_epi32(x0, onei), y1 = _mm256_add_epi32(y0, onei);
    __m256 wx0 = _mm256_sub_ps(_mm256_add_ps(x0f, one), x), wx1 = _mm256_sub_ps(x, x0f);
    __m256 wy0 = _mm256_sub_ps(_mm256_add_ps(y0f, one), y), wy1 = _mm256_sub_ps(y, y0f);
    __m256i in_x0 = Avx2Inside(x0, width), in_x1 = Avx2Inside(x1, width);
    __m256i in_y0 = _mm256_and_si256(Avx2Inside(y0, height), live);
    __m256i in_y1 = _mm256_and_si256(Avx2Inside(y1, height), live);
    __m256i c0 = _mm256_min_epi32(_mm256_max_epi32(x0, zero), last_col);
    __m256i c1 = _mm256_min_epi32(_mm256_max_epi32(x1, zero), last_col);
    __m256i r0 = _mm256_mullo_epi32(_mm256_min_epi32(_mm256_max_epi32(y0, zero), last_row), width);
    __m256i r1 = _mm256_mullo_epi32(_mm256_min_epi32(_mm256_max_epi32(y1, zero), last_row), width);
    __m256 v00 = Avx2Gather(image, _mm256_add_epi32(r0, c0), _mm256_and_si256(in_y0, in_x0));
    __m256 v01 = Avx2Gather(image, _mm256_add_epi32(r0, c1), _mm256_and_si256(in_y0, in_x1));
    __m256 v10 = Avx2Gather(image, _mm256_add_epi32(r1, c0), _mm256_and_si256(in_y1, in_x0));
    __m256 v11 = Avx2Gather(image, _mm256_add_epi32(r1, c1), _mm256_and_si256(in_y1, in_x1));
    __m256 top = _mm256_add_ps(_mm256_mul_ps(wx0, v00), _mm256_mul_ps(wx1, v01));
    __m256 bottom = _mm256_add_ps(_mm256_mul_ps(wx0, v10), _mm256_mul_ps(wx1, v11));
    _mm256_maskstore_ps(out + i, live,
                        _mm256_add_ps(_mm256_mul_ps(wy0, top), _mm256_mul_ps(wy1, bottom)));
  }
}

#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-512

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")

template <bool kBorder>
__m512 Avx512Pixel(__m512 c, int64_t size, bool align) {
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  const __m512 hi = _mm512_set1_ps(static_cast<float>(size - 1));
  c = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q), c, _mm512_set1_ps(-1.0f));
  c = align ? _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(c, one), half), hi)
            : _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(_mm512_add_ps(c, one),
                                                        _mm512_set1_ps(static_cast<float>(size))),
                                          one),
                            half);
  c = _mm512_min_ps(_mm512_max_ps(c, _mm512_set1_ps(-kFar)), _mm512_set1_ps(kFar));
  if (kBorder) {
    c = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_LE_OQ), c,
                             _mm512_setzero_ps());
    c = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(c, hi, _CMP_GE_OQ), c, hi);
  }
  return c;
}

template <bool kBorder>
void Avx512Range(const float* __restrict image, const float* __restrict grid,
                 float* __restrict out, int64_t begin, int64_t end, const Geometry& g) {
  const __m512i even =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i width = _mm512_set1_epi32(static_cast<int32_t>(g.width));
  const __m512i height = _mm512_set1_epi32(static_cast<int32_t>(g.height));
  const __m512i last_col = _mm512_set1_epi32(static_cast<int32_t>(g.width - 1));
  const __m512i last_row = _mm512_set1_epi32(static_cast<int32_t>(g.height - 1));
  const __m512i zero = _mm512_setzero_si512(), onei = _mm512_set1_epi32(1);
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = begin; i < end; i += 16) {
    // Lanes past `end` load and store nothing; their grid reads as 0 (in bounds).
    int64_t left = std::min<int64_t>(end - i, 16);
    __mmask16 live = static_cast<__mmask16>((1u << left) - 1);
    __mmask16 live_a = static_cast<__mmask16>((1u << std::min<int64_t>(2 * left, 16)) - 1);
    __mmask16 live_b = static_cast<__mmask16>((1u << std::max<int64_t>(2 * left - 16, 0)) - 1);
    __m512 a = _mm512_maskz_loadu_ps(live_a, grid + 2 * i);
    __m512 b = _mm512_maskz_loadu_ps(live_b, grid + 2 * i + 16);
    __m512 x = Avx512Pixel<kBorder>(_mm512_permutex2var_ps(a, even, b), g.width, g.align_corners);
    __m512 y = Avx512Pixel<kBorder>(_mm512_permutex2var_ps(a, odd, b), g.height, g.align_corners);
    __m512 x0f = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 y0f = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512i x0 = _mm512_cvttps_epi32(x0f), y0 = _mm512_cvttps_epi32(y0f);
    __m512i x1 = _mm512_add_epi32(x0, onei), y1 = _mm512_add_epi32(y0, onei);
    __m512 wx0 = _mm512_sub_ps(_mm512_add_ps(x0f, one), x), wx1 = _mm512_sub_ps(x, x0f);
    __m512 wy0 = _mm512_sub_ps(_mm512_add_ps(y0f, one), y), wy1 = _mm512_sub_ps(y, y0f);
    // Unsigned compares: a negative position wraps above the size.
    __mmask16 in_x0 = _mm512_cmplt_epu32_mask(x0, width);
    __mmask16 in_x1 = _mm512_cmplt_epu32_mask(x1, width);
    __mmask16 in_y0 = _mm512_cmplt_epu32_mask(y0, height) & live;
    __mmask16 in_y1 = _mm512_cmplt_epu32_mask(y1, height) & live;
    __m512i c0 = _mm512_min_epi32(_mm512_max_epi32(x0, zero), last_col);
    __m512i c1 = _mm512_min_epi32(_mm512_max_epi32(x1, zero), last_col);
    __m512i r0 = _mm512_mullo_epi32(_mm512_min_epi32(_mm512_max_epi32(y0, zero), last_row), width);
    __m512i r1 = _mm512_mullo_epi32(_mm512_min_epi32(_mm512_max_epi32(y1, zero), last_row), width);
    const __m512 none = _mm512_setzero_ps();
    __m512 v00 = _mm512_mask_i32gather_ps(none, in_y0 & in_x0, _mm512_add_epi32(r0, c0), image, 4);
    __m512 v01 = _mm512_mask_i32gather_ps(none, in_y0 & in_x1, _mm512_add_epi32(r0, c1), image, 4);
    __m512 v10 = _mm512_mask_i32gather_ps(none, in_y1 & in_x0, _mm512_add_epi32(r1, c0), image, 4);
    __m512 v11 = _mm512_mask_i32gather_ps(none, in_y1 & in_x1, _mm512_add_epi32(r1, c1), image, 4);
    __m512 top = _mm512_add_ps(_mm512_mul_ps(wx0, v00), _mm512_mul_ps(wx1, v01));
    __m512 bottom = _mm512_add_ps(_mm512_mul_ps(wx0, v10), _mm512_mul_ps(wx1, v11));
    _mm512_mask_storeu_ps(out + i, live,
                          _mm512_add_ps(_mm512_mul_ps(wy0, top), _mm512_mul_ps(wy1, bottom)));
  }
}

#pragma GCC pop_options

// ---------------------------------------------------------------- driver

RangeFn PickRange(Isa isa, bool border) {
  switch (isa) {
    case kAvx512: return border ? Avx512Range<true> : Avx512Range<false>;
    case kAvx2: return border ? Avx2Range<true> : Avx2Range<false>;
    default: return border ? ScalarRange<true> : ScalarRange<false>;
  }
}

struct Layout {
  int64_t batch;    // prod(B...)
  int64_t images;   // N
  int64_t grids;    // G
  int64_t examples; // max(N, G)
};

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

ffi::Error GridSample2d(ffi::ThreadPool pool, ffi::AnyBuffer image, ffi::AnyBuffer grid,
                        ffi::Result<ffi::AnyBuffer> out, int64_t padding, bool align_corners,
                        int64_t isa) {
  auto idims = image.dimensions();
  auto gdims = grid.dimensions();
  const size_t rank = idims.size();
  if (image.element_type() != ffi::F32 || grid.element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument("stnjax grid_sample kernel: image and grid must be float32");
  }
  if (rank < 3 || gdims.size() != rank || gdims[rank - 1] != 2) {
    return ffi::Error::InvalidArgument(
        "stnjax grid_sample kernel: expected image (..., N, H, W) and grid (..., G, P, 2)");
  }
  Layout layout{1, idims[rank - 3], gdims[rank - 3], std::max(idims[rank - 3], gdims[rank - 3])};
  for (size_t d = 0; d + 3 < rank; ++d) {
    if (idims[d] != gdims[d]) {
      return ffi::Error::InvalidArgument("stnjax grid_sample kernel: batch dims differ");
    }
    layout.batch *= idims[d];
  }
  if ((layout.images != layout.examples && layout.images != 1) ||
      (layout.grids != layout.examples && layout.grids != 1)) {
    return ffi::Error::InvalidArgument("stnjax grid_sample kernel: N and G must match or be 1");
  }
  if (padding != 0 && padding != 1) {
    return ffi::Error::InvalidArgument("stnjax grid_sample kernel: padding must be 0 or 1");
  }
  Geometry geometry{idims[rank - 2], idims[rank - 1], gdims[rank - 2], align_corners};
  const int64_t pixels = geometry.height * geometry.width;
  const int64_t total = layout.batch * layout.examples * geometry.points;
  if (total == 0) return ffi::Error::Success();
  static const Isa cpu_isa = CpuIsa();
  const Isa chosen = isa == kBest ? cpu_isa : static_cast<Isa>(std::min<int64_t>(isa, cpu_isa));
  const RangeFn range = PickRange(chosen, padding == 1);
  const float* image_data = static_cast<const float*>(image.untyped_data());
  const float* grid_data = static_cast<const float*>(grid.untyped_data());
  float* out_data = static_cast<float*>(out->untyped_data());

  auto run = [=](int64_t begin, int64_t end) {  // Global points [begin, end).
    while (begin < end) {
      const int64_t example = begin / geometry.points;
      const int64_t first = example * geometry.points;
      const int64_t stop = std::min(end - first, geometry.points);
      const int64_t b = example / layout.examples, m = example % layout.examples;
      const int64_t image_row = b * layout.images + (layout.images == 1 ? 0 : m);
      const int64_t grid_row = b * layout.grids + (layout.grids == 1 ? 0 : m);
      range(image_data + image_row * pixels, grid_data + grid_row * 2 * geometry.points,
            out_data + first, begin - first, stop, geometry);
      begin = first + stop;
    }
  };
  const int64_t chunks = (total + kChunkPoints - 1) / kChunkPoints;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), chunks));
  if (threads == 1) {
    run(0, total);
    return ffi::Error::Success();
  }
  // Shared with helper tasks that may start after this call has returned.
  auto progress = std::make_shared<Progress>();
  auto work = [=]() {
    int64_t k;
    while ((k = progress->next.fetch_add(1, std::memory_order_relaxed)) < chunks) {
      run(k * kChunkPoints, std::min(total, (k + 1) * kChunkPoints));
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (progress->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnjaxGridSample2dF32, GridSample2d,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("padding")
                                  .Attr<bool>("align_corners")
                                  .Attr<int64_t>("isa"));

// The ISA the kernel picks on this CPU (Isa above), for tests and benchmarks.
extern "C" int64_t StnjaxGridSampleCpuIsa() { return CpuIsa(); }
