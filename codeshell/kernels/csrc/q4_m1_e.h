// int4 M = 1 on the shared epilogue's bits (q8_epilogue.h) for rows of NG = K / G groups known at
// compile time, all in one span (NG <= 16: K <= 2048 at G = 128; codeshell-mini's K = 256 / 1024, the
// small shape's K = 1024), header-only. Session 28, helper C.
//
// What this is: qdot_int4.cpp's tile_r16_q4e (16 weight rows a tile, each row's nibbles front to
// back, a group's vpdpbusd lane sums stored at lb[g][row], then per group the 16 rows' lane vectors
// reduced together: lane = weight row), the same bits, with the costs that do not scale with K cut
// for short rows:
//  * the lane sums of a group in one chain (lo then hi nibbles into one accumulator) instead of two
//    chains and an add: exact int32 sums, so any order gives the same lanes;
//  * the 16 rows' scales (and offsets) as NG column vectors straight from the contiguous [16, NG]
//    block (NG = 2: two loads, two vpermt2ps), not 16 row loads and a 16 x 16 transpose (64 shuffles)
//    a tile; NG > 2 keeps the loads + transpose;
//  * acc in registers, one per group (NG of the 16 slots; each slot sees one epi_step from +0), and
//    tree16 over the NG present slots only: q8_epilogue.h's tree16 adds a slot with no group (+0) to
//    a present value; x + (+0) == x for every x but -0, and an acc slot is never -0 (it starts at +0,
//    q8_epilogue.h), so leaving those adds out gives the same bits (tree_prefix below).
// Why: at K = 256 (2 groups) a 16-row tile does 64 vpdpbusd, and the former tile added ~200 vector
// instructions besides (16 acc stores + tree16_v's 16 loads / 15 adds, cols16's 16 loads + 64
// shuffles, two chains' adds): the mini's int4 linears at M = 1 ran ~0.15 us a tile warm (1 thread),
// i.e. compute bound with the weights in L2 / L3 (docs/kernels-log.md, session 28 helper C).
// What this is not: K past 2048 (two spans: tile_r16_q4e), M >= 2, groups of 32 / 64, the per-lane
// family (qdot_q4v.h, q4_m1.h: CPUs that take tile_q4v's bits).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "isa.h"
#include "q8_epilogue.h"
#include "qdot.h"
#include "simd512.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace q4m1e {

