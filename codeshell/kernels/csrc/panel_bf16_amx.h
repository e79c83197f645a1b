// AMX-BF16 tiles for bf16 weights in the panel layout: prefill_amx (any M) and decode_amx (M <= 16).
//
// What this is: a section of panel_bf16.cpp kept in its own file for size (session 33 split): it is
// included once, by panel_bf16.cpp only, after the per-ISA structs and decode_panels it uses, inside
// that translation unit's CODESHELL_HAVE_AVX512 build; the layout and the row-invariance rule are in
// panel_bf16.cpp's opening comment.
// What this is not: a header to include elsewhere (it relies on panel_bf16.cpp's file-local helpers).
#pragma once

// ---- AMX-BF16 prefill ------------------------------------------------------------------------
#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

// Tile registers: tmm0..3 C (16 rows x 16 fp32), tmm4/5 A (16 rows of x x 32 bf16), tmm6/7 B
// (16 k-pairs x 16 weight rows x 2). All 16 rows x 64 bytes.
void amx_configure() {
  codeshell::AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  codeshell::amx_load_config(cfg);
}

// x bf16 [M, K] -> A tiles [Mt = ceil(M/16)][Kt = Kp/32][16][32] bf16 (zero padded), so each
// A tile is 1 KiB contiguous.
void pack_a(const uint16_t* x, int64_t M, int64_t K, int64_t Kp, uint16_t* a) {
  const int64_t Mt = (M + 15) / 16, Kt = Kp / 32;
  at::parallel_for(0, Mt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t mt = t0; mt < t1; ++mt)
      for (int64_t kt = 0; kt < Kt; ++kt) {
        uint16_t* tile = a + (mt * Kt + kt) * 512;
        for (int64_t r = 0; r < 16; ++r) {
          const int64_t m = mt * 16 + r, k0 = kt * 32;
          uint16_t* dst = tile + r * 32;
          if (m >= M) {
            std::memset(dst, 0, 64);
          } else if (k0 + 32 <= K) {
            std::memcpy(dst, x + m * K + k0, 64);
          } else {
            std::memset(dst, 0, 64);
            std::memcpy(dst, x + m * K + k0, size_t(K - k0) * 2);
          }
        }
      }
  });
}

