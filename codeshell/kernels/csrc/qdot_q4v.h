// The per-lane int4 kernels without AMX (`avx512_vnni:q8` int4, main's per-lane epilogue: every
// int4 M has these bits there): tile_q4v (one weight row, up to 8 rows of x; any group size),
// tile_q4v_blk (M > 8: 4 rows of x by NR weight rows), tile_q4v12 (M = 1-2, groups of 128 / 256 up to
// kQ4v12MaxGroups), tile_q4f (M = 1, the scales read beside the dots; off by default), and their
// helpers affine_const_v / scale_products / group_dots. Included by qdot_int4.cpp alone (so
// affine_const_v, not inlined for row invariance, has one copy), which holds the switches and run_q4v,
// the loop that picks among them.
// What this is not: q4_m1.h's 16-row M = 1 tile or q4_rows.h's M = 3..16 rows (same bits, other
// headers), tile_q4r (qdot_int4.cpp), the AMX CPUs' int4 (tile_v, qdot_tile_v.h: other bits).
// Split out of qdot.cpp in session 20 (code unchanged).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "isa.h"
#include "qdot.h"

// vpdpbusd multiplies 64 unsigned x signed byte pairs and adds each 4 into an int32 lane: no
// int16 stage (so no saturation bound), one instruction where AVX2 needs maddubs + madd + add.
// Needs K % 128 == 0 (ops.plan checks): a 64-byte int4 load covers 128 weights.
#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace qdot {


// affine_const for the 512-bit kernels: 16 groups per step, the last step masked (the 1536-wide
// mid shape has 12 groups of 128: one step instead of an 8-wide step, its sum and 4 scalar
// terms, ~3x fewer instructions per output; at M = 8 int4 this ran once per 24 vpdpbusd).
// Not inlined, for the reason affine_const is not.
template <bool OFFS>
__attribute__((noinline)) float affine_const_v(const float* sc, const float* of, const float* xs, int64_t ng) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 m8 = _mm512_set1_ps(-8.f);
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 k = ng - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ng - g)) - 1);
    __m512 c = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sc + g), m8);
    if (OFFS) c = _mm512_add_ps(c, _mm512_maskz_loadu_ps(k, of + g));
    acc = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(k, xs + g), acc);  // masked lanes add 0
  }
  return _mm512_reduce_add_ps(acc);
}

// sd[g] = sc[g] * dx[g] for g < ng, 16 at a time (the last step masked): the same fp32 products
// as the scalar sc[g] * dx[g] the kernels use when the table does not fit.
inline void scale_products(const float* sc, const float* dx, int64_t ng, float* sd) {
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 k = ng - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ng - g)) - 1);
    _mm512_mask_storeu_ps(sd + g, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sc + g), _mm512_maskz_loadu_ps(k, dx + g)));
  }
}

// int4 without AMX (`avx512_vnni:q8`; main's per-lane epilogue, its own bits: with AMX these
// rows run tile_v / q8_panel.h / the AMX tiles on the shared epilogue).
// x permuted in runs of 128 (quantize_x perm = 128). G >= 128: int32 sums of a whole group
// stay in registers and are scaled once; G = 32 / 64: each 128-run holds 4 / 2 groups, lane L of
// the int32 sums belongs to run L / 4, scaled per run by a lane vector (gidx maps lane -> group).
// The integer dots of group g (G >= 128 k) of one int4 weight row (q: its packed bytes) with MB
// rows of x, 128 k a step: a[i][0] += lo nibbles . x, a[i][CH - 1] += hi nibbles . x (at CH = 1
// one chain takes both, lo first). tile_q4v's and tile_q4v12's shared inner loop.
template <int MB, int CH>
inline void group_dots(const int8_t* xq, int64_t K, const uint8_t* q, int64_t g, int64_t G, __m512i m0f,
                       __m512i (&a)[MB][CH], const Pf& pf = Pf()) {
  for (int i = 0; i < MB; ++i)
    for (int h = 0; h < CH; ++h) a[i][h] = _mm512_setzero_si512();
  for (int64_t k = g * G; k < (g + 1) * G; k += 128) {
    if (pf.d) pf_line(q + k / 2, pf);
    const __m512i v = _mm512_loadu_si512(q + k / 2);
    const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
    for (int i = 0; i < MB; ++i) {
      const int8_t* xr = xq + i * K + k;
      a[i][0] = _mm512_dpbusd_epi32(a[i][0], lo, _mm512_loadu_si512(xr));
      a[i][CH - 1] = _mm512_dpbusd_epi32(a[i][CH - 1], hi, _mm512_loadu_si512(xr + 64));
    }
  }
}

