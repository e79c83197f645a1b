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
// KV group and used for all of its query heads.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

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

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// One (row, KV group): R query heads q [R][D] (fp32) against S keys; writes o [R][D] (fp32).
template <class T>
void attend_group(const float* q, int R, int64_t D, const T* k, const T* v, int64_t S, float scale, float* p,
                  float* o) {
  const bool vec = D % 8 == 0;
  for (int64_t s = 0; s < S; ++s) {  // scores: each key row read once for all R heads
    const T* kr = k + s * D;
    for (int r = 0; r < R; ++r) {
      float dot = 0.f;
      if (vec) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(load8(q + r * D + d), load8(kr + d), acc);
        dot = hsum(acc);
      } else {
        for (int64_t d = 0; d < D; ++d) dot += q[r * D + d] * to_f(kr[d]);
      }
      p[r * S + s] = dot * scale;
    }
  }
  for (int r = 0; r < R; ++r) {  // softmax in fp32
    float* pr = p + r * S;
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; ++s) mx = std::max(mx, pr[s]);
    float sum = 0.f;
    for (int64_t s = 0; s < S; ++s) sum += (pr[s] = std::exp(pr[s] - mx));
    const float inv = 1.f / sum;
    for (int64_t s = 0; s < S; ++s) pr[s] *= inv;
  }
  std::fill(o, o + R * D, 0.f);
  for (int64_t s = 0; s < S; ++s) {  // o += p * v, each value row read once
    const T* vr = v + s * D;
    for (int r = 0; r < R; ++r) {
      const float w = p[r * S + s];
      float* orow = o + r * D;
      if (vec) {
        const __m256 wv = _mm256_set1_ps(w);
        for (int64_t d = 0; d < D; d += 8)
          _mm256_storeu_ps(orow + d, _mm256_fmadd_ps(wv, load8(vr + d), _mm256_loadu_ps(orow + d)));
      } else {
        for (int64_t d = 0; d < D; ++d) orow[d] += w * to_f(vr[d]);
      }
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