// Columns of a row-major [16, NG] fp32 block (rows past R read as 0): t[c] lane r = v[r * NG + c].
template <int NG>
inline void columns(const float* v, int64_t R, __m512 (&t)[NG]) {
  if constexpr (NG == 2) {
    const int64_t n = 2 * R;  // floats of the block that exist
    const __mmask16 k0 = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
    const __mmask16 k1 = n >= 32 ? __mmask16(0xffff) : n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(k0, v), b = _mm512_maskz_loadu_ps(k1, v + 16);
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    t[0] = _mm512_permutex2var_ps(a, ev, b);
    t[1] = _mm512_permutex2var_ps(a, od, b);
  } else {
    const __mmask16 kc = NG >= 16 ? __mmask16(0xffff) : __mmask16((1u << NG) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < R ? _mm512_maskz_loadu_epi32(kc, v + i * NG) : _mm512_setzero_si512();
    codeshell::transpose16(r);
    for (int c = 0; c < NG; ++c) t[c] = _mm512_castsi512_ps(r[c]);
  }
}

// q8_epilogue.h's tree16 (a_i = s_i + s_(i+8), b_i = a_i + a_(i+4), c_i = b_i + b_(i+2), r = c_0 + c_1)
// of 16 slots of which s_0..s_(NG-1) are given and the rest +0: an add whose other term is a missing
// (+0) slot is left out (x + 0 == x, the slots never -0). The present terms stay a prefix at every level.
template <int NG>
inline __m512 tree_prefix(__m512 (&s)[NG]) {
  __m512 a[8];
  constexpr int p1 = NG < 8 ? NG : 8;
  for (int i = 0; i < p1; ++i) a[i] = i + 8 < NG ? _mm512_add_ps(s[i], s[i + 8]) : s[i];
  constexpr int p2 = p1 < 4 ? p1 : 4;
  for (int i = 0; i < p2; ++i)
    if (i + 4 < p1) a[i] = _mm512_add_ps(a[i], a[i + 4]);
  constexpr int p3 = p2 < 2 ? p2 : 2;
  for (int i = 0; i < p3; ++i)
    if (i + 2 < p2) a[i] = _mm512_add_ps(a[i], a[i + 2]);
  return p3 > 1 ? _mm512_add_ps(a[0], a[1]) : a[0];
}

// 16 weight rows (w: row 0, stride K / 2; R <= 16 of them; sc, of: row 0, stride NG) against one
// row of x (xq [K] permuted in runs of 128, dx / xs [NG], sx [NG] its integer block sums); K = NG * G,
// G = 128 * RUNS. out[0..R): the raw tree16 results (finish_cols applies the bias), as tile_r16_q4e.
// U: the lane sums reduced by q8_epilogue.h's reduce_lanes16_unpack (session 41), else reduce_lanes<16>.
template <bool OFFS, int RUNS, int NG, bool U = true>
inline void tile(const int8_t* xq, const float* dx, const int32_t* sx, const float* xs, const uint8_t* w, int64_t R,
                 const float* sc, const float* of, float* out, const codeshell::qdot::Pf& pf) {
  namespace E = codeshell::q8epi;
  static_assert(NG >= 1 && NG <= 16, "one span of groups");
  constexpr int64_t G = 128 * RUNS, ldq = NG * G / 2;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  alignas(64) int32_t lb[NG][16][16];  // [group][weight row][lane]
  if (R < 16)  // rows past R: zero lane sums (reduced with the others, never stored)
    for (int c = 0; c < NG; ++c)
      for (int64_t r = R; r < 16; ++r) _mm512_store_si512(lb[c][r], _mm512_setzero_si512());
  __m512 st[NG], ot[OFFS ? NG : 1];
  columns<NG>(sc, R, st);  // before the nibbles: the scale block is not in the weight stream
  if constexpr (OFFS) columns<NG>(of, R, ot);
#pragma GCC unroll 1
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* wr = w + r * ldq;
#pragma GCC unroll 16
    for (int c = 0; c < NG; ++c) {
      __m512i s = _mm512_setzero_si512();
#pragma GCC unroll 2
      for (int u = 0; u < RUNS; ++u) {
        const uint8_t* p = wr + c * (G / 2) + 64 * u;
        if (pf.d) codeshell::qdot::pf_line(p, pf);
        const __m512i q = _mm512_loadu_si512(p);
        const int8_t* xi = xq + c * G + 128 * u;
        s = _mm512_dpbusd_epi32(s, _mm512_and_si512(q, m0f), _mm512_loadu_si512(xi));
        s = _mm512_dpbusd_epi32(s, _mm512_and_si512(_mm512_srli_epi16(q, 4), m0f), _mm512_loadu_si512(xi + 64));
      }
      _mm512_store_si512(lb[c][r], s);
    }
  }
  __m512 acc[NG];
  for (int c = 0; c < NG; ++c) {
    const __m512i T = _mm512_sub_epi32(E::reduce16<U>(lb[c]), _mm512_set1_epi32(sx[c] << 3));
    __m512 v = E::epi_step(_mm512_setzero_ps(), T, E::int4_mul(st[c], _mm512_set1_ps(dx[c])));
    if constexpr (OFFS) v = E::epi_offsets(v, ot[c], _mm512_set1_ps(xs[c]));
    acc[c] = v;
  }
  const __mmask16 km = R >= 16 ? __mmask16(0xffff) : __mmask16((1u << R) - 1);
  _mm512_mask_storeu_ps(out, km, tree_prefix<NG>(acc));
}

// Weight rows [n0, n1) (n0 % 16 == 0) of int4 [N, K] at M = 1 in 16-row tiles when K / G is one of
// the NG this header is compiled for (2, 4, 8, 16) and G is 128 / 256; false (nothing done) otherwise.
// unpack: tile's U (the lane sums' reduction; the same bits either way).
template <bool OFFS>
inline bool run(const int8_t* xq, const float* dx, const int32_t* sx, const float* xs, int64_t K, int64_t G,
                const uint8_t* q, const float* sc, const float* of, float* out, int64_t n0, int64_t n1,
                const codeshell::qdot::Pf& pf, bool unpack = true) {
  const int64_t ng = K / G;
  auto go = [&](auto runs, auto ngc) {
    constexpr int RU = decltype(runs)::value, NG = decltype(ngc)::value;
    for (int64_t n = n0; n < n1; n += 16) {
      const int64_t R = std::min<int64_t>(16, n1 - n);
      if (unpack)
        tile<OFFS, RU, NG, true>(xq, dx, sx, xs, q + n * (K / 2), R, sc + n * NG, OFFS ? of + n * NG : nullptr,
                                 out + n, pf);
      else
        tile<OFFS, RU, NG, false>(xq, dx, sx, xs, q + n * (K / 2), R, sc + n * NG, OFFS ? of + n * NG : nullptr,
                                  out + n, pf);
    }
    return true;
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  if (G == 128) {
    switch (ng) {
      case 2: return go(I1{}, std::integral_constant<int, 2>{});
      case 4: return go(I1{}, std::integral_constant<int, 4>{});
      case 8: return go(I1{}, std::integral_constant<int, 8>{});
      case 16: return go(I1{}, std::integral_constant<int, 16>{});
      default: return false;
    }
  }
  if (G == 256) {
    switch (ng) {
      case 1: return go(I2{}, std::integral_constant<int, 1>{});
      case 2: return go(I2{}, std::integral_constant<int, 2>{});
      case 4: return go(I2{}, std::integral_constant<int, 4>{});
      case 8: return go(I2{}, std::integral_constant<int, 8>{});
      default: return false;
    }
  }
  return false;
}

}  // namespace q4m1e
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
