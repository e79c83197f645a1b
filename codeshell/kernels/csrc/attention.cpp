// Decode attention over the engine's KV cache: one new query per row, grouped-query heads.
//
// What this is: out[b, h] = softmax(scale * q[b, h] . K[slot_b, g]^T over keys 0..len_b-1) V[slot_b, g]
// with g = h / (H / G), read straight from the cache layer [slots, G, max_len, D] (bfloat16 or
// float32) through each row's slot index: no gather of the cache, no mask tensor. Math in fp32.
// What this is not: prefill attention (T > 1: attention_prefill.cpp on AVX512-BF16, else PyTorch SDPA)
// or a training kernel.
//
// Why: on this AVX2 CPU torch's SDPA for one query spends 3.7 ms per layer at 600 cached
// tokens in bf16 (26 ms at batch 8), several times the cost of reading K and V; the cache is
// also gathered when a batch's slots are not consecutive. Here each K/V row is read once per
// KV group and used for up to 4 query heads at a time, with independent FMA chains (two keys
// at a time for the scores, 16-wide value strips held in registers) and a vectorised exp.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "attention_rows.h"
#include "isa.h"
#include "simd.h"
#include "simd512.h"
#include "switches.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

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

namespace {

// wide (the caller's isa has AVX-512F; the same bits at every level): 1 the values in 16-lane
// registers (values16), 2 the softmax too (softmax_rows16).
template <class T, int RB>
void attend_block(const float* q, int64_t D, const T* k, const T* v, int64_t S, float scale, float* p, float* o,
                  int wide = 0) {
  scores<T, RB>(q, D, k, S, scale, p);
#if CODESHELL_HAVE_AVX512
  if (wide >= 2) softmax_rows16(p, RB, S);
  else softmax_rows(p, RB, S);
#else
  softmax_rows(p, RB, S);
#endif
#if CODESHELL_HAVE_AVX512
  if (wide) {
    weighted_values16<T, RB>(p, S, v, D, o);
    return;
  }
#endif
  weighted_values<T, RB>(p, S, v, D, o);
}

// One (row, KV group): R query heads q [R][D] (fp32) against S keys; writes o [R][D] (fp32).
// Heads go in blocks of up to 4 (K and V are re-read from cache, not memory, per block).
template <class T>
void attend_group(const float* q, int R, int64_t D, const T* k, const T* v, int64_t S, float scale, float* p,
                  float* o, int wide = 0) {
  if (D % 16 == 0) {
    int r = 0;
    for (; r + 4 <= R; r += 4) attend_block<T, 4>(q + r * D, D, k, v, S, scale, p, o + r * D, wide);
    switch (R - r) {
      case 3: attend_block<T, 3>(q + r * D, D, k, v, S, scale, p, o + r * D, wide); break;
      case 2: attend_block<T, 2>(q + r * D, D, k, v, S, scale, p, o + r * D, wide); break;
      case 1: attend_block<T, 1>(q + r * D, D, k, v, S, scale, p, o + r * D, wide); break;
      default: break;
    }
    return;
  }
  for (int64_t s = 0; s < S; ++s) {  // any D: scalar scores, each key row read once for all R heads
    const T* kr = k + s * D;
    for (int r = 0; r < R; ++r) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += q[r * D + d] * to_f(kr[d]);
      p[r * S + s] = dot * scale;
    }
  }
  softmax_rows(p, R, S);
  std::fill(o, o + R * D, 0.f);
  for (int64_t s = 0; s < S; ++s) {
    const T* vr = v + s * D;
    for (int r = 0; r < R; ++r) {
      const float w = p[r * S + s];
      for (int64_t d = 0; d < D; ++d) o[r * D + d] += w * to_f(vr[d]);
    }
  }
}

