// The read probe's inner loop (session 36 helper A: one copy, included by kernels.cpp's read_stream and the
// torch-free standalones benchmarks/standalone/q4avx2_m1_cold.cpp and q8m1_stream.cpp, which each had their
// own copy of the same loop). Why a loop of its own: the benchmarks' "% of the read bound" needs a plain read
// that nothing but memory bounds (docs/kernels.md, "the read probe"); this is the loop they all time.
//
// probe_lines(base, l0, l1) reads the 128-byte lines [l0, l1) of base (32-byte aligned) with 4 independent
// 256-bit loads a line into 4 OR chains, prefetching 2 KiB ahead (two 64-byte lines, T0: the decode kernels'
// software prefetch distance), and returns the OR of every 64-bit word read (so the loads cannot be elided).
// Torch-free and header-only: the callers split the lines between threads as they need (read_stream with
// parallel_chunks, the standalones with OpenMP).
// pf = 0 (session 39 helper C): no software prefetch. On the Zen 4 EPYC a core read 34.6 GB/s against
// 32.1 with the 2 KiB prefetch (1 thread, 512 MiB, the thread's CPU time), so a bound taken from the
// prefetching loop alone was below what the machine reads; codeshell.bench takes the best of both.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace codeshell {

template <bool kPf>
inline uint64_t probe_lines_t(const char* base, int64_t l0, int64_t l1, int64_t pf) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t l = l0; l < l1; ++l) {
    const char* p = base + l * 128;
    if constexpr (kPf) {
      _mm_prefetch(p + pf, _MM_HINT_T0);
      _mm_prefetch(p + pf + 64, _MM_HINT_T0);
    }
    a0 = _mm256_or_si256(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p)));
    a1 = _mm256_or_si256(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 32)));
    a2 = _mm256_or_si256(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 64)));
    a3 = _mm256_or_si256(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 96)));
  }
  alignas(32) uint64_t v[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(v), _mm256_or_si256(_mm256_or_si256(a0, a1), _mm256_or_si256(a2, a3)));
  return v[0] | v[1] | v[2] | v[3];
}

// pf: the prefetch distance in bytes (2048 the decode kernels' default; 0 none: the hardware prefetchers alone)
inline uint64_t probe_lines(const char* base, int64_t l0, int64_t l1, int64_t pf = 2048) {
  return pf > 0 ? probe_lines_t<true>(base, l0, l1, pf) : probe_lines_t<false>(base, l0, l1, 0);
}

}  // namespace codeshell
