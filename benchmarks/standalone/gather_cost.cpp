// Standalone micro-benchmark (session 25 helper C, docs/kernels-log.md): the cost of one vgatherdps zmm
// (16 fp32 lanes at a stride of 8 / 16 floats from an L1-resident table, as tile_r16_q4e gathered a
// group's 16 row scales), 4 independent gathers an iteration, against 16 scalar loads and a vector
// load of the same values. On the Ice Lake-class Xeon of sessions 23-25 a gather took ~9 ns.
//   g++ -O2 -march=native -std=c++20 benchmarks/standalone/gather_cost.cpp -o gather && ./gather
#include <immintrin.h>
#include <chrono>
#include <cstdio>
static double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
alignas(64) float S[4096];
__attribute__((noinline)) __m512 g(long n, int stride){
  __m512i gi=_mm512_mullo_epi32(_mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15),_mm512_set1_epi32(stride));
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;
  for(long i=0;i<n;++i){ const float* p=S+(i&7);
    a0=_mm512_add_ps(a0,_mm512_i32gather_ps(gi,p,4)); a1=_mm512_add_ps(a1,_mm512_i32gather_ps(gi,p+8,4));
    a2=_mm512_add_ps(a2,_mm512_i32gather_ps(gi,p+16,4)); a3=_mm512_add_ps(a3,_mm512_i32gather_ps(gi,p+24,4)); asm volatile(""::"r"(p):"memory");}
  return _mm512_add_ps(_mm512_add_ps(a0,a1),_mm512_add_ps(a2,a3));}
__attribute__((noinline)) __m512 ld16(long n, int stride){ // same data by 16 scalar loads + insert: alternative
  __m512 a0=_mm512_setzero_ps();
  for(long i=0;i<n;++i){ const float* p=S+(i&7);
    for(int j=0;j<4;++j){ alignas(64) float t[16]; for(int l=0;l<16;++l) t[l]=p[8*j+l*stride]; a0=_mm512_add_ps(a0,_mm512_load_ps(t)); }
    asm volatile(""::"r"(p):"memory");}
  return a0;}
int main(){ long n=20000000; volatile float sink;
  for(int st: {8, 16}){ g(n/10,st); double t=now(); __m512 r=g(n,st); t=now()-t; sink=_mm512_reduce_add_ps(r); printf("gather zmm stride %d: %.2f ns each\n",st,t/(4.0*n)*1e9);
   t=now(); r=ld16(n/4,st); t=now()-t; sink=_mm512_reduce_add_ps(r); printf("16 scalar loads + vector load: %.2f ns each\n",t/(4.0*n/4)*1e9);}
}