template <class T>
void run(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const int64_t* slots,
         const int64_t* lens, double scale, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = kc.size(1), L = kc.size(2);
  const int R = int(H / G);
  const T* kp = reinterpret_cast<const T*>(kc.data_ptr());
  const T* vp = reinterpret_cast<const T*>(vc.data_ptr());
  const bool q32 = q.scalar_type() == torch::kFloat32;
  const float* q_f = q32 ? q.data_ptr<float>() : nullptr;
  const uint16_t* q_h = q32 ? nullptr : reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  float* o_f = q32 ? out.data_ptr<float>() : nullptr;
  uint16_t* o_h = q32 ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, B * G, 1, [&](int64_t a, int64_t e) {
    std::vector<float> qf(size_t(R) * D), o(size_t(R) * D), p;
    for (int64_t i = a; i < e; ++i) {
      const int64_t b = i / G, g = i % G, S = lens[b];
      p.resize(size_t(R) * S);
      for (int64_t j = 0; j < R * D; ++j) {
        const int64_t idx = (b * H + g * R) * D + j;
        qf[j] = q32 ? q_f[idx] : to_f(q_h[idx]);
      }
      const int64_t base = (slots[b] * G + g) * L * D;
      attend_group<T>(qf.data(), R, D, kp + base, vp + base, S, float(scale), p.data(), o.data());
      for (int64_t j = 0; j < R * D; ++j) {
        const int64_t idx = (b * H + g * R) * D + j;
        if (q32) o_f[idx] = o[j];
        else o_h[idx] = to_bf16(o[j]);
      }
    }
  });
}


// ---- packed attention: the queries of one slot share their keys ------------------------------
//
// A speculative verify step packs a sequence's last token and its drafts as consecutive
// queries of one slot (positions p .. p + d: query j sees keys 0..p + j). Each query must get
// exactly the bits `run` above gives it alone (plain decoding's kernel: the greedy text must
// not depend on whether a token was verified or plainly decoded), so the arithmetic per
// (query, head, key) stays attend_block's: each score an FMA chain over d in 8-lane steps from
// zero, summed by hsum8's tree and scaled; softmax_rows on the query's own length; each
// output lane an FMA chain over keys 0..S-1 in order from zero. What a run of n >= 2 queries
// shares (avx512::attend_run): a block of the slot's keys and values converted to fp32 once
// for all its queries and heads (it stays in L1), and 16-lane registers that do two keys'
// 8-lane chains side by side. A single query, or a CPU without AVX-512, runs decode's own
// code (attend_group) per query: on AVX2 registers sharing the loads measured no faster
// (the FMAs, hsum8 and exps are per query and dominate at head_dim 32), and for one query
// the fp32 copy of the block costs more than it saves.

