// Standalone: what an AMX tile configuration costs, and a 4-panel bf16 decode block (panel_bf16_amx.h's
// amx_decode_block: 4 B tiles a k-tile, operands in L1 / L2) on 16-row against 1-row A / C tiles.
// Session 37 helper A (docs/kernels-log.md). Not a test: prints ns per loop, 3 repeats each.
//
//   g++ -O2 -mamx-tile -mamx-bf16 -mavx512f benchmarks/standalone/amx_tilecfg.cpp -o /tmp/amx_tilecfg && /tmp/amx_tilecfg
//
// cfg+release: ldtilecfg, a tile zero and store, tilerelease (decode_amx's cost a chunk before session 37);
// zero+store only: the same without the configuration; cfg only: without the release. block K=...: one
// 4-panel block over K (8 or 32 k-tiles: codeshell-mini's K = 256 / 1024), the tile configuration loaded once.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdio>
#include <cstdint>
#include <chrono>
#include <cstring>
struct alignas(64) Cfg { uint8_t palette=1, start=0, r[14]={}; uint16_t colsb[16]={}; uint8_t rows[16]={}; };
int main(){
  syscall(SYS_arch_prctl, 0x1023, 18);
  Cfg c16, c1; for(int t=0;t<8;++t){c16.colsb[t]=64;c16.rows[t]=16;c1.colsb[t]=64;c1.rows[t]=(t<=4)?1:16;}
  alignas(64) static uint16_t A[16*32*64], B[16*32*64*4]; alignas(64) static float C[16*64];
  memset(A,0,sizeof A); memset(B,0,sizeof B);
  auto bench=[&](const char* name, auto f){ for(int rep=0;rep<3;++rep){ auto t0=std::chrono::steady_clock::now(); int N=200000; for(int i=0;i<N;++i) f(); auto t1=std::chrono::steady_clock::now(); printf("%s %.1f ns\n",name, std::chrono::duration<double,std::nano>(t1-t0).count()/N);} };
  bench("cfg+release", [&]{ _tile_loadconfig(&c16); _tile_zero(0); _tile_stored(0,C,64); _tile_release(); });
  _tile_loadconfig(&c16);
  bench("zero+store only", [&]{ _tile_zero(0); _tile_stored(0,C,64); });
  bench("cfg only", [&]{ _tile_loadconfig(&c16); _tile_zero(0); _tile_stored(0,C,64); });
  // 8 ktiles x 4 panels TMUL block, rows 16
  auto blk=[&](int K){ _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3); for(int kt=0;kt<K;++kt){ _tile_loadd(4,A+kt*512,64); _tile_loadd(5,B+kt*512,64);_tile_dpbf16ps(0,4,5); _tile_loadd(6,B+8192+kt*512,64);_tile_dpbf16ps(1,4,6);_tile_loadd(7,B+16384+kt*512,64);_tile_dpbf16ps(2,4,7);_tile_loadd(5,B+24576+kt*512,64);_tile_dpbf16ps(3,4,5);} _tile_stored(0,C,256);_tile_stored(1,C+16,256);_tile_stored(2,C+32,256);_tile_stored(3,C+48,256); };
  _tile_loadconfig(&c16);
  bench("block K=256 rows16", [&]{ blk(8); });
  bench("block K=1024 rows16", [&]{ blk(32); });
  _tile_loadconfig(&c1);
  bench("block K=256 rows1", [&]{ blk(8); });
  bench("block K=1024 rows1", [&]{ blk(32); });
  _tile_release();
}
