// int4 (groups of 32 / 64) x int8-activation kernel for AVX-512 CPUs without AMX
// (`avx512_vnni:q8` and the avx512_bf16 level below AMX), M = 1..ops.ROW_INVARIANT_MAX_M,
// header-only (qdot.cpp's decode_int4_q8).
//
// What this is: y[M, N] = x[M, K] . W^T (+ bias) on per-row vpdpbusd dots with a per-lane fp32
// epilogue: a 64-byte load of packed nibbles (one run of 128 weights) meets two 64-byte loads of
// x (quantize_x's perm 128 order) as stored, and each vpdpbusd lane keeps its own fp32 partial
// sum until the end of the row. Per output y[m, n] (row m of x, weight row n):
//   T_r[L] = the exact int32 sum of lane L over run r (lanes 4c..4c+3 hold k0 + 32c + 0..31, so
//            lane L belongs to group (L / 4) * 32 / G of the run), nibbles unsigned 0..15
//   acc[L] = fma(float(T_r[L]), scale[n, g] * d[m, g], acc[L]) for runs r in order, from +0
//            (g = lane L's group; the 128 / G products per run, then a lane permute)
//   r      = tree16 of acc (q8epi::tree16_h) + affine (sum over groups of (offset - 8 * scale)
//            * d * sum(xq): the nibble offset 8 and the offsets)
//   y      = r + bias[n] (fma(r, 1, bias))
// Row invariance: that sequence does not depend on M, on the tile a row lands in, nor on the
// K chunks (the lanes' fp32 sums are stored and reloaded between chunks, which is exact), so a
// row gets the bits it gets alone at every M (tests/kernels/test_q8_rows.py).
// Tiles: up to 8 rows of x by one weight row below 9 rows (each weight load and unpack feeds up
// to 16 vpdpbusd), 4 rows of x by 2 weight rows from 9 (each x load feeds 2). When M rows of x
// would not stay in L1 (M x K > 16 KiB of xq), K runs in chunks of 16 KiB of x over panels of
// 16 weight rows, so x is re-read from L1 rather than L2 by each weight row.
// Why: the AMX level's kernel for these groups (qdot.cpp's tile_v: the shared epilogue of
// q8_epilogue.h after a lane reduction of up to 4 lane vectors per 16 groups) ran 1.3-1.7x
// slower at M = 1-4 on the AMD EPYC without AMX (7B shapes, groups of 32, 1 thread: M = 1
// 11.3-12.3 vs 6.7-7.3 ms for the four linears, M = 4 15.8-16.7 vs 12.5); without AMX no kernel
// needs the AMX rows' bits. int8 and int4 groups of 128 / 256 keep the AMX level's kernels
// without AMX too (tile_v at M = 1-2, q8_panel.h from 3): measured faster there than this
// kernel's per-lane form (int8 M = 8 13.5-16.9 vs 24.6-30.7 ms).
// What this is not: the AMX level's kernels (q8_panel.h, tile_v, qgemm_amx.cpp), int8 or other
// int4 groups, nor the AVX2 kernels (qdot.cpp, 256-bit vpmaddubsw, their own bits).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "q8_epilogue.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace q8rows {

struct Args {
  const int8_t* xq;    // [M][K], quantize_x's perm 128 order
  const float* dx;     // [M][ng] block scales of x (blocks = the groups)
  const float* xs;     // [M][ng] d * sum of the group's xq
  int64_t M, K, N;
  const uint8_t* w;      // [N][K/2] packed nibbles (packing.py)
  const float* scale;    // [N][ng]
  const float* offset;   // [N][ng] or null
  int64_t G;             // 32 or 64
  const float* bias;     // [N] or null
  float* out;            // [M][N]
  int64_t prefetch;      // bytes ahead in a weight row for the software prefetch
};

// sum over groups of (offset - 8 * scale) * xs, 16 groups per step, the last step masked, then
// the fixed reduction of _mm512_reduce_add_ps: the same instructions for every tile.
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

// y[m, n] from the lane sums: the same instructions whatever the tile or the K chunks.
template <bool OFFS>
inline void finish(const Args& A, int64_t m, int64_t n, __m512 acc) {
  const int64_t ng = A.K / A.G;
  const float r = codeshell::q8epi::tree16_h(acc) +
                  affine<OFFS>(A.scale + n * ng, OFFS ? A.offset + n * ng : nullptr, A.xs + m * ng, ng);
  A.out[m * A.N + n] = std::fma(r, 1.f, A.bias ? A.bias[n] : 0.f);
}

