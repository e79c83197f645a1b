// Temperature sampling of a row (or the rows of a decode step) of logits by inverse CDF, fused
// into two passes.
//
// What this is: token = the first i with cumsum(softmax(logits / T))[i] > u * total, u in [0, 1):
// the draw `engine/sampling.py` makes with torch ops (softmax, cumsum, searchsorted), done here
// as one max pass and one exp-and-sum pass over the vocabulary, then a scan of the block sums
// that stops at the crossing. Tokens of probability 0 (a -inf logit, or exp underflow) are never
// drawn. What this is not: top-k/top-p/min-p or penalties (those rows take the torch path).
//
// Why: on a 70,144-token vocabulary the torch ops cost 270-350 us a row on this CPU (each pass
// allocates and the cumsum is scalar), about 8% of a batch-16 decode step of a small model;
// this takes ~75 us.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

#include "simd.h"

namespace {

int64_t draw(const float* l, int64_t V, double temperature, double u) {
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  TORCH_CHECK(u >= 0 && u < 1, "u must be in [0, 1)");
  TORCH_CHECK(V > 0, "empty logits");
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(l + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float mx = -INFINITY;
  for (float v : lanes) mx = std::max(mx, v);
  for (; i < V; ++i) mx = std::max(mx, l[i]);
  TORCH_CHECK(std::isfinite(mx), "every logit is -inf or NaN: nothing to sample");
  const float inv = float(1.0 / temperature);
  // Block b's 8 values exp((l[i] - max) / T) (0 past V). The total is the block sums added in
  // order, which is exactly what the scan adds up again; the crossing block is recomputed
  // rather than keeping all V values (a 280 KB buffer per call cost more than the exps).
  const __m256 m8 = _mm256_set1_ps(mx), i8 = _mm256_set1_ps(inv);
  auto block = [&](int64_t b, float* out) -> __m256 {
    __m256 ev;
    if (b * 8 + 8 <= V) {
      ev = codeshell::exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(l + b * 8), m8), i8));
    } else {
      alignas(32) float t8[8];
      for (int t = 0; t < 8; ++t) t8[t] = b * 8 + t < V ? std::exp((l[b * 8 + t] - mx) * inv) : 0.f;
      ev = _mm256_load_ps(t8);
    }
    if (out) _mm256_storeu_ps(out, ev);
    return ev;
  };
  const int64_t nb = (V + 7) / 8;
  std::unique_ptr<float[]> bsum(new float[size_t(nb)]);
  double total = 0;
  for (int64_t b = 0; b < nb; ++b) {
    bsum[b] = codeshell::hsum8(block(b, nullptr));
    total += bsum[b];
  }
  const double target = u * total;
  double acc = 0;
  for (int64_t b = 0; b < nb; ++b) {
    if (acc + bsum[b] <= target) {
      acc += bsum[b];
      continue;
    }
    block(b, lanes);
    for (int t = 0; t < 8; ++t)
      if (lanes[t] > 0 && (acc += lanes[t]) > target) return b * 8 + t;
  }
  // rounding left the crossing unmet: the last token of non-zero probability
  for (int64_t b = nb - 1; b >= 0; --b) {
    if (bsum[b] <= 0) continue;
    block(b, lanes);
    for (int t = 7; t >= 0; --t)
      if (lanes[t] > 0) return b * 8 + t;
  }
  return V - 1;
}

}  // namespace

int64_t sample_temperature(const torch::Tensor& logits, double temperature, double u) {
  TORCH_CHECK(logits.dim() == 1 && logits.scalar_type() == torch::kFloat32 && logits.is_contiguous(),
              "logits must be a contiguous fp32 [V] tensor");
  return draw(logits.data_ptr<float>(), logits.numel(), temperature, u);
}

// Rows [B, V], one temperature and one uniform each (fp64 [B]): the rows of a decode step, in
// parallel over the threads (16 rows: ~0.6 ms on 2 threads against ~1.8 ms one call at a time).
torch::Tensor sample_temperature_rows(const torch::Tensor& logits, const torch::Tensor& temperatures,
                                      const torch::Tensor& us) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.is_contiguous(),
              "logits must be a contiguous fp32 [B, V] tensor");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(temperatures.scalar_type() == torch::kFloat64 && temperatures.is_contiguous() &&
                  temperatures.numel() == B && us.scalar_type() == torch::kFloat64 && us.is_contiguous() &&
                  us.numel() == B,
              "temperatures and us must be contiguous fp64 [B] tensors");
  auto out = torch::empty({B}, logits.options().dtype(torch::kInt64));
  const float* l = logits.data_ptr<float>();
  const double* t = temperatures.data_ptr<double>();
  const double* u = us.data_ptr<double>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) o[b] = draw(l + b * V, V, t[b], u[b]);
  });
  return out;
}