template <int MB, bool OFFS>
inline void tile_q4v(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                     const float* sc, const float* of, int64_t G, __m512i gidx, float* out, int64_t ldo,
                     const Pf& pf = Pf()) {
  const int64_t ng = K / G;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  if (G >= 128) {
    // sd[i][g] = scale_g * d_ig, a vector product per row up front (ng <= 256 here), so the
    // group epilogue is cvt + one fmadd with a broadcast operand from memory.
    alignas(64) float sd[MB][128];
    const bool tab = ng <= 128;
    if (tab)
      for (int i = 0; i < MB; ++i) scale_products(sc, dx + i * ng, ng, sd[i]);
    // Two chains (lo, hi nibbles) per row at MB <= 2; at MB >= 3 the rows are enough chains.
    constexpr int CH = MB <= 2 ? 2 : 1;
    for (int64_t g = 0; g < ng; ++g) {
      __m512i a[MB][CH];
      group_dots<MB, CH>(xq, K, q, g, G, m0f, a, pf);
      for (int i = 0; i < MB; ++i) {
        __m512i s32 = a[i][0];
        if constexpr (CH == 2) s32 = _mm512_add_epi32(s32, a[i][1]);
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), _mm512_set1_ps(tab ? sd[i][g] : sc[g] * dx[i * ng + g]),
                                 acc[i]);
      }
    }
  } else {
    const __mmask8 gm = __mmask8((1u << (128 / G)) - 1);  // groups per 128-run
    for (int64_t k = 0; k < K; k += 128) {
      const int64_t g = k / G;
      _mm_prefetch(reinterpret_cast<const char*>(q + k / 2) + kPrefetch, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(q + k / 2);
      const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
      const __m128 sw = _mm_maskz_loadu_ps(gm, sc + g);
      for (int i = 0; i < MB; ++i) {
        const int8_t* xr = xq + i * K + k;
        const __m512i a = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xr)), hi, _mm512_loadu_si512(xr + 64));
        const __m128 sd = _mm_mul_ps(sw, _mm_maskz_loadu_ps(gm, dx + i * ng + g));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_permutexvar_ps(gidx, _mm512_castps128_ps512(sd)), acc[i]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    out[i * ldo] = _mm512_reduce_add_ps(acc[i]) + affine_const_v<OFFS>(sc, OFFS ? of : nullptr, xs + i * ng, ng);
}

