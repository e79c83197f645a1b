// int8 / int4 x int8-activation kernel for AVX-512 CPUs without AMX (`avx512_vnni:q8`, and the
// avx512_bf16 level below AMX), M = 1..ops.ROW_INVARIANT_MAX_M, header-only (qdot.cpp).
//
// What this is: y[M, N] = x[M, K] . W^T (+ bias) on per-row vpdpbusd dots with a per-lane fp32
// epilogue: the 64-byte weight loads meet 64 bytes of x as stored (no transposes), and each
// vpdpbusd lane keeps its own partial sum until the end of the row. Per output y[m, n]:
//   unit u = int8: 128 k (x's activation block); int4: one group (G >= 128, G / 128 runs of 128
//            weights) or one run of 128 weights (G = 32 / 64: 128 / G groups in runs of lanes)
//   T_u[L] = the exact int32 sum of lane L over the unit (vpdpbusd lane L sums the 4 bytes 4L..
//            4L+3 of each 64-byte step); int8: the weight offset to unsigned (w ^ 0x80 = w + 128)
//            is taken back exactly by starting the lane at ncx = -128 * (lane L's sum of xq)
//   acc[L] = fma(float(T_u[L]), mul_u[L], acc[L]) for u in order, from +0; mul_u = d[m, u]
//            (int8), scale[n, g] * d[m, g] (int4, the group of lane L)
//   r      = tree16 of acc (q8epi::tree16_h); int4: r += affine (sum over groups of
//            (offset - 8 * scale) * d * sum(xq): the nibbles are unsigned 0..15 in the dots)
//   y      = fma(r, scale[n] (int8) or 1 (int4), bias[n] or 0)
// Row invariance: that sequence does not depend on M, on the tile a row lands in, nor on the
// K chunks (the lanes' fp32 sums are stored and reloaded between chunks, which is exact), so a
// row gets the bits it gets alone at every M (tests/kernels/test_invariance.py).
// Tiles: up to 8 rows of x by one weight row below 9 rows (each 64-byte weight load feeds up to
// 8 vpdpbusd; one read stream per thread, as the AVX2 kernel, measured best at M = 1), 4 rows of
// x by 2 weight rows from 9 (each x load feeds 2 vpdpbusd). When M rows of x would not stay in
// L1 (M x K > 16 KiB of xq), K runs in chunks of 16 KiB of x over panels of 16 weight rows, so
// x is re-read from L1 rather than L2 by each weight row.
// Why not q8_panel.h here: its weight transposes (64 shuffles per KiB) are what the AMX rows'
// shared epilogue needs (exact block sums T_b), but on the AMD EPYC (Zen 4/5, no AMX) they cost
// more than the weight read: int8 7B shapes at M = 1 ran 2.1x slower than the AVX2 kernel
// (2 threads, 6.0 vs 2.8 ms for the four linears). Without AMX no kernel needs those bits.
// What this is not: the AMX level's kernels (q8_panel.h, tile_v, qgemm_amx.cpp keep their own
// arithmetic, the shared epilogue of q8_epilogue.h), nor the AVX2 kernels (qdot.cpp, 256-bit
// vpmaddubsw, their own bits).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "q8_epilogue.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace q8rows {

struct Args {
  const int8_t* xq;    // [M][K]; int4: quantize_x's perm 128 order
  const float* dx;     // [M][nbx] block scales of x (int8: blocks of 128; int4: the groups)
  const float* xs;     // int4: [M][ng] d * sum of the group's xq (affine part); int8: unused
  const int32_t* ncx;  // int8: [M][K / 128][16] -128 * lane sums of xq (the weight offset); int4: unused
  int64_t M, K, N;
  const uint8_t* w;      // int8 [N][K] / int4 [N][K/2] (packing.py)
  const float* scale;    // int8 [N] / int4 [N][ng]
  const float* offset;   // int4 [N][ng] or null
  int64_t G;             // int4 group (32, 64, 128, 256); 0 for int8
  const float* bias;     // [N] or null
  float* out;            // [M][N]
  int64_t prefetch;      // bytes ahead in a weight row for the software prefetch
};

// ncx for one row of int8 xq [K]: lane L of block b = -128 * (xq[128b + 4L .. +3] + xq[128b + 64 + 4L .. +3]).
inline void int8_lane_offsets(const int8_t* xq, int64_t K, int32_t* ncx) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t b = 0; b < K / 128; ++b) {
    __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(xq + 128 * b));
    s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(xq + 128 * b + 64));
    _mm512_storeu_si512(ncx + 16 * b, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(s, 7)));
  }
}

