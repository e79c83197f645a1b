// Standalone: the small shape's int4 block linears (K = 1024: c_attn 1536 rows, attn.c_proj 1024, c_fc 4096;
// K = 4096: mlp.c_proj 1024 rows; G = 128 symmetric) at M = 1 on AVX2, cold (LAYERS layers of them on huge
// pages, > the 32 MiB L3, called in the decode step's order), 2 threads with parallel_owned's split (one
// contiguous share a thread, steps of 64 rows), against the read probe (1 GiB) in the same rounds: where the
// int4 M = 1 kernel's cold read loses against the probe. Session 35 helper C (docs/kernels-log.md). Not a test:
// prints GB/s, medians of alternating rounds, and checks every kernel variant's output bitwise against the
// extension's q4avx2::run.
//
//   g++ -O3 -mavx2 -mfma -mf16c -fopenmp -std=c++17 -I codeshell/kernels/csrc \
//       benchmarks/standalone/q4avx2_m1_cold.cpp -o /tmp/q4cold && OMP_WAIT_POLICY=active /tmp/q4cold [rounds] [variant...]
//
// Variants: probe (kernels.cpp read_stream's loop over 1 GiB), seq (the same loop over each linear's bytes,
// split as the kernel: the read with the kernel's calls and split but no compute: the % column's reference),
// pat same-place / pat seq (tile2's load order without its compute, the tile ahead prefetched at each line's own
// (row, group) place or in ascending order), run 8K mode M (q4avx2::run as the extension calls it, pf 8 KiB,
// pfmode M: 0 session 32's prefetch, 1 ascending, 3 and the scales), run 4K mode 3 (4 KiB ahead), t2all
// (tile2 at K = 4096 too: t2k 4096). Names given after the rounds pick variants (the probe always runs).
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

#include "q4_rows_avx2.h"
#include "huge_buffer.h"
#include "read_probe.h"

using namespace codeshell;
using namespace codeshell::q4avx2;

// tile2's load order without its compute (the loads OR-ed): PM as tile2p's.
template <int PM>
static uint64_t pattern(int64_t ng, const uint8_t* const* wr, int64_t pf) {
  __m256i acc = _mm256_setzero_si256();
  const char* pfb = reinterpret_cast<const char*>(wr[0]) + pf;
  for (int64_t g = 0; g < ng; ++g)
    for (int r = 0; r < 8; ++r) {
      const uint8_t* w = wr[r] + g * 64;
      _mm_prefetch(PM == 0 ? reinterpret_cast<const char*>(w) + pf : pfb + (g * 8 + r) * 64, _MM_HINT_T0);
      acc = _mm256_or_si256(acc, _mm256_or_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32))));
    }
  alignas(32) uint64_t v[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(v), acc);
  return v[0] | v[1] | v[2] | v[3];
}

