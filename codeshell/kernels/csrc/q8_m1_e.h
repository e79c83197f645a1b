// int8 M = 1 on the shared epilogue's bits (q8_epilogue.h) for rows of NB = K / 128 blocks known at
// compile time, all in one span (NB <= 16: K <= 2048; codeshell-mini's K = 256 linears and its
// 16384 x 256 head, K = 1024), header-only. Session 28, helper C.
//
// What this is: qdot_int8.cpp's tile_r16_q8 at M = 1 (16 weight rows a tile, each row's K bytes front
// to back, a block's vpdpbusd lane sums stored at lb[b][row], then per block the 16 rows' lane vectors
// reduced together: lane = weight row), the same bits, with q4_m1_e.h's cuts: a block's two vpdpbusd
// in one chain (exact int32 sums: any order gives the same lanes) instead of two and an add; acc in
// registers, one per block (each of the NB present tree16 slots sees one epi_step from +0); tree16 over
// the present slots only (q4m1e::tree_prefix: the left-out adds were of +0, exact).
// Why: at K = 256 (2 blocks) tile_r16_q8 spends 16 acc stores, tree16_v's 16 loads and 15 adds and a
// tile's 32 adds beside its 64 vpdpbusd; the mini's head (16384 x 256, 4 MiB, L3-resident) is ~40% of
// its int4 / int8 token.
// What this is not: K past 2048 (two spans: tile_r16_q8 / tile_v), M = 2 (tile_r16_q8<2>).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "isa.h"
#include "q4_m1_e.h"
#include "q8_epilogue.h"
#include "qdot.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace q8m1e {

// 16 weight rows (w: row 0, stride K = 128 NB; R <= 16 of them) against one row of x (xq [K] in
// blocks of 128, dx [NB], sx [NB] its integer block sums). out[0..R): the raw tree16 results
// (finish_cols applies scale and bias), as tile_r16_q8<1>. U: the lane sums reduced by q8_epilogue.h's
// reduce_lanes16_unpack (session 41), else reduce_lanes<16> (the same bits).
template <int NB, bool U = true>
inline void tile(const int8_t* xq, const float* dx, const int32_t* sx, const uint8_t* w, int64_t R, float* out,
                 const codeshell::qdot::Pf& pf) {
  namespace E = codeshell::q8epi;
  static_assert(NB >= 1 && NB <= 16, "one span of blocks");
  constexpr int64_t K = 128 * NB;
  const __m512i s80 = _mm512_set1_epi8(int8_t(0x80));
  alignas(64) int32_t lb[NB][16][16];  // [block][weight row][lane]
  if (R < 16)
    for (int c = 0; c < NB; ++c)
      for (int64_t r = R; r < 16; ++r) _mm512_store_si512(lb[c][r], _mm512_setzero_si512());
#pragma GCC unroll 1
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* wr = w + r * K;
#pragma GCC unroll 16
    for (int c = 0; c < NB; ++c) {
      const uint8_t* p = wr + c * 128;
      if (pf.d) {
        codeshell::qdot::pf_line(p, pf);
        codeshell::qdot::pf_line(p + 64, pf);
      }
      const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(p), s80);
      const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(p + 64), s80);
      const int8_t* xi = xq + c * 128;
      const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xi)),
                                            w1, _mm512_loadu_si512(xi + 64));
      _mm512_store_si512(lb[c][r], s);
    }
  }
  __m512 acc[NB];
  for (int c = 0; c < NB; ++c) {
    const __m512i T = _mm512_sub_epi32(E::reduce16<U>(lb[c]), _mm512_set1_epi32(sx[c] << 7));
    acc[c] = E::epi_step(_mm512_setzero_ps(), T, _mm512_set1_ps(dx[c]));
  }
  const __mmask16 km = R >= 16 ? __mmask16(0xffff) : __mmask16((1u << R) - 1);
  _mm512_mask_storeu_ps(out, km, codeshell::q4m1e::tree_prefix<NB>(acc));
}

// Weight rows [n0, n1) (n0 % 16 == 0) of int8 [N, K] at M = 1 when K / 128 is 1, 2, 4, 8 or 16; false
// (nothing done) otherwise. unpack: tile's U (the same bits either way).
inline bool run(const int8_t* xq, const float* dx, const int32_t* sx, int64_t K, const uint8_t* w, float* out,
                int64_t n0, int64_t n1, const codeshell::qdot::Pf& pf, bool unpack = true) {
  auto go = [&](auto nbc) {
    constexpr int NB = decltype(nbc)::value;
    for (int64_t n = n0; n < n1; n += 16) {
      if (unpack) tile<NB, true>(xq, dx, sx, w + n * K, std::min<int64_t>(16, n1 - n), out + n, pf);
      else tile<NB, false>(xq, dx, sx, w + n * K, std::min<int64_t>(16, n1 - n), out + n, pf);
    }
    return true;
  };
  if (K % 128) return false;
  switch (K / 128) {
    case 1: return go(std::integral_constant<int, 1>{});
    case 2: return go(std::integral_constant<int, 2>{});
    case 4: return go(std::integral_constant<int, 4>{});
    case 8: return go(std::integral_constant<int, 8>{});
    case 16: return go(std::integral_constant<int, 16>{});
    default: return false;
  }
}

}  // namespace q8m1e
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
