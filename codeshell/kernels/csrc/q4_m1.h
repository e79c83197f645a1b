// int4 x int8-activation batch-1 (M = 1) tile for CPUs without AMX (AVX512-VNNI, header-only):
// qdot.cpp's `avx512_vnni:q8` int4 at M = 1 with groups of 128 / 256, 16 weight rows a tile (up to
// kQ4M1R16Groups groups a row: K <= 4096 at G = 128 since session 19, any K computes the same bits).
//
// What this is: y[n] = x . W[n]^T for 16 consecutive weight rows (uint8 [N, K/2] nibbles, scale
// [N, K/G], optional offset [N, K/G]; x rounded to int8 per group, quantize_x perm = 128), giving
// every row tile_q4v's bits (the bits of every int4 M without AMX): per row j and group g the
// exact int32 sum (vpdpbusd lanes, lo nibbles and hi nibbles in two chains, added), then
// acc_j = fma(float(sum), sc[j, g] * dx[g], acc_j) in group order, r_j = reduce_add(acc_j), plus
// affine_const_v (16-group steps of fma(-8 sc (+ of), xs, e) from +0, reduce_add). The 16 rows'
// reductions run together through q4_rows.h's transposing tree (tree16_t: the same pairs of lanes
// as _mm512_reduce_add_ps), as q4_rows.h does for M = 2..16.
// Loop order: the 16 rows one after another, each row's K / 2 bytes front to back, so a tile is
// one contiguous range read in order (one stream), as tile_r16_q8 reads int8 rows; x (K bytes)
// stays in L1.
// Why: tile_q4v / tile_q4v12 finish every row on its own (a reduce_add and a call of
// affine_const_v a row, ~40 dependent instructions) and were compute bound at M = 1: warm
// (L3-resident, 1 thread, docs/kernels-log.md session 18 helper A) 4096 x 1024 read 26 GB/s, under the
// 41-43 GB/s one core streams from memory. q4_rows.h's 1 x 16 tile (the same bits) ran it at 49
// warm but 0.6x cold at K = 4096: it reads the 16 rows side by side, a group of each in turn (16
// streams K / 2 bytes apart). Here the per-row costs are shared by 16 rows and the read is one
// stream.
// What this is not: M >= 2 (q4_rows.h, tile_q4v12 / tile_q4v), groups of 32 / 64 (tile_q4v's
// per-run scale spread), the AMX CPUs' int4 (the shared epilogue of q8_epilogue.h, other bits).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "isa.h"
#include "q4_rows.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace q4m1 {

// The end of a 16-row tile (tile16 and q4_m1_g32.h's tile16_g): the rows' lane sums accs[16][16]
// reduced, plus each row's affine term (-8 sc (+ of)) . xs over its ng groups; out[0..15].
template <bool OFFS>
inline void finish16(const float (*accs)[16], const float* xs, const float* sc, const float* of, int64_t ng,
                     float* out) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_load_ps(accs[j]);
  // affine_const_v of each row, 16 rows at a time (q4_rows.h's tile: the same steps)
  __m512 e[16];
  for (int j = 0; j < 16; ++j) e[j] = _mm512_setzero_ps();
  const __m512 m8 = _mm512_set1_ps(-8.f);
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 km = ng - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ng - g)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(km, xs + g);
    for (int j = 0; j < 16; ++j) {
      __m512 c = _mm512_mul_ps(_mm512_maskz_loadu_ps(km, sc + j * ng + g), m8);
      if (OFFS) c = _mm512_add_ps(c, _mm512_maskz_loadu_ps(km, of + j * ng + g));
      e[j] = _mm512_fmadd_ps(c, xv, e[j]);
    }
  }
  alignas(64) float y[16];
  _mm512_store_ps(y, _mm512_add_ps(q4rows::tree16_t(acc), q4rows::tree16_t(e)));  // reduce_add(acc) + affine
  for (int j = 0; j < 16; ++j) out[j] = y[4 * (j % 4) + j / 4];  // tree16_t: lane 4k + t holds p = 4t + k
}

// 16 weight rows (q: row 0, stride K / 2; sc, of: row 0, stride ng) against one row of x (xq
// [K] permuted in runs of 128, dx / xs [ng]); G = 128 * RUNS, ng = K / G. out[0..15].
// pf: software prefetch distance in bytes ahead on the weight stream (0: none), hint T0.
template <int RUNS, bool OFFS>
inline void tile16(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                   const float* sc, const float* of, int64_t pf, float* out) {
  constexpr int64_t G = 128 * RUNS;
  const int64_t ng = K / G, ldq = K / 2;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  // One loop over the rows, not unrolled: the same load instructions stream every row (the
  // hardware's per-instruction stride prefetcher then sees one sequence of 64-byte steps through
  // the tile; 16 unrolled copies of the group loop ran cold at 0.4-0.9x tile_q4v at K = 4096).
  alignas(64) float accs[16][16];
#pragma GCC unroll 1
  for (int j = 0; j < 16; ++j) {
    const uint8_t* qj = q + j * ldq;
    const float* sj = sc + j * ng;
    __m512 a = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      for (int r = 0; r < RUNS; ++r) {
        const uint8_t* p = qj + (g * G + 128 * r) / 2;
        if (pf) _mm_prefetch(reinterpret_cast<const char*>(p) + pf, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(p);
        const int8_t* xr = xq + g * G + 128 * r;
        s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v, m0f), _mm512_loadu_si512(xr));
        s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f), _mm512_loadu_si512(xr + 64));
      }
      a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_set1_ps(sj[g] * dx[g]), a);
    }
    _mm512_store_ps(accs[j], a);
  }
  finish16<OFFS>(accs, xs, sc, of, ng, out);
}

}  // namespace q4m1
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
