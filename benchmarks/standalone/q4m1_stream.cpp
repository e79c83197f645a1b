// Standalone harness (session 17 helper B, docs/kernels-log.md): int4 g128 (with offsets) M = 1 decode
// loops outside the extension, variants of qdot.cpp's tile_q4v, timed cold (3 layers of the four 7B
// linears, 283 MB on huge pages, 2 threads by default) against a plain read probe in every round,
// the variants alternating in rounds (medians, paired ratio to the first); or warm (L2, 1 thread).
//   g++ -O3 -mavx2 -mfma -mf16c -mbmi2 -mtune=native -fopenmp -std=c++20 q4m1_stream.cpp -o q4m1
//   ./q4m1 check 1 VARIANT...        bits of each variant against v0 (tile_q4v's arithmetic)
//   ./q4m1 warm ROUNDS VARIANT...    1 thread, 1 MiB of weights (l1: 16 KiB)
//   T=1 ./q4m1 cold ROUNDS VARIANT...  (T threads; run under flock /tmp/bench.lock nice -n -10)
// Variant names: v0 (tile_q4v), u4t (16-group unrolled, table), fa (tile_q4f's loop: scale products
// and affine step per 16-group block), nr2u4 / nr4u2 (2 / 4 weight rows at once), rd1/rd2/rd3 (plain
// reads of the weight / + scale / + offset streams), e1/e0/dint/dnoepi (diagnostics, not the bits:
// e1 skips the offsets), blkR / pre (scales and offsets of R rows / the chunk first); suffixes
// :PF[:HINT] (prefetch distance, hint 0-4), +PF2 (a second, T1 prefetch), @R[/HINT] (prefetch the
// scales / offsets R rows ahead), #C (C chunks a thread, parallel_chunks' 8), #oS (parallel_owned,
// steps of S rows).
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <time.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "huge_buffer.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

static int64_t PF = 2048;
static int PFH = 0;  // 0: T0, 1: T1, 2: T2, 3: NTA, 4: none
static int64_t PF2 = 0;  // second prefetch (T1), bytes ahead, every line
static int64_t PFS = 0;  // rows ahead to prefetch scales / offsets (0: none)
static int PFSH = 0;
static inline void pfs(const void* p) {
  switch (PFSH) {
    case 0: _mm_prefetch((const char*)p, _MM_HINT_T0); break;
    case 1: _mm_prefetch((const char*)p, _MM_HINT_T1); break;
    case 2: _mm_prefetch((const char*)p, _MM_HINT_T2); break;
    default: _mm_prefetch((const char*)p, _MM_HINT_NTA); break;
  }
}

static inline void pf(const void* p) {
  switch (PFH) {
    case 0: _mm_prefetch((const char*)p, _MM_HINT_T0); break;
    case 1: _mm_prefetch((const char*)p, _MM_HINT_T1); break;
    case 2: _mm_prefetch((const char*)p, _MM_HINT_T2); break;
    case 3: _mm_prefetch((const char*)p, _MM_HINT_NTA); break;
    default: break;
  }
}

template <bool OFFS>
__attribute__((noinline)) float affine_const_v(const float* sc, const float* of, const float* xs, int64_t ng) {
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

inline void scale_products(const float* sc, const float* dx, int64_t ng, float* sd) {
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 k = ng - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ng - g)) - 1);
    _mm512_mask_storeu_ps(sd + g, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sc + g), _mm512_maskz_loadu_ps(k, dx + g)));
  }
}

template <int MB, int CH>
inline void group_dots(const int8_t* xq, int64_t K, const uint8_t* q, int64_t g, int64_t G, __m512i m0f,
                       __m512i (&a)[MB][CH]) {
  for (int i = 0; i < MB; ++i)
    for (int h = 0; h < CH; ++h) a[i][h] = _mm512_setzero_si512();
  for (int64_t k = g * G; k < (g + 1) * G; k += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(q + k / 2) + 2048, _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(q + k / 2);
    const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
    for (int i = 0; i < MB; ++i) {
      const int8_t* xr = xq + i * K + k;
      a[i][0] = _mm512_dpbusd_epi32(a[i][0], lo, _mm512_loadu_si512(xr));
      a[i][CH - 1] = _mm512_dpbusd_epi32(a[i][CH - 1], hi, _mm512_loadu_si512(xr + 64));
    }
  }
}

