// int4 x int8-activation batched decode kernel for M = 2..16 rows of x on CPUs without AMX
// (AVX512-VNNI, header-only): qdot.cpp's `avx512_vnni:q8` int4 with groups of 128 / 256.
//
// What this is: y[M, N] = x[M, K] . W^T for int4 weights (uint8 [N, K/2], two nibbles a byte,
// scale [N, K/G], optional offset [N, K/G]) with x rounded to int8 per group (qdot.cpp's
// quantize_x, perm = 128), giving every row exactly tile_q4v's bits (the M = 1 kernel's): per
// (row of x i, weight row j) and group g the int32 lane sums S (vpdpbusd lane L of the group's
// 64-byte runs: integers, any order), then acc = fma(float(S), sc[j, g] * d[i, g], acc) per group in
// k order, r = reduce_add(acc) (GCC's _mm512_reduce_add_ps: lanes i + (i + 8), then + 4, + 2, + 1),
// plus affine_const_v (the -8 * sc (+ offset) times xs term, 16 groups a step, the same reduction).
// Register tiles of MB rows of x by NR weight rows (MB * NR <= 16: 8 x 2, 4 x 4, 2 x 8; M = 9..16:
// 8 rows, then the rest), so each unpacked weight vector feeds MB rows and each x load NR rows.
// Why (measured on the 2-core Zen 5 EPYC, 1 thread, a standalone copy, weights L2-resident, M = 8,
// K = 1024, docs/kernels-log.md session 17 helper A): qdot.cpp's tile_q4r ran ~0.6 vpdpbusd a cycle
// where its group loop alone (2 vpdpbusd + cvt + fma per row, weight row and group; the fma shares
// vpdpbusd's two pipes) runs 1.33 a cycle. The rest was per output, not per group: each of a
// tile's 16 outputs ran its own _mm512_reduce_add_ps and a call of affine_const_v (~40
// instructions, a long dependent chain), a 64-bit idiv (K / G) per tile, and the group's
// scale products moved to the lanes by vpermd from spilled index vectors; at K = 1024 (8
// groups) that doubled the tile, at K = 256 it tripled it. Here the 16 outputs of a tile are
// reduced together by a transposing tree (tree16_t: the same pairs of lanes, 45 instructions
// for all 16), their affine terms likewise (one fma per output per 16 groups), K / G is a shift,
// and the scale products sc[j, g] * d[i, g] are a small table per tile in L1 that the group
// loop reads as the fma's broadcast memory operand (a load, not a shuffle).
// What this is not: groups of 32 / 64 (tile_q4v's per-run scale spread: they stay there), M = 1
// (tile_q4v / tile_q4v12, the same bits), the AMX CPUs' int4 (the shared epilogue of q8_epilogue.h,
// other bits), M > 16 (tile_q4v_blk).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "isa.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace q4rows {

