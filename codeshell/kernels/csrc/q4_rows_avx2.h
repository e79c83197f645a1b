// int4 weights (groups of 64 / 128 / 256) x int8-rounded x at every M (1..64 and the avx2:q8 prefill) on the
// AVX2 level (`avx2:q8`, qdot_int4.cpp int4_q8): eight weight rows a tile with the rows in the vector lanes.
//
// What this is: for a tile of 8 weight rows (contiguous in the [N, K/2] nibbles) and MB rows of x, the integer
// dot of every (row of x, weight row, group) by vpmaddubsw(nibbles, xq) + vpaddw in int16 lanes (a lane sums 8
// products of a group of 128: |sum| <= 16 * 15 * 127 = 30480 at G = 256, no overflow) and one vpmaddwd(ones)
// to int32, stored per weight row; then the 8 weight rows' int32 vectors are reduced into one vector whose lane
// r is weight row r's exact group sum S (reduce8: unpack / add, 21 ops per 8 sums), and the group's fp32 step
// runs once per 8 outputs:
//     T = S - 8 * sum(xq of the group)                     (exact: the nibbles' -8 in integers)
//     acc = fma(float(T), scale[row, g] * dx[g], acc)      (groups in order)
//     acc = fma(offset[row, g], xs[g], acc)                (asymmetric groups only)
// and acc is the output (bias added after, as before). Every (row of x, weight row) gets those operations in
// that order whatever M, the tile of x it sits in or its lane: each row of the result has the M = 1 bits (row
// invariance; tests/kernels/test_q4_rows_avx2.py checks M = 1..64 bitwise against the rows alone).
// Why (docs/kernels-log.md, session 31 helper A): the tile it replaces (qdot_int4.cpp tile_q4, one weight row and
// a runtime group size a loop) spent per (row of x, weight row, group) a vpmaddwd, a convert, a scalar
// scale * dx product and broadcast and an fma, plus a horizontal sum and a non-inlined affine_const per
// output, and ~2x the vector instructions in loop and index overhead: at M = 1 it ran ~2x below what the
// vector ops allow on one core, compute bound at 6-12 GB/s. Here the group size is a template parameter (the
// group's runs unrolled), the fp32 step and the scales' transposition are shared by 8 outputs, and the
// nibbles' constant term is an integer subtraction instead of affine_const.
// Also here: x's rounding for it (round_x: quantize_x's integers, dx and xs, vectorised, in the perm-64 order
// the tiles read, plus the groups' integer sums), which quantize_rows ran scalar on the AVX2 level.
// What this is not: groups of 32 (they keep tile_q4: two groups a 32-byte load), the 512-bit kernels
// (q4_rows.h, q4_m1*.h, qdot_q4v.h), int8 weights (q8_rows_avx2.h).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace codeshell {
namespace q4avx2 {

// Most groups a row the tiles take (their transposed scales live on the stack: 8 KiB each): K <= 32768 at
// G = 128. Past it the caller keeps tile_q4.
constexpr int64_t kMaxGroups = 256;

// M = 1's prefetch, bits of range()'s pfmode (session 35 helper C, docs/kernels-log.md; the same bits whichever):
// kPfSeq: tile2 prefetches the tile ahead in ascending address order (one line a 64 loaded bytes, the k-th
// prefetch of a tile taking the k-th line of the tile ahead) rather than each line at its own (row, group)
// place, the order tile2 loads: eight lines 512 bytes apart a group at K = 1024; kPfScales: the scales (and
// offsets) of the tile pf_m1 bytes ahead too, a line at a time. qdot_int4.cpp reads the mode
// (CODESHELL_Q4_AVX2_M1_PFMODE; 0: session 32's same-place prefetch without the scales).
constexpr int kPfSeq = 1, kPfScales = 2;
// M = 1: tile2 for rows up to kTile2MaxK (range()'s t2k; qdot_int4.cpp's CODESHELL_Q4_AVX2_M1_T2K), longer
// rows on the session-31 tile. 1024 in session 32 (tile2's 8 row streams 2 KiB apart at K = 4096 ran 0.88x the
// old tile's one stream with the same-place prefetch); 4096 since session 35 (with the ascending prefetch, cold,
// 2 threads: the small shape's mlp.c_proj 70 us a call against the old tile's 82-89, the plain read's 70-72).
constexpr int64_t kTile2MaxK = 4096;

// x fp32 [M, K] -> xq int8 [M, K] in the perm-64 order (within each run of 64: x0..15 x32..47 | x16..31
// x48..63, the order of a 32-byte load's low / high nibbles), dx, xs fp32 [M, K/G] and s8 int32 [M, K/G]
// (8 * the group's integer sum). The same integers, dx and xs as qdot.cpp's quantize_x(perm = 64): amax by
// max (order-free; a NaN is skipped as std::max(amax, |x|) skips it), dx = amax / 127, x * (127 / amax)
// rounded by cvtps (the default round-half-even: nearbyint's), int8 by truncation (the scalar int8_t(v)),
// the sum in int32, xs = dx * float(sum). G % 64 == 0.
inline void round_x(const float* x, int64_t M, int64_t K, int64_t G, int8_t* xq, float* dx, float* xs, int32_t* s8) {
  const int64_t ng = K / G;
  const __m256i lowb = _mm256_set1_epi32(0xff);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      const float* r = x + m * K + g * G;
      const float amax = absmax8(r, G);
      const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      const __m256 idv = _mm256_set1_ps(id);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t k = 0; k < G; k += 64) {
        __m256i q[8];
        for (int j = 0; j < 8; ++j) {
          q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + k + 8 * j), idv));
          sum = _mm256_add_epi32(sum, q[j]);
          q[j] = _mm256_and_si256(q[j], lowb);
        }
        // 16 values in order as int16: packus gives [a0-3 b0-3 | a4-7 b4-7]; 0xD8 puts the quarters in order
        auto w16 = [](__m256i a, __m256i b) { return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8); };
        auto b8 = [](__m256i a, __m256i b) { return _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0xD8); };
        const __m256i x0 = w16(q[0], q[1]), x1 = w16(q[2], q[3]), x2 = w16(q[4], q[5]), x3 = w16(q[6], q[7]);
        int8_t* o = xq + m * K + g * G + k;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), b8(x0, x2));       // x0..15, x32..47
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32), b8(x1, x3));  // x16..31, x48..63
      }
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
      const int32_t si = _mm_cvtsi128_si32(s);
      dx[m * ng + g] = d;
      xs[m * ng + g] = d * float(si);
      s8[m * ng + g] = int32_t(uint32_t(si) * 8u);
    }
}