// V0: the current tile_q4v<1, OFFS> (G >= 128 branch).
template <bool OFFS>
__attribute__((noinline)) void tile_q4v(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                                        const float* sc, const float* of, int64_t G, float* out) {
  const int64_t ng = K / G;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512 acc = _mm512_setzero_ps();
  alignas(64) float sd[128];
  const bool tab = ng <= 128;
  if (tab) scale_products(sc, dx, ng, sd);
  for (int64_t g = 0; g < ng; ++g) {
    __m512i a[1][2];
    group_dots<1, 2>(xq, K, q, g, G, m0f, a);
    __m512i s32 = _mm512_add_epi32(a[0][0], a[0][1]);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), _mm512_set1_ps(tab ? sd[g] : sc[g] * dx[g]), acc);
  }
  out[0] = _mm512_reduce_add_ps(acc) + affine_const_v<OFFS>(sc, OFFS ? of : nullptr, xs, ng);
}

// Integer sum of one 64-byte run of packed int4 (128 k) against x (perm 128 layout).
static inline __m512i dot128(const uint8_t* q, const int8_t* x, __m512i m0f) {
  const __m512i v = _mm512_loadu_si512(q);
  const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(x)), hi,
                             _mm512_loadu_si512(x + 64));
}
// two chains, add (tile_q4v's CH = 2 form)
static inline __m512i dot128b(const uint8_t* q, const int8_t* x, __m512i m0f) {
  const __m512i v = _mm512_loadu_si512(q);
  const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
  return _mm512_add_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(x)),
                          _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, _mm512_loadu_si512(x + 64)));
}

// SM: scale mode. 0 = table (unmasked stores, padded), 1 = bcast(sc) * dx{1to16} per group,
// 2 = vector of 16 products + vpermps with lane index
template <bool OFFS, int SM, int U, bool CH1>
__attribute__((noinline)) void tile_u(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                                      const float* sc, const float* of, float* out) {
  const int64_t ng = K / 128;  // G = 128
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512 acc = _mm512_setzero_ps();
  alignas(64) float sd[128];
  if (PFS)
    for (int64_t g = 0; g < ng; g += 16) {
      pfs(sc + PFS * ng + g);
      pfs(of + PFS * ng + g);
    }
  if (SM == 0)
    for (int64_t g = 0; g < ng; g += 16) _mm512_store_ps(sd + g, _mm512_mul_ps(_mm512_loadu_ps(sc + g), _mm512_loadu_ps(dx + g)));
  for (int64_t g = 0; g < ng; g += U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      pf(q + g * 64 + 64 * u + PF);
      if (PF2) _mm_prefetch((const char*)(q + g * 64 + 64 * u + PF2), _MM_HINT_T1);
      const __m512i s = CH1 ? dot128(q + (g + u) * 64, xq + (g + u) * 128, m0f) : dot128b(q + (g + u) * 64, xq + (g + u) * 128, m0f);
      __m512 d;
      if (SM == 0) d = _mm512_set1_ps(sd[g + u]);
      else d = _mm512_mul_ps(_mm512_set1_ps(sc[g + u]), _mm512_set1_ps(dx[g + u]));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc);
    }
  }
  out[0] = _mm512_reduce_add_ps(acc) + affine_const_v<OFFS>(sc, OFFS ? of : nullptr, xs, ng);
}

// NR weight rows at once (independent chains), scale mode 1, U groups per step.
template <bool OFFS, int NR, int U>
__attribute__((noinline)) void tile_nr(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                                       const float* sc, const float* of, float* out) {
  const int64_t ng = K / 128, ldq = K / 2;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512 acc[NR];
  for (int j = 0; j < NR; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; g += U) {
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) pf(q + j * ldq + g * 64 + PF);
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      const __m512 dxg = _mm512_set1_ps(dx[g + u]);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        const __m512i s = dot128(q + j * ldq + (g + u) * 64, xq + (g + u) * 128, m0f);
        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(_mm512_set1_ps(sc[j * ng + g + u]), dxg), acc[j]);
      }
    }
  }
  for (int j = 0; j < NR; ++j)
    out[j] = _mm512_reduce_add_ps(acc[j]) + affine_const_v<OFFS>(sc + j * ng, OFFS ? of + j * ng : nullptr, xs, ng);
}

