// The vector operations stnjax's CPU kernels are written in, for three
// instruction sets: Scalar (one lane), Avx2 (8 float lanes) and Avx512 (16).
// kernels.inc is compiled once per set against these, so every set runs the
// same float32 operations in the same order and gives the same bits.
//
// Each set defines F (floats), I (int32s), M (a lane mask) and kLanes. Masked
// loads read nothing and gathers read nothing in lanes that are off; masked
// stores write nothing there.

#ifndef STNJAX_CSRC_SIMD_H_
#define STNJAX_CSRC_SIMD_H_

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

// For the helpers of kernels.inc's loops: a call would pass vectors through memory.
#define STNJAX_INLINE inline __attribute__((always_inline))

namespace stnjax {

struct Scalar {
  using F = float;
  using I = int32_t;
  using M = bool;
  static constexpr int64_t kLanes = 1;

  static M FirstN(int64_t n) { return n > 0; }
  static M And(M a, M b) { return a && b; }
  static M Or(M a, M b) { return a || b; }
  static F Set(float v) { return v; }
  static F Add(F a, F b) { return a + b; }
  static F Sub(F a, F b) { return a - b; }
  static F Mul(F a, F b) { return a * b; }
  static F Min(F a, F b) { return std::min(a, b); }
  static F Max(F a, F b) { return std::max(a, b); }
  static F Floor(F a) { return std::floor(a); }
  static M IsNan(F a) { return std::isnan(a); }
  static M Le(F a, F b) { return a <= b; }
  static M Ge(F a, F b) { return a >= b; }
  static F Select(M m, F yes, F no) { return m ? yes : no; }
  static I SetI(int32_t v) { return v; }
  static I Trunc(F a) { return static_cast<int32_t>(a); }
  static I AddI(I a, I b) { return a + b; }
  static I MulI(I a, I b) { return a * b; }
  static I ClampI(I a, I lo, I hi) { return std::min(std::max(a, lo), hi); }
  static M InRange(I position, I size) {  // 0 <= position < size.
    return static_cast<uint32_t>(position) < static_cast<uint32_t>(size);
  }
  static F Gather(const float* base, I index, M m) { return m ? base[index] : 0.0f; }
  static F Load(const float* p, M live) { return live ? *p : 0.0f; }
  static void Store(float* p, F v, M live) {
    if (live) *p = v;
  }
  static void LoadPairs(const float* p, int64_t n, F* x, F* y) {
    *x = n > 0 ? p[0] : 0.0f;
    *y = n > 0 ? p[1] : 0.0f;
  }
  static void StorePairs(float* p, int64_t n, F x, F y) {
    if (n > 0) p[0] = x, p[1] = y;
  }
  static void StoreAll(float* p, F v) { *p = v; }
  static void StoreAllI(int32_t* p, I v) { *p = v; }
};

#pragma GCC push_options
#pragma GCC target("avx2,fma")

struct Avx2 {
  using F = __m256;
  using I = __m256i;
  using M = __m256i;  // All ones in the lanes that are on.
  static constexpr int64_t kLanes = 8;

