// Standalone harness (session 29 helper B, docs/kernels-log.md): codeshell-mini's int8 head at batch 8
// (q8_rows.h run_rows<2, true> with the weight's block sums table, as the decode step runs it):
// N x K int8 rows at M rows of x, T threads (each a contiguous half), variant A against B
// alternating in rounds (medians), bits compared. A variant is q8rows::Args switches (VA / VB:
// comma-separated NAME=V: pf0, pf1, t8) or t=1: q8_rows_t.h on the transposed copy (tpf=N: its T0
// prefetch N blocks ahead).
// Memory: the weight rotates through COPIES copies (1: re-read from L3 / L2 each call).
//   g++ -O3 -std=c++20 -march=native -fopenmp -I codeshell/kernels/csrc $(torch includes) \
//       benchmarks/standalone/head_m8.cpp -o head_m8
//   VA=... VB=... ./head_m8 M N K THREADS ROUNDS COPIES
#include "q8_rows.h"
#include "q8_rows_t.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>
using namespace codeshell;
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

static int use_t[2] = {0, 0}, tpf[2] = {0, 0};
static void set_variant(q8rows::Args& A, const char* spec, int vi) {
  if (!spec) return;
  std::string s(spec);
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string kv = s.substr(i, j - i);
    size_t e = kv.find('=');
    std::string k = kv.substr(0, e);
    long v = e == std::string::npos ? 1 : atol(kv.c_str() + e + 1);
    if (k == "pf0") A.pf0 = v;
    else if (k == "pf1") A.pf1 = v;
    else if (k == "t8") A.t8 = v;
    else if (k == "t") use_t[vi] = v;
    else if (k == "tpf") tpf[vi] = v;
    i = j + 1;
  }
}

int main(int argc, char** argv) {
  const int M = argc > 1 ? atoi(argv[1]) : 8;
  const int64_t N = argc > 2 ? atol(argv[2]) : 16384, K = argc > 3 ? atol(argv[3]) : 256;
  const int T = argc > 4 ? atoi(argv[4]) : 2, rounds = argc > 5 ? atoi(argv[5]) : 20, copies = argc > 6 ? atoi(argv[6]) : 1;
  const int64_t nb = K / 128, wbytes = N * K;
  std::mt19937 rng(1);
  std::vector<int8_t> w(size_t(wbytes * copies));
  for (auto& b : w) b = int8_t(rng() % 255 - 127);
  std::vector<std::vector<int32_t>> sums;
  for (int c = 0; c < copies; ++c) sums.push_back(q8rows::block_sums(w.data() + c * wbytes, N, K));
  std::vector<float> sc(N), bias(N);
  for (auto& s : sc) s = std::uniform_real_distribution<float>(0.001f, 0.02f)(rng);
  for (auto& s : bias) s = std::uniform_real_distribution<float>(-1, 1)(rng);
  std::vector<int8_t> xq(size_t(M * K));
  for (auto& v : xq) v = int8_t(rng() % 255 - 127);
  std::vector<float> dx(size_t(M * nb));
  std::vector<int32_t> sx(size_t(M * nb), 0);
  for (auto& v : dx) v = std::uniform_real_distribution<float>(0.001f, 0.1f)(rng);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b)
      for (int k = 0; k < 128; ++k) sx[m * nb + b] += xq[m * K + b * 128 + k];
  std::vector<float> o[2] = {std::vector<float>(M * N), std::vector<float>(M * N)};
  q8rows::Prepared P(xq.data(), dx.data(), sx.data(), M, K, false, true);
  q8rows::Args A[2];
  for (int v = 0; v < 2; ++v) {
    A[v] = P.args(N, reinterpret_cast<const uint8_t*>(w.data()), sc.data(), bias.data(), o[v].data());
    set_variant(A[v], getenv(v ? "VB" : "VA"), v);
  }
  std::vector<std::vector<uint8_t>> packs;
  for (int c = 0; c < copies; ++c) packs.push_back(q8rt::pack(w.data() + c * wbytes, N, K));
  std::vector<int32_t> xp(size_t(K / 4 * 8 + 16)), so(size_t(M * nb));
  for (int64_t i = 0; i < M * nb; ++i) so[i] = 128 * sx[i];
  omp_set_num_threads(T);
  auto run = [&](int v, int c) {
    q8rows::Args a = A[v];
    a.w = reinterpret_cast<const uint8_t*>(w.data()) + c * wbytes;
    a.wsum = sums[c].data();
    q8rt::Args ta{M, K, N, nb, xp.data(), so.data(), dx.data(), packs[c].data(), sc.data(), bias.data(), o[v].data(), tpf[v]};
    if (use_t[v]) q8rt::pack_x(xq.data(), M, K, xp.data());
    const int64_t half = (N / T + 31) / 32 * 32;
#pragma omp parallel num_threads(T)
    {
      const int t = omp_get_thread_num();
      const int64_t n0 = std::min<int64_t>(N, t * half), n1 = t == T - 1 ? N : std::min<int64_t>(N, (t + 1) * half);
      if (n0 < n1) {
        if (use_t[v]) q8rt::run_cols(ta, n0, n1);
        else q8rows::run_chunk(a, n0, n1);
      }
    }
  };
  run(0, 0);
  run(1, 0);
  const bool same = std::memcmp(o[0].data(), o[1].data(), o[0].size() * 4) == 0;
  std::vector<double> t[2];
  int c = 0;
  for (int r = 0; r < rounds; ++r)
    for (int vv = 0; vv < 2; ++vv) {
      const int v = r % 2 ? 1 - vv : vv;
      for (int rep = 0; rep < 4; ++rep) {
        c = (c + 1) % copies;
        const double t0 = now();
        run(v, c);
        t[v].push_back(now() - t0);
      }
    }
  double med[2], mn[2];
  for (int v = 0; v < 2; ++v) {
    std::sort(t[v].begin(), t[v].end());
    med[v] = t[v][t[v].size() / 2];
    mn[v] = t[v][0];
  }
  const double mac = double(M) * N * K;
  printf("M=%d N=%ld K=%ld T=%d copies=%d  A %7.1f us (min %7.1f)  B %7.1f us (min %7.1f)  A/B %.3fx  A %.2f B %.2f vpdpbusd/ns/core  B %.1f GB/s  bits %s\n",
         M, long(N), long(K), T, copies, med[0] * 1e6, mn[0] * 1e6, med[1] * 1e6, mn[1] * 1e6, med[0] / med[1],
         mac / 64 / med[0] / 1e9 / T, mac / 64 / med[1] / 1e9 / T, wbytes / med[1] / 1e9, same ? "same" : "DIFFER");
}
