// Register-only micro-kernel (session 19 helper B, docs/kernels-log.md): vpdpbusd zmm throughput alone
// and with q4_rows.h's per-output fp32 step (2 vpdpbusd from zero + vcvtdq2ps + vfmadd231ps, the fma's
// scale as a {1to16} broadcast, a register or a 64-byte memory operand), 8 outputs an iteration.
// Printed: vpdpbusd per ns. On the session 19 Zen 5 EPYC: 8.3 alone, 4.4 with the fp32 step (any
// operand form): a zmm fma costs about two vpdpbusd slots there.
//   g++ -O3 -funroll-all-loops benchmarks/standalone/dpbusd_fma_mix.cpp -o dpbusd_fma_mix
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <algorithm>
static double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
#define T __attribute__((noinline,target("avx512f,avx512vnni,avx512bw")))
// variant v: 0 = 2dp only; 1 = 2dp+cvt+fma; 2 = 2dp(magic)+subps+fma; 3 = 2dp+fma ; 4 = 2dp + cvt
template<int V> T double run(long n, const float* sd){
  __m512 c[8]; for(int i=0;i<8;++i) c[i]=_mm512_setzero_ps();
  __m512i u=_mm512_set1_epi8(1),s=_mm512_set1_epi8(2),v=_mm512_set1_epi8(3), mg=_mm512_set1_epi32(0x4B400000);
  __m512 mf=_mm512_set1_ps(12582912.0f);
  double t=now();
  for(long i=0;i<n;++i){
    for(int o=0;o<8;++o){ __m512i z;
      if (V==2) asm volatile("vmovdqa32 %1,%0":"=v"(z):"v"(mg)); else asm volatile("vpxord %0,%0,%0":"=v"(z));
      asm volatile("vpdpbusd %2, %1, %0\n vpdpbusd %3, %1, %0":"+v"(z):"v"(u),"v"(s),"v"(v));
      __m512 f;
      if (V==0) { asm volatile(""::"v"(z)); continue; }
      if (V==1||V==4||V==7||V==8) asm volatile("vcvtdq2ps %1,%0":"=v"(f):"v"(z));
      if (V==2) asm volatile("vsubps %2,%1,%0":"=v"(f):"v"(z),"v"(mf));
      if (V==3) f=_mm512_castsi512_ps(z);
      if (V==5) { asm volatile(""::"v"(z)); f=mf; }
      if (V==6) { asm volatile(""::"v"(z)); asm volatile("vmulps %2, %1, %0":"=v"(f):"v"(mf),"v"(mf)); }
      if (V==4) { asm volatile(""::"v"(f)); continue; }
      if (V==7) asm volatile("vfmadd231ps %2, %1, %0":"+v"(c[o]):"v"(f),"v"(mf));
      else if (V==8) asm volatile("vfmadd231ps %2, %1, %0":"+v"(c[o]):"v"(f),"m"(*(const __m512*)(sd)));
      else asm volatile("vfmadd231ps %2%{1to16%}, %1, %0":"+v"(c[o]):"v"(f),"m"(sd[o]));}
  }
  double dt=now()-t; for(int i=0;i<8;++i) asm volatile(""::"v"(c[i]));
  return 16.0*n/dt/1e9;}
int main(){ alignas(64) static float sd[16]={1}; long n=5000000;
  for(int r=0;r<6;++r){ printf("dp/ns: 2dp %.2f | cvt+fma{1to16} %.2f | cvt+fma reg %.2f | cvt+fma zmm-mem %.2f\n", run<0>(n,sd), run<1>(n,sd), run<7>(n,sd), run<8>(n,sd)); } }
