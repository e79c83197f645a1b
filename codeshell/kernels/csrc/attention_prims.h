// The per-query arithmetic of decode attention (attention.cpp), shared by its one-query path
// (attend_group) and its packed verify runs (attention_run512.h): fp32 <-> bf16 loads, scores of up to
// 4 heads two keys at a time, softmax rows, weighted values, in 8-lane registers and (AVX-512F) the
// same bits in 16-lane ones. What this is not: the entry points, the thread split or the switches'
// reading (attention.cpp). Included by attention.cpp only: its definitions live in an anonymous
// namespace, one copy in that translation unit.
#pragma once

#include <immintrin.h>

#include "isa.h"
#include "simd.h"
#include "simd512.h"
#include "switches.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return codeshell::load_bf16x8(p); }
inline float to_f(float v) { return v; }
inline float to_f(uint16_t v) { return codeshell::bf16_to_f32(v); }
inline uint16_t to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// p[r][0..S) = softmax over s (fp32, in place) for R rows.
void softmax_rows(float* p, int R, int64_t S) {
  for (int r = 0; r < R; ++r) {
    float* pr = p + r * S;
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(pr + s));
    float mx = -INFINITY;
    alignas(32) float t[8];
    _mm256_store_ps(t, mv);
    for (float v : t) mx = std::max(mx, v);
    for (int64_t j = s; j < S; ++j) mx = std::max(mx, pr[j]);
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 sv = _mm256_setzero_ps();
    for (s = 0; s + 8 <= S; s += 8) {
      const __m256 ev = codeshell::exp8(_mm256_sub_ps(_mm256_loadu_ps(pr + s), m8));
      _mm256_storeu_ps(pr + s, ev);
      sv = _mm256_add_ps(sv, ev);
    }
    float sum = codeshell::hsum8(sv);
    for (int64_t j = s; j < S; ++j) sum += (pr[j] = std::exp(pr[j] - mx));
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    for (s = 0; s + 8 <= S; s += 8) _mm256_storeu_ps(pr + s, _mm256_mul_ps(_mm256_loadu_ps(pr + s), inv));
    for (int64_t j = s; j < S; ++j) pr[j] *= 1.f / sum;
  }
}

// Scores of RB (<= 4) heads q [RB][D] against keys [s0, s1), two keys at a time: 2 x RB
// independent FMA chains, each key vector converted once for all RB heads. D % 16 == 0.
// Software prefetch of the K and V rows kAhead keys ahead: the cache is read once per step from
// memory, and one sequential stream per thread without it reads at ~7 GB/s here.
constexpr int64_t kAhead = 16;

