// int4 x int8-activation batch-1 (M = 1) tile for groups of 32 / 64 on CPUs without AMX
// (AVX512-VNNI, header-only; session 22 helper D): the Q4_0 GGUF files' layers (llama.cpp's Q4_0
// blocks are 32 weights under one scale; codeshell/quant/gguf.py imports them as int4 g32 bit for
// bit), 16 weight rows a tile, q4_m1.h's loop order.
//
// What this is: y[n] = x . W[n]^T for 16 consecutive weight rows (uint8 [N, K/2] nibbles, scale
// [N, K/G], optional offset [N, K/G]; x rounded to int8 per group, quantize_x perm = 128), with
// tile_q4v's G < 128 bits (qdot_q4v.h): per 128-run of row j the exact int32 lane sums
// (vpdpbusd lo then hi from zero), acc_j = fma(float(sum), [sc[j, g..] * dx[g..]] spread over the
// run's lanes by gidx, acc_j) in run order, then reduce_add(acc_j) + affine_const_v, the 16 rows'
// reductions through q4_rows.h's transposing tree (tree16_t: the same pairs of lanes as
// _mm512_reduce_add_ps), as q4_m1.h's tile16 does for G >= 128. The products sc * dx are taken
// 16 groups at a time into a row table first (scale_products: the same fp32 products as
// tile_q4v's 4-wide _mm_mul_ps).
// Why: at G = 32 every int4 M = 1 row ran tile_q4v on its own: a reduce_add and a call of
// affine_const_v over K / 32 groups a row (128 at K = 4096, 512 at 16384), and the scale rows read
// beside the weights one row at a time; the Q4_0 file's layers took ~15 ms a 1.7B token where the
// g128 checkpoint's took ~11 (docs/kernels-log.md, session 21 helper A). Here the per-row costs are
// shared by 16 rows and the read is one stream (q4_m1.h's reasons).
// What this is not: G >= 128 (q4_m1.h), M > 1 (tile_q4v / q4_rows.h), the AMX CPUs' int4.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "isa.h"
#include "q4_m1.h"
#include "q4_rows.h"
#include "qdot_q4v.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace q4m1 {

// The most groups a row the tile takes (its row table of sc * dx on the stack): K <= 16384 at G = 32.
constexpr int64_t kG32MaxGroups = 512;

// 16 weight rows (q: row 0, stride K / 2; sc, of: row 0, stride ng) against one row of x (xq [K]
// permuted in runs of 128, dx / xs [ng]); G = 32 or 64, ng = K / G <= kG32MaxGroups. gidx: lane L
// -> the run's group (L / 4) * 32 / G (tile_q4v's). pf: prefetch distance in bytes on the weight
// stream (0: none). out[0..15].
template <bool OFFS>
inline void tile16_g(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                     const float* sc, const float* of, int64_t G, __m512i gidx, int64_t pf, float* out) {
  const int64_t ng = K / G, ldq = K / 2, per = 128 / G;  // per: groups a 128-run
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  alignas(64) float accs[16][16];
  alignas(64) float sd[kG32MaxGroups + 16];
#pragma GCC unroll 1
  for (int j = 0; j < 16; ++j) {
    const uint8_t* qj = q + j * ldq;
    codeshell::qdot::scale_products(sc + j * ng, dx, ng, sd);
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0, g = 0; k < K; k += 128, g += per) {
      const uint8_t* p = qj + k / 2;
      if (pf) _mm_prefetch(reinterpret_cast<const char*>(p) + pf, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(p);
      const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
      const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq + k)),
                                            hi, _mm512_loadu_si512(xq + k + 64));
      // lanes past the run's groups are never indexed by gidx (sd has 16 spare floats)
      const __m512 sv = _mm512_permutexvar_ps(gidx, _mm512_castps128_ps512(_mm_loadu_ps(sd + g)));
      a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sv, a);
    }
    _mm512_store_ps(accs[j], a);
  }
  finish16<OFFS>(accs, xs, sc, of, ng, out);
}

}  // namespace q4m1
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