// 8 vectors of 8 int32 (weight row r's at p + 8 r) -> one vector, lane r = the sum of row r's 8 lanes.
inline __m256i reduce8(const int32_t* p) {
  auto L = [p](int r) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 8 * r)); };
  auto pair = [](__m256i a, __m256i b) { return _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b)); };
  auto quad = [](__m256i a, __m256i b) { return _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b)); };
  const __m256i u0 = quad(pair(L(0), L(1)), pair(L(2), L(3)));  // [r0..r3 lanes 0-3 | r0..r3 lanes 4-7]
  const __m256i u1 = quad(pair(L(4), L(5)), pair(L(6), L(7)));
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

// st[g][r] = s[row r of the tile][g] for the ng groups (rows past R repeat row R - 1).
inline void cols8(const float* s, int64_t ng, int R, float (*st)[8]) {
  const float* rp[8];
  for (int r = 0; r < 8; ++r) rp[r] = s + std::min(r, R - 1) * ng;
  int64_t g = 0;
  for (; g + 8 <= ng; g += 8) {
    __m256 v[8], t[8];
    for (int r = 0; r < 8; ++r) v[r] = _mm256_loadu_ps(rp[r] + g);
    for (int r = 0; r < 8; r += 2) {
      t[r] = _mm256_unpacklo_ps(v[r], v[r + 1]);
      t[r + 1] = _mm256_unpackhi_ps(v[r], v[r + 1]);
    }
    for (int r = 0; r < 8; r += 4) {
      v[r] = _mm256_shuffle_ps(t[r], t[r + 2], 0x44);
      v[r + 1] = _mm256_shuffle_ps(t[r], t[r + 2], 0xee);
      v[r + 2] = _mm256_shuffle_ps(t[r + 1], t[r + 3], 0x44);
      v[r + 3] = _mm256_shuffle_ps(t[r + 1], t[r + 3], 0xee);
    }
    for (int c = 0; c < 4; ++c) {
      _mm256_store_ps(st[g + c], _mm256_permute2f128_ps(v[c], v[c + 4], 0x20));
      _mm256_store_ps(st[g + 4 + c], _mm256_permute2f128_ps(v[c], v[c + 4], 0x31));
    }
  }
  for (; g < ng; ++g)
    for (int r = 0; r < 8; ++r) st[g][r] = rp[r][g];
}