// v[0..15] -> one vector whose lane kLane[p] holds _mm512_reduce_add_ps(v[p]) bit for bit: the
// same four levels of pairwise adds (lane l + (l + 8), then + 4, + 2, + 1; fp32 addition is
// commutative, so a + b and b + a are the same bits), done for 16 vectors at once with shuffles.
// Lane 4k + t of the result holds p = 4t + k.
inline __m512 tree16_t(const __m512 (&v)[16]) {
  __m512 a[8], b[4], c[2];
  for (int p = 0; p < 8; ++p)  // 128-bit chunks [v0.c0, v0.c1, v1.c0, v1.c1] + [v0.c2, v0.c3, v1.c2, v1.c3]
    a[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int q = 0; q < 4; ++q)  // chunk c of b[q] = output 4q + c, lanes l + (l + 4)
    b[q] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * q], a[2 * q + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a[2 * q], a[2 * q + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int r = 0; r < 2; ++r)  // chunk k of c[r]: lanes (0, 1) output 8r + k, (2, 3) output 8r + 4 + k
    c[r] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * r], b[2 * r + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * r], b[2 * r + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Groups of the scale-product table per pass (sd[KC][NR][16]: 8 KiB at NR = 2... 16).
constexpr int64_t KC = 16;
// The v2 schedule's pass: up to KC2 groups (its tables 2 x KC2 x NR x 16 floats: 8 KiB at NR = 2).
#ifndef Q4R_KC2
#define Q4R_KC2 32
#endif
constexpr int64_t KC2 = Q4R_KC2;

// The v2 schedule (CODESHELL_Q4_ROWS_V2, default on; off: the session 17 schedule, for A/B). Same
// integers, same fp32 operations in the same order, so the same bits; what changes is when things
// are issued (docs/kernels-log.md, session 19 helper B):
// (1) The scale-product table sd of a pass of KC2 groups is written one pass ahead (the next pass's
//     table at the start of this one; the next tile's first pass at the start of this tile's last
//     pass), into the other of two buffers. Why: the group loop reads it as 4-byte broadcast
//     operands right after the table's 64-byte stores; on Zen 5 those loads cannot be forwarded
//     from the wider stores and waited for the stores to reach L1. Standalone (1 thread, M = 8,
//     K = 1024, weights in L2) the tile ran 1.23-1.34x faster with the table written a tile ahead;
//     with the broadcasts replaced by a register operand (wrong bits, a probe) it gained the same.
// (2) In the 8 x 2 (MB >= 5) tiles the fp32 step of row i (cvt + fma) is issued after the integer
//     sums of row i + 2 (a software pipeline of depth 2): each row's chain is zero -> vpdpbusd ->
//     vpdpbusd -> cvt -> fma, and issued in row order the fmas waiting on their chains filled the
//     FP scheduler (+3-10% standalone; depth 4 spilled registers).
// (3) vpdpbusd through inline asm (q8_rows.h's dpbusd): GCC 12 put register copies around the
//     intrinsic.
// Where: 8 x 2 tiles (MB >= 5: M = 5..16's first 8 rows, M = 13..16's rest) with at most KC = 16
// groups (K <= 2048 at G = 128), and 8-row tiles (MB = 8) with at most KC2 = 32 (K = 4096: the small
// shape's mlp.c_proj, the 1.7B's c_attn, attn.c_proj and c_fc), one pass a tile. At K = 4096 and
// 5-7 rows it ran 0.95-1.03x standalone (M = 5 / 6, cold), so those keep the session 17 schedule. Standalone (1 thread, cold weights, M = 8) the 4 x 4 tiles (M = 3-4)
// ran 0.75-0.85x with (1), and tiles of several 16-group passes (K = 4096 / 16384) 0.87-0.95x with
// (1) alone, 0.96-1.03x with (1) + (2), hence one pass of up to 32 groups (K = 4096: 1.2x) and the
// session 17 schedule above that (the 1.7B's mlp.c_proj, K = 16384).
// The bound: a (row, weight row, group) needs 2 vpdpbusd + 1 fma on the same two FP pipes (zmm fma
// costs about two vpdpbusd slots on this Zen 5: 2 vpdpbusd + cvt + fma per output ran 4.4
// vpdpbusd/ns against 8.3 for vpdpbusd alone, a register-only micro-kernel), i.e. ~4.4 vpdpbusd/ns
// a core whatever the schedule while the bits keep one fp32 fma per lane per group.
inline __m512i dpbusd_asm(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// sd[c][j][i] = sc[j * ng + g0 + c] * dxT[(g0 + c) * 16 + i] for c < gn (tile_q4v's product).
template <int NR>
inline void fill_sd(float* sd, const float* sc, const float* dxT, int64_t ng, int64_t g0, int64_t gn) {
  for (int64_t c = 0; c < gn; ++c) {
    const __m512 dg = _mm512_loadu_ps(dxT + (g0 + c) * 16);
    for (int j = 0; j < NR; ++j) _mm512_store_ps(sd + (c * NR + j) * 16, _mm512_mul_ps(_mm512_set1_ps(sc[j * ng + g0 + c]), dg));
  }
}

// MB rows of x (xq: row 0 of the tile, stride K; dxT: [ng][16] block scales, lane i = row i of
// the tile; xs: [M][ng] rows' d * sum xq, row 0 of the tile, stride ng) by NR weight rows (q:
// row 0, stride K / 2; sc, of: row 0, stride ng), G = 128 * RUNS, ng = K / G; out[i * ldo + j].
// V2: the schedule above; tb0: this tile's first-pass table if the previous tile wrote it (else
// null), tbn / scn: where and for which weight rows to write the next tile's (scn null: no next).
template <int MB, int NR, int RUNS, bool OFFS, bool V2 = false>
inline void tile(const int8_t* xq, int64_t K, int64_t ng, const float* dxT, const float* xs, const uint8_t* q,
                 const float* sc, const float* of, int64_t pf, float* out, int64_t ldo, const float* tb0 = nullptr,
                 float* tbn = nullptr, const float* scn = nullptr) {
  static_assert(MB * NR <= 16, "16 outputs per tile");
  constexpr int64_t G = 128 * RUNS;
  const int64_t ldq = K / 2;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512 acc[MB][NR];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  // sd[g - g0][j][i] = sc[j, g] * d[i, g] (tile_q4v's product); V2: two buffers, one pass ahead
  constexpr int64_t KP = V2 ? KC2 : KC;  // groups a pass
  alignas(64) float sdb[V2 ? 2 : 1][KP][NR][16];
  for (int64_t g0 = 0, p = 0; g0 < ng; g0 += KP, ++p) {
    const int64_t gn = std::min<int64_t>(KP, ng - g0);
    const float (*sd)[NR][16] = sdb[0];
    if constexpr (V2) {
      if (p == 0 && tb0) sd = reinterpret_cast<const float (*)[NR][16]>(tb0);
      else {
        sd = sdb[p & 1];
        if (p == 0) fill_sd<NR>(&sdb[0][0][0][0], sc, dxT, ng, 0, gn);  // no earlier tile wrote it
      }
      if (g0 + KP < ng) fill_sd<NR>(&sdb[(p + 1) & 1][0][0][0], sc, dxT, ng, g0 + KP, std::min<int64_t>(KP, ng - g0 - KP));
      else if (scn) fill_sd<NR>(tbn, scn, dxT, ng, 0, std::min<int64_t>(KP, ng));
    } else {
      fill_sd<NR>(&sdb[0][0][0][0], sc, dxT, ng, g0, gn);
    }
    for (int64_t c = 0; c < gn; ++c) {
      const int64_t k0 = (g0 + c) * G;
      if constexpr (NR <= 2) {
        // x rows outer: both weight rows' runs unpacked first (4 * RUNS zmm), each x load held in
        // a register for the NR weight rows (an empty asm keeps GCC from folding it into each
        // vpdpbusd as a memory operand, which doubled the loads).
        __m512i lo[RUNS][NR], hi[RUNS][NR];
        for (int r = 0; r < RUNS; ++r)
          for (int j = 0; j < NR; ++j) {
            const uint8_t* p = q + j * ldq + (k0 + 128 * r) / 2;
            _mm_prefetch(reinterpret_cast<const char*>(p) + pf, _MM_HINT_T1);
            const __m512i v = _mm512_loadu_si512(p);
            lo[r][j] = _mm512_and_si512(v, m0f);
            hi[r][j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
          }
        if constexpr (V2) {
          // row i's integer sums, then row i - D's fp32 step (D = 2; the same operations per row)
          constexpr int D = MB >= 3 ? 2 : MB - 1;
          __m512i sb[D + 1][NR];
          for (int i = 0; i < MB + D; ++i) {
            if (i < MB) {
              __m512i* s = sb[i % (D + 1)];
              for (int j = 0; j < NR; ++j) s[j] = _mm512_setzero_si512();
              for (int r = 0; r < RUNS; ++r) {
                const int8_t* xr = xq + i * K + k0 + 128 * r;
                __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 64);
                asm("" : "+v"(x0), "+v"(x1));
                for (int j = 0; j < NR; ++j) s[j] = dpbusd_asm(dpbusd_asm(s[j], lo[r][j], x0), hi[r][j], x1);
              }
            }
            if (i >= D) {
              const int ii = i - D;
              const __m512i* s = sb[ii % (D + 1)];
              for (int j = 0; j < NR; ++j)
                acc[ii][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[j]), _mm512_set1_ps(sd[c][j][ii]), acc[ii][j]);
            }
          }
        } else {
          for (int i = 0; i < MB; ++i) {
            __m512i s[NR];
            for (int j = 0; j < NR; ++j) s[j] = _mm512_setzero_si512();
            for (int r = 0; r < RUNS; ++r) {
              const int8_t* xr = xq + i * K + k0 + 128 * r;
              __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 64);
              asm("" : "+v"(x0), "+v"(x1));
              for (int j = 0; j < NR; ++j) s[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s[j], lo[r][j], x0), hi[r][j], x1);
            }
            for (int j = 0; j < NR; ++j)
              acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[j]), _mm512_set1_ps(sd[c][j][i]), acc[i][j]);
          }
        }
      } else {
      // Weight row by weight row: its runs unpacked once (2 * RUNS zmm), then every row of x's
      // integer sums and fp32 step, so only the 16 accumulators stay live across the tile; at
      // MB <= 4 (RUNS = 1) the tile's x loads are held in registers for all NR weight rows.
      __m512i xr0[MB <= 4 && RUNS == 1 ? MB : 1], xr1[MB <= 4 && RUNS == 1 ? MB : 1];
      if constexpr (MB <= 4 && RUNS == 1)
        for (int i = 0; i < MB; ++i) {
          xr0[i] = _mm512_loadu_si512(xq + i * K + k0);
          xr1[i] = _mm512_loadu_si512(xq + i * K + k0 + 64);
          asm("" : "+v"(xr0[i]), "+v"(xr1[i]));
        }
      for (int j = 0; j < NR; ++j) {
        __m512i lo[RUNS], hi[RUNS];
        for (int r = 0; r < RUNS; ++r) {
          const uint8_t* p = q + j * ldq + (k0 + 128 * r) / 2;
          _mm_prefetch(reinterpret_cast<const char*>(p) + pf, _MM_HINT_T1);
          const __m512i v = _mm512_loadu_si512(p);
          lo[r] = _mm512_and_si512(v, m0f);
          hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
        }
        for (int i = 0; i < MB; ++i) {
          __m512i s = _mm512_setzero_si512();
          for (int r = 0; r < RUNS; ++r) {
            const int8_t* xr = xq + i * K + k0 + 128 * r;
            if constexpr (MB <= 4 && RUNS == 1) s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s, lo[r], xr0[i]), hi[r], xr1[i]);
            else s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s, lo[r], _mm512_loadu_si512(xr)), hi[r], _mm512_loadu_si512(xr + 64));
          }
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(sd[c][j][i]), acc[i][j]);
        }
      }
      }
    }
  }
  // affine_const_v per output, 16 outputs at a time: e[p] over 16-group steps (the last masked),
  // fma(-8 sc (+ of), xs, e) in step order from +0.
  __m512 v[16], e[16];
  for (int p = 0; p < 16; ++p) e[p] = _mm512_setzero_ps();
  const __m512 m8 = _mm512_set1_ps(-8.f);
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 km = ng - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ng - g)) - 1);
    __m512 cj[NR];
    for (int j = 0; j < NR; ++j) {
      cj[j] = _mm512_mul_ps(_mm512_maskz_loadu_ps(km, sc + j * ng + g), m8);
      if (OFFS) cj[j] = _mm512_add_ps(cj[j], _mm512_maskz_loadu_ps(km, of + j * ng + g));
    }
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(km, xs + i * ng + g);
      for (int j = 0; j < NR; ++j) e[i * NR + j] = _mm512_fmadd_ps(cj[j], xv, e[i * NR + j]);
    }
  }
  for (int p = 0; p < 16; ++p) v[p] = p < MB * NR ? acc[p / NR][p % NR] : _mm512_setzero_ps();
  alignas(64) float y[16];
  _mm512_store_ps(y, _mm512_add_ps(tree16_t(v), tree16_t(e)));  // reduce_add(acc) + affine_const_v
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NR; ++j) {
      const int p = i * NR + j;
      out[i * ldo + j] = y[4 * (p % 4) + p / 4];
    }
}