// C tiles for rows [16*mt, 16*(mt+TM)) x panels [p, p+TN) over k-tiles [kt0, kt1) into c (row
// stride ldc floats): started from zero when `first`, else from what c holds (K-blocking).
template <int TM, int TN>
void amx_block(const uint16_t* a, int64_t mt, int64_t Kt, const uint16_t* w, int64_t p, int64_t Kh, int64_t kt0,
               int64_t kt1, bool first, float* c, int64_t ldc) {
  const uint16_t* a0 = a + mt * Kt * 512;
  const uint16_t* a1 = a0 + Kt * 512;
  const uint16_t* b0 = w + p * Kh * 32;  // panel p: Kh k-pairs x 32 bf16; k-tile kt at kt * 512
  const uint16_t* b1 = b0 + Kh * 32;
  const int64_t ldb = ldc * 4;  // bytes
  float* c1 = c + 16;
  float* c2 = c + 16 * ldc;
  float* c3 = c2 + 16;
  if (first) {
    _tile_zero(0);
    if constexpr (TN == 2) _tile_zero(1);
    if constexpr (TM == 2) _tile_zero(2);
    if constexpr (TM == 2 && TN == 2) _tile_zero(3);
  } else {
    _tile_loadd(0, c, ldb);
    if constexpr (TN == 2) _tile_loadd(1, c1, ldb);
    if constexpr (TM == 2) _tile_loadd(2, c2, ldb);
    if constexpr (TM == 2 && TN == 2) _tile_loadd(3, c3, ldb);
  }
  for (int64_t kt = kt0; kt < kt1; ++kt) {
    // the next A tiles into L1 ahead of their tile loads (B is in L1 already by the blocking):
    // +3% measured in-process, alternating (c_attn 0.95 -> 0.99 TFLOP/s, mlp.c_proj 1.03 -> 1.06)
    if (kt + 1 < kt1) {
      const char* na0 = reinterpret_cast<const char*>(a0 + (kt + 1) * 512);
      const char* na1 = reinterpret_cast<const char*>(a1 + (kt + 1) * 512);
      for (int l = 0; l < 16; ++l) {
        _mm_prefetch(na0 + 64 * l, _MM_HINT_T0);
        if constexpr (TM == 2) _mm_prefetch(na1 + 64 * l, _MM_HINT_T0);
      }
    }
    _tile_loadd(4, a0 + kt * 512, 64);
    _tile_loadd(6, b0 + kt * 512, 64);
    if constexpr (TN == 2) _tile_loadd(7, b1 + kt * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (TN == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (TM == 2) {
      _tile_loadd(5, a1 + kt * 512, 64);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (TN == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, ldb);
  if constexpr (TN == 2) _tile_stored(1, c1, ldb);
  if constexpr (TM == 2) _tile_stored(2, c2, ldb);
  if constexpr (TM == 2 && TN == 2) _tile_stored(3, c3, ldb);
}

// Decode-sized M (one 16-row block of x, M <= 16): TN panels (TN <= 4) over all of K, C tiles
// tmm0..3, the A tile tmm4, B tiles through tmm5..7 (tmm5 reused by the 4th panel once its
// first TMUL has read it). The weight is streamed once, so each B stream is prefetched
// kAmxPrefetchTiles tiles (4 KiB) ahead, as the vdpbf16ps panel kernel does; the chunked
// prefill schedule below left the stream to the hardware prefetchers (M = 1 per core, 7B
// shapes: 5-20% slower than vdpbf16ps). Each C tile sees the same tdpbf16ps sequence over
// k-tiles 0..Kt-1 as in the prefill schedule (whose tile stores and loads between K chunks
// are exact), so a row's bits do not depend on which schedule ran: row invariance across M.
constexpr int64_t kAmxPrefetchTiles = 4;

// `as`: bf16 from one k-tile of x to the next: 512 for the packed A tiles (pack_a), 32 for M = 1's row
// read in place (decode_amx_m1: a 1-row A tile is 64 contiguous bytes of x).
// `pfd` / HINT (M = 1 only, session 37: CODESHELL_AMX_BF16_M1_PF / _PFH): tiles ahead and the prefetch's
// cache level (0 L1, 1 L2, 2 L3); past the panels' end the stream goes on in the next block's panels.
// `lda`: bytes from one row of the A tile to the next: 64 for pack_a's tiles and M = 1; 2K for the M = 2..16 rows
// of x read in place (panel_bf16_amx_rows.h's decode_amx_rows, session 38).
template <int TN, int HINT = 0>
void amx_decode_block(const uint16_t* a, int64_t Kt, const uint16_t* w, int64_t p, int64_t Kh, float* c,
                      int64_t ldc, int64_t p_end, int64_t as = 512, int64_t pfd = kAmxPrefetchTiles,
                      int64_t lda = 64) {
  const int64_t ps = Kh * 32;  // bf16 per panel
  const uint16_t* b = w + p * ps;
  const int64_t ldb = ldc * 4;
  _tile_zero(0);
  if constexpr (TN > 1) _tile_zero(1);
  if constexpr (TN > 2) _tile_zero(2);
  if constexpr (TN > 3) _tile_zero(3);
  for (int64_t kt = 0; kt < Kt; ++kt) {
    // Stream q reads panel p + q, then (the next block) panel p + 4 + q: its prefetch runs
    // kAmxPrefetchTiles tiles ahead along that sequence, so the next block's four panels are
    // in flight when it starts. Before, the prefetch ran on past the panel's end into panel
    // p + q + 1 (read by the next stream already), and 3 of the next block's 4 panels started
    // cold: with K = 256 (codeshell-mini) a panel is 8 tiles. Paired in-process A/B, 1 core,
    // M = 1, weights cold (cycled through 64 MiB), CPU time, a loaded machine (load ~5): the
    // 16384 x 256 head 879 -> 793 us and 550 -> 498, 256 x 1024 38.4 -> 34.1, 4096 x 1024
    // 473 -> 450, 1024 x 4096 419 -> 435 (noise level), 1024 x 256 / 384 x 256 the same.
    const int64_t ahead = kt + pfd;
    const int64_t blk = ahead < Kt ? 0 : ahead / Kt, at = ahead < Kt ? ahead : ahead % Kt;
    for (int q = 0; q < TN; ++q) {
      const int64_t pq = p + 4 * blk + q;
      if (pq >= p_end) continue;
      const char* pf = reinterpret_cast<const char*>(w + pq * ps + at * 512);
      for (int l = 0; l < 16; ++l) {
        if constexpr (HINT == 0) _mm_prefetch(pf + 64 * l, _MM_HINT_T0);
        else if constexpr (HINT == 1) _mm_prefetch(pf + 64 * l, _MM_HINT_T1);
        else _mm_prefetch(pf + 64 * l, _MM_HINT_T2);
      }
    }
    _tile_loadd(4, a + kt * as, lda);
    _tile_loadd(5, b + kt * 512, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (TN > 1) {
      _tile_loadd(6, b + ps + kt * 512, 64);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (TN > 2) {
      _tile_loadd(7, b + 2 * ps + kt * 512, 64);
      _tile_dpbf16ps(2, 4, 7);
    }
    if constexpr (TN > 3) {
      _tile_loadd(5, b + 3 * ps + kt * 512, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, c, ldb);
  if constexpr (TN > 1) _tile_stored(1, c + 16, ldb);
  if constexpr (TN > 2) _tile_stored(2, c + 32, ldb);
  if constexpr (TN > 3) _tile_stored(3, c + 48, ldb);
}

void decode_amx(const uint16_t* a, int64_t M, int64_t Kt, const uint16_t* w, int64_t N, int64_t Kh,
                const float* bias, float* out) {
  const int64_t P = (N + kPanel - 1) / kPanel;
  codeshell::parallel_chunks(P, 4, 4, [&](int64_t p0, int64_t p1) {
    amx_configure();
    alignas(64) float c[16 * 64];  // 16 rows x 4 panels
    for (int64_t p = p0; p < p1; p += 4) {
      const int64_t tn = std::min<int64_t>(4, p1 - p);
      if (tn == 4) amx_decode_block<4>(a, Kt, w, p, Kh, c, 64, p1);
      else if (tn == 3) amx_decode_block<3>(a, Kt, w, p, Kh, c, 64, p1);
      else if (tn == 2) amx_decode_block<2>(a, Kt, w, p, Kh, c, 64, p1);
      else amx_decode_block<1>(a, Kt, w, p, Kh, c, 64, p1);
      __asm__ volatile("" ::: "memory");  // c was written by tile stores (asm)
      const int64_t n0 = p * kPanel;
      store_rows(c, 64, M, out, N, n0, std::min(N, (p + tn) * kPanel) - n0, bias);
    }
    _tile_release();
  });
}

// ---- M = 1 (session 37, helper A) -------------------------------------------------------------
// What: one row of x on tiles of one row: the A tile (tmm4) and the C tiles (tmm0..3) configured with
// rows = 1 (B, tmm5..7, keeps its 16 k-pair rows), x's row read in place as the A tile (64 contiguous
// bytes a k-tile: no pack_a copy of 16 zero-padded rows a call, no C rows of zeros stored and reloaded),
// and the tile configuration loaded once per thread and call (chunks_scoped: each thread takes its
// steps in a loop of its own between one amx_configure_m1 and one _tile_release) instead of once a
// chunk; the panels split in owned shares (one contiguous share a thread, steps of 4 panels, the block
// prefetch running on into the thread's next step; the other's steps stolen from the back). Why (session 37's AMX VM, a standalone loop, quiet): ldtilecfg + a tile
// zero / store + tilerelease ~60 ns (~425 ns while the host ran load 10), the zero / store alone ~5
// ns, and a codeshell-mini token ran ~200 chunks of decode_amx (6 chunks c_attn, 4 attn.c_proj, 16
// c_fc, 4 mlp.c_proj a layer, 16 the head) at one configuration each; one 4-panel block over K = 1024
// took 1.16 us on 1-row tiles against 1.39 us on 16 rows (K = 256: 180 ns both); pack_a wrote 16 rows
// x K (32 KiB at K = 1024) a call and each k-tile loaded a 1 KiB A tile. Measured together, not one
// by one: the native step's bf16 call 440.6 against 499.6 us (docs/kernels-log.md, session 37 helper A).
// The same bits: tdpbf16ps computes each row of C from its own row of A, whatever the tile's row
// count (tests/kernels/test_amx_m1.py, test_invariance.py compare M = 1 with every row of M = 2..64).
// CODESHELL_AMX_BF16_M1=0 (read per call; A/B runs and tests): M = 1 through decode_amx as before.
inline bool amx_bf16_m1() { return codeshell::env_flag("CODESHELL_AMX_BF16_M1", true); }

void amx_configure_m1() {
  codeshell::AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = t <= 4 ? 1 : 16;  // C tmm0..3 and A tmm4: one row of x; B tmm5..7: 16 k-pairs
  }
  codeshell::amx_load_config(cfg);
}

// parallel_chunks' chunks (the same grain: ~8 a thread, none under min_items, multiples of align),
// claimed one after another by whichever thread is free, with enter() before a thread's first chunk
// and leave() after its last, once a thread and call (parallel_chunks calls f per chunk); f(i0, i1,
// pend): pend = i1. With `owned` (the default at M = 1; CODESHELL_AMX_BF16_M1_SPLIT=0: without): parallel_owned's
// split instead (one contiguous share a thread taken front to back in steps of the grain, a thread
// done stealing steps from the back of the other's), pend = the end of the thread's own share
// still ahead (a step's prefetch runs on into the thread's next step; a stolen step: its own end).
template <class E, class F, class L>
void chunks_scoped(int64_t n, int64_t align, int64_t min_items, bool owned, const E& enter, const F& f,
                   const L& leave) {
  codeshell::Team* team = codeshell::current_team();
  const int64_t threads = std::min<int64_t>(codeshell::current_threads(), 64);
  int64_t grain = std::max(min_items, (n + 8 * threads - 1) / (8 * threads));
  grain = (grain + align - 1) / align * align;
  const int64_t chunks = (n + grain - 1) / grain;
  if (threads <= 1 || chunks <= 1 || (team == nullptr && at::in_parallel_region())) {
    enter();
    f(0, n, n);
    leave();
    return;
  }
  std::atomic<int64_t> next{0};
  codeshell::OwnedShare sh[64];
  if (owned) codeshell::owned_shares_init(sh, threads, n, align);
  auto share = [&](int64_t me, int64_t) {
    bool in = false;
    auto run = [&](int64_t a, int64_t b, int64_t pend) {
      if (!in) {
        enter();
        in = true;
      }
      f(a, b, pend);
    };
    if (!owned) {
      for (int64_t ch; (ch = next.fetch_add(1, std::memory_order_relaxed)) < chunks;)
        run(ch * grain, std::min(n, (ch + 1) * grain), std::min(n, (ch + 1) * grain));
    } else {
      codeshell::owned_claims(sh, threads, me, align, grain, run);
    }
    if (in) leave();
  };
  if (team != nullptr) team->run(threads, 1, share);
  else at::parallel_for(0, threads, 1, share);
}

// y [1, N] for one row of x (bf16 [K], K % 32 == 0 read in place; else `x` is pack_a's tiles, as 512).
void decode_amx_m1(const uint16_t* x, int64_t as, int64_t Kt, const uint16_t* w, int64_t N, int64_t Kh,
                   const float* bias, float* out) {
  const int64_t P = (N + kPanel - 1) / kPanel;
  const int64_t pfd = std::max<int64_t>(1, codeshell::env_int("CODESHELL_AMX_BF16_M1_PF", kAmxPrefetchTiles));
  const int64_t hint = codeshell::env_int("CODESHELL_AMX_BF16_M1_PFH", 0);
  const int64_t grain = std::max<int64_t>(4, codeshell::env_int("CODESHELL_AMX_BF16_M1_GRAIN", 4));
  // owned shares by default (session 37: the step's bf16 call 434.6 / 419.7 us against 453.5 / 442.5 on
  // chunks in two in-process runs of 25 rounds, c_fc 73.0 / 69.7 against 81.8 / 77.3; bench_quant b1 1.02x,
  // 1.11x, 1.07x chunks in three alternating pairs); CODESHELL_AMX_BF16_M1_SPLIT=0: parallel_chunks' claims
  const bool owned = codeshell::env_flag("CODESHELL_AMX_BF16_M1_SPLIT", true);
  auto go = [&](auto h) {
    constexpr int H = decltype(h)::value;
    chunks_scoped(
      P, 4, grain, owned, [] { amx_configure_m1(); },
      [&](int64_t p0, int64_t p1, int64_t pend) {
        alignas(64) float c[64];  // one row x 4 panels
        for (int64_t p = p0; p < p1; p += 4) {
          const int64_t tn = std::min<int64_t>(4, p1 - p);
          if (tn == 4) amx_decode_block<4, H>(x, Kt, w, p, Kh, c, 64, pend, as, pfd);
          else if (tn == 3) amx_decode_block<3, H>(x, Kt, w, p, Kh, c, 64, pend, as, pfd);
          else if (tn == 2) amx_decode_block<2, H>(x, Kt, w, p, Kh, c, 64, pend, as, pfd);
          else amx_decode_block<1, H>(x, Kt, w, p, Kh, c, 64, pend, as, pfd);
          __asm__ volatile("" ::: "memory");  // c was written by tile stores (asm)
          const int64_t n0 = p * kPanel;
          store_rows(c, 64, 1, out, N, n0, std::min(N, (p + tn) * kPanel) - n0, bias);
        }
      },
      [] { _tile_release(); });
  };
  if (hint == 1) go(std::integral_constant<int, 1>{});
  else if (hint == 2) go(std::integral_constant<int, 2>{});
  else go(std::integral_constant<int, 0>{});
}

#include "panel_bf16_amx_rows.h"  // M = 2..16 on M-row tiles (session 38): decode_amx_rows

// Blocking (measured, 7B shapes at M = 512, 1 core, a busy machine, +-15%): work items of
// kAmxPanels panels; K in chunks of kAmxKTiles k-tiles; within a chunk, for each panel pair,
// every 32-row block of x. The pair's B chunk (2 x 8 KiB) and one A block (2 x 8 KiB) then fit
// L1 together, so each tdpbf16ps pair needs one tile load from L2 instead of two (the 2x2
// block's 4 loads per 4 TMULs otherwise ask ~64 B/cycle of L2). Partial sums wait in c
// [Mt*16][kAmxPanels*16] fp32 between chunks (tile load/store: 8 KiB per 32 TMULs). Against
// the earlier order (all K for each 32x32 block, B chunk of 1 MiB in L2): c_attn ~0.85 vs
// 0.71-0.85 TFLOP/s, mlp.c_proj 0.84-1.23 vs 0.72-0.93; torch's bf16 matmul ran 0.92-1.06.
// Chunk size, in-process alternation (medians, c_attn / mlp.c_proj): 4 k-tiles 0.62 / 0.80,
// 8: 0.91 / 1.14, 12: 0.92 / 1.00, 16: 0.91 / 1.06, 32: 0.87 / 0.98, 128: 0.71 / 0.72.
constexpr int64_t kAmxKTiles = 8;
constexpr int64_t kAmxPanels = 16;

// out_gelu / out_b16 (bf16 [M, N], M > 16; session 37): the result through prefill_dot's epilogues
// (store_rows_gelu: c_fc's GELU; store_rows_b16: rounded to bf16) instead of fp32 into out, while
// the item's sums are in L2: the small shape's c_fc wrote 8 MiB of fp32 a layer for the fused GELU
// to read back.
void prefill_amx(const uint16_t* xb, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,
                 float* out, uint16_t* out_gelu = nullptr, uint16_t* out_b16 = nullptr) {
  const int64_t Kp = padded_k(K), Kh = Kp / 2, Kt = Kp / 32, Mt = (M + 15) / 16, P = (N + kPanel - 1) / kPanel;
  const bool m1 = M == 1 && amx_bf16_m1();
  if (m1 && K == Kp) {  // x's row is the A tiles (1 row each): no copy
    __asm__ volatile("" ::: "memory");
    decode_amx_m1(xb, 32, Kt, w, N, Kh, bias, out);
    return;
  }
  if (Mt == 1 && M > 1 && K == Kp && amx_bf16_rows()) {  // M = 2..16 (session 38): x's rows are the A tiles
    __asm__ volatile("" ::: "memory");
    decode_amx_rows(xb, M, 32, 2 * K, Kt, w, N, Kh, bias, out);
    return;
  }
  static thread_local codeshell::ThreadScratch a_keep;
  codeshell::Scratch<uint16_t> a(a_keep, size_t(Mt) * Kt * 512);  // aligned, kept between calls (scratch.h)
  pack_a(xb, M, K, Kp, a.data());
  __asm__ volatile("" ::: "memory");  // the tile loads below are asm without memory operands
  if (m1) {  // K not a multiple of 32: row 0 of the packed (zero-padded) tiles
    decode_amx_m1(a.data(), 512, Kt, w, N, Kh, bias, out);
    return;
  }
  if (Mt == 1 && M > 1 && amx_bf16_rows()) {  // M = 2..16 (session 38): M-row tiles of pack_a's rows (K % 32 != 0)
    decode_amx_rows(a.data(), M, 512, 64, Kt, w, N, Kh, bias, out);
    return;
  }
  if (Mt == 1) {  // decode-sized: stream the weight once (decode_amx)
    decode_amx(a.data(), M, Kt, w, N, Kh, bias, out);
    return;
  }
  // fewer panels per item when there are few panels: >= 4 items per thread to share out
  // CODESHELL_AMX_KTILES / CODESHELL_AMX_PANELS (read per call; A/B, session 37): the K chunk in
  // k-tiles and the most panels an item holds (even), kAmxKTiles / kAmxPanels by default. Every
  // output's sum runs over the k-tiles in order whatever the chunk (tile stores and loads between
  // chunks are exact): the same bits.
  const int64_t kc = std::min(Kt, std::max<int64_t>(1, codeshell::env_int("CODESHELL_AMX_KTILES", kAmxKTiles)));
  const int64_t most = std::max<int64_t>(2, codeshell::env_int("CODESHELL_AMX_PANELS", kAmxPanels) / 2 * 2);
  const int64_t nb = std::max<int64_t>(2, std::min<int64_t>(most, P / (4 * at::get_num_threads()) / 2 * 2));
  // C rows padded by 16 floats: the next 32-row block's C tiles (loaded right after this
  // block's are stored) then sit at other 4 KiB page offsets than the stores still in flight
  const int64_t items = (P + nb - 1) / nb, ldc = nb * 16 + 16;
  // items claimed by the threads one chunk at a time (parallel.h): a fixed share each made
  // every call wait for a descheduled thread on this shared machine
  codeshell::parallel_chunks(items, 1, 1, [&](int64_t i0, int64_t i1) {
    amx_configure();
    static thread_local codeshell::ThreadScratch c_keep;
    codeshell::Scratch<float> cbuf(c_keep, size_t(Mt) * 16 * ldc);  // C tiles' rows at 64-byte boundaries
    float* c = cbuf.data();
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t pa = it * nb, pb = std::min(P, pa + nb);
      for (int64_t k0 = 0; k0 < Kt; k0 += kc) {
        const int64_t k1 = std::min(Kt, k0 + kc);
        for (int64_t p = pa; p < pb; p += 2) {
          const int tn = pb - p >= 2 ? 2 : 1;
          for (int64_t mt = 0; mt < Mt; mt += 2) {
            const int tm = Mt - mt >= 2 ? 2 : 1;
            float* cp = c + mt * 16 * ldc + (p - pa) * 16;
            if (tm == 2 && tn == 2) amx_block<2, 2>(a.data(), mt, Kt, w, p, Kh, k0, k1, k0 == 0, cp, ldc);
            else if (tm == 2) amx_block<2, 1>(a.data(), mt, Kt, w, p, Kh, k0, k1, k0 == 0, cp, ldc);
            else if (tn == 2) amx_block<1, 2>(a.data(), mt, Kt, w, p, Kh, k0, k1, k0 == 0, cp, ldc);
            else amx_block<1, 1>(a.data(), mt, Kt, w, p, Kh, k0, k1, k0 == 0, cp, ldc);
          }
        }
      }
      __asm__ volatile("" ::: "memory");  // c was written by tile stores (asm)
      const int64_t n0 = pa * kPanel, cols = std::min(N, pb * kPanel) - n0;
      if (out_gelu) store_rows_gelu(c, ldc, M, out_gelu, N, n0, cols, bias);
      else if (out_b16) store_rows_b16(c, ldc, M, out_b16, N, n0, cols, bias);
      else store_rows(c, ldc, M, out, N, n0, cols, bias);
    }
    _tile_release();  // AMX state off: cheaper context switches for this thread
  });
}

// The bf16 compute ceiling of this machine for benchmarks/bench_kernels.py, per thread:
// `reps` passes of the 2x2-tile block over K = Kt * 32 on data that stays in L2 (A 32 rows and
// B 2 panels, 2 * Kt KiB each), i.e. the micro-kernel above with memory out of the way; with
// loads = false only the tdpbf16ps (the TMUL's own rate, which no GEMM reaches).
// The operands are 64-byte aligned as the prefill's own buffers are (scratch.h): in a
// std::vector (16-byte aligned) every tile row straddled two cache lines by chance of the
// allocation, and this ceiling read 1.07-1.77 TFLOP/s per core from one process to the next.
int64_t peak_amx(int64_t Kt, int64_t reps, bool loads) {
  const size_t n = size_t(2) * Kt * 512;
  std::unique_ptr<uint16_t, decltype(&std::free)> ab(static_cast<uint16_t*>(std::aligned_alloc(64, 2 * n)), &std::free),
      wb(static_cast<uint16_t*>(std::aligned_alloc(64, 2 * n)), &std::free);
  TORCH_CHECK(ab && wb, "bf16_peak: out of memory");
  uint16_t* const a = ab.get();
  uint16_t* const w = wb.get();
  std::fill(a, a + n, uint16_t(0x3f80));  // 1.0 in bf16
  std::fill(w, w + n, uint16_t(0x3f80));
  alignas(64) float c[32 * 32];
  amx_configure();
  for (int64_t r = 0; r < reps; ++r) {
    if (loads) {
      amx_block<2, 2>(a, 0, Kt, w, 0, Kt * 16, 0, Kt, true, c, 32);
    } else {
      _tile_loadd(4, a, 64);
      _tile_loadd(5, a + 512, 64);
      _tile_loadd(6, w, 64);
      _tile_loadd(7, w + 512, 64);
      for (int64_t kt = 0; kt < Kt; ++kt) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, 64);
    }
  }
  _tile_release();
  return reps * Kt * 4 * 2 * 16 * 16 * 32;  // flops: 4 tiles x 16x16 outputs x 32 k x 2
}

}  // namespace
CODESHELL_END_AVX512
#endif
