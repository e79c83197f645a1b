// Standalone: the small shape's int8 head (70144 x 1024, 72 MB, cold) at M = 1 on AVX2, 1-2 threads, against
// the read probe in the same process and rounds: which stream shape / prefetch reads DRAM closest to the probe.
// Session 34 helper A (docs/kernels-log.md). Not a test: prints GB/s, medians of alternating rounds.
//
//   g++ -O3 -mavx2 -mfma -mf16c -fopenmp -std=c++17 -I codeshell/kernels/csrc \
//       benchmarks/standalone/q8m1_stream.cpp -o /tmp/q8m1_stream && /tmp/q8m1_stream [N K rounds]
//
// Variants: probe (kernels.cpp read_stream: 4 loads a 128 bytes, prefetch 2 KiB ahead), tile_q8 (one weight row
// at a time, a prefetch every 32 bytes at 2 KiB: the extension's head path), q8_m1_avx2.h's range at several
// prefetch distances / hints, with the rows split in ~8 claimed chunks a thread (parallel_chunks) or one
// contiguous share a thread (parallel_owned's split, no steal).
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "q8_m1_avx2.h"
#include "huge_buffer.h"
#include "read_probe.h"

using namespace codeshell;

static void tile_q8_row(const int8_t* xq, int64_t K, const float* dx, const int8_t* w, float* out, int64_t pf) {
  const int64_t nb = K / 128;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i a = _mm256_setzero_si256();
    for (int64_t k = b * 128; k < (b + 1) * 128; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + pf, _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
      a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(xv, v)), ones));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(dx[b]), acc);
  }
  *out = hsum8(acc);
}

// f(n0, n1) over [0, n): owned = one contiguous share a thread, else ~8 claimed chunks a thread (parallel_chunks)
static void split(int64_t n, int threads, bool owned, const std::function<void(int64_t, int64_t)>& f) {
  if (owned) {
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      auto edge = [&](int i) { return i == threads ? n : std::min(n, (n * i / threads + 15) / 16 * 16); };
      f(edge(t), edge(t + 1));
    }
    return;
  }
  int64_t grain = std::max<int64_t>(64, (n + 8 * threads - 1) / (8 * threads));
  grain = (grain + 15) / 16 * 16;
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
  {
    for (;;) {
      const int64_t i = next.fetch_add(grain);
      if (i >= n) break;
      f(i, std::min(n, i + grain));
    }
  }
}

int main(int argc, char** argv) {
  const int64_t N = argc > 1 ? atoll(argv[1]) : 70144, K = argc > 2 ? atoll(argv[2]) : 1024;
  const int rounds = argc > 3 ? atoi(argv[3]) : 5;
  const int copies = 2;  // a pass reads copy (pass % 2): the other was read a whole 72 MB ago (> the 32 MiB L3)
  std::vector<int8_t*> w(copies);
  for (int c = 0; c < copies; ++c) {
    w[c] = static_cast<int8_t*>(huge_buffer(size_t(N * K), 1));
    for (int64_t i = 0; i < N * K; ++i) w[c][i] = int8_t((i * 2654435761u >> 7) % 255 - 127);
  }
  const size_t pbytes = size_t(1) << 30;
  char* pbuf = static_cast<char*>(huge_buffer(pbytes, 1));
  std::vector<int8_t> xq(K);
  for (int64_t k = 0; k < K; ++k) xq[k] = int8_t((k * 37) % 255 - 127);
  std::vector<float> dx(K / 128, 0.01f), scale(N, 0.02f), out(N);
  struct V {
    std::string name;
    std::function<void(const int8_t*, int)> fn;
  };
  std::vector<V> vs;
  std::atomic<uint64_t> sink{0};
  vs.push_back({"probe 1 GiB", [&](const int8_t*, int t) {
                  split(int64_t(pbytes / 128), t, false, [&](int64_t a, int64_t b) { sink |= probe_lines(pbuf, a, b); });
                }});
  vs.push_back({"probe W", [&](const int8_t* wc, int t) {
                  split(N * K / 128, t, false, [&](int64_t a, int64_t b) { sink |= probe_lines(reinterpret_cast<const char*>(wc), a, b); });
                }});
  vs.push_back({"tile_q8 2K", [&](const int8_t* wc, int t) {
                  split(N, t, false, [&](int64_t a, int64_t b) {
                    for (int64_t n = a; n < b; ++n) tile_q8_row(xq.data(), K, dx.data(), wc + n * K, &out[n], 2048);
                  });
                }});
  for (bool owned : {false, true})
    for (int64_t pf : {int64_t(0), int64_t(1024), int64_t(2048), int64_t(4096), int64_t(8192)})
      for (int h : {0, 1, 3}) {
        if (pf == 0 && h) continue;
        if (owned && !(pf == 2048 || pf == 4096)) continue;
        vs.push_back({std::string("m1 ") + (owned ? "owned " : "chunks ") + std::to_string(pf) + " h" + std::to_string(h),
                      [&, owned, pf, h](const int8_t* wc, int t) {
                        split(N, t, owned, [&](int64_t a, int64_t b) {
                          q8m1avx2::run(xq.data(), dx.data(), K, 128, wc, scale.data(), nullptr, out.data(), a, b, pf, h);
                        });
                      }});
      }
  const int tl[2] = {1, 2};
  std::vector<std::vector<std::vector<double>>> res(2, std::vector<std::vector<double>>(vs.size()));
  int pass = 0;
  for (int r = 0; r < rounds; ++r)
    for (int ti = 0; ti < 2; ++ti)
      for (size_t i = 0; i < vs.size(); ++i) {
        const size_t j = (i + r) % vs.size();
        double best = 1e30;
        const size_t bytes = j == 0 ? pbytes : size_t(N * K);
        for (int p = 0; p < 3; ++p) {
          const int8_t* wc = w[pass++ % copies];
          const auto t0 = std::chrono::steady_clock::now();
          vs[j].fn(wc, tl[ti]);
          best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        res[ti][j].push_back(bytes / best / 1e9);
      }
  printf("N %lld K %lld, medians of %d rounds, GB/s (%% of the probe, 1 GiB)\n", (long long)N, (long long)K, rounds);
  printf("%-26s %16s %16s\n", "", "T1", "T2");
  for (size_t j = 0; j < vs.size(); ++j) {
    printf("%-26s", vs[j].name.c_str());
    for (int ti = 0; ti < 2; ++ti) {
      auto v = res[ti][j], p = res[ti][0];
      std::sort(v.begin(), v.end());
      std::sort(p.begin(), p.end());
      printf(" %8.1f (%4.0f%%)", v[v.size() / 2], 100 * v[v.size() / 2] / p[p.size() / 2]);
    }
    printf("\n");
  }
  return int(sink.load() == 12345);
}