// One tile: MB rows of x (xq rows K apart, dx / xs / s8 rows ng apart) times 8 weight rows from w (rows ldq
// bytes apart; the caller's tail tile repeats its last row), groups of G = 64 * RUNS, the scales / offsets
// transposed (st / ot [ng][8]); acc[i] lane r = the output (row i of x, weight row r). SPAN groups of a
// weight row are summed before the next row (one sequential stream for M = 1: the tile's rows are
// contiguous); pf: bytes ahead to prefetch (0: none). SEQ (SPAN = 1 only, M > 1; session 35 helper C, part 2):
// the tile pf bytes ahead is prefetched in ascending address order, as tile2i's SEQ (the k-th prefetch of the
// tile takes the k-th line of the tile ahead) rather than each line at its own (row, group) place, which with
// SPAN = 1 is eight lines ldq bytes apart a group: the same bits (prefetches only).
template <int MB, int RUNS, int SPAN, bool OFFS, bool SEQ = false>
inline void tile(const int8_t* xq, int64_t K, int64_t ng, const float* dx, const float* xs, const int32_t* s8,
                 const uint8_t* const* wr, const float (*st)[8], const float (*ot)[8], int64_t pf, __m256* acc) {
  constexpr int64_t G = 64 * RUNS;
  const __m256i m0f = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  static_assert(!SEQ || SPAN == 1, "the ascending prefetch follows SPAN = 1's load order");
  alignas(32) int32_t lb[MB][SPAN][8][8];
  for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps();
  const char* pfb = reinterpret_cast<const char*>(wr[0]) + pf;  // SEQ: the tile pf bytes ahead, from its start
  for (int64_t g0 = 0; g0 < ng; g0 += SPAN) {
    const int cnt = int(std::min<int64_t>(SPAN, ng - g0));
    for (int r = 0; r < 8; ++r) {
      const uint8_t* w = wr[r] + g0 * (G / 2);
      const int8_t* x = xq + g0 * G;
      for (int c = 0; c < cnt; ++c) {
        __m256i a[MB];
        for (int u = 0; u < RUNS; ++u) {
          const uint8_t* p = w + c * (G / 2) + 32 * u;
          if (!SEQ && pf && (u % 2 == 0)) _mm_prefetch(reinterpret_cast<const char*>(p) + pf, _MM_HINT_T0);
          // SEQ: this (group, row, run)'s 32 bytes' place in the tile's loads (8 * g0 + r rows of 32 * RUNS
          // bytes) names the line of the tile ahead it prefetches, a line each 64 bytes
          if (SEQ && pf && ((r * RUNS + u) % 2 == 0))
            _mm_prefetch(pfb + ((8 * g0 + r) * RUNS + u) * 32, _MM_HINT_T0);
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          const __m256i lo = _mm256_and_si256(v, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
          for (int i = 0; i < MB; ++i) {
            const int8_t* xi = x + i * K + c * G + 64 * u;
            const __m256i s = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi))),
                _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi + 32))));
            a[i] = u == 0 ? s : _mm256_add_epi16(a[i], s);
          }
        }
        for (int i = 0; i < MB; ++i)
          _mm256_store_si256(reinterpret_cast<__m256i*>(lb[i][c][r]), _mm256_madd_epi16(a[i], ones));
      }
    }
    for (int c = 0; c < cnt; ++c) {
      const int64_t g = g0 + c;
      const __m256 sv = _mm256_load_ps(st[g]);
      for (int i = 0; i < MB; ++i) {
        const __m256i T = _mm256_sub_epi32(reduce8(lb[i][c][0]), _mm256_set1_epi32(s8[i * ng + g]));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(T), _mm256_mul_ps(sv, _mm256_set1_ps(dx[i * ng + g])), acc[i]);
        if (OFFS) acc[i] = _mm256_fmadd_ps(_mm256_load_ps(ot[g]), _mm256_set1_ps(xs[i * ng + g]), acc[i]);
      }
    }
  }
}