// sum over groups of (offset - 8 * scale) * xs (int4's affine part: the dots ran on unsigned
// nibbles), 16 groups per step, the last step masked; then the fixed reduction of
// _mm512_reduce_add_ps. The same instructions for every tile (row invariance).
template <bool OFFS>
inline float affine(const float* sc, const float* of, const float* xs, int64_t ng) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 m8 = _mm512_set1_ps(-8.f);
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 k = ng - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ng - g)) - 1);
    __m512 c = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sc + g), m8);
    if (OFFS) c = _mm512_add_ps(c, _mm512_maskz_loadu_ps(k, of + g));
    acc = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(k, xs + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// y[m, n] from lane sums acc: the same instructions whatever the tile or the K chunks.
template <bool INT4, bool OFFS>
inline void finish(const Args& A, int64_t m, int64_t n, __m512 acc) {
  float r = codeshell::q8epi::tree16_h(acc);
  if constexpr (INT4) {
    const int64_t ng = A.K / A.G;
    r += affine<OFFS>(A.scale + n * ng, OFFS ? A.offset + n * ng : nullptr, A.xs + m * ng, ng);
  }
  A.out[m * A.N + n] = std::fma(r, INT4 ? 1.f : A.scale[n], A.bias ? A.bias[n] : 0.f);
}

// MB rows of x (m0..) by NR weight rows (n0..), units [u0, u1); acc [MB][NR][16] in memory
// (+0 at the first chunk, else loaded; stored after a chunk that is not the last, which is
// exact; after the last the outputs are written). GPV: int4 groups per run (G < 128), else 1;
// RPU: runs of 128 k per unit (int4 G = 256: 2, else 1).
// The loop's addressing is kept to offsets from two base pointers and compile-time strides:
// the first version recomputed row offsets per unit from the Args (a runtime runs-per-unit
// loop, ~45 instructions per 64 bytes at M = 1) and ran int4 M = 1 1.4x slower than AVX2.
// A table of the int4 multipliers (vector products up front) made GCC keep accumulators in
// stack slots (a store and reload per unit in the fma chain: M = 2 ran 2x slower than AVX2).
template <int MB, int NR, bool INT4, bool OFFS, int GPV, int RPU>
inline void tile(const Args& A, int64_t m0, int64_t n0, int64_t u0, int64_t u1, float* accm) {
  const int64_t nu = A.K / (INT4 ? std::max<int64_t>(A.G, 128) : 128);
  constexpr int64_t WB = INT4 ? 64 * RPU : 128, XB = 128 * RPU;  // weight / x bytes per unit
  const int64_t K = A.K, ldw = INT4 ? K / 2 : K, nt = u1 - u0;
  const int64_t ng = INT4 ? K / A.G : 0, nbx = INT4 ? ng : K / 128;
  const int64_t pf = A.prefetch;
  const __m512i m0f = _mm512_set1_epi8(0x0f), s80 = _mm512_set1_epi8(int8_t(0x80));
  const uint8_t* w = A.w + n0 * ldw + u0 * WB;
  const int8_t* x = A.xq + m0 * K + u0 * XB;
  // G < 128: lane L's group in the run is (L / 4) * GPV / 4 (L >> 2 for G = 32, L >> 3 for 64)
  const __m512i gidx = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         GPV == 4 ? 2 : 3);
  __m512 acc[MB][NR];
  _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i)
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) acc[i][j] = u0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(accm + (i * NR + j) * 16);
  {
    for (int64_t t = 0; t < nt; ++t) {
      __m512i a[MB][NR];
      _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
        const __m512i init =
            INT4 ? _mm512_setzero_si512() : _mm512_loadu_si512(A.ncx + ((m0 + i) * nbx + u0 + t) * 16);
        _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) a[i][j] = init;
      }
      _Pragma("GCC unroll 16") for (int r = 0; r < RPU; ++r) {
        __m512i w0[NR], w1[NR];
        _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
          const uint8_t* p = w + j * ldw + t * WB + r * 64;
          _mm_prefetch(reinterpret_cast<const char*>(p) + pf, _MM_HINT_T0);
          if constexpr (INT4) {
            const __m512i q = _mm512_loadu_si512(p);
            w0[j] = _mm512_and_si512(q, m0f);
            w1[j] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m0f);
          } else {
            _mm_prefetch(reinterpret_cast<const char*>(p) + pf + 64, _MM_HINT_T0);
            w0[j] = _mm512_xor_si512(_mm512_loadu_si512(p), s80);
            w1[j] = _mm512_xor_si512(_mm512_loadu_si512(p + 64), s80);
          }
        }
        _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
          const int8_t* xr = x + i * K + t * XB + r * 128;
          const __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 64);
          _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j)
            a[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[i][j], w0[j], x0), w1[j], x1);
        }
      }
      _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i)
        _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
          __m512 mul;
          if constexpr (!INT4) {
            mul = _mm512_set1_ps(A.dx[(m0 + i) * nbx + u0 + t]);
          } else if constexpr (GPV == 1) {
            mul = _mm512_set1_ps(A.scale[(n0 + j) * ng + u0 + t] * A.dx[(m0 + i) * nbx + u0 + t]);
          } else {
            const __mmask8 gm = __mmask8((1u << GPV) - 1);
            const int64_t g = (u0 + t) * GPV;
            const __m128 sd = _mm_mul_ps(_mm_maskz_loadu_ps(gm, A.scale + (n0 + j) * ng + g),
                                         _mm_maskz_loadu_ps(gm, A.dx + (m0 + i) * nbx + g));
            mul = _mm512_permutexvar_ps(gidx, _mm512_castps128_ps512(sd));
          }
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[i][j]), mul, acc[i][j]);
        }
    }
  }
  if (u1 < nu) {
    _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i)
      _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) _mm512_store_ps(accm + (i * NR + j) * 16, acc[i][j]);
    return;
  }
  _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i)
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) finish<INT4, OFFS>(A, m0 + i, n0 + j, acc[i][j]);
}


