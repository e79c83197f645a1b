// Standalone harness (session 20 helper D, docs/kernels-log.md): q8_rows.h's int8 rows (run_rows, 1 thread)
// at M rows of x on the small shape's linears, variant A against variant B alternating in rounds (4
// calls each, medians), bits compared. A variant is a set of q8rows::Args switches: VA / VB in the
// environment as comma-separated NAME=V (pf0, asm, epi, v2), e.g. VA=v2=0 VB=v2=1. Weights cold
// (copies rotated through ~96 MB) or warm (one copy).
//   g++ -O3 -std=c++20 -mavx2 -mfma -mtune=native -fno-math-errno -fno-trapping-math -fopenmp \
//       -I codeshell/kernels/csrc $(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))") \
//       benchmarks/standalone/q8rows_ab.cpp -o q8rows_ab
//   VA=v2=0 VB=v2=1 ./q8rows_ab M ROUNDS COLD     (e.g. ./q8rows_ab 8 5 1)
#include "q8_rows.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>
using namespace codeshell;
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

static void set_variant(q8rows::Args& A, const char* spec) {
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
    else if (k == "asm") A.asm_dp = v;
    else if (k == "epi") A.lean_epi = v;
    else if (k == "v2") A.v2 = v;
    else if (k == "pf1") A.pf1 = v;
    i = j + 1;
  }
}

int main(int argc, char** argv) {
  const int M = argc > 1 ? atoi(argv[1]) : 8, rounds = argc > 2 ? atoi(argv[2]) : 5, cold = argc > 3 ? atoi(argv[3]) : 1;
  struct Sh { int64_t N, K; const char* name; } shapes[] = {
      {1536, 1024, "c_attn"}, {1024, 1024, "attn.c_proj"}, {4096, 1024, "c_fc"}, {1024, 4096, "mlp.c_proj"}, {70144, 1024, "head"}};
  std::mt19937 rng(1);
  double tot[2] = {0, 0};
  for (const Sh& sh : shapes) {
    const int64_t N = sh.N, K = sh.K, nb = K / 128, wbytes = N * K;
    const int copies = cold ? int(std::max<int64_t>(1, (96 << 20) / wbytes)) : 1;
    std::vector<int8_t> w(size_t(wbytes * copies));
    for (auto& b : w) b = int8_t(rng() % 255 - 127);
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
    q8rows::Prepared P(xq.data(), dx.data(), sx.data(), M, K);
    q8rows::Args A[2];
    for (int v = 0; v < 2; ++v) {
      A[v] = P.args(N, reinterpret_cast<const uint8_t*>(w.data()), sc.data(), bias.data(), o[v].data());
      set_variant(A[v], getenv(v ? "VB" : "VA"));
    }
    auto run = [&](int v, int c) {
      q8rows::Args a = A[v];
      a.w = reinterpret_cast<const uint8_t*>(w.data()) + c * wbytes;
      q8rows::run_chunk(a, 0, N);
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
    double med[2];
    for (int v = 0; v < 2; ++v) {
      std::sort(t[v].begin(), t[v].end());
      med[v] = t[v][t[v].size() / 2];
      tot[v] += med[v];
    }
    const double mac = double(M) * N * K;
    printf("M=%d %-12s N=%6ld K=%5ld %s A %8.1f us  B %8.1f us (%.3fx)  A %.2f B %.2f vpdpbusd/ns  B %.1f GB/s  bits %s\n", M,
           sh.name, long(N), long(K), cold ? "cold" : "warm", med[0] * 1e6, med[1] * 1e6, med[0] / med[1], mac / 64 / med[0] / 1e9,
           mac / 64 / med[1] / 1e9, wbytes / med[1] / 1e9, same ? "same" : "DIFFER");
  }
  printf("M=%d total A %.1f us  B %.1f us (%.3fx)\n", M, tot[0] * 1e6, tot[1] * 1e6, tot[0] / tot[1]);
}