// Session 32 (helper C): the same integers and fp32 steps with fewer vector ops a (weight row, group). The
// 8 weight rows' int16 sums are reduced in registers a pair of rows at a time instead of one vpmaddwd, a store
// and a reload per (row of x, weight row, group) then reduce8: for groups of 64 / 128 two rows' int16 vectors
// are interleaved by 32-bit pairs and added in int16 (a lane then sums 2 * 8 products: |lane| <= 2 * 15240 =
// 30480 at G = 128, exact), one vpmaddwd(ones) for the two rows, giving int32 [r0 r1 r0 r1 | r0 r1 r0 r1];
// groups of 256 (|lane| <= 30480 already) take one vpmaddwd a row and the same interleave in int32. Then
// [r0..r3 | r0..r3] by 64-bit interleaves, and the halves added: lane r = row r's exact group sum S, as
// reduce8 gives it, so the fp32 step and every output bit are the session-31 tile's. Per 8 (weight row,
// group) pairs of a row of x: 4 vpmaddwd + 12 + 9 reduction ops (G <= 128) against 8 vpmaddwd + 8 stores +
// 8 loads + 21. At M = 1 the tile runs group by group over its 8 rows (x's group stays in registers) and
// prefetches each line the same (row, group) place of the tile pf_tiles tiles ahead. Counted in
// docs/kernels-log.md, session 32 helper C.
template <int RUNS>
inline __m256i pair_rows(__m256i a, __m256i b, __m256i ones) {
  if constexpr (RUNS <= 2) {
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b)), ones);
  } else {
    const __m256i c = _mm256_madd_epi16(a, ones), d = _mm256_madd_epi16(b, ones);
    return _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
  }
}