#if CODESHELL_HAVE_AVX512
// A run with 16-lane registers (AVX-512F; chosen by the caller's isa >= kAvx512Vnni), still
// exactly the AVX2 arithmetic per query: a score register holds two keys' 8-lane FMA chains
// side by side (lanes 0-7 and 8-15), reduced by hsum8's tree in each half (hsum8x16); a value
// register holds 16 output lanes, each its own FMA chain over the keys in order; softmax's
// exps are exp8's operations 16 at a time, its sum accumulated 8 lanes at a time in order.
CODESHELL_BEGIN_AVX512
namespace avx512 {

// hsum8 of each 256-bit half of 8 registers (16 sums). Register i holds keys (kA[i], kB[i]) of
// a 16-key group; the result holds keys 0..15 in order.
constexpr int kA[8] = {0, 8, 1, 9, 2, 10, 3, 11};
constexpr int kB[8] = {4, 12, 5, 13, 6, 14, 7, 15};

inline __m512 hsum8x16(const __m512* a) {
  auto half = [](__m512 x, __m512 y) {  // per 8-lane half: lane i + lane i + 4 -> [x.A, x.B, y.A, y.B] x 4 lanes
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  const __m512 s01 = half(a[0], a[1]), s23 = half(a[2], a[3]), s45 = half(a[4], a[5]), s67 = half(a[6], a[7]);
  const __m512 t0 = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 t1 = _mm512_add_ps(_mm512_shuffle_ps(s45, s67, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(s45, s67, _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 1, 3, 1)));
}


// Keys [s0, s1) of a cache block as fp32 in score order: per 16-key group and register i,
// D/8 chunks of 16 floats [key kA[i] chunk c | key kB[i] chunk c] (keys past s1: zeros).
template <class T>
void keys_paired(const T* src, int64_t s0, int64_t s1, int64_t D, float* buf) {
  const int64_t C = D / 8;
  for (int64_t g = s0; g < s1; g += 16)
    for (int i = 0; i < 8; ++i)
      for (int h = 0; h < 2; ++h) {
        const int64_t s = g + (h ? kB[i] : kA[i]);
        float* dst = buf + (((g - s0) / 16 * 8 + i) * C) * 16 + 8 * h;
        if (s < s1) {
          for (int64_t c = 0; c < C; ++c) _mm256_storeu_ps(dst + c * 16, load8(src + s * D + c * 8));
        } else {
          for (int64_t c = 0; c < C; ++c) _mm256_storeu_ps(dst + c * 16, _mm256_setzero_ps());
        }
      }
}

// Values [s0, s1) as fp32 rows [s1 - s0][D].
template <class T>
void values_f32(const T* src, int64_t s0, int64_t s1, int64_t D, float* buf) {
  const int64_t n = (s1 - s0) * D;
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(buf + i, load8(src + s0 * D + i));
}

// ---- the transposed run (session 38; CODESHELL_ATTN_RUN_T, bf16 caches with D % 32 == 0) --------
// A 16-key group's scores as attend_group / scores16 compute them, without hsum8x16's shuffles: the
// keys stored transposed ([D][16 keys] fp32 a group), so that lane l of each score's 8-lane FMA chain
// (dims l, l + 8, l + 16, ... in order) is register a[l] over 16 keys, and hsum8's tree
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) is seven vertical adds. The same products, the
// same FMA chains, the same pairs added: the same bits (fp32 addition and multiplication commute).
// Why: at codeshell-mini's head dim 32 a score was 2 FMAs and ~1.3 shuffles / adds on the same two
// ports, and verify rows cost a plain row's attention each (~43 us a row of ~56, session 38).

// r[16] rows of 16 dwords -> r[c] = column c (rows 0..15): unpack 32 / 64, then a 4 x 4 transpose of
// the 128-bit lanes.
inline void transpose16_epi32(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[4b + j], lane L: rows 4b..4b+3 of column 4L + j
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i u0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), u1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
    const __m512i u2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88), u3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    t[j] = _mm512_shuffle_i32x4(u0, u2, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(u1, u3, 0x88);
    t[8 + j] = _mm512_shuffle_i32x4(u0, u2, 0xdd);
    t[12 + j] = _mm512_shuffle_i32x4(u1, u3, 0xdd);
  }
  for (int c = 0; c < 16; ++c) r[c] = t[c];
}

// bf16 keys [s0, s1) as fp32 [group][D][16 keys] (keys past s1: zeros); D % 32 == 0. A 32-dim slice
// of 16 keys is 16 rows of 16 bf16 pairs: transposed as dwords, each pair's low half is dim 2c and
// its high half dim 2c + 1 (bf16 -> fp32 is the bits shifted up 16: exact, as load8).
inline void keys_transposed(const uint16_t* src, int64_t s0, int64_t s1, int64_t D, float* buf) {
  const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int64_t g = s0; g < s1; g += 16) {
    float* dst = buf + (g - s0) * D;
    for (int64_t dp = 0; dp < D; dp += 32) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = g + i < s1 ? _mm512_loadu_si512(src + (g + i) * D + dp) : _mm512_setzero_si512();
      transpose16_epi32(r);
      for (int c = 0; c < 16; ++c) {
        _mm512_storeu_si512(dst + (dp + 2 * c) * 16, _mm512_slli_epi32(r[c], 16));
        _mm512_storeu_si512(dst + (dp + 2 * c + 1) * 16, _mm512_and_si512(r[c], hi));
      }
    }
  }
}

// scores16's p[s] for keys [0, n) of a 16-key group stored by keys_transposed.
inline void scores16_t(const float* q, const float* kt, int64_t D, int n, __m512 scale, float* p) {
  __m512 a[8];
  for (int l = 0; l < 8; ++l) a[l] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 8)
    for (int l = 0; l < 8; ++l) a[l] = _mm512_fmadd_ps(_mm512_set1_ps(q[c + l]), _mm512_loadu_ps(kt + (c + l) * 16), a[l]);
  const __m512 f0 = _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6]));
  const __m512 f1 = _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7]));
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), _mm512_mul_ps(_mm512_add_ps(f0, f1), scale));
}