// MB rows of x (m0..) by NR weight rows (n0..), runs [u0, u1) of 128 weights; GPV = 128 / G
// groups per run. acc: +0 at the first run, else loaded from accm; stored back after a chunk
// that is not the last (exact), the outputs written after the last.
// The loop's addressing is kept to offsets from two base pointers and compile-time strides:
// a first version recomputed row offsets from the Args per run (~45 instructions per 64 bytes
// at M = 1). The unroll pragmas keep the accumulator arrays in registers: without them GCC left
// the last accumulator of a tile in a stack slot (a store and reload in every fma chain step;
// M = 2 ran 2x slower than the AVX2 kernel).
template <int MB, int NR, bool OFFS, int GPV>
inline void tile(const Args& A, int64_t m0, int64_t n0, int64_t u0, int64_t u1, float* accm) {
  const int64_t K = A.K, ldw = K / 2, nu = K / 128, nt = u1 - u0, ng = K / A.G;
  const int64_t pf = A.prefetch;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const uint8_t* w = A.w + n0 * ldw + u0 * 64;
  const int8_t* x = A.xq + m0 * K + u0 * 128;
  // lane L's group in the run: (L / 4) * GPV / 4 (L >> 2 for G = 32, L >> 3 for G = 64)
  const __m512i gidx = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         GPV == 4 ? 2 : 3);
  const __mmask8 gm = __mmask8((1u << GPV) - 1);
  __m512 acc[MB][NR];
  _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i)
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j)
      acc[i][j] = u0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(accm + (i * NR + j) * 16);
  for (int64_t t = 0; t < nt; ++t) {
    __m512i w0[NR], w1[NR], a[MB][NR];
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
      const uint8_t* p = w + j * ldw + t * 64;
      _mm_prefetch(reinterpret_cast<const char*>(p) + pf, _MM_HINT_T0);
      const __m512i q = _mm512_loadu_si512(p);
      w0[j] = _mm512_and_si512(q, m0f);
      w1[j] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m0f);
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
      const int8_t* xr = x + i * K + t * 128;
      const __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 64);
      _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j)
        a[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w0[j], x0), w1[j], x1);
    }
    const int64_t g = (u0 + t) * GPV;
    _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
      const __m128 d = _mm_maskz_loadu_ps(gm, A.dx + (m0 + i) * ng + g);
      _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
        const __m128 sd = _mm_mul_ps(_mm_maskz_loadu_ps(gm, A.scale + (n0 + j) * ng + g), d);
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[i][j]), _mm512_permutexvar_ps(gidx, _mm512_castps128_ps512(sd)),
                                    acc[i][j]);
      }
    }
  }
  if (u1 < nu) {
    _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i)
      _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) _mm512_store_ps(accm + (i * NR + j) * 16, acc[i][j]);
    return;
  }
  _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i)
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) finish<OFFS>(A, m0 + i, n0 + j, acc[i][j]);
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
// Bytes of xq per K chunk: M x chunk stays in L1 (48 KiB per core here) beside the weight rows.
constexpr int64_t kChunkX = 16384;

// Weight rows [n0, n1) for all M rows of x; GPV = 128 / G.
template <bool OFFS, int GPV>
void run(const Args& A, int64_t n0, int64_t n1) {
  const int64_t M = A.M, nu = A.K / 128;
  const int64_t cu = std::max<int64_t>(1, kChunkX / (M * 128));  // runs per K chunk
  constexpr int64_t P = 16;                                        // weight rows per panel
  std::vector<float> bufv(size_t(P * M * 16) + 16);
  float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(bufv.data()) + 63) & ~uintptr_t(63));
  const bool pairs = M >= kPairMinM;
  for (int64_t p = n0; p < n1; p += P) {
    const int64_t pe = std::min(n1, p + P);
    // acc of weight row (or pair) n, x tile at m: [MB][nr][16] at acc + ((n - p) * M + m * nr) * 16
    for (int64_t u0 = 0; u0 < nu; u0 += cu) {
      const int64_t u1 = std::min(nu, u0 + cu);
      int64_t n = p;
      if (pairs)
        for (; n + 2 <= pe; n += 2)
          x_tiles<4>(M, [&](auto mb, int64_t m) {
            tile<decltype(mb)::value, 2, OFFS, GPV>(A, m, n, u0, u1, acc + ((n - p) * M + m * 2) * 16);
          });
      for (; n < pe; ++n)
        x_tiles<8>(M, [&](auto mb, int64_t m) {
          tile<decltype(mb)::value, 1, OFFS, GPV>(A, m, n, u0, u1, acc + ((n - p) * M + m) * 16);
        });
    }
  }
}

}  // namespace q8rows
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