// Two pair vectors [r r+1 r r+1 | ...] (r, r + 2) -> [r..r+3 | r..r+3]; then rows 0-3 and 4-7 -> lane r = row r's
// sum.
inline __m256i quad_rows(__m256i a, __m256i b) {
  return _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
}
inline __m256i halves_rows(__m256i u0, __m256i u1) {
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

// The session-32 tile: as tile with SPAN = 1 and the pairwise reduction above; pf: bytes ahead to prefetch each
// nibble line (0: none; a template flag inside, so the row loop carries no test), SEQ: in ascending order
// (kPfSeq). range() takes it for M = 1 at K <= t2k only (MB = 1; MB > 1 is correct, the same bits, but measured
// slower: range's comment).
template <int MB, int RUNS, bool OFFS, bool PF, bool SEQ>
inline void tile2i(const int8_t* xq, int64_t K, int64_t ng, const float* dx, const float* xs, const int32_t* s8,
                  const uint8_t* const* wr, const float (*st)[8], const float (*ot)[8], int64_t pf, __m256* acc) {
  constexpr int64_t G = 64 * RUNS;
  const __m256i m0f = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps();
  const char* pfb = reinterpret_cast<const char*>(wr[0]) + pf;  // SEQ: the tile pf bytes ahead, from its start
  for (int64_t g = 0; g < ng; ++g) {
    const int8_t* x = xq + g * G;
    __m256i pr[MB][4];
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) {
      __m256i a[MB][2];
#pragma GCC unroll 2
      for (int e = 0; e < 2; ++e) {
        const uint8_t* w = wr[2 * h + e] + g * (G / 2);
#pragma GCC unroll 4
        for (int u = 0; u < RUNS; ++u) {
          const uint8_t* p = w + 32 * u;
          const int r = 2 * h + e;
          if (PF && !SEQ && (u % 2 == 0)) _mm_prefetch(reinterpret_cast<const char*>(p) + pf, _MM_HINT_T0);
          // SEQ: this (group, row, run)'s 32 bytes' place in the tile's loads, 8 * g + r rows of 32 * RUNS bytes,
          // names the line of the tile ahead it prefetches (a line each 64 bytes): the tile ahead is prefetched
          // in ascending order (session 35 helper C)
          if (PF && SEQ && ((r * RUNS + u) % 2 == 0))
            _mm_prefetch(pfb + ((8 * g + r) * RUNS + u) * 32, _MM_HINT_T0);
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          const __m256i lo = _mm256_and_si256(v, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
#pragma GCC unroll 4
          for (int i = 0; i < MB; ++i) {
            const int8_t* xi = x + i * K + 64 * u;
            const __m256i s = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi))),
                _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi + 32))));
            a[i][e] = u == 0 ? s : _mm256_add_epi16(a[i][e], s);
          }
        }
      }
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) pr[i][h] = pair_rows<RUNS>(a[i][0], a[i][1], ones);
    }
    const __m256 sv = _mm256_load_ps(st[g]);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const __m256i S = halves_rows(quad_rows(pr[i][0], pr[i][1]), quad_rows(pr[i][2], pr[i][3]));
      const __m256i T = _mm256_sub_epi32(S, _mm256_set1_epi32(s8[i * ng + g]));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(T), _mm256_mul_ps(sv, _mm256_set1_ps(dx[i * ng + g])), acc[i]);
      if (OFFS) acc[i] = _mm256_fmadd_ps(_mm256_load_ps(ot[g]), _mm256_set1_ps(xs[i * ng + g]), acc[i]);
    }
  }
}

template <int MB, int RUNS, bool OFFS>
inline void tile2(const int8_t* xq, int64_t K, int64_t ng, const float* dx, const float* xs, const int32_t* s8,
                  const uint8_t* const* wr, const float (*st)[8], const float (*ot)[8], int64_t pf, bool seq,
                  __m256* acc) {
  if (pf && seq) tile2i<MB, RUNS, OFFS, true, true>(xq, K, ng, dx, xs, s8, wr, st, ot, pf, acc);
  else if (pf) tile2i<MB, RUNS, OFFS, true, false>(xq, K, ng, dx, xs, s8, wr, st, ot, pf, acc);
  else tile2i<MB, RUNS, OFFS, false, false>(xq, K, ng, dx, xs, s8, wr, st, ot, 0, acc);
}

