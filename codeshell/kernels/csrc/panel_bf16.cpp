// bf16 weight-only matmul for M <= 64 (decode, short prefills) on AVX2+FMA, over the panel layout.
//
// What this is: y[M, N] = x[M, K] @ W^T (+ bias) with x fp32 and W bfloat16 stored as
// panels of 16 output rows: data [P = ceil(N/16), K, 16], padded with zero rows. Within the
// 16 values of (panel p, k), position 2i holds row 16p+i and position 2i+1 holds row 16p+8+i,
// so one 32-byte load gives rows 0..7 as fp32 with a shift (v << 16) and rows 8..15 with a
// mask (v & 0xffff0000). Also `dequant_bf16`, which expands panels to an fp32 K-major block
// for the prefill sgemm. See codeshell/kernels/packing.py for the reference.
// What this is not: the int8/int4 kernels (kernels.cpp, qdot.cpp) or anything for large M
// (ops.py splits larger M into 64-row calls for large weights, else dequant + sgemm).
//
// Why this layout: a classic outer-product micro-kernel (BLIS-style: broadcast x[m, k],
// multiply a vector of 8 weights). Up to 6 rows of x by 16 weight rows keeps 12 accumulators
// in registers, reads each weight once per tile from L1 and needs no horizontal sums. The
// earlier row-major dot-product kernel re-read x from L2 for every pair of weight rows; at
// M = 8..16 this one is 15-40% faster per core (benchmarks/bench_kernels.py), and the weight
// streams from memory strictly in order, which the prefetchers like.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>

#include "parallel.h"

namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kKBlock = 512;     // k range per pass: the panel chunk (16 KiB) stays in L1 across m-tiles
constexpr int64_t kPrefetch = 128;   // k steps ahead (4 KiB) of software prefetch on the weight stream
constexpr int64_t kMaxRows = 64;     // rows of x per call: c [64][16] fp32 is the per-thread buffer below

inline void split16(const uint16_t* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xffff0000u))));
}

// For NP consecutive panels q (weights w + q * pstride, results c + q * 256):
// c[q][MR][16] (+)= xt[k][0..MR) (x transposed, row stride ldx) times panel[q][k][16], k in [k0, k1).
// NP > 1 serves small M: each panel is its own sequential stream, and several streams per
// thread keep more memory requests in flight and give the FMAs independent chains (M = 1,
// 7B c_fc shape, 2 threads, a noisy shared machine: 5.7-6.8 ms, against 6.8-8.0 for the old
// row-major kernel; the same trick on the int4/int8 rows of qdot.cpp measured no gain).
template <int MR, int NP>
inline void micro(const float* xt, int64_t ldx, const uint16_t* w, int64_t pstride, int64_t k0, int64_t k1,
                  float* c, bool first) {
  __m256 acc[NP][MR][2];
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i)
      for (int h = 0; h < 2; ++h)
        acc[q][i][h] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + q * kPanel * kPanel + i * kPanel + h * 8);
  for (int64_t k = k0; k < k1; ++k) {
    if constexpr (NP == 1) {  // 12 accumulators + 2 weight vectors: one broadcast register left
      const uint16_t* wk = w + k * kPanel;
      _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetch * kPanel), _MM_HINT_T0);
      __m256 lo, hi;
      split16(wk, lo, hi);
      for (int i = 0; i < MR; ++i) {
        const __m256 xb = _mm256_broadcast_ss(xt + k * ldx + i);
        acc[0][i][0] = _mm256_fmadd_ps(xb, lo, acc[0][i][0]);
        acc[0][i][1] = _mm256_fmadd_ps(xb, hi, acc[0][i][1]);
      }
      continue;
    }
    __m256 xb[MR];  // reused by every panel
    for (int i = 0; i < MR; ++i) xb[i] = _mm256_broadcast_ss(xt + k * ldx + i);
    for (int q = 0; q < NP; ++q) {
      const uint16_t* wk = w + q * pstride + k * kPanel;
      _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetch * kPanel), _MM_HINT_T0);
      __m256 lo, hi;
      split16(wk, lo, hi);
      for (int i = 0; i < MR; ++i) {
        acc[q][i][0] = _mm256_fmadd_ps(xb[i], lo, acc[q][i][0]);
        acc[q][i][1] = _mm256_fmadd_ps(xb[i], hi, acc[q][i][1]);
      }
    }
  }
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(c + q * kPanel * kPanel + i * kPanel + h * 8, acc[q][i][h]);
}

// c[M][16] = x[M, K] @ panel^T for 4 <= M <= 64: tiles of 6 rows (4/3/2 for the rest), k-blocked
// so the panel chunk is re-read from L1 by every tile.
void panel_product(const float* xt, int64_t M, int64_t K, const uint16_t* w, float* c) {
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t k1 = std::min(K, k0 + kKBlock);
    const bool first = k0 == 0;
    for (int64_t m = 0; m < M;) {
      const int64_t r = M - m;
      const float* xm = xt + m;
      float* cm = c + m * kPanel;
      // 6-row tiles, splitting the rest so that no 1-row tile (2 FMA chains) is left
      if (r >= 6 && r != 7 && r != 8) { micro<6, 1>(xm, M, w, 0, k0, k1, cm, first); m += 6; }
      else if (r >= 4 && r != 5) { micro<4, 1>(xm, M, w, 0, k0, k1, cm, first); m += 4; }
      else if (r >= 3) { micro<3, 1>(xm, M, w, 0, k0, k1, cm, first); m += 3; }
      else if (r == 2) { micro<2, 1>(xm, M, w, 0, k0, k1, cm, first); m += 2; }
      else { micro<1, 1>(xm, M, w, 0, k0, k1, cm, first); m += 1; }
    }
  }
}

