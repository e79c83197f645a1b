// The loop of `avx512_vnni:gemm` (csrc/panel_bf16.cpp prefill_fma_t / fma_block) alone, one thread
// (session 26 helper A, docs/kernels-log.md): one work item (NP panels = NP x 16 output columns) over
// M = 512 rows and K = 1024, per K chunk the weights widened into b [kc][NP * 16] and every MR-row
// tile of x run over it, x packed per chunk as the kernel packs it ([kc][MR] a tile, or with KB
// [kc / 16][MR][16]), the next tile's x prefetched. "L1" runs every tile on the same x and c (both
// L1-resident: the ceiling of the block with b streamed from L1 / L2), "all" walks the tiles as the
// kernel does (x from L2 / L3). Printed: zmm FMAs per TSC cycle (best of 15; 2.0 = both FMA ports
// every cycle at the TSC clock), so it is robust to other processes on the host. Why: to tell the
// loop's own rate from the GEMM's other costs (pack, widening, epilogue, threads) before wiring a
// register block in. On the Ice Lake-class Xeon of sessions 23-26 (2.8 GHz TSC), under the
// extension's flags: 4x6 / 3x8 1.81-1.86 at KC 128-256 (98% of the L1 case), 2x12 1.66-1.78,
// 2x10 1.63-1.74; 4x6kb with an 8-k unroll 1.76 (GCC's schedule: ~50 register moves), with 4 1.82.
//   g++ -O3 -mavx2 -mfma -mavx512f -mavx512bw -mavx512dq -mavx512vl -mtune=native \
//       benchmarks/standalone/fma_gemm_loop.cpp -o fma_gemm_loop && taskset -c 0 ./fma_gemm_loop
#include <immintrin.h>
#include <x86intrin.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

constexpr int kPanel = 16;

// KB: 0 = [kc][MR]; 4 / 8 = [kc / 16][MR][16] with the 8-k step unrolled by 4 / 8
template <int NP, int MR, int KB = 0>
__attribute__((noinline)) void fma_block(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, bool first,
                                         const float* pf) {
  __m512 acc[NP][MR];
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i) acc[q][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + q * 16);
  if constexpr (KB == 4 || KB == 8) {
    for (int64_t k8 = 0; k8 < kc; k8 += 8) {
      const float* a8 = a + (k8 >> 4) * (MR * 16) + (k8 & 15);
      const float* b8 = b + k8 * NP * 16;
      if (pf)
        for (int l = 0; l < 8 * MR * 4; l += 64) _mm_prefetch(reinterpret_cast<const char*>(pf + k8 * MR) + l, _MM_HINT_T0);
      if constexpr (KB == 4) {
#pragma GCC unroll 4
        for (int j = 0; j < 8; ++j) {
          __m512 bv[NP];
          for (int q = 0; q < NP; ++q) bv[q] = _mm512_load_ps(b8 + j * NP * 16 + q * 16);
          for (int i = 0; i < MR; ++i) {
            const __m512 xb = _mm512_set1_ps(a8[i * 16 + j]);
            for (int q = 0; q < NP; ++q) acc[q][i] = _mm512_fmadd_ps(xb, bv[q], acc[q][i]);
          }
        }
      } else {
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          __m512 bv[NP];
          for (int q = 0; q < NP; ++q) bv[q] = _mm512_load_ps(b8 + j * NP * 16 + q * 16);
          for (int i = 0; i < MR; ++i) {
            const __m512 xb = _mm512_set1_ps(a8[i * 16 + j]);
            for (int q = 0; q < NP; ++q) acc[q][i] = _mm512_fmadd_ps(xb, bv[q], acc[q][i]);
          }
        }
      }
    }
  } else {
    for (int64_t k8 = 0; k8 < kc; k8 += 8) {
      if (pf)
        for (int l = 0; l < 8 * MR * 4; l += 64) _mm_prefetch(reinterpret_cast<const char*>(pf + k8 * MR) + l, _MM_HINT_T0);
#pragma GCC unroll 8
      for (int64_t k = k8; k < k8 + 8; ++k) {
        __m512 bv[NP];
        for (int q = 0; q < NP; ++q) bv[q] = _mm512_load_ps(b + k * NP * 16 + q * 16);
        for (int i = 0; i < MR; ++i) {
          const __m512 xb = _mm512_set1_ps(a[k * MR + i]);
          for (int q = 0; q < NP; ++q) acc[q][i] = _mm512_fmadd_ps(xb, bv[q], acc[q][i]);
        }
      }
    }
  }
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i) _mm512_storeu_ps(c + i * ldc + q * 16, acc[q][i]);
}