// diagnostics (not the bits): D = 1 integer sums only; D = 2 no per-row epilogue
template <int D>
__attribute__((noinline)) void tile_diag(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                                      const float* sc, const float* of, float* out) {
  const int64_t ng = K / 128;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512 acc = _mm512_setzero_ps();
  __m512i ai = _mm512_setzero_si512();
  alignas(64) float sd[128];
  for (int64_t g = 0; g < ng; g += 16) _mm512_store_ps(sd + g, _mm512_mul_ps(_mm512_loadu_ps(sc + g), _mm512_loadu_ps(dx + g)));
  for (int64_t g = 0; g < ng; g += 4) {
    pf(q + g * 64 + PF);
#pragma GCC unroll 16
    for (int u = 0; u < 4; ++u) {
      const __m512i s = dot128(q + (g + u) * 64, xq + (g + u) * 128, m0f);
      if (D == 1) ai = _mm512_add_epi32(ai, s);
      else acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(sd[g + u]), acc);
    }
  }
  if (D == 1) out[0] = _mm512_reduce_add_ps(_mm512_cvtepi32_ps(ai)) + affine_const_v<true>(sc, of, xs, ng);
  else out[0] = acc[0];
}

// E: 1 = no affine (diag), 2 = no reduce (diag), 3 = affine precomputed: `of` points at the row's constant
template <int E>
__attribute__((noinline)) void tile_e(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                                      const float* sc, const float* of, float* out) {
  const int64_t ng = K / 128;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512 acc = _mm512_setzero_ps();
  alignas(64) float sd[128];
  for (int64_t g = 0; g < ng; g += 16) _mm512_store_ps(sd + g, _mm512_mul_ps(_mm512_loadu_ps(sc + g), _mm512_loadu_ps(dx + g)));
  float c0 = 0.f;
  if (E == 4) c0 = affine_const_v<true>(sc, of, xs, ng);
  __m512 aa = _mm512_setzero_ps();
  if (E == 5) {
    const __m512 m8 = _mm512_set1_ps(-8.f);
    for (int64_t g = 0; g < ng; g += 16)
      aa = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_loadu_ps(sc + g), m8, _mm512_loadu_ps(of + g)), _mm512_loadu_ps(xs + g), aa);
  }
  for (int64_t g = 0; g < ng; g += 4) {
    pf(q + g * 64 + PF);
#pragma GCC unroll 16
    for (int u = 0; u < 4; ++u) {
      const __m512i s = dot128(q + (g + u) * 64, xq + (g + u) * 128, m0f);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(sd[g + u]), acc);
    }
  }
  if (E == 6) out[0] = _mm512_reduce_add_ps(acc) + affine_const_v<true>(sc, sc, xs, ng);
  else if (E == 7) { const float c = affine_const_v<true>(sc, of, xs, ng); out[0] = _mm512_reduce_add_ps(acc) + c; }
  else if (E == 4) out[0] = _mm512_reduce_add_ps(acc) + c0;
  else if (E == 5) out[0] = _mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(aa);
  else if (E == 1) out[0] = _mm512_reduce_add_ps(acc);
  else if (E == 2) out[0] = acc[0] + affine_const_v<true>(sc, of, xs, ng);
  else out[0] = _mm512_reduce_add_ps(acc) + of[0];
}

