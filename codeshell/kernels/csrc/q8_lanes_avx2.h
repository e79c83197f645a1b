// int8 weights x int8-rounded x at every M on the AVX2 level with CODESHELL_Q8_AVX2_LANES=1 (`avx2:q8`,
// qdot_int8.cpp int8_q8; off by default: see "Measured" below): eight weight rows a tile with the rows in the
// vector lanes, exact block sums.
//
// What this is: for a tile of 8 weight rows (w [N, K] int8, one scale a row) and MB rows of x rounded to int8
// in blocks of B (q8_block_int8(K): 128 where it divides K), the exact integer dot S of every (row of x, weight
// row, block) is summed in int32 lanes, the 8 weight rows' lane vectors of a block are reduced into one vector
// whose lane r is weight row r's S (q4avx2::reduce8: unpack / add, 21 ops per 8 sums), and the block's fp32
// step runs once per 8 outputs:
//     acc = fma(float(S_b), dx_b, acc)        (blocks in order)
//     y   = acc * scale (+ bias)              (a multiply, then an add)
// which are the bits of the int8 prompt GEMM (q8_gemm_avx2.h: the same rounding of x, the same exact S_b, the
// same fp32 steps in the same order): decode and prompt give a row the same bits, closer to exact than
// tile_q8's 8 fp32 lanes a row (within 2e-6 of a float64 reference: tests/kernels/test_q8_lanes_avx2.py).
// Two exact ways to S, chosen by M (the same integers, hence the same bits at every M):
//  * M = 1 ("sign"): tile_q8's vpsignb(w, w) + vpsignb(x, w) + vpmaddubsw + vpmaddwd(ones) + vpaddd on int8 x,
//    a weight row's blocks (up to kM1Span) one after another: one sequential stream;
//  * M >= 2 ("wide"): x rounded to int8 and widened to int16 once a call in q8_rows_avx2.h's E / O order, each
//    weight chunk once a tile by 3 shifts, then 2 vpmaddwd + 2 vpaddd a (row of x, weight row, 32 weights);
//    tiles of up to 4 rows of x, K in spans of kSpanK with the fp32 accumulators carried in order; rows of x 64
//    at a time (M > 64: the prompt's avx2:q8 candidate).
// Measured (docs/kernels-log.md, session 33 helper A; 1 thread, AMD EPYC Zen 3): M = 1 1.06-1.56x tile_q8, but
// q8_m1_avx2.h (tile_q8's bits) gains as much there; M = 8 0.87-0.99x q8_rows_avx2.h / tile_q8 (the same
// vector ops a (row, 32 weights) as q8_rows_avx2.h; the per-block reduction through lb was not made cheaper).
// Variants measured slower at M = 8 and removed: weight rows in pairs sharing x's loads (0.82-0.92x of this
// one), vpmovsxbw instead of the shifts with x in natural order, spans of 8 blocks a weight row; the chunk loop
// unrolled (GCC issued a block's products first and spilled them: objdump).
// What this is not: the default (q8_m1_avx2.h at M = 1, q8_rows_avx2.h / tile_q8 at M >= 2), the 512-bit
// kernels, int4 (q4_rows_avx2.h), the prompt GEMM (q8_gemm_avx2.h, whose rounding of x this reuses).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "q4_rows_avx2.h"  // reduce8 (shared, unchanged)
#include "q8_gemm_avx2.h"  // quantize_row (x's rounding, the prompt GEMM's)
#include "q8_rows_avx2.h"  // widen_x
#include "simd.h"

