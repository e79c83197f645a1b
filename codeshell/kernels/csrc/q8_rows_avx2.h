// int8 weights x int8-rounded x at M >= 2 on the AVX2 level (`avx2:q8`, qdot_int8.cpp int8_q8): the
// bits of tile_q8 (the M = 1 kernel there) with half the multiply-port work per (row of x, 32 weights).
//
// What this is: tile_q8 sums, per row of x, weight row and block, 8 int32 lanes (lane l: the bytes
// 4l..4l+3 of each 32-byte chunk of the block) by vpsignb + vpmaddubsw + vpmaddwd(ones) + vpaddd,
// then fma(float(lane), dx_b, acc) in block order and hsum8. Three of those four instructions issue
// on the two multiply-class ports of an AMD Zen 3 (vpsignb, vpmaddubsw and vpmaddwd all measured
// at half vpaddd's rate, as vfmadd), so from ~4 rows of x the kernel is bound by those ports
// (~1.5 cycles a (row of x, chunk)). Here x is widened once a call to int16 in two halves per
// chunk, E (bytes 4l, 4l+2 of each lane) and O (bytes 4l+1, 4l+3), and a weight chunk once per
// tile the same way (three shifts: vpsraw(v, 8) -> O, vpsraw(vpsllw(v, 8), 8) -> E); then
// vpmaddwd(E_w, E_x) + vpmaddwd(O_w, O_x) is lane l's w0 x0 + w2 x2 + w1 x1 + w3 x3: the same exact
// integer as tile_q8's lane, with 2 multiply-class instructions (no sign) and 2 vpaddd.
// The block epilogue, the fp32 fma order and hsum8 are tile_q8's: every row's bits are the M = 1
// path's (row invariance; tests/kernels/test_q8_rows_avx2.py checks it bitwise for M = 1..64).
// What this is not: the M = 1 kernel (tile_q8 stays: memory bound there, and its x is half the
// bytes), the 512-bit kernels (q8_rows.h, q8_panel.h), or int4 (qdot_int4.cpp).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "qdot.h"
#include "simd.h"

namespace codeshell {
namespace q8avx2 {

// xq int8 [M, K] -> x16 int16 [M, K]: per 32-byte chunk, 16 words E then 16 words O (above).
inline void widen_x(const int8_t* xq, int64_t M, int64_t K, int16_t* x16) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k));
      int16_t* d = x16 + m * K + k;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16), _mm256_srai_epi16(v, 8));
    }
}

// MB rows of x (x16 rows K apart, dx rows nb apart) times one weight row w: out[i * ldo] = hsum8 of
// the per-lane fp32 accumulators, tile_q8<MB, 1>'s bits.
template <int MB>
inline void tile(const int16_t* x16, int64_t K, const float* dx, const int8_t* w, int64_t B, float* out,
                 int64_t ldo) {
  const int64_t nb = K / B;
  __m256 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i a32[MB];
    for (int i = 0; i < MB; ++i) a32[i] = _mm256_setzero_si256();
    for (int64_t k = b * B; k < (b + 1) * B; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + qdot::kPrefetch, _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m256i we = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8), wo = _mm256_srai_epi16(v, 8);
      for (int i = 0; i < MB; ++i) {
        const int16_t* xi = x16 + i * K + k;
        const __m256i pe = _mm256_madd_epi16(we, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi)));
        const __m256i po = _mm256_madd_epi16(wo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi + 16)));
        a32[i] = _mm256_add_epi32(a32[i], _mm256_add_epi32(pe, po));
      }
    }
    for (int i = 0; i < MB; ++i)
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a32[i]), _mm256_set1_ps(dx[i * nb + b]), acc[i]);
  }
  for (int i = 0; i < MB; ++i) out[i * ldo] = codeshell::hsum8(acc[i]);
}

// Weight rows a block: about kBlockBytes of the weight, which every tile of rows of x then reads from
// L1 in turn (the tile's 4 rows of widened x, 8 KiB at K = 1024, stay there too). Why: one weight row
// at a time for all tiles of x read all of the widened x per weight row (M * K * 2 bytes: 32 KiB at
// M = 16, K = 1024, which is all of L1d).
constexpr int64_t kBlockBytes = 16384;

// Weight rows [n0, n1) for all M rows of x: raw hsum8 results into out [M, N] (the caller scales).
inline void range(const int16_t* x16, const float* dx, int64_t M, int64_t K, int64_t B, const int8_t* w, float* out,
                  int64_t N, int64_t n0, int64_t n1) {
  const int64_t nb = K / B, rows = M <= 4 ? 1 : std::max<int64_t>(1, kBlockBytes / K);
  for (int64_t n = n0; n < n1; n += rows) {
    const int64_t r1 = std::min(n1, n + rows);
    qdot::for_x_tiles(M, [&](auto mb, int64_t m) {
      for (int64_t j = n; j < r1; ++j)
        tile<decltype(mb)::value>(x16 + m * K, K, dx + m * nb, w + j * K, B, out + m * N + j, N);
    });
  }
}

}  // namespace q8avx2
}  // namespace codeshell