// M > 8 (kBlockMinM), G >= 128: register tiles of MB rows of x by NR weight rows, so each x
// load feeds NR vpdpbusd and each unpacked weight load MB. Why: with one weight row per tile
// (tile_q4v) every weight row re-reads all M rows of x from L2 (M x K bytes: 96 KiB at M = 64,
// K = 1536), which made M = 17..64 2-3x slower than the AMX prefill it replaced.
// Row invariance: per (row of x, weight row) the same arithmetic as tile_q4v: exact int32 group
// sums (integer adds: any order gives the same lanes; lane L holds the same k in both), then
// acc = fma(cvt(sum), scale_g * d_g, acc) per group in k order, reduce_add, + affine_const.
template <int MB, int NR, bool OFFS>
inline void tile_q4v_blk(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                         const float* sc, const float* of, int64_t G, float* out, int64_t ldo) {
  const int64_t ng = K / G, ldq = K / 2;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  // sd[i][j][g] = scale_jg * d_ig (the same fp32 product as tile_q4v's), 16 at a time up front:
  // the group epilogue is then cvt + fmadd with a broadcast memory operand.
  constexpr int64_t kMaxG = 64;  // K <= 8192 at G = 128; longer rows take the product per group
  alignas(64) float sd[MB][NR][kMaxG];
  const bool tab = ng <= kMaxG;
  if (tab)
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NR; ++j) scale_products(sc + j * ng, dx + i * ng, ng, sd[i][j]);
  __m512 acc[MB][NR];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512i a[MB][NR];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NR; ++j) a[i][j] = _mm512_setzero_si512();
    for (int64_t k = g * G; k < (g + 1) * G; k += 128) {
      __m512i lo[NR], hi[NR];
      for (int j = 0; j < NR; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(q + j * ldq + k / 2) + kPrefetch, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(q + j * ldq + k / 2);
        lo[j] = _mm512_and_si512(v, m0f);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
      }
      for (int i = 0; i < MB; ++i) {
        const __m512i x0 = _mm512_loadu_si512(xq + i * K + k), x1 = _mm512_loadu_si512(xq + i * K + k + 64);
        for (int j = 0; j < NR; ++j) a[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[i][j], lo[j], x0), hi[j], x1);
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[i][j]),
                                    _mm512_set1_ps(tab ? sd[i][j][g] : sc[j * ng + g] * dx[i * ng + g]), acc[i][j]);
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NR; ++j)
      out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]) +
                         affine_const_v<OFFS>(sc + j * ng, OFFS ? of + j * ng : nullptr, xs + i * ng, ng);
}

// Rows of x in tiles of 4 (then the 1-3 left), for NR weight rows at q.
template <int NR, bool OFFS>
inline void rows_q4v_blk(const int8_t* xq, const float* dx, const float* xs, int64_t M, int64_t K, const uint8_t* q,
                         const float* sc, const float* of, int64_t G, float* out, int64_t N) {
  const int64_t ng = K / G;
  for_x_tiles(M, [&](auto mb, int64_t m) {
    tile_q4v_blk<decltype(mb)::value, NR, OFFS>(xq + m * K, K, dx + m * ng, xs + m * ng, q, sc, of, G, out + m * N, N);
  });
}


// tile_q4v for M = 1-2 rows of x and groups of 128 / 256: the same arithmetic (its bits: the
// group sums in two chains, acc = fma(float(sum), scale_g * d_g, acc) per group in order,
// reduce_add, + affine_const_v), with scale_g * d_g taken as a scalar product per group instead
// of from the table tile_q4v writes first (the same fp32 product either way).
// Why: tile_q4v ran ~70 cycles a row for ~60 instructions at K = 256 (codeshell-mini; its int4
// decode was slower than bf16), the rows one after another; tile_q4v12 runs the same shapes in
// about half the time (docs/kernels-log.md, session 14). The likely cause (inferred, not profiled):
// the table is written with a masked 512-bit store and read back at once with 4-byte loads, which
// a masked store does not forward to, so each row waited for the store to retire.
template <int MB, bool OFFS>
inline void tile_q4v12(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                       const float* sc, const float* of, int64_t G, float* out, int64_t ldo, const Pf& pf = Pf()) {
  const int64_t ng = K / G;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512i a[MB][2];
    group_dots<MB, 2>(xq, K, q, g, G, m0f, a, pf);
    for (int i = 0; i < MB; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a[i][0], a[i][1])),
                               _mm512_set1_ps(sc[g] * dx[i * ng + g]), acc[i]);
  }
  for (int i = 0; i < MB; ++i)
    out[i * ldo] = _mm512_reduce_add_ps(acc[i]) + affine_const_v<OFFS>(sc, OFFS ? of : nullptr, xs + i * ng, ng);
}