// M > 1: the tiles of up to 4 rows of x over one tile of 8 weight rows, the first prefetching pft bytes ahead
// (SEQ: in ascending order, range's pfmode kPfSeq), the later ones finding the tile's nibbles in L1.
template <int RUNS, bool OFFS, bool SEQ, class Put>
inline void rest(const int8_t* xq, const float* dx, const float* xs, const int32_t* s8, int64_t M, int64_t K,
                 int64_t ng, const uint8_t* const* wr, const float (*st)[8], const float (*ot)[8], int64_t pft,
                 Put& put) {
  __m256 acc[4];
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    tile<4, RUNS, 1, OFFS, SEQ>(xq + m * K, K, ng, dx + m * ng, xs + m * ng, s8 + m * ng, wr, st, ot, m ? 0 : pft, acc);
    put(acc, 4, m);
  }
  const int64_t pr = m ? 0 : pft;
  switch (M - m) {
    case 3:
      tile<3, RUNS, 1, OFFS, SEQ>(xq + m * K, K, ng, dx + m * ng, xs + m * ng, s8 + m * ng, wr, st, ot, pr, acc);
      put(acc, 3, m);
      break;
    case 2:
      tile<2, RUNS, 1, OFFS, SEQ>(xq + m * K, K, ng, dx + m * ng, xs + m * ng, s8 + m * ng, wr, st, ot, pr, acc);
      put(acc, 2, m);
      break;
    case 1:
      tile<1, RUNS, 1, OFFS, SEQ>(xq + m * K, K, ng, dx + m * ng, xs + m * ng, s8 + m * ng, wr, st, ot, pr, acc);
      put(acc, 1, m);
      break;
    default: break;
  }
}

// Weight rows [n0, n1) for all M rows of x into out [M, N] (no bias): tiles of 8 weight rows, each with its
// scales transposed once and then every tile of up to 4 rows of x (M = 1: spans of 32 groups a weight row,
// prefetching pf_m1 bytes ahead; M > 1: a group at a time for the 8 rows, the first tile of x prefetching the
// tile(s) ahead where pf != 0, the later ones finding the tile's nibbles in L1). V2: tile2 for M = 1 at K <= t2k
// (kTile2MaxK; group by group, the tile whole tiles ahead prefetched, the tiles nearest pf_m1 bytes and at
// least one: in ascending order under pfmode's kPfSeq, else each line at its own place; the scales of the tile
// pf_m1 bytes ahead under kPfScales); longer rows and every M > 1 keep the session-31 tiles, measured faster
// there (docs/kernels-log.md, session 32 helper C: at M = 2 tile2<2> ran 0.87-0.95x; at M = 8 tile2<4> keeps
// 4 * 4 pair vectors live, which the compiler spilled: 0.83x; session 35 helper C for K = 4096). !V2: the
// session-31 tiles everywhere (CODESHELL_Q4_AVX2_V2=0; the same bits).
template <int RUNS, bool OFFS, bool V2>
void range(const int8_t* xq, const float* dx, const float* xs, const int32_t* s8, int64_t M, int64_t K,
           const uint8_t* q, const float* sc, const float* of, float* out, int64_t N, int64_t n0, int64_t n1,
           int64_t pf_m1, int64_t pf, int pfmode, int64_t t2k) {
  constexpr int64_t G = 64 * RUNS;
  const int64_t ng = K / G, ldq = K / 2;
  // M > 1: the first tile of x prefetches the same rows and groups of the tile 2 ahead (K <= 1024) or the next
  // (a tile is 8 * K / 2 bytes): a distance of pf bytes, as tile_q4 used, landed inside the current tile (it
  // sweeps its 8 rows group by group), so cold weights (the decode step's, one read a step) stalled there
  const int64_t pft = pf ? 8 * ldq * (ldq <= 512 ? 2 : 1) : 0;
  const int64_t pft1 = pf_m1 > 0 ? 8 * ldq * std::max<int64_t>(1, pf_m1 / (8 * ldq)) : 0;
  const int64_t pfr = std::max<int64_t>(8, pf_m1 / ldq / 8 * 8);  // M = 1: the scales' prefetch, rows ahead
  alignas(32) float st[kMaxGroups][8];
  alignas(32) float ot[OFFS ? kMaxGroups : 1][8];
  for (int64_t n = n0; n < n1; n += 8) {
    const int R = int(std::min<int64_t>(8, n1 - n));
    const uint8_t* wr[8];
    for (int r = 0; r < 8; ++r) wr[r] = q + (n + std::min(r, R - 1)) * ldq;
    cols8(sc + n * ng, ng, R, st);
    if (OFFS) cols8(of + n * ng, ng, R, ot);
    auto put = [&](const __m256* acc, int mb, int64_t m) {
      for (int i = 0; i < mb; ++i) {
        float* o = out + (m + i) * N + n;
        if (R == 8) {
          _mm256_storeu_ps(o, acc[i]);
        } else {
          alignas(32) float t[8];
          _mm256_store_ps(t, acc[i]);
          for (int r = 0; r < R; ++r) o[r] = t[r];
        }
      }
    };
    __m256 acc[4];
    if (M == 1) {
      // the scales (and offsets) of the tile pfr rows ahead, a prefetch a line (kPfScales): they are [N, K/G]
      // fp32 on torch's allocator, 4 KiB pages, a stream the hardware prefetcher restarts every page
      if ((pfmode & kPfScales) && pf_m1 > 0 && n + pfr + 8 <= n1) {
        const char* sp = reinterpret_cast<const char*>(sc + (n + pfr) * ng);
        for (int64_t b = 0; b < 8 * ng * 4; b += 64) _mm_prefetch(sp + b, _MM_HINT_T0);
        if (OFFS) {
          const char* op = reinterpret_cast<const char*>(of + (n + pfr) * ng);
          for (int64_t b = 0; b < 8 * ng * 4; b += 64) _mm_prefetch(op + b, _MM_HINT_T0);
        }
      }
      if (V2 && K <= t2k) tile2<1, RUNS, OFFS>(xq, K, ng, dx, xs, s8, wr, st, ot, pft1, pfmode & kPfSeq, acc);
      else tile<1, RUNS, 32, OFFS>(xq, K, ng, dx, xs, s8, wr, st, ot, pf_m1, acc);
      put(acc, 1, 0);
      continue;
    }
    if (pfmode & kPfSeq) {
      rest<RUNS, OFFS, true>(xq, dx, xs, s8, M, K, ng, wr, st, ot, pft, put);
    } else {
      rest<RUNS, OFFS, false>(xq, dx, xs, s8, M, K, ng, wr, st, ot, pft, put);
    }
  }
}