namespace codeshell {
namespace q8lanes {

// x fp32 [K] (M = 1) -> x8 int8 [K], dx [K / B] (quantize_row: qdot.cpp quantize_x's integers and dx); xs scratch.
inline void round_x1(const float* x, int64_t K, int64_t B, int8_t* x8, float* dx, float* xs) {
  q8gemm::quantize_row(x, K, B, nullptr, dx, xs, x8, nullptr);
}

// x fp32 [M, K] -> x8 int8 [M, K], then x16 in q8_rows_avx2.h's E / O order (widen_x), dx [M, K / B].
inline void round_x_eo(const float* x, int64_t M, int64_t K, int64_t B, int8_t* x8, int16_t* x16, float* dx,
                       float* xs) {
  const int64_t nb = K / B;
  for (int64_t m = 0; m < M; ++m) q8gemm::quantize_row(x + m * K, K, B, nullptr, dx + m * nb, xs + m * nb, x8 + m * K);
  q8avx2::widen_x(x8, M, K, x16);
}

// Weight rows (8, rows K bytes apart: wr[r]) x MB rows of x over blocks [b0, b1): acc[i] lane r += the fp32
// steps of (row i of x, weight row r). SPAN: blocks a weight row summed before the next row (M = 1: one
// sequential stream for the tile's contiguous rows); lb holds the blocks' lane vectors until the reduction.
// WIDE: x16 (int16) and vpmaddwd, else x8 (int8) and the sign trick. RUNS = B / 32. pf: bytes ahead to
// prefetch the weight lines (0: none).
template <int MB, int SPAN, bool WIDE, int RUNS>
inline void tile(const int8_t* x8, const int16_t* x16, int64_t K, int64_t nb, const float* dx,
                 const int8_t* const* wr, int64_t b0, int64_t b1, int64_t pf, __m256* acc) {
  constexpr int64_t B = 32 * RUNS;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) int32_t lb[MB][SPAN][8][8];
  for (int64_t s0 = b0; s0 < b1; s0 += SPAN) {
    const int cnt = int(std::min<int64_t>(SPAN, b1 - s0));
    if constexpr (WIDE) {
      for (int r = 0; r < 8; ++r) {
        const int8_t* wa = wr[r] + s0 * B;
        const int16_t* xs = x16 + s0 * B;
        asm("" : "+r"(xs));
        for (int c = 0; c < cnt; ++c) {
          __m256i a[MB];
          for (int i = 0; i < MB; ++i) a[i] = _mm256_setzero_si256();
          // one chunk a loop step: unrolled, GCC issued all of a block's products first and spilled them
#pragma GCC unroll 1
          for (int u = 0; u < RUNS; ++u) {
            const int64_t o = c * B + 32 * u;
            if (pf && (u % 2 == 0)) _mm_prefetch(reinterpret_cast<const char*>(wa + o) + pf, _MM_HINT_T0);
            // E / O halves (q8_rows_avx2.h's layout: x16 holds x's chunk as bytes 4l, 4l+2 then 4l+1, 4l+3)
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wa + o));
            const __m256i a0 = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8), a1 = _mm256_srai_epi16(v, 8);
#pragma GCC unroll 4
            for (int i = 0; i < MB; ++i) {
              const int16_t* xi = xs + i * K + o;
              const __m256i p0 = _mm256_madd_epi16(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi)));
              const __m256i p1 = _mm256_madd_epi16(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi + 16)));
              a[i] = _mm256_add_epi32(a[i], _mm256_add_epi32(p0, p1));
            }
          }
          for (int i = 0; i < MB; ++i) _mm256_store_si256(reinterpret_cast<__m256i*>(lb[i][c][r]), a[i]);
        }
      }
    } else {
      for (int r = 0; r < 8; ++r) {
        const int8_t* w = wr[r] + s0 * B;
        for (int c = 0; c < cnt; ++c) {
          __m256i a[MB];
#pragma GCC unroll 4
          for (int u = 0; u < RUNS; ++u) {
            const int64_t o = c * B + 32 * u;
            if (pf && (u % 2 == 0)) _mm_prefetch(reinterpret_cast<const char*>(w + o) + pf, _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + o));
            const __m256i av = _mm256_sign_epi8(v, v);
#pragma GCC unroll 4
            for (int i = 0; i < MB; ++i) {
              const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x8 + i * K + s0 * B + o));
              const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(xv, v)), ones);
              a[i] = u == 0 ? s : _mm256_add_epi32(a[i], s);
            }
          }
          for (int i = 0; i < MB; ++i) _mm256_store_si256(reinterpret_cast<__m256i*>(lb[i][c][r]), a[i]);
        }
      }
    }
    for (int c = 0; c < cnt; ++c)
      for (int i = 0; i < MB; ++i)
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q4avx2::reduce8(lb[i][c][0])),
                                 _mm256_set1_ps(dx[i * nb + s0 + c]), acc[i]);
  }
}

// Columns of K a span at M > 1 (the weight tile's 8 x kSpanK bytes and an x tile's 4 x kSpanK int16 sit in L1
// together: 24 KiB), and the blocks a weight row at M = 1 before the next row (lb: 8 KiB).
constexpr int64_t kSpanK = 1024;
constexpr int kM1Span = 32;

