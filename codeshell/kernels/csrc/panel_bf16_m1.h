// bf16 weights at M = 1 on AVX512-BF16 without AMX (`avx512_bf16:panel`'s batch-1 decode), included once
// by panel_bf16.cpp inside its AVX-512 section (it uses that file's kPanel, Emit and store_rows). Session 39,
// helper C (the 2-core Zen 4 EPYC: AVX-512 BF16 / VNNI, no AMX).
//
// What this is: the M = 1 schedule of decode_panels on vdpbf16ps (panels_small_m<Bf16Dot, 1, 4, false> before
// it): NP panels in flight, each panel one vdpbf16ps chain over its k-pairs in order from zero (so the same
// bits as Bf16Dot::micro<1, NP> at every NP, prefetch and split: row invariance), with three knobs read per
// call through switches.h's cache, for A/B runs on the CPU at hand:
//   CODESHELL_BF16_M1_NP=1|2|4|8   panels in flight (read streams a thread; default np_default(): 1 on Zen 4
//                                  for a model read from memory, else 4)
//   CODESHELL_BF16_M1_PF=BYTES     software prefetch (T0) this far ahead on each panel's stream (0: none, the
//                                  hardware prefetchers alone; default kPf)
//   CODESHELL_BF16_M1_GRAIN=PANELS panels a claimed chunk (rounded up to NP); 0: parallel_chunks' rule (~8
//                                  chunks a thread), as before; default kGrain
// Why NP = 1 on Zen 4 (the default there; NP = 4 elsewhere, Zen 5's measured choice, session 14 helper A):
// a Zen 4 core reads one sequential stream faster than several far apart. Standalone, 1 thread, 512 MiB on
// huge pages, the thread's CPU time (the host ran three kernel builds), this loop's shape at K = 1024:
// NP = 1 34.7 GB/s, NP = 2 29.9, NP = 4 30.3, NP = 8 28.3, NP = 4 with a 1-4 KiB prefetch 26.3-28.5; a plain
// read of 2 streams 256 MiB apart 20.0, one stream 34.6. In the extension, the small shape's 8 layers and
// head (320 MB, bench_m1_threads.py --sets small:bf16 --threads 1 --clock thread, 5 rounds): NP = 1 1.101x
// NP = 4 (31.4 against 28.6 GB/s, 99.8% of the probe), NP = 2 0.958x, NP = 1 with a 2 KiB prefetch 0.988x.
// llama.cpp's bf16 GEMV (4 rows of 2 KiB at K = 1024 side by side: one region) read the small shape at 112%
// of our probe's bound in the session's first table. One vdpbf16ps chain a core (its latency unhidden) still
// read the probe's rate above, so the loop is not latency bound at NP = 1.
// What this is not: the AMX CPUs' M = 1 (decode_amx_m1) or the AVX2 / fp32-FMA M = 1 (avx2_m1_tile).
#pragma once

namespace bf16m1 {

// NP = 1 only for weights read from memory: a cache-resident model's (the decode step's hint, step_hints.h)
// come from L3, where one vdpbf16ps chain a core waits on its latency. Measured (session 39, lead; 2 threads,
// bench_b8_ratio.py CODESHELL_MINI --rounds 8 --tokens 64 --ab - CODESHELL_BF16_M1_NP=4): codeshell-mini's b1
// step 0.379 ms at NP = 1 against 0.313 at NP = 4 (medians), so it keeps NP = 4.
inline int64_t np_default() {
  const bool resident = codeshell::bf16_far_prefetch_hint().load(std::memory_order_relaxed) > 0;
  return codeshell::cpu_features().zen4 && !resident ? 1 : 4;
}
constexpr int64_t kPf = 0;
constexpr int64_t kGrain = 0;

// c [NP][16] = x . panels w + q * ps (q < NP) over Kh k-pairs; kPfOn: prefetch pf uint32 ahead on each stream
template <int NP, bool kPfOn>
__attribute__((noinline)) void tile(const uint32_t* xp, const uint32_t* w, int64_t ps, int64_t Kh, float* c,
                                    int64_t pf) {
  __m512 acc[NP];
  for (int q = 0; q < NP; ++q) acc[q] = _mm512_setzero_ps();
  for (int64_t j = 0; j < Kh; ++j) {
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(int(xp[j]));
    for (int q = 0; q < NP; ++q) {
      const uint32_t* wk = w + q * ps + j * kPanel;
      if constexpr (kPfOn) _mm_prefetch(reinterpret_cast<const char*>(wk + pf), _MM_HINT_T0);
      acc[q] = _mm512_dpbf16_ps(acc[q], xv, (__m512bh)_mm512_loadu_si512(wk));
    }
  }
  for (int q = 0; q < NP; ++q) _mm512_storeu_ps(c + q * kPanel, acc[q]);
}

template <int NP, bool kPfOn>
void panels(const uint32_t* xp, int64_t Kh, const uint32_t* w, int64_t p0, int64_t p1, int64_t pf, float* c,
            const Emit& emit) {
  const int64_t ps = Kh * kPanel;
  int64_t p = p0;
  for (; p + NP <= p1; p += NP) {
    tile<NP, kPfOn>(xp, w + p * ps, ps, Kh, c, pf);
    for (int q = 0; q < NP; ++q) emit(p + q, c + q * kPanel);
  }
  for (; p < p1; ++p) {
    tile<1, kPfOn>(xp, w + p * ps, ps, Kh, c, pf);
    emit(p, c);
  }
}

// out [N] (+ bias) = x (bf16 pairs, Kh of them) . the P panels of w
inline void run(const uint32_t* xp, int64_t Kh, const uint32_t* w, int64_t N, int64_t P, const float* bias,
                float* out) {
  int64_t np = codeshell::env_int("CODESHELL_BF16_M1_NP", np_default());
  np = np >= 8 ? 8 : np >= 4 ? 4 : np >= 2 ? 2 : 1;
  const int64_t pf = std::max<int64_t>(0, codeshell::env_int("CODESHELL_BF16_M1_PF", kPf)) / 4;  // uint32 units
  const int64_t g = codeshell::env_int("CODESHELL_BF16_M1_GRAIN", kGrain);
  auto body = [&](int64_t p0, int64_t p1) {
    alignas(64) float c[8 * kPanel];
    const Emit emit = [&](int64_t p, const float* cp) {
      const int64_t n0 = p * kPanel;
      store_rows(cp, kPanel, 1, out, N, n0, std::min(kPanel, N - n0), bias);
    };
    auto go = [&](auto npc) {
      constexpr int NP = decltype(npc)::value;
      if (pf > 0) panels<NP, true>(xp, Kh, w, p0, p1, pf, c, emit);
      else panels<NP, false>(xp, Kh, w, p0, p1, 0, c, emit);
    };
    switch (np) {
      case 1: go(std::integral_constant<int, 1>{}); break;
      case 2: go(std::integral_constant<int, 2>{}); break;
      case 8: go(std::integral_constant<int, 8>{}); break;
      default: go(std::integral_constant<int, 4>{}); break;
    }
  };
  if (g > 0) codeshell::parallel_grain(P, (g + np - 1) / np * np, body);
  else codeshell::parallel_chunks(P, np, np, body);
}

}  // namespace bf16m1
