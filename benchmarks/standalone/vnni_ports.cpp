// Standalone micro-benchmark (session 25 helper C, docs/kernels-log.md): register-only issue rates of
// vpdpbusd zmm / ymm, vpmaddubsw zmm, vfmadd231ps zmm, a vpdpbusd + fma mix, vpermt2d zmm (the
// shuffle port) and vpaddd zmm, 12 independent
// chains, on T threads at once (one a core), against the core clock from a dependent add chain (4
// adds an iteration: 1 cycle each, so the clock printed is a lower bound and the per-cycle rates an
// upper bound). More than 1 vpdpbusd zmm a cycle means two 512-bit ports execute it.
//   g++ -O2 -march=native -std=c++20 -pthread benchmarks/standalone/vnni_ports.cpp -o vnni_ports
//   flock /work/notes/bench.lock ./vnni_ports 2      (T = 2: both cores)
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>
#include <cstdlib>
static double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
__attribute__((noinline)) long addchain(long n){ long x=0; for(long i=0;i<n;++i){ asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0":"+r"(x)); } return x;}
#define DP(a) asm volatile("vpdpbusd %%zmm30, %%zmm31, %%" #a :::);
#define FM(a) asm volatile("vfmadd231ps %%zmm30, %%zmm31, %%" #a :::);
#define MB(a) asm volatile("vpmaddubsw %%zmm30, %%zmm31, %%" #a :::);
#define PT(a) asm volatile("vpermt2d %%zmm30, %%zmm31, %%" #a :::);
#define AD(a) asm volatile("vpaddd %%zmm30, %%zmm31, %%" #a :::);
#define DPY(a) asm volatile("vpdpbusd %%ymm14, %%ymm15, %%" #a :::);
#define X12(M) M(zmm0) M(zmm1) M(zmm2) M(zmm3) M(zmm4) M(zmm5) M(zmm6) M(zmm7) M(zmm8) M(zmm9) M(zmm10) M(zmm11)
#define Y12(M) M(ymm0) M(ymm1) M(ymm2) M(ymm3) M(ymm4) M(ymm5) M(ymm6) M(ymm7) M(ymm8) M(ymm9) M(ymm10) M(ymm11)
__attribute__((noinline)) void dp(long n){ for(long i=0;i<n;++i){ X12(DP) } }
__attribute__((noinline)) void fm(long n){ for(long i=0;i<n;++i){ X12(FM) } }
__attribute__((noinline)) void mb(long n){ for(long i=0;i<n;++i){ X12(MB) } }
__attribute__((noinline)) void pt(long n){ for(long i=0;i<n;++i){ X12(PT) } }
__attribute__((noinline)) void ad(long n){ for(long i=0;i<n;++i){ X12(AD) } }
__attribute__((noinline)) void dpy(long n){ for(long i=0;i<n;++i){ Y12(DPY) } }
__attribute__((noinline)) void dpfm(long n){ for(long i=0;i<n;++i){ DP(zmm0) FM(zmm12) DP(zmm1) FM(zmm13) DP(zmm2) FM(zmm14) DP(zmm3) FM(zmm15) DP(zmm4) FM(zmm16) DP(zmm5) FM(zmm17) } }
template<class F> double rate(F f, long n, int per){ f(n/10); double t=now(); f(n); t=now()-t; return n*(double)per/t/1e9; }
int main(int argc,char**argv){
  int T = argc>1? atoi(argv[1]):1;
  long n=200000000;
  auto run=[&](const char* name, auto f, int per, double ghz){
    std::vector<double> r(T); std::vector<std::thread> th;
    for(int t=0;t<T;++t) th.emplace_back([&,t]{ r[t]=rate(f,n/4,per); });
    for(auto&x:th) x.join();
    for(int t=0;t<T;++t) printf("%-8s thread %d: %.2f /ns  %.2f /cycle\n",name,t,r[t],r[t]/ghz);
  };
  std::vector<double> g(T); { std::vector<std::thread> th; for(int t=0;t<T;++t) th.emplace_back([&,t]{ g[t]=rate([](long k){addchain(k);},n,4);}); for(auto&x:th)x.join(); }
  double ghz=g[0]; printf("clock (dep add chain): %.2f GHz\n", ghz);
  run("dp zmm",dp,12,ghz); run("fma zmm",fm,12,ghz); run("maddubsw",mb,12,ghz); run("dp ymm",dpy,12,ghz); run("dp+fma",dpfm,12,ghz); run("vpermt2d",pt,12,ghz); run("vpaddd",ad,12,ghz);
  { std::vector<double> r(T); std::vector<std::thread> th; for(int t=0;t<T;++t) th.emplace_back([&,t]{ r[t]=rate([](long k){addchain(k);},n,4);}); for(auto&x:th)x.join(); printf("clock after: %.2f GHz\n", r[0]); }
}
