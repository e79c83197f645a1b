// The loop of `avx2:gemm` (csrc/gemm_fma.h block<V256, 6, 2>) alone, one thread (session 34 helper C,
// docs/kernels-log.md), against the register block of the fp32-FMA peak probe (`bf16_fma_peak` isa 0:
// Avx2::micro, 6 rows x 1 panel, the bf16 weights widened in registers every k): one work item of
// NP panels over M = 512 rows and K = 1024, per K chunk (KC) the weights widened into b [kc][16]
// per panel and every 6-row tile of x run over it as the kernel does ("all": x [kc / 8][6][8] per
// tile from L2 / L3, the next tile's x prefetched), or every tile on the same x and c ("L1": the
// block's own ceiling). Printed: ymm FMAs per TSC cycle (best of 31; 2.0 = both FMA pipes every
// cycle at the TSC clock; Zen 3 boosts above its TSC, so > 2.0 is possible), so it is robust to
// other processes on the host. Variants:
//   peak     the probe's block: 128 k-pairs of one panel, widened per k (shift / and), 6 rows
//   6x2      gemm_fma.h's block (2 weight loads + 6 broadcasts + 12 FMAs a k)
//   3x4m     3 rows x 2 panels (4 ymm), the weights as the FMAs' memory operands (12 FMAs, 3 broadcasts)
//   g++ -O3 -mavx2 -mfma -mtune=znver3 -std=c++20 benchmarks/standalone/fma_gemm_loop_avx2.cpp \
//       -o fma_gemm_loop_avx2 && taskset -c 0 ./fma_gemm_loop_avx2
#include <immintrin.h>
#include <x86intrin.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

template <class T>
struct Aligned {  // 64-byte aligned storage (the kernel's scratch is aligned: its b loads are aligned)
  using value_type = T;
  Aligned() = default;
  template <class U> Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)); }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const Aligned&) const { return true; }
};
template <class T> using vec = std::vector<T, Aligned<T>>;

template <int MR, int NV>
__attribute__((noinline)) void block(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, bool first,
                                     const float* pf) {
  constexpr int L = 8;
  __m256 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc + v * L);
  for (int64_t k0 = 0; k0 < kc; k0 += L) {
    if (pf)
      for (int l = 0; l < L * MR * 4; l += 64) _mm_prefetch(reinterpret_cast<const char*>(pf + k0 * MR) + l, _MM_HINT_T0);
    const float* a8 = a + k0 * MR;
    const float* b8 = b + k0 * NV * L;
#pragma GCC unroll 16
    for (int j = 0; j < L; ++j) {
      if constexpr (NV <= 2) {
        __m256 bv[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) bv[v] = _mm256_load_ps(b8 + j * NV * L + v * L);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
          const __m256 xb = _mm256_broadcast_ss(a8 + i * L + j);
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(xb, bv[v], acc[i][v]);
        }
      } else {
        __m256 xb[MR];
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) xb[i] = _mm256_broadcast_ss(a8 + i * L + j);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v)
#pragma GCC unroll 16
          for (int i = 0; i < MR; ++i) acc[i][v] = _mm256_fmadd_ps(xb[i], _mm256_load_ps(b8 + j * NV * L + v * L), acc[i][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + i * ldc + v * L, acc[i][v]);
}

// the probe: Avx2::micro<6, 1>: per k-pair 2 loads, 2 widenings each half, 6 broadcasts, 12 FMAs
__attribute__((noinline)) void micro(const float* xt, const uint32_t* w, int64_t Kh, float* c, bool first) {
  constexpr int MR = 6;
  const __m256i hi = _mm256_set1_epi32(int32_t(0xffff0000u));
  __m256 acc[MR][2];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int h = 0; h < 2; ++h) acc[i][h] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * 16 + h * 8);
  for (int64_t j = 0; j < Kh; ++j) {
    const uint32_t* wk = w + j * 16;
#pragma GCC unroll 16
    for (int h = 0; h < 2; ++h) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 8));
      const __m256 w0 = _mm256_castsi256_ps(h ? _mm256_and_si256(v0, hi) : _mm256_slli_epi32(v0, 16));
      const __m256 w1 = _mm256_castsi256_ps(h ? _mm256_and_si256(v1, hi) : _mm256_slli_epi32(v1, 16));
      const float* xk = xt + (2 * j + h) * MR;
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const __m256 xb = _mm256_broadcast_ss(xk + i);
        acc[i][0] = _mm256_fmadd_ps(xb, w0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(xb, w1, acc[i][1]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(c + i * 16 + h * 8, acc[i][h]);
}

template <int MR, int NV>
double run(const char* name, int64_t KC, bool l1, int NP) {
  const int64_t M = 512, K = 1024, T = (M + MR - 1) / MR, ncol = NP * 16, G = NV * 8 / 16;
  vec<float> x(size_t(T) * MR * K + 64, 0.001f), b(size_t(KC) * ncol + 64, 1.0f), c(size_t(T) * MR * ncol + 64, 0.f);
  double best = 1e30;
  for (int r = 0; r < 31; ++r) {
    const uint64_t t0 = __rdtsc();
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const float* xc = x.data() + k0 * T * MR;
      for (int64_t g = 0; g < NP / G; ++g)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t tt = l1 ? 0 : t;
          block<MR, NV>(xc + tt * KC * MR, b.data() + g * KC * NV * 8, KC, c.data() + tt * MR * ncol + g * G * 16, ncol,
                        k0 == 0, t + 1 < T && !l1 ? xc + (t + 1) * KC * MR : nullptr);
        }
    }
    best = std::min(best, double(__rdtsc() - t0));
  }
  const double fmas = double(T) * MR * (NP * 2) * K;  // ymm FMAs
  std::printf("%-6s KC %4ld NP %d %s: %.3f ymm FMAs / TSC cycle\n", name, long(KC), NP, l1 ? "L1 " : "all", fmas / best);
  return fmas / best;
}

double peak() {
  constexpr int64_t Kh = 128;
  vec<uint32_t> w(Kh * 16, 0x3f803f80u);
  vec<float> xt(2 * Kh * 6, 0.f);
  alignas(64) float c[6 * 16];
  double best = 1e30;
  const int reps = 400;  // ~0.5 ms a pass: shorter than a time slice of a loaded host
  for (int r = 0; r < 31; ++r) {
    const uint64_t t0 = __rdtsc();
    for (int i = 0; i < reps; ++i) {
      micro(xt.data(), w.data(), Kh, c, i == 0);
      __asm__ volatile("" ::"r"(c) : "memory");
    }
    best = std::min(best, double(__rdtsc() - t0));
  }
  const double f = double(reps) * Kh * 2 * 12 / best;
  std::printf("peak   (the probe's Avx2::micro, L1): %.3f ymm FMAs / TSC cycle\n", f);
  return f;
}

int main() {
  for (int pass = 0; pass < 2; ++pass) {
    peak();
    for (int64_t kc : {128, 256, 512}) {
      run<6, 2>("6x2", kc, true, 4);
      run<6, 2>("6x2", kc, false, 4);
      run<3, 4>("3x4m", kc, true, 4);
      run<3, 4>("3x4m", kc, false, 4);
    }
  }
}