// Block of rows: sd tables and affine constants of R rows first (bursts of the scale / offset
// streams), then the R rows' weights.
static int64_t BR = 32;
__attribute__((noinline)) void rows_blk(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                                        const float* sc, const float* of, float* out, int64_t R) {
  const int64_t ng = K / 128, ldq = K / 2;
  static thread_local float* buf = (float*)aligned_alloc(64, 64 * 128 * 4);
  float cst[64];
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t g = 0; g < ng; g += 16)
      _mm512_store_ps(buf + r * ng + g, _mm512_mul_ps(_mm512_loadu_ps(sc + r * ng + g), _mm512_loadu_ps(dx + g)));
    cst[r] = affine_const_v<true>(sc + r * ng, of + r * ng, xs, ng);
  }
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* qr = q + r * ldq;
    const float* sd = buf + r * ng;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g += 4) {
      pf(qr + g * 64 + PF);
#pragma GCC unroll 16
      for (int u = 0; u < 4; ++u) {
        const __m512i s = dot128(qr + (g + u) * 64, xq + (g + u) * 128, m0f);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(sd[g + u]), acc);
      }
    }
    out[r] = _mm512_reduce_add_ps(acc) + cst[r];
  }
}

// Plain reads of a row's streams (S = 1: weights; 2: + scales; 3: + offsets): the bound of the layout
template <int S>
__attribute__((noinline)) void rd(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                                  const float* sc, const float* of, float* out) {
  const int64_t ng = K / 128;
  __m512i a0 = _mm512_setzero_si512(), a1 = a0;
  for (int64_t i = 0; i < K / 2; i += 128) {
    _mm_prefetch((const char*)q + i + 2048, _MM_HINT_T0);
    _mm_prefetch((const char*)q + i + 2048 + 64, _MM_HINT_T0);
    a0 = _mm512_or_si512(a0, _mm512_loadu_si512(q + i));
    a1 = _mm512_or_si512(a1, _mm512_loadu_si512(q + i + 64));
  }
  if (S >= 2)
    for (int64_t g = 0; g < ng; g += 16) a0 = _mm512_or_si512(a0, _mm512_loadu_si512(sc + g));
  if (S >= 3)
    for (int64_t g = 0; g < ng; g += 16) a1 = _mm512_or_si512(a1, _mm512_loadu_si512(of + g));
  out[0] = _mm512_reduce_add_epi32(_mm512_or_si512(a0, a1));
}

// Fused: per block of 16 groups, the block's scale products (a 16-float table, one store) and
// the affine step (affine_const_v's: c = sc * -8 + of, aff += c * xs) beside its 16 group dots.
template <int SM>
__attribute__((noinline)) void tile_fa(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                                       const float* sc, const float* of, float* out) {
  const int64_t ng = K / 128;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512 m8 = _mm512_set1_ps(-8.f);
  __m512 acc = _mm512_setzero_ps(), aff = _mm512_setzero_ps();
  alignas(64) float tb[16];
  for (int64_t g = 0; g < ng; g += 16) {
    const __m512 scv = _mm512_loadu_ps(sc + g);
    if (SM == 0) _mm512_store_ps(tb, _mm512_mul_ps(scv, _mm512_loadu_ps(dx + g)));
    aff = _mm512_fmadd_ps(_mm512_fmadd_ps(scv, m8, _mm512_loadu_ps(of + g)), _mm512_loadu_ps(xs + g), aff);
#pragma GCC unroll 16
    for (int u = 0; u < 16; ++u) {
      pf(q + (g + u) * 64 + PF);
      const __m512i s = dot128(q + (g + u) * 64, xq + (g + u) * 128, m0f);
      const __m512 d = SM == 0 ? _mm512_set1_ps(tb[u]) : _mm512_mul_ps(_mm512_set1_ps(sc[g + u]), _mm512_set1_ps(dx[g + u]));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc);
    }
  }
  out[0] = _mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(aff);
}

using Kern = void (*)(const int8_t*, int64_t, const float*, const float*, const uint8_t*, const float*, const float*, float*);

struct Var {
  std::string name;
  int nr;  // rows per call
  Kern k;
  int64_t pf = -1;
  int pfh = -1;
  int64_t pfs = 0;
  int pfsh = 0;
  int64_t pf2 = 0;
  int64_t ppt = 0;
};

static void k_v0(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q, const float* sc,
                 const float* of, float* out) {
  tile_q4v<true>(xq, K, dx, xs, q, sc, of, 128, out);
}

