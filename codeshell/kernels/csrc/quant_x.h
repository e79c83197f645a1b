// Activation rounding for the integer kernels, AVX-512 (header-only; qdot.cpp and qgemm_amx.cpp).
//
// What this is: one row of x fp32 [K] -> int8 in blocks of B along K, exactly the arithmetic of
// qdot.cpp's scalar `quantize_x` (and of codeshell.kernels.packing.quantize_activations): per
// block d = amax / 127, x' = round_half_even(x * (127 / amax)) (0 for an all-zero block), 16
// lanes at a time (the same fp32 products and the same rounding, so the same integers).
// Why: the scalar loop cost ~2 ns per value, serial: at M = 8 and K = 6144 ~0.1 ms of a call
// whose weight read takes ~0.5 ms, and ~1 ms of an M = 512 prefill.
// What this is not: the AVX2 path (an AVX2-only CPU keeps the scalar `quantize_x`).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "isa.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {

// x [K] -> o [K] int8 (B % 16 == 0, K % B == 0); d[b * dstride] = amax / 127; xs[b] (if not
// null) = d * sum of the block's integers; sx[b] (if not null) = that sum as int32 (the 512-bit
// kernels take their weight offset, 128 for int8 and 8 for int4, back out of the exact block sums). perm = 128: within each run of 128, the order the
// 512-bit int4 kernel reads (16-byte pieces 0, 2, 4, 6 then 1, 3, 5, 7: quantize_x's perm 128);
// perm = 0: k order.
inline void quantize_row_avx512(const float* x, int64_t K, int64_t B, int perm, int8_t* o, float* d,
                                int64_t dstride, float* xs, int32_t* sx = nullptr) {
  for (int64_t b = 0; b < K / B; ++b) {
    const float* xb = x + b * B;
    __m512 am = _mm512_setzero_ps();
    for (int64_t k = 0; k < B; k += 16) am = _mm512_max_ps(am, _mm512_abs_ps(_mm512_loadu_ps(xb + k)));
    const float amax = _mm512_reduce_max_ps(am);
    const float db = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    const __m512 iv = _mm512_set1_ps(id);
    __m512i s = _mm512_setzero_si512();
    for (int64_t k = 0; k < B; k += 16) {
      const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + k), iv),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      s = _mm512_add_epi32(s, q);
      int64_t at = b * B + k;
      if (perm == 128) {
        const int64_t c = (at % 128) / 16;  // 16-byte piece of the run
        at = at / 128 * 128 + 16 * (c % 2 ? 4 + c / 2 : c / 2);
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + at), _mm512_cvtepi32_epi8(q));
    }
    d[b * dstride] = db;
    const int32_t si = _mm512_reduce_add_epi32(s);
    if (xs) xs[b] = db * float(si);
    if (sx) sx[b] = si;
  }
}

}  // namespace codeshell
CODESHELL_END_AVX512
#endif