void widen_panels(const uint32_t* w, int64_t pstride, int NP, int64_t j0, int64_t kc, float* b) {
  const __m512i hi = _mm512_set1_epi32(int32_t(0xffff0000u));
  for (int64_t j = 0; j < kc / 2; ++j)
    for (int q = 0; q < NP; ++q) {
      const __m512i v = _mm512_loadu_si512(w + q * pstride + (j0 + j) * kPanel);
      _mm512_store_ps(b + (2 * j) * NP * 16 + q * 16, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
      _mm512_store_ps(b + (2 * j + 1) * NP * 16 + q * 16, _mm512_castsi512_ps(_mm512_and_si512(v, hi)));
    }
}

// One item: FMAs per TSC cycle, best of `reps`.
template <int NP, int MR, int KB = 0>
double run(int64_t M, int64_t K, int64_t KC, int reps, bool l1only) {
  const int64_t T = (M + MR - 1) / MR, Kh = K / 2, ldc = NP * kPanel;
  float* xp = static_cast<float*>(std::aligned_alloc(64, T * MR * K * 4 + 64));
  for (int64_t i = 0; i < T * MR * K; ++i) xp[i] = (i % 7) * 0.01f;
  uint32_t* w = static_cast<uint32_t*>(std::aligned_alloc(64, NP * Kh * kPanel * 4));
  for (int64_t i = 0; i < NP * Kh * kPanel; ++i) w[i] = 0x3f803f80u ^ (i & 0x00ff00ff);
  float* c = static_cast<float*>(std::aligned_alloc(64, T * MR * ldc * 4));
  float* b = static_cast<float*>(std::aligned_alloc(64, KC * NP * kPanel * 4));
  uint64_t best = ~0ull;
  for (int r = 0; r < reps; ++r) {
    const uint64_t t0 = __rdtsc();
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      const float* xc = xp + k0 * T * MR;
      widen_panels(w, Kh * kPanel, NP, k0 / 2, kc, b);
      for (int64_t t = 0; t < T; ++t) {
        const float* a = l1only ? xc : xc + t * kc * MR;
        const float* pf = (t + 1 < T && !l1only) ? xc + (t + 1) * kc * MR : nullptr;
        fma_block<NP, MR, KB>(a, b, kc, l1only ? c : c + t * MR * ldc, ldc, k0 == 0, pf);
      }
    }
    best = std::min<uint64_t>(best, __rdtsc() - t0);
  }
  std::free(xp), std::free(w), std::free(c), std::free(b);
  return double(T) * MR * NP * K / best;
}

int main() {
  const int64_t M = 512, K = 1024;
  for (int rep = 0; rep < 2; ++rep)
    for (bool l1 : {true, false})
      for (int kc : {128, 192, 256})
        std::printf("%s kc %3d  4x6 %.3f  4x6kb(u4) %.3f  4x6kb(u8) %.3f  3x8 %.3f  3x8kb(u4) %.3f  2x12 %.3f  2x10 %.3f\n",
                    l1 ? "L1 " : "all", kc, run<4, 6>(M, K, kc, 15, l1), run<4, 6, 4>(M, K, kc, 15, l1),
                    run<4, 6, 8>(M, K, kc, 15, l1), run<3, 8>(M, K, kc, 15, l1), run<3, 8, 4>(M, K, kc, 15, l1),
                    run<2, 12>(M, K, kc, 15, l1), run<2, 10>(M, K, kc, 15, l1));
}
