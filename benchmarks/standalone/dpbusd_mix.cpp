// Standalone micro-benchmark (session 22 helper C, docs/kernels-log.md): vpdpbusd issue rates of the
// instruction mixes an int8 rows kernel at M = 8 can use, one thread, operands in L1 (no memory
// stream): what q8_rows.h's step loop reaches without its per-block work, against the
// instruction's own peak. Each line: vpdpbusd per ns.
//   cur       q8_rows.h's step: 1 x load + 8 vpbroadcastq (one per weight row) + 8 vpdpbusd, 8 chains
//   cur4      E = 4 at M = 8: 2 x loads + 8 16-byte broadcasts + 16 vpdpbusd (a broadcast feeds 2)
//   regonly   8 vpdpbusd on register operands, 8 chains; regonly16: 16 chains (the peak)
//   panel2/3  weights in lanes (16 rows x a quad, a layout the model does not store) and 8 x-quad
//             broadcasts feeding 2 / 3 weight vectors
//   curshuf   the weight runs taken from a 64-byte row load by vpermq instead of broadcast loads;
//   curmix    half of them
//   g++ -O3 -march=native -std=c++20 benchmarks/standalone/dpbusd_mix.cpp -o dpbusd_mix && ./dpbusd_mix
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
static double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
static inline __m512i dp(__m512i a, __m512i u, __m512i s){asm("vpdpbusd %2, %1, %0":"+v"(a):"v"(u),"v"(s));return a;}
alignas(64) uint8_t W[8][4096];
alignas(64) uint8_t X[4096];
__attribute__((noinline)) __m512i cur(long iters){ // 1 x load + 8 bcastq mem + 8 dp, 8 chains
  __m512i a[8]; for(int j=0;j<8;++j)a[j]=_mm512_setzero_si512();
  for(long it=0;it<iters;++it){ for(int p=0;p<16;++p){ __m512i xv=_mm512_load_si512(X+64*p);
    for(int j=0;j<8;++j){int64_t v; memcpy(&v,&W[j][8*p],8); a[j]=dp(a[j],xv,_mm512_set1_epi64(v));}}
    asm volatile(""::"r"(W):"memory");}
  __m512i s=a[0]; for(int j=1;j<8;++j)s=_mm512_add_epi32(s,a[j]); return s;}
__attribute__((noinline)) __m512i regonly(long iters){ // 8 dp, 8 chains, register operands
  __m512i a[8]; for(int j=0;j<8;++j)a[j]=_mm512_setzero_si512();
  __m512i u=_mm512_load_si512(X), w[8]; for(int j=0;j<8;++j) w[j]=_mm512_load_si512(W[j]);
  for(long it=0;it<iters;++it){ for(int p=0;p<16;++p){ for(int j=0;j<8;++j) a[j]=dp(a[j],u,w[j]);} asm volatile(""::"v"(u));}
  __m512i s=a[0]; for(int j=1;j<8;++j)s=_mm512_add_epi32(s,a[j]); return s;}
__attribute__((noinline)) __m512i regonly16(long iters){
  __m512i a[16]; for(int j=0;j<16;++j)a[j]=_mm512_setzero_si512();
  __m512i u=_mm512_load_si512(X), w[4]; for(int j=0;j<4;++j) w[j]=_mm512_load_si512(W[j]);
  for(long it=0;it<iters;++it){ for(int p=0;p<8;++p){ for(int j=0;j<16;++j) a[j]=dp(a[j],u,w[j&3]);} asm volatile(""::"v"(u));}
  __m512i s=a[0]; for(int j=1;j<16;++j)s=_mm512_add_epi32(s,a[j]); return s;}
// panel: P weight zmm loads (16 rows x quad), 8 x-quad broadcasts from memory (reg), P*8 dp
template<int P> __attribute__((noinline)) __m512i panel(long iters){
  __m512i a[P][8]; for(int q=0;q<P;++q)for(int j=0;j<8;++j)a[q][j]=_mm512_setzero_si512();
  for(long it=0;it<iters;++it){ for(int p=0;p<(P==2?8:5);++p){ __m512i w[P]; for(int q=0;q<P;++q) w[q]=_mm512_load_si512(&W[q][64*p]);
     for(int m=0;m<8;++m){ int32_t v; memcpy(&v,X+128*m+4*p,4); __m512i b=_mm512_set1_epi32(v); for(int q=0;q<P;++q) a[q][m]=dp(a[q][m],w[q],b);} }
    asm volatile(""::"r"(W):"memory");}
  __m512i s=a[0][0]; for(int q=0;q<P;++q)for(int j=0;j<8;++j)s=_mm512_add_epi32(s,a[q][j]); return s;}
