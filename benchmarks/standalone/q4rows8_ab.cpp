// Standalone harness (session 27 helper B, docs/kernels-log.md): q8_rows.h's int4 rows (run_rows_q4, 1
// thread, no pool) at M rows of x on codeshell-mini's shapes (N x K: head-sized 16384 x 256, c_fc
// 1024 x 256, mlp.c_proj 256 x 1024), warm weights (one copy), group 128 with offsets; prints ns a
// call and vpdpbusd / ns (32 / E per 8 weight rows and 128 k). Variant: env PF0 (L1 prefetch groups), T8 (0: scalar result stores).
//   g++ -O3 -std=c++20 -march=native -fno-math-errno -fno-trapping-math -fopenmp \
//       -I codeshell/kernels/csrc $(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))") \
//       benchmarks/standalone/q4rows8_ab.cpp -o q4rows8_ab
//   ./q4rows8_ab M ROUNDS
#include "q8_rows.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>
using namespace codeshell;
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

int main(int argc, char** argv) {
  const int64_t M = argc > 1 ? atol(argv[1]) : 8;
  const int rounds = argc > 2 ? atoi(argv[2]) : 5;
  const int64_t pf0 = getenv("PF0") ? atol(getenv("PF0")) : 2;
  const bool t8 = getenv("T8") ? atol(getenv("T8")) != 0 : true;
  std::mt19937 rng(1);
  const int64_t shapes[][2] = {{16384, 256}, {1024, 256}, {256, 1024}};
  for (auto& sh : shapes) {
    const int64_t N = sh[0], K = sh[1], ng = K / 128;
    std::vector<uint8_t> q(size_t(N * K / 2));
    for (auto& v : q) v = uint8_t(rng());
    std::vector<float> sc(size_t(N * ng)), of(size_t(N * ng)), out(size_t(M * N)), dx(size_t(M * ng)), xs(size_t(M * ng));
    for (auto& v : sc) v = float(rng() % 1000) * 1e-5f;
    for (auto& v : of) v = float(rng() % 1000) * 1e-5f;
    std::vector<int8_t> xq(size_t(M * K));
    std::vector<int32_t> sx(size_t(M * ng));
    for (auto& v : xq) v = int8_t(rng());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < ng; ++g) {
        int32_t t = 0;
        for (int k = 0; k < 128; ++k) t += xq[m * K + g * 128 + k];
        sx[m * ng + g] = t;
        dx[m * ng + g] = 0.01f;
        xs[m * ng + g] = 0.01f * t;
      }
    q8rows::Prepared P(xq.data(), dx.data(), sx.data(), M, K, true, false, 128, 8, xs.data());
    q8rows::Q4Args A{M, K, N, ng, P.xt, P.so, P.dT, P.xsT, q.data(), sc.data(), of.data(), nullptr, out.data(), pf0, t8};
    const int reps = std::max<int64_t>(4, 20000000 / (N * K));
    std::vector<double> ts;
    for (int r = 0; r < rounds; ++r) {
      const double t0 = now();
      for (int i = 0; i < reps; ++i) q8rows::run_chunk_q4<1, true>(A, 0, N);
      ts.push_back((now() - t0) / reps);
    }
    std::sort(ts.begin(), ts.end());
    const double t = ts[ts.size() / 2];
    const int E = q8rows::quads_per_lane(M);
    const double vp = double(N) / 8 * ng * 8 * (32 / E);
    printf("N=%5ld K=%5ld M=%ld: %8.1f us  %.2f vpdpbusd/ns\n", long(N), long(K), long(M), t * 1e6, vp / t * 1e-9);
  }
}