struct Lin {
  int64_t N, K;
  std::vector<uint8_t*> q;  // a layer each
  std::vector<float*> sc;
};

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? atoi(argv[1]) : 7;
  const int LAYERS = 16;
  Lin lins[4] = {{1536, 1024, {}, {}}, {1024, 1024, {}, {}}, {4096, 1024, {}, {}}, {1024, 4096, {}, {}}};
  const char* lname[4] = {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"};
  for (auto& L : lins)
    for (int l = 0; l < LAYERS; ++l) {
      uint8_t* q = static_cast<uint8_t*>(huge_buffer(size_t(L.N * L.K / 2), 1));
      for (int64_t i = 0; i < L.N * L.K / 2; ++i) q[i] = uint8_t((i * 2654435761u + l) >> 9);
      // the scales as the model has them: torch's allocator, 4 KiB pages (under hugepages.py's arena minimum)
      const size_t sb = size_t(L.N) * size_t(L.K / 128) * 4;
      float* s = static_cast<float*>(std::aligned_alloc(64, sb));
      for (int64_t i = 0; i < L.N * L.K / 128; ++i) s[i] = 0.001f * float(1 + (i * 7 + l) % 13);
      L.q.push_back(q);
      L.sc.push_back(s);
    }
  const size_t pbytes = size_t(1) << 30;
  char* pbuf = static_cast<char*>(huge_buffer(pbytes, 1));
  const int64_t KM = 4096;
  std::vector<float> x(KM);
  for (int64_t k = 0; k < KM; ++k) x[k] = std::sin(0.37f * float(k)) * (1 + k % 5);
  alignas(64) static int8_t xq[KM];
  alignas(64) static float dx[KM / 128], xs[KM / 128];
  alignas(64) static int32_t s8[KM / 128];
  std::vector<float> out(4096), ref(4096);
  std::atomic<uint64_t> sink{0};

  // f(n0, n1) on 2 threads: parallel_owned's shares (16-aligned edges), each in steps of 64 rows
  auto owned = [](int64_t n, const std::function<void(int64_t, int64_t)>& f) {
#pragma omp parallel num_threads(2)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      auto edge = [&](int i) { return i == T ? n : std::min(n, (n * i / T + 15) / 16 * 16); };
      for (int64_t a = edge(t), e = edge(t + 1); a < e; a += 64) f(a, std::min(e, a + 64));
    }
  };
  using KFn = std::function<void(const Lin&, int, float*)>;
  struct V {
    std::string name;
    KFn fn;  // nullptr: the probe
    bool check;
  };
  std::vector<V> vs;
  vs.push_back({"probe 1 GiB", nullptr, false});
  vs.push_back({"seq (read only)", [&](const Lin& L, int l, float*) {
                  const int64_t lines = L.N * L.K / 2 / 128;
                  owned(lines, [&](int64_t a, int64_t b) { sink |= probe_lines(reinterpret_cast<const char*>(L.q[l]), a, b); });
                }, false});
  auto runv = [&](int64_t pf1, int mode, int64_t t2k = 1024) -> KFn {
    return [&, pf1, mode, t2k](const Lin& L, int l, float* o) {
      round_x(x.data(), 1, L.K, 128, xq, dx, xs, s8);
      owned(L.N, [&](int64_t a, int64_t b) {
        run(xq, dx, xs, s8, 1, L.K, 128, L.q[l], L.sc[l], nullptr, o, L.N, a, b, pf1, 2048, true, mode, t2k);
      });
    };
  };
  auto patv = [&](int pm) -> KFn {
    return [&, pm](const Lin& L, int l, float*) {
      if (L.K != 1024) {
        owned(L.N * L.K / 2 / 128, [&](int64_t a, int64_t b) { sink |= probe_lines(reinterpret_cast<const char*>(L.q[l]), a, b); });
        return;
      }
      owned(L.N, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; n += 8) {
          const uint8_t* wr[8];
          for (int r = 0; r < 8; ++r) wr[r] = L.q[l] + (n + r) * 512;
          sink |= pm ? pattern<1>(8, wr, 8192) : pattern<0>(8, wr, 8192);
        }
      });
    };
  };
  vs.push_back({"pat same-place 8K", patv(0), false});
  vs.push_back({"pat seq 8K", patv(1), false});
  for (int mode : {0, 1, 3}) vs.push_back({"run 8K mode " + std::to_string(mode), runv(8192, mode), true});
  vs.push_back({"run 4K mode 3", runv(4096, 3), true});
  // tile2 at K = 4096 too (t2k 4096): its 8 row streams 2 KiB apart, the tile ahead prefetched in order
  vs.push_back({"t2all 8K mode 0", runv(8192, 0, 4096), true});
  vs.push_back({"t2all 8K mode 3", runv(8192, 3, 4096), true});
  vs.push_back({"t2all 32K mode 3", runv(32768, 3, 4096), true});

  std::vector<std::string> pick(argv + std::min(argc, 2), argv + argc);
  if (!pick.empty()) {
    std::vector<V> keep{vs[0]};
    for (auto& v : vs)
      for (auto& p : pick)
        if (v.name == p) keep.push_back(v);
    vs = keep;
  }
  // bits: every checked variant's output against run's at pf 8 KiB, each linear's layer 0
  for (auto& v : vs) {
    if (!v.check) continue;
    for (int i = 0; i < 4; ++i) {
      runv(8192, 0)(lins[i], 0, ref.data());
      std::fill(out.begin(), out.end(), 0.f);
      v.fn(lins[i], 0, out.data());
      if (std::memcmp(out.data(), ref.data(), size_t(lins[i].N) * 4) != 0) {
        printf("BITS DIFFER: %s on %s\n", v.name.c_str(), lname[i]);
        return 1;
      }
    }
  }
  double bytes[4];
  for (int i = 0; i < 4; ++i) bytes[i] = double(lins[i].N * lins[i].K / 2 + lins[i].N * lins[i].K / 128 * 4);
  // calls[variant][linear] = every call's seconds; the probe's rounds in probe[]. On a shared host (other
  // processes on the 2 cores) a call the scheduler cut into is an outlier: the figures are each variant's
  // per-call quantiles (q25 and the median), and the % is against seq's same quantile (the same bytes read
  // plainly with the same calls and split) as well as against the 1 GiB probe's median.
  std::vector<std::vector<std::vector<double>>> calls(vs.size(), std::vector<std::vector<double>>(4));
  std::vector<double> probe;
  for (int r = 0; r < rounds; ++r)
    for (size_t ii = 0; ii < vs.size(); ++ii) {
      const size_t j = (ii + r) % vs.size();
      if (!vs[j].fn) {
        double best = 1e30;
        for (int p = 0; p < 3; ++p) {
          const auto t0 = std::chrono::steady_clock::now();
          owned(int64_t(pbytes / 128), [&](int64_t a, int64_t b) { sink |= probe_lines(pbuf, a, b); });
          best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        probe.push_back(pbytes / best / 1e9);
        continue;
      }
      for (int pass = 0; pass < 2; ++pass)
        for (int l = 0; l < LAYERS; ++l)
          for (int i = 0; i < 4; ++i) {
            const auto t0 = std::chrono::steady_clock::now();
            vs[j].fn(lins[i], l, out.data());
            calls[j][i].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
          }
    }
  auto q = [](std::vector<double> v, double f) {
    std::sort(v.begin(), v.end());
    return v[size_t(f * (v.size() - 1))];
  };
  const double pm = q(probe, 0.5);
  size_t seq = 0;
  for (size_t j = 0; j < vs.size(); ++j)
    if (vs[j].name == "seq (read only)") seq = j;
  printf("%d layers cold, 2 threads, %d rounds; probe 1 GiB median %.1f GB/s (q25 %.1f, q75 %.1f)\n", LAYERS, rounds, pm,
         q(probe, 0.25), q(probe, 0.75));
  printf("per call: q25 us / median us, GB/s of the q25 (%% of seq's q25, %% of the probe)\n%-20s", "");
  for (int i = 0; i < 4; ++i) printf(" %31s", lname[i]);
  printf("\n");
  for (size_t j = 1; j < vs.size(); ++j) {
    printf("%-20s", vs[j].name.c_str());
    for (int i = 0; i < 4; ++i) {
      const double t25 = q(calls[j][i], 0.25), t50 = q(calls[j][i], 0.5), g = bytes[i] / t25 / 1e9;
      const double sq = seq ? q(calls[seq][i], 0.25) : t25;
      printf(" %5.1f/%5.1f %5.1f (%3.0f%%,%3.0f%%)", t25 * 1e6, t50 * 1e6, g, 100 * sq / t25, 100 * g / pm);
    }
    printf("\n");
  }
  return int(sink.load() == 12345);
}
