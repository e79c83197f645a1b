// Standalone micro-benchmark (session 41 helper B, docs/kernels-log.md): register-only issue rates of zmm
// vpunpckldq, vshufi32x4, vpsrlw alone, and of vpdpbusd mixed 1:1 with vpermt2d / vpunpckldq / vshufi32x4 /
// vpsrlw / vpandd / vpaddd (12 independent chains), against the core clock from a dependent add chain
// (vnni_ports.cpp's method): which of the M = 1 tiles' shuffles and nibble ops take vpdpbusd's issue slot.
// On Zen 4 (3.65 GHz): vpdpbusd + vpermt2d 1.06 ops a cycle in all, + vpunpckldq 1.73, + vshufi32x4 1.47.
//   g++ -O2 -march=native -std=c++20 benchmarks/standalone/vnni_mix.cpp -o vnni_mix
//   flock /work/notes/bench.lock ./vnni_mix
#include <immintrin.h>
#include <chrono>
#include <cstdio>
static double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
__attribute__((noinline)) long addchain(long n){ long x=0; for(long i=0;i<n;++i){ asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0":"+r"(x)); } return x;}
#define DP(a) asm volatile("vpdpbusd %%zmm30, %%zmm31, %%" #a :::);
#define PT(a) asm volatile("vpermt2d %%zmm30, %%zmm31, %%" #a :::);
#define UN(a) asm volatile("vpunpckldq %%zmm30, %%zmm31, %%" #a :::);
#define SH(a) asm volatile("vshufi32x4 $0x88, %%zmm30, %%zmm31, %%" #a :::);
#define SR(a) asm volatile("vpsrlw $4, %%zmm31, %%" #a :::);
#define AN(a) asm volatile("vpandd %%zmm30, %%zmm31, %%" #a :::);
#define AD(a) asm volatile("vpaddd %%zmm30, %%zmm31, %%" #a :::);
#define X12(M) M(zmm0) M(zmm1) M(zmm2) M(zmm3) M(zmm4) M(zmm5) M(zmm6) M(zmm7) M(zmm8) M(zmm9) M(zmm10) M(zmm11)
#define MIX(A,B) A(zmm0) B(zmm12) A(zmm1) B(zmm13) A(zmm2) B(zmm14) A(zmm3) B(zmm15) A(zmm4) B(zmm16) A(zmm5) B(zmm17)
__attribute__((noinline)) void un(long n){ for(long i=0;i<n;++i){ X12(UN) } }
__attribute__((noinline)) void sh(long n){ for(long i=0;i<n;++i){ X12(SH) } }
__attribute__((noinline)) void sr(long n){ for(long i=0;i<n;++i){ X12(SR) } }
__attribute__((noinline)) void dppt(long n){ for(long i=0;i<n;++i){ MIX(DP,PT) } }
__attribute__((noinline)) void dpun(long n){ for(long i=0;i<n;++i){ MIX(DP,UN) } }
__attribute__((noinline)) void dpsh(long n){ for(long i=0;i<n;++i){ MIX(DP,SH) } }
__attribute__((noinline)) void dpsr(long n){ for(long i=0;i<n;++i){ MIX(DP,SR) } }
__attribute__((noinline)) void dpan(long n){ for(long i=0;i<n;++i){ MIX(DP,AN) } }
__attribute__((noinline)) void ptsr(long n){ for(long i=0;i<n;++i){ MIX(PT,SR) } }
__attribute__((noinline)) void dpad(long n){ for(long i=0;i<n;++i){ MIX(DP,AD) } }
template<class F> double rate(F f, long n, int per){ f(n/10); double t=now(); f(n); t=now()-t; return n*(double)per/t/1e9; }
int main(){
  long n=50000000; double ghz=rate([](long k){addchain(k);},200000000,4);
  printf("clock %.2f GHz\n",ghz);
  auto p=[&](const char* s, double r){ printf("%-10s %.2f /ns %.2f /cycle\n",s,r,r/ghz); };
  p("unpckldq",rate(un,n,12)); p("shufi32x4",rate(sh,n,12)); p("psrlw",rate(sr,n,12));
  p("dp+permt2d",rate(dppt,n,12)); p("dp+unpck",rate(dpun,n,12)); p("dp+shufi",rate(dpsh,n,12));
  p("dp+psrlw",rate(dpsr,n,12)); p("dp+pand",rate(dpan,n,12)); p("perm+psrlw",rate(ptsr,n,12)); p("dp+paddd",rate(dpad,n,12));
}