// scores16_t for two query heads q0, q1 (p0, p1) on one key group: each key vector loaded once for
// both heads' FMAs (one head's FMAs took two loads each, the key and q's broadcast: more than the
// load ports give at two FMAs a cycle). Each head's chains and sums are scores16_t's: the same bits.
inline void scores16_t2(const float* q0, const float* q1, const float* kt, int64_t D, int n, __m512 scale, float* p0,
                        float* p1) {
  __m512 a[8], b[8];
  for (int l = 0; l < 8; ++l) a[l] = b[l] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 8)
    for (int l = 0; l < 8; ++l) {
      const __m512 k = _mm512_loadu_ps(kt + (c + l) * 16);
      a[l] = _mm512_fmadd_ps(_mm512_set1_ps(q0[c + l]), k, a[l]);
      b[l] = _mm512_fmadd_ps(_mm512_set1_ps(q1[c + l]), k, b[l]);
    }
  const __mmask16 m = __mmask16((1u << n) - 1);
  const __m512 f0 = _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6]));
  const __m512 f1 = _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7]));
  _mm512_mask_storeu_ps(p0, m, _mm512_mul_ps(_mm512_add_ps(f0, f1), scale));
  const __m512 g0 = _mm512_add_ps(_mm512_add_ps(b[0], b[4]), _mm512_add_ps(b[2], b[6]));
  const __m512 g1 = _mm512_add_ps(_mm512_add_ps(b[1], b[5]), _mm512_add_ps(b[3], b[7]));
  _mm512_mask_storeu_ps(p1, m, _mm512_mul_ps(_mm512_add_ps(g0, g1), scale));
}

// values_f32 for bf16 rows 16 values a step (one 512-bit store each instead of two 256-bit ones:
// the copy was store-bound); the same values: bf16_to_f32_16 over the block's rows.
inline void values_f32_16(const uint16_t* src, int64_t s0, int64_t s1, int64_t D, float* buf) {
  codeshell::widen_bf16_row(src + s0 * D, buf, (s1 - s0) * D);
}

// p[s] for keys [0, n) of a 16-key group (n <= 16), keys paired as keys_paired stores them.
inline void scores16(const float* q, const float* kp, int64_t D, int n, __m512 scale, float* p) {
  const int64_t C = D / 8;
  __m512 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    const __m512 qv = _mm512_broadcast_f32x8(_mm256_loadu_ps(q + c * 8));
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kp + (i * C + c) * 16), acc[i]);
  }
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), _mm512_mul_ps(hsum8x16(acc), scale));
}