static std::vector<Var> variants() {
  return {
      {"v0", 1, k_v0},
      {"u4t", 1, tile_u<true, 0, 4, true>},
      {"u4t2", 1, tile_u<true, 0, 4, false>},
      {"u4m", 1, tile_u<true, 1, 4, true>},
      {"u8t", 1, tile_u<true, 0, 8, true>},
      {"u2t", 1, tile_u<true, 0, 2, true>},
      {"nr2u2", 2, tile_nr<true, 2, 2>},
      {"nr2u4", 2, tile_nr<true, 2, 4>},
      {"nr4u2", 4, tile_nr<true, 4, 2>},
      {"dint", 1, tile_diag<1>},
      {"e1", 1, tile_e<1>},
      {"e2", 1, tile_e<2>},
      {"pre", 1, tile_e<3>},
      {"e4", 1, tile_e<4>},
      {"e5", 1, tile_e<5>},
      {"e0", 1, tile_e<0>},
      {"fa", 1, tile_fa<0>},
      {"fam", 1, tile_fa<1>},
      {"e6", 1, tile_e<6>},
      {"e7", 1, tile_e<7>},
      {"blk", 1, nullptr},
      {"rd1", 1, rd<1>},
      {"rd2", 1, rd<2>},
      {"rd3", 1, rd<3>},
      {"dnoepi", 1, tile_diag<2>},
  };
}

// Rows [n0, n1) of one layer with variant v.
static int64_t PF0 = 2048;
static int PFH0 = 0;
static void run_rows(const Var& v, const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                     const float* sc, const float* of, float* out, int64_t n0, int64_t n1) {
  PF = v.pf >= 0 ? v.pf : PF0;
  PFS = v.pfs;
  PFSH = v.pfsh;
  PF2 = v.pf2;
  PFH = v.pfh >= 0 ? v.pfh : PFH0;
  const int64_t ng = K / 128, ldq = K / 2;
  int64_t n = n0;
  if (v.name.rfind("blk", 0) == 0) {
    const int64_t R = atoll(v.name.c_str() + 3);
    for (; n < n1; n += R) rows_blk(xq, K, dx, xs, q + n * ldq, sc + n * ng, of + n * ng, out + n, std::min(R, n1 - n));
    return;
  }
  if (v.name.rfind("pre", 0) == 0) {
    static thread_local std::vector<float> cst;
    cst.resize(n1 - n0);
    for (int64_t r = n0; r < n1; ++r) cst[r - n0] = affine_const_v<true>(sc + r * ng, of + r * ng, xs, ng);
    for (; n < n1; ++n) v.k(xq, K, dx, xs, q + n * ldq, sc + n * ng, &cst[n - n0], out + n);
    return;
  }
  for (; n + v.nr <= n1; n += v.nr) v.k(xq, K, dx, xs, q + n * ldq, sc + n * ng, of + n * ng, out + n);
  for (; n < n1; ++n) k_v0(xq, K, dx, xs, q + n * ldq, sc + n * ng, of + n * ng, out + n);
}

struct Layer {
  int64_t N, K;
  uint8_t* q;
  float *sc, *of, *out;
};

static double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// parallel_chunks: grain = max(64, N / 16) rounded to 16, claimed from an atomic counter
template <class F>
static void chunks(int64_t n, int threads, F&& f, int64_t per_thread = 8) {
  int64_t grain = std::max<int64_t>(64, (n + per_thread * threads - 1) / (per_thread * threads));
  grain = (grain + 15) / 16 * 16;
  const int64_t nc = (n + grain - 1) / grain;
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
  {
    for (int64_t c; (c = next.fetch_add(1)) < nc;) f(c * grain, std::min(n, (c + 1) * grain));
  }
}

