// int8 weights x int8-rounded x at M = 1 on the AVX2 level (`avx2:q8`, qdot_int8.cpp int8_q8): tile_q8's bits,
// eight weight rows a step with their horizontal sums and the scale / bias epilogue done as vectors.
//
// What this is: per weight row, tile_q8<1, 1>'s arithmetic unchanged -- per 32 weights vpsignb(w, w),
// vpsignb(x, w), vpmaddubsw, vpmaddwd(ones), vpaddd into 8 int32 lanes a block, then
// acc = fma(float(lanes), dx_b, acc) in block order -- and for each 8 weight rows the 8 fp32 accumulators
// are summed across lanes together by the tree of simd.h's hsum8 (lo + hi, then lanes 0 + 2 and 1 + 3, then
// those two: the same fp32 additions on the same operands, so the same sums), then y = sum * scale + bias
// (a multiply, then an add of the bias or of 0, as qdot_int8.cpp's scalar epilogue). So every output has the
// bits tile_q8 gives it, and M = 1 keeps the bits of M >= 2 (q8_rows_avx2.h / tile_q8: row invariance).
// Why (docs/kernels-log.md, session 33 helper A): at M = 1 tile_q8 ran one weight row a tile through for_x_tiles,
// a scalar hsum8 an output and a second pass for the scale and bias; codeshell-mini's int8 linears (K = 256:
// 8 chunks a row) spent a large part of each row there. x is rounded by q8_gemm_avx2.h's quantize_row
// (vectorised; qdot.cpp quantize_x's integers and dx). A weight tile's 8 rows are read one after another (one
// sequential stream), prefetched pf bytes ahead.
// What this is not: M >= 2 (q8_rows_avx2.h, tile_q8), the lanes kernel with exact block sums
// (q8_lanes_avx2.h, another set of bits), the 512-bit kernels.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace codeshell {
namespace q8m1avx2 {

// out[r] = hsum8(v[r]) for r = 0..7, by hsum8's additions (above).
inline __m256 hsum8x8(const __m256* v) {
  __m256 p[4];
  for (int r = 0; r < 4; ++r)  // [lo + hi of row r | of row r + 4]
    p[r] = _mm256_add_ps(_mm256_permute2f128_ps(v[r], v[r + 4], 0x20), _mm256_permute2f128_ps(v[r], v[r + 4], 0x31));
  auto half = [](__m256 a, __m256 b) {  // lanes 0 + 2, 1 + 3 of a's and b's quads
    return _mm256_add_ps(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  };
  const __m256 q0 = half(p[0], p[1]), q1 = half(p[2], p[3]);  // [r0 r0 r1 r1 | r4 r4 r5 r5], [r2.. r3.. | r6.. r7..]
  return _mm256_add_ps(_mm256_shuffle_ps(q0, q1, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(q0, q1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Weight rows [n0, n1) (w [N, K] int8, scale [N], bias [N] or null) x one row of x (xq int8 [K], dx [K / B]):
// out[n] for n in [n0, n1). B = 32 * RUNS. pf: bytes ahead to prefetch the weight stream (0: none), HINT the
// prefetch's level (0: T0, 1: T1, 2: T2, 3: NTA).
template <int RUNS, bool PF, int HINT = 0>
void range(const int8_t* xq, const float* dx, int64_t K, const int8_t* w, const float* scale, const float* bias,
           float* out, int64_t n0, int64_t n1, int64_t pf) {
  constexpr int64_t B = 32 * RUNS;
  const int64_t nb = K / B;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; n += 8) {
    const int R = int(std::min<int64_t>(8, n1 - n));
    __m256 acc[8];
    for (int r = 0; r < 8; ++r) {
      const int8_t* wr = w + (n + std::min(r, R - 1)) * K;
      __m256 a = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        __m256i s = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int u = 0; u < RUNS; ++u) {
          const int64_t k = b * B + 32 * u;
          if (PF && u % 2 == 0) {
            const char* p = reinterpret_cast<const char*>(wr + k) + pf;
            if constexpr (HINT == 1) _mm_prefetch(p, _MM_HINT_T1);
            else if constexpr (HINT == 2) _mm_prefetch(p, _MM_HINT_T2);
            else if constexpr (HINT == 3) _mm_prefetch(p, _MM_HINT_NTA);
            else _mm_prefetch(p, _MM_HINT_T0);
          }
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
          s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(xv, v)), ones));
        }
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dx[b]), a);
      }
      acc[r] = a;
    }
    alignas(32) float sv[8], bv[8];
    for (int r = 0; r < 8; ++r) {
      const int64_t j = n + std::min(r, R - 1);
      sv[r] = scale[j];
      bv[r] = bias ? bias[j] : 0.f;
    }
    const __m256 y = _mm256_add_ps(_mm256_mul_ps(hsum8x8(acc), _mm256_load_ps(sv)), _mm256_load_ps(bv));
    if (R == 8) {
      _mm256_storeu_ps(out + n, y);
    } else {
      alignas(32) float t[8];
      _mm256_store_ps(t, y);
      for (int r = 0; r < R; ++r) out[n + r] = t[r];
    }
  }
}

inline void run(const int8_t* xq, const float* dx, int64_t K, int64_t B, const int8_t* w, const float* scale,
                const float* bias, float* out, int64_t n0, int64_t n1, int64_t pf, int hint = 0) {
  auto go = [&](auto runs) {
    constexpr int RU = decltype(runs)::value;
    if (pf <= 0) range<RU, false>(xq, dx, K, w, scale, bias, out, n0, n1, 0);
    else if (hint == 1) range<RU, true, 1>(xq, dx, K, w, scale, bias, out, n0, n1, pf);
    else if (hint == 2) range<RU, true, 2>(xq, dx, K, w, scale, bias, out, n0, n1, pf);
    else if (hint == 3) range<RU, true, 3>(xq, dx, K, w, scale, bias, out, n0, n1, pf);
    else range<RU, true>(xq, dx, K, w, scale, bias, out, n0, n1, pf);
  };
  if (B == 128) go(std::integral_constant<int, 4>{});
  else if (B == 64) go(std::integral_constant<int, 2>{});
  else go(std::integral_constant<int, 1>{});
}

}  // namespace q8m1avx2
}  // namespace codeshell