// Panels [p0, p1) for M <= 3, NP at a time (the rest one at a time); c holds NP panels.
template <int MR, int NP>
void panels_small_m(const float* xt, int64_t K, const uint16_t* w, int64_t p0, int64_t p1, float* c,
                    const std::function<void(int64_t, const float*)>& emit) {
  const int64_t ps = K * kPanel;
  int64_t p = p0;
  for (; p + NP <= p1; p += NP) {
    micro<MR, NP>(xt, MR, w + p * ps, ps, 0, K, c, true);
    for (int q = 0; q < NP; ++q) emit(p + q, c + q * kPanel * kPanel);
  }
  for (; p < p1; ++p) {
    micro<MR, 1>(xt, MR, w + p * ps, ps, 0, K, c, true);
    emit(p, c);
  }
}

void check_panels(const torch::Tensor& w, int64_t N) {
  TORCH_CHECK(w.dim() == 3 && w.size(2) == kPanel && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(),
              "bf16 weight must be contiguous bf16 panels [ceil(N/16), K, 16]");
  TORCH_CHECK(N > 0 && (N + kPanel - 1) / kPanel == w.size(0), "N=", N, " does not match ", w.size(0), " panels");
}

}  // namespace

torch::Tensor decode_bf16(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                          const c10::optional<torch::Tensor>& bias) {
  check_panels(w, N);
  const int64_t K = w.size(1), M = x.size(0), P = w.size(0);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.size(1) == K,
              "x must be a contiguous fp32 [M, K] tensor with K=", K);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "decode_bf16 takes 1..", kMaxRows, " rows of x, got ", M);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                "bias must be a contiguous fp32 tensor with ", N, " elements");
    b = bias->data_ptr<float>();
  }
  auto out = torch::empty({M, N}, x.options());
  auto xt = x.t().contiguous();  // [K, M]: the m-tile's values for one k are adjacent
  const float* xp = xt.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  codeshell::parallel_chunks(P, 4, 4, [&](int64_t p0, int64_t p1) {
    alignas(32) float c[kMaxRows * kPanel];  // also NP = 4 panels x 16 rows for M <= 3
    auto emit = [&](int64_t p, const float* cp) {  // c rows of panel p -> out[:, 16p : 16p+16) + bias
      const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        float* o = op + m * N + n0;
        const float* cm = cp + m * kPanel;
        if (b)
          for (int64_t j = 0; j < cols; ++j) o[j] = cm[j] + b[n0 + j];
        else
          std::memcpy(o, cm, size_t(cols) * sizeof(float));
      }
    };
    if (M == 1) panels_small_m<1, 4>(xp, K, wp, p0, p1, c, emit);
    else if (M == 2) panels_small_m<2, 3>(xp, K, wp, p0, p1, c, emit);
    else if (M == 3) panels_small_m<3, 2>(xp, K, wp, p0, p1, c, emit);
    else
      for (int64_t p = p0; p < p1; ++p) {
        panel_product(xp, M, K, wp + p * K * kPanel, c);
        emit(p, c);
      }
  });
  return out;
}

// Rows [n0, n1) of the weight (n0 a multiple of 16) as fp32 into out, K-major: out[k * R + j]
// = W[n0 + j, k] with R = n1 - n0, i.e. the block's transpose, which sgemm takes as is.
void dequant_bf16(const torch::Tensor& w, int64_t N, int64_t n0, int64_t n1, torch::Tensor& out) {
  check_panels(w, N);
  const int64_t K = w.size(1), R = n1 - n0;
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N && n0 % kPanel == 0, "bad row range [", n0, ", ", n1, ")");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() >= R * K,
              "out buffer too small");
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const int64_t pa = n0 / kPanel, pb = (n1 + kPanel - 1) / kPanel;
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    alignas(32) float tmp[kPanel];
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t p = pa; p < pb; ++p) {
        __m256 lo, hi;
        split16(wp + (p * K + k) * kPanel, lo, hi);
        float* o = op + k * R + (p - pa) * kPanel;
        const int64_t cols = std::min(kPanel, n1 - p * kPanel);
        if (cols == kPanel) {
          _mm256_storeu_ps(o, lo);
          _mm256_storeu_ps(o + 8, hi);
        } else {
          _mm256_store_ps(tmp, lo);
          _mm256_store_ps(tmp + 8, hi);
          std::memcpy(o, tmp, size_t(cols) * sizeof(float));
        }
      }
  });
}

// The panel layout of a contiguous bf16 W [N, K] (what packing.prepack computes with torch ops,
// ~10x slower: a 7B model spent ~20 s of its load there).
torch::Tensor pack_bf16(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(),
              "weight must be a contiguous bf16 [N, K] tensor");
  const int64_t N = w.size(0), K = w.size(1), P = (N + kPanel - 1) / kPanel;
  auto out = torch::empty({P, K, kPanel}, w.options());
  if (N % kPanel) out[P - 1].zero_();  // the padding rows of the last panel
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t r = 0; r < kPanel && p * kPanel + r < N; ++r) {
        const uint16_t* row = src + (p * kPanel + r) * K;
        uint16_t* o = dst + p * K * kPanel + (r < 8 ? 2 * r : 2 * (r - 8) + 1);
        for (int64_t k = 0; k < K; ++k) o[k * kPanel] = row[k];
      }
  });
  return out;
}