// Weight rows [n0, n1) for all M rows of x into out [M, N] (scale and bias applied): tiles of 8 weight rows
// (rows past n1 repeat the last one and are not stored); M = 1 the sign way with pf_m1 bytes of prefetch;
// M > 1 the wide way, K in spans of kSpanK, tiles of 4 rows of x, the first tile of x prefetching the next
// weight tile's same span (pf != 0).
template <int RUNS>
void range(const int8_t* x8, const int16_t* x16, const float* dx, int64_t M, int64_t K, const int8_t* w,
           const float* scale, const float* bias, float* out, int64_t N, int64_t n0, int64_t n1, int64_t pf_m1,
           bool pf) {
  constexpr int64_t B = 32 * RUNS;
  const int64_t nb = K / B, spb = std::max<int64_t>(1, kSpanK / B);
  alignas(32) float accs[64][8];
  for (int64_t n = n0; n < n1; n += 8) {
    const int R = int(std::min<int64_t>(8, n1 - n));
    const int8_t* wr[8];
    alignas(32) float sv[8], bv[8];
    for (int r = 0; r < 8; ++r) {
      const int64_t j = n + std::min(r, R - 1);
      wr[r] = w + j * K;
      sv[r] = scale[j];
      bv[r] = bias ? bias[j] : 0.f;
    }
    auto put = [&](__m256 a, int64_t m) {
      __m256 v = _mm256_mul_ps(a, _mm256_load_ps(sv));
      if (bias) v = _mm256_add_ps(v, _mm256_load_ps(bv));
      float* o = out + m * N + n;
      if (R == 8) {
        _mm256_storeu_ps(o, v);
      } else {
        alignas(32) float t[8];
        _mm256_store_ps(t, v);
        for (int r = 0; r < R; ++r) o[r] = t[r];
      }
    };
    if (M == 1) {
      __m256 acc[1] = {_mm256_setzero_ps()};
      tile<1, kM1Span, false, RUNS>(x8, nullptr, K, nb, dx, wr, 0, nb, pf_m1, acc);
      put(acc[0], 0);
      continue;
    }
    const int64_t pft = pf ? 8 * K : 0;  // the next tile of 8 weight rows, the same place
    for (int64_t mc = 0; mc < M; mc += 64) {  // rows of x 64 at a time (the prompt's avx2:q8 candidate: M > 64)
    const int64_t Mc = std::min<int64_t>(64, M - mc);
    for (int64_t m = 0; m < Mc; ++m) _mm256_store_ps(accs[m], _mm256_setzero_ps());
    for (int64_t s0 = 0; s0 < nb; s0 += spb) {
      const int64_t s1 = std::min(nb, s0 + spb);
      int64_t m = 0;
      auto run = [&](auto mb_tag) {
        constexpr int MBt = decltype(mb_tag)::value;
        __m256 acc[MBt];
        for (int i = 0; i < MBt; ++i) acc[i] = _mm256_load_ps(accs[m + i]);
        tile<MBt, 1, true, RUNS>(nullptr, x16 + (mc + m) * K, K, nb, dx + (mc + m) * nb, wr, s0, s1,
                                 m || mc ? 0 : pft, acc);
        for (int i = 0; i < MBt; ++i) _mm256_store_ps(accs[m + i], acc[i]);
        m += MBt;
      };
      for (; m + 4 <= Mc;) run(std::integral_constant<int, 4>{});
      if (Mc - m == 3) run(std::integral_constant<int, 3>{});
      if (Mc - m == 2) run(std::integral_constant<int, 2>{});
      if (m < Mc) run(std::integral_constant<int, 1>{});
    }
    for (int64_t m = 0; m < Mc; ++m) put(_mm256_load_ps(accs[m]), mc + m);
    }
  }
}

// The entry for one range of weight rows (M <= 64, B in {32, 64, 128}).
inline void run(const int8_t* x8, const int16_t* x16, const float* dx, int64_t M, int64_t K, int64_t B,
                const int8_t* w, const float* scale, const float* bias, float* out, int64_t N, int64_t n0, int64_t n1,
                int64_t pf_m1, bool pf) {
  if (B == 128) range<4>(x8, x16, dx, M, K, w, scale, bias, out, N, n0, n1, pf_m1, pf);
  else if (B == 64) range<2>(x8, x16, dx, M, K, w, scale, bias, out, N, n0, n1, pf_m1, pf);
  else range<1>(x8, x16, dx, M, K, w, scale, bias, out, N, n0, n1, pf_m1, pf);
}

}  // namespace q8lanes
}  // namespace codeshell