// The entry for one range of weight rows: G in {64, 128, 256}, K / G <= kMaxGroups (the caller checks: takes());
// v2: tile2 (session 32), else the session-31 tiles (the same bits).
inline bool takes(int64_t K, int64_t G) { return (G == 64 || G == 128 || G == 256) && K % G == 0 && K / G <= kMaxGroups; }

inline void run(const int8_t* xq, const float* dx, const float* xs, const int32_t* s8, int64_t M, int64_t K, int64_t G,
                const uint8_t* q, const float* sc, const float* of, float* out, int64_t N, int64_t n0, int64_t n1,
                int64_t pf_m1, int64_t pf, bool v2 = true, int pfmode = kPfSeq | kPfScales, int64_t t2k = kTile2MaxK) {
  auto go = [&](auto runs) {
    constexpr int RU = decltype(runs)::value;
    if (v2) {
      if (of) range<RU, true, true>(xq, dx, xs, s8, M, K, q, sc, of, out, N, n0, n1, pf_m1, pf, pfmode, t2k);
      else range<RU, false, true>(xq, dx, xs, s8, M, K, q, sc, nullptr, out, N, n0, n1, pf_m1, pf, pfmode, t2k);
    } else {
      if (of) range<RU, true, false>(xq, dx, xs, s8, M, K, q, sc, of, out, N, n0, n1, pf_m1, pf, pfmode, t2k);
      else range<RU, false, false>(xq, dx, xs, s8, M, K, q, sc, nullptr, out, N, n0, n1, pf_m1, pf, pfmode, t2k);
    }
  };
  if (G == 64) go(std::integral_constant<int, 1>{});
  else if (G == 128) go(std::integral_constant<int, 2>{});
  else go(std::integral_constant<int, 4>{});
}

}  // namespace q4avx2
}  // namespace codeshell
