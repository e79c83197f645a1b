// Standalone harness (session 19 helper B, docs/kernels-log.md): q4_rows.h's int4 rows (groups of 128,
// symmetric) at M rows of x, 1 thread, the session 17 schedule (V2 = false) against the session 19
// one (V2 = true) alternating in rounds (4 calls each, medians), bits compared. Weights cold (copies
// rotated through ~96 MB) or warm (one copy). Shapes: the small shape's four block linears, or
// (BIG=1 in the environment) the 1.7B's at K = 4096 / 16384 and an odd N.
//   g++ -O3 -std=c++20 -mavx2 -mfma -mtune=native -fno-math-errno -fno-trapping-math \
//       -I codeshell/kernels/csrc benchmarks/standalone/q4rows_v2.cpp -o q4rows_v2
//   ./q4rows_v2 M ROUNDS COLD     (e.g. ./q4rows_v2 8 4 1)
#include "q4_rows.h"

#include <chrono>
#include <cstdio>
#include <random>
#include <vector>
#include <cstring>
#include <algorithm>
using namespace codeshell;
static double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
int main(int argc, char** argv){
  int M = argc > 1 ? atoi(argv[1]) : 8; int rounds = argc > 2 ? atoi(argv[2]) : 5; int cold = argc > 3 ? atoi(argv[3]) : 1;
  struct Sh { int64_t N, K; const char* name; } sm[] = {{3072,1024,"c_attn"},{1024,1024,"attn.c_proj"},{4096,1024,"c_fc"},{1024,4096,"mlp.c_proj"}},
  big[] = {{1536,4096,"1.7B c_attn/4"},{4096,4096,"1.7B c_proj"},{2048,16384,"1.7B mlp.c_proj/2"},{1027,1024,"odd N"}};
  const bool bigs = getenv("BIG") != nullptr; Sh* shapes = bigs ? big : sm;
  std::mt19937 rng(1);
  for (int si = 0; si < 4; ++si) { Sh sh = shapes[si];
    const int64_t N = sh.N, K = sh.K, ng = K / 128;
    const int64_t wbytes = N * K / 2; const int copies = cold ? std::max<int64_t>(1, (96 << 20) / wbytes) : 1;
    std::vector<uint8_t> q(size_t(wbytes * copies)); for (auto& b : q) b = rng();
    std::vector<float> sc(size_t(N * ng * copies)); for (auto& s : sc) s = std::uniform_real_distribution<float>(0.001f, 0.02f)(rng);
    std::vector<int8_t> xq(size_t(M * K)); for (auto& v : xq) v = int8_t(rng() % 255 - 127);
    std::vector<float> dx(size_t(M * ng)), xs(size_t(M * ng)); for (auto& v : dx) v = std::uniform_real_distribution<float>(0.001f, 0.1f)(rng);
    for (auto& v : xs) v = std::uniform_real_distribution<float>(-3, 3)(rng);
    q4rows::XT xt(dx.data(), M, ng);
    std::vector<float> o1(M * N), o2(M * N);
    const int64_t pf = 16 * (K / 2); const int64_t pf2 = (getenv("PFR") ? atoi(getenv("PFR")) : 16) * (K / 2);
    auto run = [&](int v, int c, float* o) {
      const uint8_t* qq = q.data() + c * wbytes; const float* ss = sc.data() + c * N * ng;
      if (v == 0) q4rows::run_rows<1, false>(xq.data(), xt.dxT, xs.data(), M, K, qq, ss, nullptr, pf, o, N, 0, N);
      else q4rows::run_rows<1, false, true>(xq.data(), xt.dxT, xs.data(), M, K, qq, ss, nullptr, pf2, o, N, 0, N);
    };
    run(0, 0, o1.data()); run(1, 0, o2.data());
    const bool same = std::memcmp(o1.data(), o2.data(), o1.size() * 4) == 0;
    std::vector<double> t[2]; int c = 0;
    for (int r = 0; r < rounds; ++r) for (int v = 0; v < 2; ++v) for (int rep = 0; rep < 4; ++rep) {
      c = (c + 1) % copies; double t0 = now(); run(v, c, v ? o2.data() : o1.data()); t[v].push_back(now() - t0); }
    for (int v = 0; v < 2; ++v) std::sort(t[v].begin(), t[v].end());
    double mac = double(M) * N * K;
    printf("M=%d %-12s N=%5ld K=%5ld %s old %7.1f us  new %7.1f us  (%.2fx)  new %.2f dp/ns  bits %s\n", M, sh.name, N, K, cold ? "cold" : "warm",
           t[0][t[0].size()/2]*1e6, t[1][t[1].size()/2]*1e6, t[0][t[0].size()/2]/t[1][t[1].size()/2], mac/64/t[1][t[1].size()/2]/1e9, same ? "same" : "DIFFER");
  }
}