template <class T>
inline void prefetch_rows(const T* row, int64_t n, int64_t D) {
  const char* c = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * D * int64_t(sizeof(T)); off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

// hsum8 of 8 registers at once, the same pairs of lanes per register (hsum8: lanes i + (i + 4),
// then j + (j + 2), then 0 + 1), as one transposing tree: 8 permutes, 8 shuffles and 7 adds
// for the 8 sums instead of 8 x (extract, 3 adds, 2 shuffles) and 8 scalar multiply-stores.
// Returns [v0, v2, v4, v6, v1, v3, v5, v7]'s sums. fp32 addition is commutative, so each sum is
// hsum8's bits.
inline __m256 hsum8x8(const __m256* v) {
  __m256 x[4];
  for (int i = 0; i < 4; ++i)  // lanes 0-3: v[2i]'s i + (i + 4), lanes 4-7: v[2i + 1]'s
    x[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
  const __m256 y0 = _mm256_add_ps(_mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 y1 = _mm256_add_ps(_mm256_shuffle_ps(x[2], x[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm256_shuffle_ps(x[2], x[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm256_add_ps(_mm256_shuffle_ps(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm256_shuffle_ps(y0, y1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// CODESHELL_ATTN_TREE=0 (read once a call by the entry points; A/B runs): scores' 4-head blocks
// reduce each score by its own hsum8, as before session 18.
std::atomic<bool>& tree_scores() {
  static std::atomic<bool> on{true};
  return on;
}
void read_tree_switch() {
  tree_scores().store(codeshell::env_flag("CODESHELL_ATTN_TREE", true), std::memory_order_relaxed);
}

template <class T, int RB>
void scores(const float* q, int64_t D, const T* k, int64_t S, float scale, float* p) {
  int64_t s = 0;
  if (RB == 4 && tree_scores().load(std::memory_order_relaxed)) {
    // 4 heads x 2 keys: the 8 sums by one tree, scaled in one multiply (the same single
    // rounding per score as hsum8(acc) * scale)
    const __m256 sc = _mm256_set1_ps(scale);
    for (; s + 2 <= S; s += 2) {
      if (s + kAhead + 2 <= S) prefetch_rows(k + (s + kAhead) * D, 2, D);
      __m256 acc[2 * RB];  // [2r + h]: head r, key s + h
      for (int i = 0; i < 2 * RB; ++i) acc[i] = _mm256_setzero_ps();
      const T* k0 = k + s * D;
      const T* k1 = k0 + D;
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 a = load8(k0 + d), b = load8(k1 + d);
        for (int r = 0; r < RB; ++r) {
          const __m256 qv = _mm256_loadu_ps(q + r * D + d);
          acc[2 * r] = _mm256_fmadd_ps(qv, a, acc[2 * r]);
          acc[2 * r + 1] = _mm256_fmadd_ps(qv, b, acc[2 * r + 1]);
        }
      }
      const __m256 z = _mm256_mul_ps(hsum8x8(acc), sc);  // [h0 k0, h1 k0, h2 k0, h3 k0, h0 k1, ...]
      const __m128 lo = _mm256_castps256_ps128(z), hi = _mm256_extractf128_ps(z, 1);
      const __m128 p01 = _mm_unpacklo_ps(lo, hi), p23 = _mm_unpackhi_ps(lo, hi);  // (h0 k0, h0 k1, h1 k0, h1 k1)
      _mm_storel_pi(reinterpret_cast<__m64*>(p + 0 * S + s), p01);
      _mm_storeh_pi(reinterpret_cast<__m64*>(p + 1 * S + s), p01);
      _mm_storel_pi(reinterpret_cast<__m64*>(p + 2 * S + s), p23);
      _mm_storeh_pi(reinterpret_cast<__m64*>(p + 3 * S + s), p23);
    }
  }
  for (; s + 2 <= S; s += 2) {
    if (s + kAhead + 2 <= S) prefetch_rows(k + (s + kAhead) * D, 2, D);
    __m256 acc[2][RB];
    for (int r = 0; r < RB; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
    const T* k0 = k + s * D;
    const T* k1 = k0 + D;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 a = load8(k0 + d), b = load8(k1 + d);
      for (int r = 0; r < RB; ++r) {
        const __m256 qv = _mm256_loadu_ps(q + r * D + d);
        acc[0][r] = _mm256_fmadd_ps(qv, a, acc[0][r]);
        acc[1][r] = _mm256_fmadd_ps(qv, b, acc[1][r]);
      }
    }
    for (int r = 0; r < RB; ++r) {
      p[r * S + s] = codeshell::hsum8(acc[0][r]) * scale;
      p[r * S + s + 1] = codeshell::hsum8(acc[1][r]) * scale;
    }
  }
  for (; s < S; ++s) {
    __m256 acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 a = load8(k + s * D + d);
      for (int r = 0; r < RB; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d), a, acc[r]);
    }
    for (int r = 0; r < RB; ++r) p[r * S + s] = codeshell::hsum8(acc[r]) * scale;
  }
}

// o [RB][D] = p [RB][S] @ v [S][D] in 16-wide column strips: 2 x RB accumulators stay in
// registers over all keys, each value vector converted once for all RB heads. D % 16 == 0.
// Keys go in chunks of kValueChunk so that the chunk of V (64 KiB in bf16 at D = 128) stays in
// L2 while the strips re-read it; o carries the sums between chunks.
constexpr int64_t kValueChunk = 256;

template <class T, int RB>
void weighted_values(const float* p, int64_t S, const T* v, int64_t D, float* o) {
  for (int64_t s0 = 0; s0 < S; s0 += kValueChunk) {
    const int64_t s1 = std::min(S, s0 + kValueChunk);
    for (int64_t d = 0; d < D; d += 16) {
      __m256 acc[RB][2];
      for (int r = 0; r < RB; ++r)
        for (int h = 0; h < 2; ++h)
          acc[r][h] = s0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(o + r * D + d + 8 * h);
      for (int64_t s = s0; s < s1; ++s) {
        if (d == 0 && s + kAhead < S) prefetch_rows(v + (s + kAhead) * D, 1, D);
        const __m256 a = load8(v + s * D + d), b = load8(v + s * D + d + 8);
        for (int r = 0; r < RB; ++r) {
          const __m256 w = _mm256_broadcast_ss(p + r * S + s);
          acc[r][0] = _mm256_fmadd_ps(w, a, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(w, b, acc[r][1]);
        }
      }
      for (int r = 0; r < RB; ++r) {
        _mm256_storeu_ps(o + r * D + d, acc[r][0]);
        _mm256_storeu_ps(o + r * D + d + 8, acc[r][1]);
      }
    }
  }
}

}  // namespace

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {
// weighted_values in 16-lane registers (32 lanes a pass where D % 32 == 0), the same bits: each
// output lane is its own FMA chain over the keys in order, from +0 at the first chunk and from o
// at the next, as in the 8-lane loop; the lanes are independent, so their width does not matter.
// Why: at D = 32 and 4 heads the 8-lane loop spent 16 FMAs a key (and 4 value conversions), half
// of decode attention's per-key work (docs/kernels-log.md, session 18 helper B).
inline __m512 load16v(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16v(const uint16_t* p) { return codeshell::load_bf16x16(p); }

template <class T, int RB, int NV>
void values16(const float* p, int64_t S, const T* v, int64_t D, float* o) {
  for (int64_t s0 = 0; s0 < S; s0 += kValueChunk) {
    const int64_t s1 = std::min(S, s0 + kValueChunk);
    for (int64_t d = 0; d < D; d += 16 * NV) {
      __m512 acc[RB][NV];
      for (int r = 0; r < RB; ++r)
        for (int h = 0; h < NV; ++h)
          acc[r][h] = s0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(o + r * D + d + 16 * h);
      for (int64_t s = s0; s < s1; ++s) {
        if (d == 0 && s + kAhead < S) prefetch_rows(v + (s + kAhead) * D, 1, D);
        __m512 x[NV];
        for (int h = 0; h < NV; ++h) x[h] = load16v(v + s * D + d + 16 * h);
        for (int r = 0; r < RB; ++r) {
          const __m512 w = _mm512_set1_ps(p[r * S + s]);
          for (int h = 0; h < NV; ++h) acc[r][h] = _mm512_fmadd_ps(w, x[h], acc[r][h]);
        }
      }
      for (int r = 0; r < RB; ++r)
        for (int h = 0; h < NV; ++h) _mm512_storeu_ps(o + r * D + d + 16 * h, acc[r][h]);
    }
  }
}

template <class T, int RB>
void weighted_values16(const float* p, int64_t S, const T* v, int64_t D, float* o) {
  if (D % 32 == 0) values16<T, RB, 2>(p, S, v, D, o);
  else values16<T, RB, 1>(p, S, v, D, o);
}
// softmax_rows for one row, the same bits: max (exact in any order), exps with the sum
// accumulated 8 lanes at a time in key order, hsum8, the same scalar tail, then the scaling.
inline void softmax_row16(float* pr, int64_t S) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 16 <= S; s += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(pr + s));
  float mx = _mm512_reduce_max_ps(mv);
  for (; s + 8 <= S; s += 8)
    for (int t = 0; t < 8; ++t) mx = std::max(mx, pr[s + t]);
  for (int64_t j = s; j < S; ++j) mx = std::max(mx, pr[j]);
  const __m512 m16 = _mm512_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  for (s = 0; s + 16 <= S; s += 16) {
    const __m512 ev = codeshell::exp16(_mm512_sub_ps(_mm512_loadu_ps(pr + s), m16));
    _mm512_storeu_ps(pr + s, ev);
    sv = _mm256_add_ps(sv, _mm512_castps512_ps256(ev));
    sv = _mm256_add_ps(sv, _mm512_extractf32x8_ps(ev, 1));
  }
  for (; s + 8 <= S; s += 8) {
    const __m256 ev = codeshell::exp8(_mm256_sub_ps(_mm256_loadu_ps(pr + s), _mm512_castps512_ps256(m16)));
    _mm256_storeu_ps(pr + s, ev);
    sv = _mm256_add_ps(sv, ev);
  }
  float sum = codeshell::hsum8(sv);
  for (int64_t j = s; j < S; ++j) sum += (pr[j] = std::exp(pr[j] - mx));
  const __m512 inv = _mm512_set1_ps(1.f / sum);
  for (s = 0; s + 16 <= S; s += 16) _mm512_storeu_ps(pr + s, _mm512_mul_ps(_mm512_loadu_ps(pr + s), inv));
  for (; s + 8 <= S; s += 8) _mm256_storeu_ps(pr + s, _mm256_mul_ps(_mm256_loadu_ps(pr + s), _mm512_castps512_ps256(inv)));
  for (int64_t j = s; j < S; ++j) pr[j] *= 1.f / sum;
}

// softmax_rows on 16-lane registers (softmax_row16 a row): the same bits.
inline void softmax_rows16(float* p, int R, int64_t S) {
  for (int r = 0; r < R; ++r) softmax_row16(p + r * S, S);
}

// run_packed's copies of a (query, group)'s R x D values, 16 at a time (session 28, helper B: the
// scalar to_f / to_bf16 loops were ~45% of codeshell-mini's batch-8 attention at 16 keys, the
// items being 8 queries x 2 groups of only 4 heads x 32). Exact (bf16 -> fp32) / to_bf16's
// rounding lane by lane (nearest even; a NaN keeps its payload's top bits | 0x40, as to_bf16).
inline void f32_to_bf16_16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(src + i);
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                              _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(r));
  }
  for (; i < n; ++i) dst[i] = to_bf16(src[i]);
}
}  // namespace
CODESHELL_END_AVX512
#endif