// Weight rows per tile for MB rows of x: 16 outputs a tile (8 x 2, 5-7 x 2, 4 x 4, 3 x 4, 2 x 8, 1 x 16).
template <int MB>
constexpr int nr_for() { return MB >= 5 ? 2 : MB >= 3 ? 4 : MB == 2 ? 8 : 16; }

// Weight rows [n0, n1), all M (<= 16) rows of x: tiles of NR weight rows (the last < NR one at a
// time), rows of x in tiles of up to 8 (9..16: 8, then the rest; the second reads the weights
// again, from L2).
// V2: the session 19 schedule (tile's comment), the first-pass tables of a tile written by the
// tile before it into two buffers that alternate.
template <int RUNS, bool OFFS, bool V2 = false>
void run_rows(const int8_t* xq, const float* dxT, const float* xs, int64_t M, int64_t K, const uint8_t* q,
              const float* sc, const float* of, int64_t pf, float* out, int64_t N, int64_t n0, int64_t n1) {
  const int64_t ng = K / (128 * RUNS), ldq = K / 2;
  auto rows = [&](auto mb, int64_t m) {
    constexpr int MB = decltype(mb)::value, NR = nr_for<MB>();
    const int8_t* x = xq + m * K;
    const float* d = dxT + m;
    const float* s = xs + m * ng;
    float* o = out + m * N;
    int64_t n = n0;
    if constexpr (V2 && MB >= 5) {  // 8 x 2 tiles (the 4 x 4 / 2 x 8 / 1 x 16 tiles ran 0.75-0.85x with it)
      alignas(64) float tb[2][KC2 * NR * 16];
      if (n + NR <= n1) fill_sd<NR>(tb[0], sc + n * ng, d, ng, 0, std::min<int64_t>(KC2, ng));
      for (int t = 0; n + NR <= n1; n += NR, t ^= 1)
        tile<MB, NR, RUNS, OFFS, true>(x, K, ng, d, s, q + n * ldq, sc + n * ng, OFFS ? of + n * ng : nullptr, pf, o + n,
                                       N, tb[t], tb[t ^ 1], n + 2 * NR <= n1 ? sc + (n + NR) * ng : nullptr);
      for (; n < n1; ++n)
        tile<MB, 1, RUNS, OFFS, true>(x, K, ng, d, s, q + n * ldq, sc + n * ng, OFFS ? of + n * ng : nullptr, pf, o + n, N);
    } else {
      for (; n + NR <= n1; n += NR)
        tile<MB, NR, RUNS, OFFS>(x, K, ng, d, s, q + n * ldq, sc + n * ng, OFFS ? of + n * ng : nullptr, pf, o + n, N);
      for (; n < n1; ++n)
        tile<MB, 1, RUNS, OFFS>(x, K, ng, d, s, q + n * ldq, sc + n * ng, OFFS ? of + n * ng : nullptr, pf, o + n, N);
    }
  };
  auto dispatch = [&](int64_t mb, int64_t m) {
    if constexpr (V2)
      // several passes a tile, or 17..32 groups at 5-7 rows: the session 17 schedule (see below)
      if (ng > KC2 || (ng > KC && mb < 8)) {
        run_rows<RUNS, OFFS, false>(xq + m * K, dxT + m, xs + m * ng, mb, K, q, sc, of, pf, out + m * N, N, n0, n1);
        return;
      }
    switch (mb) {
      case 1: rows(std::integral_constant<int, 1>{}, m); break;
      case 2: rows(std::integral_constant<int, 2>{}, m); break;
      case 3: rows(std::integral_constant<int, 3>{}, m); break;
      case 4: rows(std::integral_constant<int, 4>{}, m); break;
      case 5: rows(std::integral_constant<int, 5>{}, m); break;
      case 6: rows(std::integral_constant<int, 6>{}, m); break;
      case 7: rows(std::integral_constant<int, 7>{}, m); break;
      default: rows(std::integral_constant<int, 8>{}, m); break;
    }
  };
  dispatch(std::min<int64_t>(M, 8), 0);
  if (M > 8) dispatch(M - 8, 8);
}

// The call's x side, once (qdot.cpp's int4_q8 builds it before splitting the weight rows; run_q4r,
// the earlier kernel, too): dxT[g][i] = dx[i][g] (16 lanes, 0 past M; a tile of rows m.. reads 16
// lanes from m). dx: [M][ng].
struct XT {
  std::vector<float> buf;
  float* dxT;
  XT(const float* dx, int64_t M, int64_t ng) : buf(size_t(ng * 16 + 32)) {
    dxT = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    for (int64_t g = 0; g < ng; ++g)
      for (int64_t i = 0; i < 16; ++i) dxT[g * 16 + i] = i < M ? dx[i * ng + g] : 0.f;
  }
};

}  // namespace q4rows
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