// tile_q4v at M = 1 for groups of 128 / 256 with the row's scale products and its affine constant
// taken per block of 16 groups beside that block's dots, so the row's scales and offsets are read
// in step with its nibbles (the K = 4096 / 16384 rows of the 7B width, past kQ4v12MaxGroups).
// The same bits as tile_q4v: per group the exact int32 sum (integer adds in any order), then
// acc = fma(float(sum), sc_g * dx_g, acc) in group order (the product a vector mul of 16 groups,
// as scale_products), reduce_add(acc); plus affine_const_v's sum, whose steps of 16 groups run
// here in its order with its operations (c = sc * -8 (+ of), aff = fma(c, xs, aff), masked the
// same way past ng, then reduce_add): sc * -8 is exact, so fma(sc, -8, of) (the contraction GCC
// applies to affine_const_v) and mul + add give the same c. tests/kernels/test_q4_m1_fused.py.
// Why try it: tile_q4v reads a row's offsets in affine_const_v after the row's last group (2 lines
// at K = 4096, 8 at K = 16384: a burst of the offset stream per row) and its scale table before the
// first. A standalone copy of the loops, cold (the four 7B shapes, 3 layers, 283 MB; 1 thread: a
// per-core streaming test; docs/kernels-log.md, session 17 helper B): 35.1 against 32.7 GB/s (probe
// 41), mlp.c_proj (K = 16384) 34.6 against 28.9; tile_q4v without reading the offsets at all ran
// 35.1. In the extension it did not win (q4_m1_fused below), so it is off by default.
template <bool OFFS>
inline void tile_q4f(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                     const float* sc, const float* of, int64_t G, float* out) {
  const int64_t ng = K / G;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512 m8 = _mm512_set1_ps(-8.f);
  __m512 acc = _mm512_setzero_ps(), aff = _mm512_setzero_ps();
  alignas(64) float sd[16];  // sc_g * dx_g of the block's groups (one full store, then 4-byte loads)
  // The int32 sum of one run of 128 k (64 bytes of nibbles) against x; a group of 256 adds two.
  auto run = [&](int64_t r) {
    const uint8_t* p = q + r * 64;
    // a volatile asm, so GCC keeps one prefetch beside each run (with _mm_prefetch it hoisted the 16
    // of a block to its start)
    __asm__ __volatile__("prefetcht0 %0" : : "m"(*(reinterpret_cast<const char*>(p) + kPrefetch)));
    const __m512i v = _mm512_loadu_si512(p);
    const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
    const int8_t* xr = xq + r * 128;
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xr)), hi,
                               _mm512_loadu_si512(xr + 64));
  };
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 k = ng - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ng - g)) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(k, sc + g);
    _mm512_store_ps(sd, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, dx + g)));
    // Read back from memory (a broadcast load a group): without this GCC kept sd in a register and
    // took each lane by vpbroadcastd + vpermd (the form session 14 measured slower); the sweep A/B
    // put both forms below tile_q4v at K = 4096 (docs/kernels-log.md, session 17 helper B).
    __asm__ __volatile__("" ::: "memory");
    __m512 c = _mm512_mul_ps(s, m8);
    if (OFFS) c = _mm512_add_ps(c, _mm512_maskz_loadu_ps(k, of + g));
    aff = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(k, xs + g), aff);  // masked lanes add 0, as there
    if (k == 0xffff && G == 128) {
#pragma GCC unroll 16
      for (int u = 0; u < 16; ++u)
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(run(g + u)), _mm512_set1_ps(sd[u]), acc);
    } else {
      const int64_t rpg = G / 128;
      for (int64_t u = 0; u < std::min<int64_t>(16, ng - g); ++u) {
        __m512i t = run((g + u) * rpg);
        for (int64_t r = 1; r < rpg; ++r) t = _mm512_add_epi32(t, run((g + u) * rpg + r));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(sd[u]), acc);
      }
    }
  }
  out[0] = _mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(aff);
}

}  // namespace qdot
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