// o [RB][D] += p [RB] (stride ps) @ v [n][D], 16 * NV lanes at a time.
template <int RB, int NV>
void values_block(const float* p, int64_t ps, const float* v, int64_t n, int64_t D, float* o) {
  for (int64_t d = 0; d < D; d += 16 * NV) {
    __m512 acc[RB][NV];
    for (int r = 0; r < RB; ++r)
      for (int h = 0; h < NV; ++h) acc[r][h] = _mm512_loadu_ps(o + r * D + d + 16 * h);
    for (int64_t s = 0; s < n; ++s) {
      __m512 x[NV];
      for (int h = 0; h < NV; ++h) x[h] = _mm512_loadu_ps(v + s * D + d + 16 * h);
      for (int r = 0; r < RB; ++r) {
        const __m512 w = _mm512_set1_ps(p[r * ps + s]);
        for (int h = 0; h < NV; ++h) acc[r][h] = _mm512_fmadd_ps(w, x[h], acc[r][h]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int h = 0; h < NV; ++h) _mm512_storeu_ps(o + r * D + d + 16 * h, acc[r][h]);
  }
}

template <int NV>
void values_heads(const float* p, int64_t ps, const float* v, int64_t n, int64_t D, int R, float* o) {
  int r = 0;
  for (; r + 4 <= R; r += 4) values_block<4, NV>(p + r * ps, ps, v, n, D, o + r * D);
  switch (R - r) {
    case 3: values_block<3, NV>(p + r * ps, ps, v, n, D, o + r * D); break;
    case 2: values_block<2, NV>(p + r * ps, ps, v, n, D, o + r * D); break;
    case 1: values_block<1, NV>(p + r * ps, ps, v, n, D, o + r * D); break;
    default: break;
  }
}

// attend_run with 16-lane registers; D % 16 == 0.
template <class T>
void attend_run(const float* q, int n, int R, int64_t D, const T* k, const T* v, const int64_t* lens, float scale,
                std::vector<float>& p, std::vector<float>& kb, float* o, bool transposed) {
  // the transposed keys (keys_transposed / scores16_t) for bf16 caches at D % 32 == 0
  constexpr bool b16 = std::is_same_v<T, uint16_t>;
  const bool tr = b16 && transposed && D % 32 == 0;
  // CODESHELL_ATTN_RUN_T2=0 (read per call; A/B runs): the transposed scores one head at a time
  const bool pair = codeshell::env_flag("CODESHELL_ATTN_RUN_T2", true);
  int64_t smax = 0;
  for (int j = 0; j < n; ++j) smax = std::max(smax, lens[j]);
  const int64_t KB = std::max<int64_t>(16, (4096 / D) / 16 * 16);  // keys per fp32 block: 16 KiB
  p.resize(size_t(n) * R * smax + 16);  // + 16: a 16-key group's masked store stays inside
  kb.resize(size_t(KB) * D);
  const __m512 sc = _mm512_set1_ps(scale);
  float* pp = p.data();
  for (int64_t s0 = 0; s0 < smax; s0 += KB) {
    const int64_t s1 = std::min(smax, s0 + KB);
    if constexpr (b16) {
      if (tr) keys_transposed(k, s0, s1, D, kb.data());
      else keys_paired(k, s0, s1, D, kb.data());
    } else {
      keys_paired(k, s0, s1, D, kb.data());
    }
    for (int j = 0; j < n; ++j) {
      const int64_t e = std::min(s1, lens[j]);
      for (int r = 0; r < R; ++r) {
        const float* qr = q + (int64_t(j) * R + r) * D;
        float* pr = pp + (int64_t(j) * R + r) * smax;
        if (tr && pair && r + 1 < R) {  // heads r and r + 1 together (scores16_t2)
          for (int64_t s = s0; s < e; s += 16)
            scores16_t2(qr, qr + D, kb.data() + (s - s0) * D, D, int(std::min<int64_t>(16, e - s)), sc, pr + s,
                        pr + smax + s);
          ++r;
        } else if (tr) {
          for (int64_t s = s0; s < e; s += 16)
            scores16_t(qr, kb.data() + (s - s0) * D, D, int(std::min<int64_t>(16, e - s)), sc, pr + s);
        } else {
          for (int64_t s = s0; s < e; s += 16)
            scores16(qr, kb.data() + (s - s0) * D, D, int(std::min<int64_t>(16, e - s)), sc, pr + s);
        }
      }
    }
  }
  for (int j = 0; j < n; ++j)
    for (int r = 0; r < R; ++r) softmax_row16(pp + (int64_t(j) * R + r) * smax, lens[j]);
  std::fill(o, o + int64_t(n) * R * D, 0.f);
  for (int64_t s0 = 0; s0 < smax; s0 += KB) {
    const int64_t s1 = std::min(smax, s0 + KB);
    if constexpr (b16) {
      if (tr) values_f32_16(v, s0, s1, D, kb.data());
      else values_f32(v, s0, s1, D, kb.data());
    } else {
      values_f32(v, s0, s1, D, kb.data());
    }
    for (int j = 0; j < n; ++j) {
      const int64_t e = std::min(s1, lens[j]);
      if (e <= s0) continue;
      if (D % 32 == 0) values_heads<2>(pp + int64_t(j) * R * smax + s0, smax, kb.data(), e - s0, D, R, o + int64_t(j) * R * D);
      else values_heads<1>(pp + int64_t(j) * R * smax + s0, smax, kb.data(), e - s0, D, R, o + int64_t(j) * R * D);
    }
  }
}

template void attend_run<uint16_t>(const float*, int, int, int64_t, const uint16_t*, const uint16_t*, const int64_t*,
                                   float, std::vector<float>&, std::vector<float>&, float*, bool);
template void attend_run<float>(const float*, int, int, int64_t, const float*, const float*, const int64_t*, float,
                                std::vector<float>&, std::vector<float>&, float*, bool);
}  // namespace avx512
CODESHELL_END_AVX512
#endif

// CODESHELL_ATTN_RUN1=1 (read per call; off by default): a single query of its slot (every query
// of a plain batched decode step) on attend_run too, not attend_group. The same bits either way
// (attend_run is attend_group's arithmetic per query, see above); what differs is the cost per
// (key, head): attend_group reduces each score's 8-lane chain by its own hsum8, attend_run 16
// keys' chains in one transposing tree, after converting a block of keys to fp32 once for the
// group's R heads. Measured slower at codeshell-mini's short contexts (docs/kernels-log.md, session 18
// helper B), so it stays an A/B switch.
// CODESHELL_ATTN_V16=0 (read per call; A/B runs): the packed path's values in 8-lane registers.
bool values_wide() {
  return codeshell::env_flag("CODESHELL_ATTN_V16", true);
}

bool single_queries_run() {
  return codeshell::env_flag("CODESHELL_ATTN_RUN1", false);
}

// CODESHELL_ATTN_LEAN=0 (read per call; A/B runs): a single query's item as before session 28
// (scalar q / output copies, softmax_rows in 8-lane registers). Default on AVX-512: the copies
// 16 lanes at a time and softmax_rows16 (the same bits).
bool lean_items() {
  return codeshell::env_flag("CODESHELL_ATTN_LEAN", true);
}

// The packed path's switches (attention_rows.h), read once a call.
// CODESHELL_ATTN_RUN_T=0 (read per call; A/B runs): a verify run's keys in keys_paired's layout and
// its scores reduced by hsum8x16, as before session 38 (default: keys_transposed / scores16_t for bf16
// caches at D % 32 == 0). The same bits either way.
PackedAttentionSwitches read_switches() {
  return PackedAttentionSwitches{single_queries_run(), values_wide(), lean_items(),
                                 codeshell::env_flag("CODESHELL_ATTN_RUN_T", true)};
}

// Queries [i0, i1) of q (out's rows [i0, i1)); `serial`: on the calling thread (a decode step's
// team chunk), else split over (run, group) items by at::parallel_for. `sw`: the switches, read
// by the caller (read_switches). `g0, g1` (serial only; default all): only KV groups [g0, g1) of
// each run (packed_attention_groups: a batch-1 query's groups split over the team).
template <class T>
void run_packed(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const int64_t* slots,
                const int64_t* lens, double scale, bool wide, torch::Tensor& out, const PackedAttentionSwitches& sw, int64_t i0,
                int64_t i1, bool serial, int64_t g0 = 0, int64_t g1 = -1) {
  const int64_t H = q.size(1), D = q.size(2), G = kc.size(1), L = kc.size(2);
  const int R = int(H / G);
  const bool single_run = wide && sw.run1, vwide = wide && sw.v16, lean = wide && sw.lean;
  const int vmode = vwide ? (lean ? 2 : 1) : 0;  // attend_group's `wide`
  std::vector<int64_t> start{i0};  // runs: maximal stretches of consecutive queries of one slot
  for (int64_t i = i0 + 1; i <= i1; ++i)
    if (i == i1 || slots[i] != slots[i - 1]) start.push_back(i);
  const int64_t U = int64_t(start.size()) - 1;
  const T* kp = reinterpret_cast<const T*>(kc.data_ptr());
  const T* vp = reinterpret_cast<const T*>(vc.data_ptr());
  const bool q32 = q.scalar_type() == torch::kFloat32;
  const float* q_f = q32 ? q.data_ptr<float>() : nullptr;
  const uint16_t* q_h = q32 ? nullptr : reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  float* o_f = q32 ? out.data_ptr<float>() : nullptr;
  uint16_t* o_h = q32 ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  auto items = [&](int64_t a, int64_t e) {
    // per-thread scratch kept between calls (resized per item: the sizes do not change the bits)
    thread_local std::vector<float> qf, o, p, kb;
    for (int64_t u_g = a; u_g < e; ++u_g) {
      const int64_t u = u_g / G, g = u_g % G, i0 = start[u];
      const int n = int(start[u + 1] - i0);
      qf.resize(size_t(n) * R * D);
      o.resize(size_t(n) * R * D);
      for (int j = 0; j < n; ++j) {
#if CODESHELL_HAVE_AVX512
        if (lean && !q32) {
          codeshell::widen_bf16_row(q_h + ((i0 + j) * H + g * R) * D, qf.data() + size_t(j) * R * D, R * D);
          continue;
        }
#endif
        for (int64_t x = 0; x < R * D; ++x) {
          const int64_t idx = ((i0 + j) * H + g * R) * D + x;
          qf[size_t(j) * R * D + x] = q32 ? q_f[idx] : to_f(q_h[idx]);
        }
      }
      const int64_t base = (slots[i0] * G + g) * L * D;
      bool done = false;
#if CODESHELL_HAVE_AVX512
      if (wide && (n >= 2 || single_run) && D % 16 == 0) {
        avx512::attend_run<T>(qf.data(), n, R, D, kp + base, vp + base, lens + i0, float(scale), p, kb, o.data(), sw.run_t);
        done = true;
      }
#endif
      for (int j = 0; j < n && !done; ++j) {  // decode's code, one query at a time
        p.resize(size_t(R) * lens[i0 + j]);
        attend_group<T>(qf.data() + size_t(j) * R * D, R, D, kp + base, vp + base, lens[i0 + j], float(scale),
                        p.data(), o.data() + size_t(j) * R * D, vmode);
      }
      for (int j = 0; j < n; ++j) {
#if CODESHELL_HAVE_AVX512
        if (lean && !q32) {
          f32_to_bf16_16(o.data() + size_t(j) * R * D, o_h + ((i0 + j) * H + g * R) * D, R * D);
          continue;
        }
#endif
        for (int64_t x = 0; x < R * D; ++x) {
          const int64_t idx = ((i0 + j) * H + g * R) * D + x;
          if (q32) o_f[idx] = o[size_t(j) * R * D + x];
          else o_h[idx] = to_bf16(o[size_t(j) * R * D + x]);
        }
      }
    }
  };
  if (serial && (g0 > 0 || (g1 >= 0 && g1 < G))) {
    for (int64_t u = 0; u < U; ++u) items(u * G + g0, u * G + std::min(g1, G));  // the same items, fewer of them
  } else if (serial) {
    items(0, U * G);
  } else {
    at::parallel_for(0, U * G, 1, items);
  }
}

}  // namespace