// Owned halves with stealing from the back: thread t runs [t*n/T, (t+1)*n/T) front to back in steps of
// `step`; a thread whose share is done takes steps from the back of the others' shares.
template <class F>
static void owned(int64_t n, int threads, int64_t step, int64_t align, F&& f) {
  struct alignas(64) Share { std::atomic<uint64_t> fb; };  // front << 32 | back
  std::vector<Share> sh(threads);
  for (int t = 0; t < threads; ++t) {
    int64_t lo = (n * t / threads + align - 1) / align * align, hi = t + 1 == threads ? n : (n * (t + 1) / threads + align - 1) / align * align;
    lo = std::min(lo, n), hi = std::min(hi, n);
    sh[t].fb.store(uint64_t(lo) << 32 | uint64_t(hi));
  }
#pragma omp parallel num_threads(threads)
  {
    const int me = omp_get_thread_num();
    for (;;) {  // own share, from the front
      uint64_t v = sh[me].fb.load();
      int64_t fr = int64_t(v >> 32), bk = int64_t(v & 0xffffffffu);
      if (fr >= bk) break;
      const int64_t e = std::min(bk, fr + step);
      if (!sh[me].fb.compare_exchange_weak(v, uint64_t(e) << 32 | uint64_t(bk))) continue;
      f(fr, e);
    }
    for (int o = 1; o < threads; ++o) {  // the others' shares, from the back
      Share& s2 = sh[(me + o) % threads];
      for (;;) {
        uint64_t v = s2.fb.load();
        int64_t fr = int64_t(v >> 32), bk = int64_t(v & 0xffffffffu);
        if (fr >= bk) break;
        const int64_t b = std::max(fr, (bk - step) / align * align);
        if (!s2.fb.compare_exchange_weak(v, uint64_t(fr) << 32 | uint64_t(b))) continue;
        f(b, bk);
      }
    }
  }
}

static double probe(const char* base, size_t bytes, int threads) {
  double best = 1e9;
  for (int r = 0; r < 4; ++r) {
    std::atomic<uint64_t> all{0};
    double t = now();
    chunks(bytes / 128, threads, [&](int64_t l0, int64_t l1) {
      __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t l = l0; l < l1; ++l) {
        const char* p = base + l * 128;
        _mm_prefetch(p + 2048, _MM_HINT_T0);
        _mm_prefetch(p + 2048 + 64, _MM_HINT_T0);
        a0 = _mm256_or_si256(a0, _mm256_load_si256((const __m256i*)p));
        a1 = _mm256_or_si256(a1, _mm256_load_si256((const __m256i*)(p + 32)));
        a2 = _mm256_or_si256(a2, _mm256_load_si256((const __m256i*)(p + 64)));
        a3 = _mm256_or_si256(a3, _mm256_load_si256((const __m256i*)(p + 96)));
      }
      alignas(32) uint64_t v[4];
      _mm256_store_si256((__m256i*)v, _mm256_or_si256(_mm256_or_si256(a0, a1), _mm256_or_si256(a2, a3)));
      all.fetch_or(v[0] | v[1] | v[2] | v[3]);
    });
    t = now() - t;
    if (r) best = std::min(best, t);
  }
  return bytes / best / 1e9;
}
#pragma GCC pop_options