  static M FirstN(int64_t n) {
    const int32_t k = static_cast<int32_t>(std::clamp<int64_t>(n, 0, kLanes));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static M And(M a, M b) { return _mm256_and_si256(a, b); }
  static M Or(M a, M b) { return _mm256_or_si256(a, b); }
  static F Set(float v) { return _mm256_set1_ps(v); }
  static F Add(F a, F b) { return _mm256_add_ps(a, b); }
  static F Sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F Min(F a, F b) { return _mm256_min_ps(a, b); }
  static F Max(F a, F b) { return _mm256_max_ps(a, b); }
  static F Floor(F a) { return _mm256_floor_ps(a); }
  static M IsNan(F a) { return _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)); }
  static M Le(F a, F b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_LE_OQ)); }
  static M Ge(F a, F b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GE_OQ)); }
  static F Select(M m, F yes, F no) { return _mm256_blendv_ps(no, yes, _mm256_castsi256_ps(m)); }
  static I SetI(int32_t v) { return _mm256_set1_epi32(v); }
  static I Trunc(F a) { return _mm256_cvttps_epi32(a); }
  static I AddI(I a, I b) { return _mm256_add_epi32(a, b); }
  static I MulI(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static I ClampI(I a, I lo, I hi) { return _mm256_min_epi32(_mm256_max_epi32(a, lo), hi); }
  static M InRange(I position, I size) {
    return _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), position),
                               _mm256_cmpgt_epi32(size, position));
  }
  static F Gather(const float* base, I index, M m) {
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, index, _mm256_castsi256_ps(m), 4);
  }
  static F Load(const float* p, M live) { return _mm256_maskload_ps(p, live); }
  static void Store(float* p, F v, M live) { _mm256_maskstore_ps(p, live, v); }
  // Points (x, y) at p[0 .. 2n): x and y of each lane's point.
  static void LoadPairs(const float* p, int64_t n, F* x, F* y) {
    F a = _mm256_maskload_ps(p, FirstN(2 * n));           // x0 y0 .. x3 y3
    F b = _mm256_maskload_ps(p + 8, FirstN(2 * n - 8));   // x4 y4 .. x7 y7
    // shuffle_ps works per 128-bit half: points (0 1 4 5 | 2 3 6 7), then reordered.
    F xs = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    F ys = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    *x = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xs), _MM_SHUFFLE(3, 1, 2, 0)));
    *y = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ys), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  static void StorePairs(float* p, int64_t n, F x, F y) {
    F lo = _mm256_unpacklo_ps(x, y), hi = _mm256_unpackhi_ps(x, y);  // (0 1 | 4 5), (2 3 | 6 7)
    _mm256_maskstore_ps(p, FirstN(2 * n), _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_maskstore_ps(p + 8, FirstN(2 * n - 8), _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  static void StoreAll(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void StoreAllI(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
};

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")

struct Avx512 {
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static constexpr int64_t kLanes = 16;

  static M FirstN(int64_t n) {
    return static_cast<M>((1u << std::clamp<int64_t>(n, 0, kLanes)) - 1);
  }
  static M And(M a, M b) { return a & b; }
  static M Or(M a, M b) { return a | b; }
  static F Set(float v) { return _mm512_set1_ps(v); }
  static F Add(F a, F b) { return _mm512_add_ps(a, b); }
  static F Sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F Min(F a, F b) { return _mm512_min_ps(a, b); }
  static F Max(F a, F b) { return _mm512_max_ps(a, b); }
  static F Floor(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static M IsNan(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static M Le(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static M Ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static F Select(M m, F yes, F no) { return _mm512_mask_blend_ps(m, no, yes); }
  static I SetI(int32_t v) { return _mm512_set1_epi32(v); }
  static I Trunc(F a) { return _mm512_cvttps_epi32(a); }
  static I AddI(I a, I b) { return _mm512_add_epi32(a, b); }
  static I MulI(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static I ClampI(I a, I lo, I hi) { return _mm512_min_epi32(_mm512_max_epi32(a, lo), hi); }
  // Unsigned compare: a negative position wraps above the size.
  static M InRange(I position, I size) { return _mm512_cmplt_epu32_mask(position, size); }
  static F Gather(const float* base, I index, M m) {
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, index, base, 4);
  }
  static F Load(const float* p, M live) { return _mm512_maskz_loadu_ps(live, p); }
  static void Store(float* p, F v, M live) { _mm512_mask_storeu_ps(p, live, v); }
  static void LoadPairs(const float* p, int64_t n, F* x, F* y) {
    const I even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    F a = _mm512_maskz_loadu_ps(FirstN(2 * n), p);
    F b = _mm512_maskz_loadu_ps(FirstN(2 * n - 16), p + 16);
    *x = _mm512_permutex2var_ps(a, even, b);
    *y = _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b);
  }
  static void StorePairs(float* p, int64_t n, F x, F y) {
    const I low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    _mm512_mask_storeu_ps(p, FirstN(2 * n), _mm512_permutex2var_ps(x, low, y));
    const I high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
    _mm512_mask_storeu_ps(p + 16, FirstN(2 * n - 16), _mm512_permutex2var_ps(x, high, y));
  }
  static void StoreAll(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void StoreAllI(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
};

#pragma GCC pop_options

}  // namespace stnjax

#endif  // STNJAX_CSRC_SIMD_H_