namespace {
// The arguments of both entry points: q [B, H, D]; caches [slots, G, max_len, D]; slots, lens int64 [B].
void check_args(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const torch::Tensor& slots,
                const torch::Tensor& lens) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [B, H, D] tensor");
  TORCH_CHECK(kc.dim() == 4 && kc.is_contiguous() && vc.sizes() == kc.sizes() && vc.is_contiguous(),
              "k and v caches must be contiguous [slots, G, max_len, D] tensors of one shape");
  TORCH_CHECK(kc.scalar_type() == vc.scalar_type() &&
                  (kc.scalar_type() == torch::kBFloat16 || kc.scalar_type() == torch::kFloat32),
              "the KV cache must be bfloat16 or float32");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kFloat32, "q must be bf16 or fp32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = kc.size(1);
  TORCH_CHECK(kc.size(3) == D && G > 0 && H % G == 0, "head dims or group count do not match the cache");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && lens.scalar_type() == torch::kInt64 && slots.numel() == B &&
                  lens.numel() == B && slots.is_contiguous() && lens.is_contiguous(),
              "slots and lens must be contiguous int64 [B] tensors");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= sp[b] && sp[b] < kc.size(0), "slot ", sp[b], " is outside the cache");
    TORCH_CHECK(0 < lp[b] && lp[b] <= kc.size(2), "length ", lp[b], " is outside the cache");
  }
}
}  // namespace

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                               const torch::Tensor& slots, const torch::Tensor& lens, double scale) {
  check_args(q, kc, vc, slots, lens);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  auto out = torch::empty_like(q);
  read_tree_switch();
  if (kc.scalar_type() == torch::kBFloat16) run<uint16_t>(q, kc, vc, sp, lp, scale, out);
  else run<float>(q, kc, vc, sp, lp, scale, out);
  return out;
}