// current but broadcast from a register-held 64B row chunk via permutexvar (shuffle)
__attribute__((noinline)) __m512i curshuf(long iters){
  __m512i a[8]; for(int j=0;j<8;++j)a[j]=_mm512_setzero_si512();
  for(long it=0;it<iters;++it){ __m512i wr[8]; for(int j=0;j<8;++j) wr[j]=_mm512_load_si512(&W[j][0]);
    for(int p=0;p<8;++p){ __m512i xv=_mm512_load_si512(X+64*p); __m512i ix=_mm512_set1_epi64(p);
    for(int j=0;j<8;++j){ a[j]=dp(a[j],xv,_mm512_permutexvar_epi64(ix,wr[j]));}}
    asm volatile(""::"r"(W):"memory");}
  __m512i s=a[0]; for(int j=1;j<8;++j)s=_mm512_add_epi32(s,a[j]); return s;}
// half mem bcast, half shuffle
__attribute__((noinline)) __m512i curmix(long iters){
  __m512i a[8]; for(int j=0;j<8;++j)a[j]=_mm512_setzero_si512();
  for(long it=0;it<iters;++it){ __m512i wr[4]; for(int j=0;j<4;++j) wr[j]=_mm512_load_si512(&W[j][0]);
    for(int p=0;p<8;++p){ __m512i xv=_mm512_load_si512(X+64*p); __m512i ix=_mm512_set1_epi64(p);
    for(int j=0;j<4;++j){ a[j]=dp(a[j],xv,_mm512_permutexvar_epi64(ix,wr[j]));}
    for(int j=4;j<8;++j){int64_t v; memcpy(&v,&W[j][8*p],8); a[j]=dp(a[j],xv,_mm512_set1_epi64(v));}}
    asm volatile(""::"r"(W):"memory");}
  __m512i s=a[0]; for(int j=1;j<8;++j)s=_mm512_add_epi32(s,a[j]); return s;}
__attribute__((noinline)) __m512i cur4(long iters){ // 2 x loads + 8 bcast16 mem + 16 dp, 16 chains
  __m512i a[16]; for(int j=0;j<16;++j)a[j]=_mm512_setzero_si512();
  for(long it=0;it<iters;++it){ for(int p=0;p<8;++p){ __m512i x0=_mm512_load_si512(X+128*p), x1=_mm512_load_si512(X+128*p+64);
    for(int j=0;j<8;++j){ __m512i b=_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)&W[j][16*p])); a[j]=dp(a[j],x0,b); a[j+8]=dp(a[j+8],x1,b);}}
    asm volatile(""::"r"(W):"memory");}
  __m512i s=a[0]; for(int j=1;j<16;++j)s=_mm512_add_epi32(s,a[j]); return s;}
template<class F> void bench(const char* name, F f, long dps_per_iter){
  long it=2000000; volatile int sink; f(1000);
  double best=1e9; for(int r=0;r<5;++r){double t=now(); __m512i s=f(it); t=now()-t; sink=_mm_cvtsi128_si32(_mm512_castsi512_si128(s)); if(t<best)best=t;}
  printf("%-10s %.2f dp/ns\n",name, it*dps_per_iter/best/1e9);}
int main(){ for(int j=0;j<8;++j)for(int i=0;i<4096;++i)W[j][i]=i*7+j; for(int i=0;i<4096;++i)X[i]=i*3;
  bench("cur",cur,128); bench("cur4",cur4,128); bench("regonly",regonly,128); bench("regonly16",regonly16,128);
  bench("panel2",panel<2>,128); bench("panel3",panel<3>,120); bench("curshuf",curshuf,64); bench("curmix",curmix,64);}