template <class T>
struct AV {
  T* p = nullptr;
  size_t n = 0;
  void resize(size_t m) { p = (T*)aligned_alloc(64, (m * sizeof(T) + 127) / 64 * 64); n = m; }
  void reserve(size_t) {}
  T* data() { return p; }
  T* begin() { return p; }
  T* end() { return p + n; }
};

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "cold";
  int rounds = argc > 2 ? atoi(argv[2]) : 5;
  std::vector<std::string> names;
  for (int i = 3; i < argc; ++i) names.push_back(argv[i]);
  if (const char* e = getenv("PF")) PF0 = atoll(e);
  if (const char* e = getenv("PFH")) PFH0 = atoi(e);
  std::vector<Var> all = variants(), vs;
  for (auto& n : names) {
    std::string base = n.substr(0, std::min({n.find(':'), n.find('@'), n.find('+'), n.find('#')}));
    if (base.rfind("blk", 0) == 0) base = "blk";
    for (auto& v : all)
      if (v.name == base) {
        Var w = v;
        w.name = n;
        if (n.find('@') != std::string::npos) w.pfs = atoll(n.substr(n.find('@') + 1).c_str());
        if (n.find('#') != std::string::npos) w.ppt = n.substr(n.find('#') + 1)[0] == 'o' ? -atoll(n.substr(n.find('#') + 2).c_str()) : atoll(n.substr(n.find('#') + 1).c_str());
        if (n.find('+') != std::string::npos) w.pf2 = atoll(n.substr(n.find('+') + 1).c_str());
        if (n.find('/') != std::string::npos) w.pfsh = atoi(n.substr(n.find('/') + 1).c_str());
        if (n.find(':') != std::string::npos) {
          std::string rest = n.substr(n.find(':') + 1);
          w.pf = atoll(rest.c_str());
          if (rest.find(':') != std::string::npos) w.pfh = atoi(rest.substr(rest.find(':') + 1).c_str());
        }
        vs.push_back(w);
      }
  }
  if (vs.empty()) vs = all;
  srand(1);
  // x for K = 4096 and 16384
  auto mkx = [](int64_t K, AV<int8_t>& xq, AV<float>& dx, AV<float>& xs) {
    xq.reserve(K + 64);
    xq.resize(K);
    dx.resize(K / 128 + 16);
    xs.resize(K / 128 + 16);
    for (auto& v : xq) v = int8_t(rand() % 255 - 127);
    for (auto& v : dx) v = 0.01f * (1 + rand() % 100);
    for (auto& v : xs) v = 0.01f * (rand() % 100);
  };
  AV<int8_t> x4, x16;
  AV<float> d4, d16, s4, s16;
  mkx(4096, x4, d4, s4);
  mkx(16384, x16, d16, s16);
  auto mklayer = [](int64_t N, int64_t K) {
    Layer L{N, K};
    L.q = (uint8_t*)huge_buffer(N * K / 2, 0);
    for (int64_t i = 0; i < N * K / 2; ++i) L.q[i] = uint8_t(rand());
    const int64_t ng = K / 128;
    L.sc = (float*)huge_buffer(N * ng * 4 + 64, 0);
    static int64_t ofs = getenv("OFS") ? atoll(getenv("OFS")) : 0;
    L.of = (float*)((char*)huge_buffer(N * ng * 4 + 64 + ofs, 0) + ofs);
    for (int64_t i = 0; i < N * ng; ++i) L.sc[i] = 0.001f * (1 + rand() % 100), L.of[i] = 0.001f * (rand() % 100);
    L.out = (float*)aligned_alloc(64, N * 4);
    return L;
  };
  const int64_t shapes[4][2] = {{6144, 4096}, {4096, 4096}, {16384, 4096}, {4096, 16384}};
  if (mode == "check") {
    Layer a = mklayer(64, 4096), b = mklayer(64, 16384);
    std::vector<float> r(64), o(64);
    for (Layer* L : {&a, &b}) {
      auto& xq = L->K == 4096 ? x4 : x16;
      auto& dx = L->K == 4096 ? d4 : d16;
      auto& xs = L->K == 4096 ? s4 : s16;
      run_rows(all[0], xq.data(), L->K, dx.data(), xs.data(), L->q, L->sc, L->of, r.data(), 0, 64);
      for (auto& v : vs) {
        run_rows(v, xq.data(), L->K, dx.data(), xs.data(), L->q, L->sc, L->of, L->out, 0, 64);
        printf("K=%ld %s: %s\n", L->K, v.name.c_str(), memcmp(r.data(), L->out, 256) ? "DIFFERENT" : "same bits");
      }
    }
    return 0;
  }
  if (mode == "warm" || mode == "l1") {  // 1 thread, L2-resident (l1: 16 KiB)
    for (int s : {0, 3}) {
      const int64_t K = shapes[s][1], N = (mode == "l1" ? (16 << 10) : (1 << 20)) / (K / 2);
      Layer L = mklayer(N, K);
      auto& xq = K == 4096 ? x4 : x16;
      auto& dx = K == 4096 ? d4 : d16;
      auto& xs = K == 4096 ? s4 : s16;
      std::vector<std::vector<double>> res(vs.size());
      for (int r = 0; r < rounds; ++r)
        for (size_t i = 0; i < vs.size(); ++i) {
          double best = 1e9;
          const int inner = mode == "l1" ? 64 : 1;
          for (int it = 0; it < 200; ++it) {
            double t = now();
            for (int j = 0; j < inner; ++j) run_rows(vs[i], xq.data(), K, dx.data(), xs.data(), L.q, L.sc, L.of, L.out, 0, N);
            best = std::min(best, (now() - t) / inner);
          }
          res[i].push_back(N * K / 2 / best / 1e9);
        }
      for (size_t i = 0; i < vs.size(); ++i) {
        std::sort(res[i].begin(), res[i].end());
        printf("warm %ldx%ld %-8s %6.1f GB/s (median of %d)\n", N, K, vs[i].name.c_str(), res[i][rounds / 2], rounds);
      }
    }
    return 0;
  }
  // cold: 3 layers of the four 7B shapes, 2 threads
  int threads = getenv("T") ? atoi(getenv("T")) : 2;
  int64_t ppt = getenv("PPT") ? atoll(getenv("PPT")) : 8;
  std::vector<Layer> layers;
  size_t bytes = 0;
  for (int l = 0; l < 3; ++l)
    for (auto& s : shapes) {
      layers.push_back(mklayer(s[0], s[1]));
      bytes += s[0] * s[1] / 2 + 2 * s[0] * (s[1] / 128) * 4;
    }
  size_t pb = size_t(1) << 30;
  char* pbuf = (char*)huge_buffer(pb, 0);
  memset(pbuf, 1, pb);
  std::vector<std::vector<double>> gbs(vs.size()), pct(vs.size()), ratio(vs.size());
  std::vector<std::vector<std::vector<double>>> per(vs.size(), std::vector<std::vector<double>>(4));
  for (int r = 0; r < rounds; ++r) {
    double bw = probe(pbuf, pb, threads);
    std::vector<double> tt(vs.size());
    printf("round %d probe %.1f:", r, bw);
    for (size_t j = 0; j < vs.size(); ++j) {
      size_t i = (j + r) % vs.size();
      double best = 1e9;
      std::vector<double> pbest(4, 1e9);
      for (int it = 0; it < 4; ++it) {
        std::vector<double> ps(4, 0);
        double t0 = now();
        for (size_t li = 0; li < layers.size(); ++li) {
          Layer& L = layers[li];
          auto& xq = L.K == 4096 ? x4 : x16;
          auto& dx = L.K == 4096 ? d4 : d16;
          auto& xs = L.K == 4096 ? s4 : s16;
          double t1 = now();
          auto body = [&](int64_t n0, int64_t n1) {
            run_rows(vs[i], xq.data(), L.K, dx.data(), xs.data(), L.q, L.sc, L.of, L.out, n0, n1);
          };
          if (vs[i].ppt < 0) owned(L.N, threads, -vs[i].ppt, 16, body);
          else chunks(L.N, threads, body, vs[i].ppt ? vs[i].ppt : ppt);
          ps[li % 4] += now() - t1;
        }
        double t = now() - t0;
        if (it && t < best) best = t, pbest = ps;
      }
      tt[i] = best;
      gbs[i].push_back(bytes / best / 1e9);
      pct[i].push_back(100 * bytes / best / 1e9 / bw);
      for (int s = 0; s < 4; ++s) per[i][s].push_back(3.0 * (shapes[s][0] * shapes[s][1] / 2 + 2 * shapes[s][0] * (shapes[s][1] / 128) * 4) / pbest[s] / 1e9);
    }
    for (size_t i = 0; i < vs.size(); ++i) {
      ratio[i].push_back(tt[0] / tt[i]);
      printf(" %s %.1f", vs[i].name.c_str(), bytes / tt[i] / 1e9);
    }
    printf("\n");
    fflush(stdout);
  }
  auto med = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  printf("cold, %zu MB a step, %d threads, PF %ld PFH %d\n", bytes >> 20, threads, PF, PFH);
  for (size_t i = 0; i < vs.size(); ++i)
    printf("  %-8s %6.1f GB/s %5.1f%% of probe %5.3fx first | c_attn %.1f proj %.1f fc %.1f mlp.proj %.1f\n", vs[i].name.c_str(),
           med(gbs[i]), med(pct[i]), med(ratio[i]), med(per[i][0]), med(per[i][1]), med(per[i][2]), med(per[i][3]));
  return 0;
}