// Packed attention for single queries of any slots (decode, or a verify step's last tokens and
// drafts): the same result as decode_attention, bit for bit, per query; consecutive queries of
// one slot (a run) share their key and value loads (attend_run).
torch::Tensor packed_attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                               const torch::Tensor& slots, const torch::Tensor& lens, double scale, int64_t isa) {
  check_args(q, kc, vc, slots, lens);
  codeshell::check_isa(isa);
  // 16-lane registers from the AVX-512 levels on (AVX-512F; the same bits as the AVX2 path)
  const bool wide = CODESHELL_HAVE_AVX512 && isa >= codeshell::kAvx512Vnni;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  auto out = torch::empty_like(q);
  read_tree_switch();
  const PackedAttentionSwitches sw = read_switches();
  const int64_t M = q.size(0);
  if (kc.scalar_type() == torch::kBFloat16) run_packed<uint16_t>(q, kc, vc, sp, lp, scale, wide, out, sw, 0, M, false);
  else run_packed<float>(q, kc, vc, sp, lp, scale, wide, out, sw, 0, M, false);
  return out;
}

// packed_attention's queries [i0, i1) into rows [i0, i1) of the caller's `out` (q's shape and
// dtype, contiguous), on the calling thread: the native decode step's share of a step's queries
// (step_layers.cpp `attend`), each row the bits packed_attention gives it (the same run_packed
// items; a query's result does not depend on the others in the call). What it saves against a
// packed_attention call on narrowed tensors: the output tensor, three views, the OpenMP region and
// two getenv scans a call (at batch 8 each of the 8 layers' attention ran as two such calls; after
// a step's weights have streamed through the caches that code and the environment are cold).
// The caller checks the arguments once (packed_attention_check) and reads the switches once
// (packed_attention_switches) for all its chunks.
void packed_attention_check(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                            const torch::Tensor& slots, const torch::Tensor& lens, int64_t isa,
                            const torch::Tensor& out) {
  check_args(q, kc, vc, slots, lens);
  codeshell::check_isa(isa);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "packed_attention_rows: out must be contiguous, of q's shape and dtype");
}

