// Small AVX2 helpers shared by the kernels (header-only, inlined).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace codeshell {

// bf16 -> fp32, exact (the bf16 bits above 16 zero bits): one value, or 8 lanes from a register /
// from memory. One copy for every kernel that widens bf16 activations or weights (simd512.h has
// the 16-lane forms).
inline float bf16_to_f32(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __m256 widen_bf16x8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline __m256 load_bf16x8(const void* p) { return widen_bf16x8(_mm_loadu_si128(static_cast<const __m128i*>(p))); }

// Sum of the 8 lanes.
inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// e^x for 8 lanes (Cephes-style: 2^n * e^r with |r| <= ln2/2, degree-6 polynomial; relative
// error ~2e-7, exactly 0 below -88). Scalar expf cost ~a fifth of decode attention at 600
// keys and most of a sampling pass.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-88.f), hi = _mm256_set1_ps(88.f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// max |x[i]| over n floats (n % 8 == 0), 8 lanes then the 4-2-1 reduction: the value of the
// scalar loop `amax = std::max(amax, std::fabs(x[i]))` (max is order-free; a NaN is skipped as that
// loop skips it: _mm256_max_ps returns its second operand when the first is NaN). Shared by the
// AVX2 kernels that round x per block as qdot.cpp's quantize_x does (q8_gemm_avx2.h, q4_rows_avx2.h).
inline float absmax8(const float* x, int64_t n) {
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) mx = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + k), absm), mx);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

}  // namespace codeshell