// Calls f(MB, m) over the tiles of M rows of x: tiles of TM, then one of the rows left.
template <int TM, class F>
inline void x_tiles(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + TM <= M; m += TM) f(std::integral_constant<int, TM>{}, m);
  switch (M - m) {
    case 7: if constexpr (TM > 7) f(std::integral_constant<int, 7>{}, m); break;
    case 6: if constexpr (TM > 6) f(std::integral_constant<int, 6>{}, m); break;
    case 5: if constexpr (TM > 5) f(std::integral_constant<int, 5>{}, m); break;
    case 4: if constexpr (TM > 4) f(std::integral_constant<int, 4>{}, m); break;
    case 3: f(std::integral_constant<int, 3>{}, m); break;
    case 2: f(std::integral_constant<int, 2>{}, m); break;
    case 1: f(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// Rows of x from which the tiles take 2 weight rows (4 rows of x each) instead of one.
constexpr int64_t kPairMinM = 9;
// Bytes of xq per K chunk: M x chunk stays in L1 (48 KiB on Zen 4/5) beside the weight rows.
constexpr int64_t kChunkX = 16384;

// Weight rows [n0, n1) for all M rows of x.
template <bool INT4, bool OFFS, int GPV, int RPU>
void run_tiles(const Args& A, int64_t n0, int64_t n1) {
  const int64_t M = A.M, K = A.K;
  const int64_t ukb = INT4 ? std::max<int64_t>(A.G, 128) : 128;  // k per unit
  const int64_t nu = K / ukb;
  const int64_t cu = std::max<int64_t>(1, kChunkX / (M * ukb));  // units per K chunk
  const int64_t P = 16;  // weight rows per panel (the chunk loop's outer)
  std::vector<float> bufv(size_t(P * M * 16) + 16);
  float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(bufv.data()) + 63) & ~uintptr_t(63));
  const int NR = M >= kPairMinM ? 2 : 1;
  for (int64_t p = n0; p < n1; p += P) {
    const int64_t pe = std::min(n1, p + P);
    // acc layout: per weight-row pair (or single row) j0, per x tile: [MB][nr][16] at
    // acc + ((j0 - p) * M + m * nr) * 16
    for (int64_t u0 = 0; u0 < nu; u0 += cu) {
      const int64_t u1 = std::min(nu, u0 + cu);
      int64_t n = p;
      if (NR == 2)
        for (; n + 2 <= pe; n += 2)
          x_tiles<4>(M, [&](auto mb, int64_t m) {
            tile<decltype(mb)::value, 2, INT4, OFFS, GPV, RPU>(A, m, n, u0, u1, acc + ((n - p) * M + m * 2) * 16);
          });
      for (; n < pe; ++n)
        x_tiles<8>(M, [&](auto mb, int64_t m) {
          tile<decltype(mb)::value, 1, INT4, OFFS, GPV, RPU>(A, m, n, u0, u1, acc + ((n - p) * M + m) * 16);
        });
    }
  }
}

// Weight rows [n0, n1), all M rows of x; GPV = 128 / G for int4 groups of 32 / 64, else 1.
template <bool INT4, bool OFFS, int GPV>
void run(const Args& A, int64_t n0, int64_t n1) {
  if (INT4 && A.G == 256) run_tiles<INT4, OFFS, GPV, 2>(A, n0, n1);
  else run_tiles<INT4, OFFS, GPV, 1>(A, n0, n1);
}

}  // namespace q8rows
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