PackedAttentionSwitches packed_attention_switches() {
  read_tree_switch();
  return read_switches();
}

void packed_attention_rows(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                           const torch::Tensor& slots, const torch::Tensor& lens, double scale, int64_t isa,
                           const PackedAttentionSwitches& sw, int64_t i0, int64_t i1, torch::Tensor& out) {
  const bool wide = CODESHELL_HAVE_AVX512 && isa >= codeshell::kAvx512Vnni;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  if (i1 <= i0) return;
  if (kc.scalar_type() == torch::kBFloat16) run_packed<uint16_t>(q, kc, vc, sp, lp, scale, wide, out, sw, i0, i1, true);
  else run_packed<float>(q, kc, vc, sp, lp, scale, wide, out, sw, i0, i1, true);
}

// KV groups [g0, g1) of every query of q [M, H, D] (heads [g0 R, g1 R)) into those heads of out,
// on the calling thread: the decode step's batch-1 query split over its team by groups
// (step_layers.cpp `attend`), each (query, group) item the run_packed item packed_attention
// computes for it (an item reads only its group's heads of q and writes only its heads of out), so
// the bits are packed_attention's. Checks and switches as packed_attention_rows.
void packed_attention_groups(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                             const torch::Tensor& slots, const torch::Tensor& lens, double scale, int64_t isa,
                             const PackedAttentionSwitches& sw, int64_t g0, int64_t g1, torch::Tensor& out) {
  const bool wide = CODESHELL_HAVE_AVX512 && isa >= codeshell::kAvx512Vnni;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t M = q.size(0);
  if (g1 <= g0 || M == 0) return;
  if (kc.scalar_type() == torch::kBFloat16) run_packed<uint16_t>(q, kc, vc, sp, lp, scale, wide, out, sw, 0, M, true, g0, g1);
  else run_packed<float>(q, kc, vc, sp, lp, scale, wide, out, sw, 0, M, true, g0, g1);
}
