// Decode attention over the engine's KV cache: one new query per row, grouped-query heads.
//
// What this is: out[b, h] = softmax(scale * q[b, h] . K[slot_b, g]^T over keys 0..len_b-1) V[slot_b, g]
// with g = h / (H / G), read straight from the cache layer [slots, G, max_len, D] (bfloat16 or
// float32) through each row's slot index: no gather of the cache, no mask tensor. Math in fp32.
// What this is not: prefill attention (T > 1 goes to PyTorch SDPA) or a training kernel.
//
// Why: on this AVX2 CPU torch's SDPA for one query spends 3.7 ms per layer at 600 cached
// tokens in bf16 (26 ms at batch 8), several times the cost of reading K and V; the cache is
// also gathered when a batch's slots are not consecutive. Here each K/V row is read once per
// KV group and used for up to 4 query heads at a time, with independent FMA chains (two keys
// at a time for the scores, 16-wide value strips held in registers) and a vectorised exp.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline float to_f(float v) { return v; }
inline float to_f(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
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

template <class T, int RB>
void scores(const float* q, int64_t D, const T* k, int64_t S, float scale, float* p) {
  int64_t s = 0;
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

template <class T, int RB>
void attend_block(const float* q, int64_t D, const T* k, const T* v, int64_t S, float scale, float* p, float* o) {
  scores<T, RB>(q, D, k, S, scale, p);
  softmax_rows(p, RB, S);
  weighted_values<T, RB>(p, S, v, D, o);
}

// One (row, KV group): R query heads q [R][D] (fp32) against S keys; writes o [R][D] (fp32).
// Heads go in blocks of up to 4 (K and V are re-read from cache, not memory, per block).
template <class T>
void attend_group(const float* q, int R, int64_t D, const T* k, const T* v, int64_t S, float scale, float* p,
                  float* o) {
  if (D % 16 == 0) {
    int r = 0;
    for (; r + 4 <= R; r += 4) attend_block<T, 4>(q + r * D, D, k, v, S, scale, p, o + r * D);
    switch (R - r) {
      case 3: attend_block<T, 3>(q + r * D, D, k, v, S, scale, p, o + r * D); break;
      case 2: attend_block<T, 2>(q + r * D, D, k, v, S, scale, p, o + r * D); break;
      case 1: attend_block<T, 1>(q + r * D, D, k, v, S, scale, p, o + r * D); break;
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

}  // namespace

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                               const torch::Tensor& slots, const torch::Tensor& lens, double scale) {
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
  auto out = torch::empty_like(q);
  if (kc.scalar_type() == torch::kBFloat16) run<uint16_t>(q, kc, vc, sp, lp, scale, out);
  else run<float>(q, kc, vc, sp, lp, scale, out);
  return out;
}
