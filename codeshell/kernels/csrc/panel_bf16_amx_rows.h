// AMX-BF16 decode at M = 2..16 rows of x (batched decode, verify steps): tiles of exactly M rows.
//
// What this is: a section of panel_bf16.cpp: included once, by panel_bf16_amx.h inside its AVX-512 section
// and anonymous namespace, after decode_amx_m1 (it uses kAmxPrefetchTiles, chunks_scoped and panel_bf16.cpp's
// store_rows), for prefill_amx's decode-sized calls (Mt == 1, M >= 2). Session 38, helper B.
// How: helper A's M = 1 path (decode_amx_m1, session 37) for M rows: the A tile (tmm4) and the C tiles
// (tmm0..3) configured with rows = M (B, tmm5..7, keeps its 16 k-pair rows), x's M rows read in place as
// the A tile (row r at x + r * K: a tile load with a stride of K bf16, no pack_a copy of 16 zero-padded
// rows a call) where K % 32 == 0 (else the first M rows of pack_a's tiles, stride 64 bytes), and the tile
// configuration loaded once per thread and call (chunks_scoped) in owned shares of the panels.
// Why: decode_amx (the path before) packs x to 16 rows a call, multiplies and stores 16-row tiles whatever
// M, and loads the tile configuration once a chunk (~200 chunks a codeshell-mini step); a TMUL's time grows
// with its A rows. Measured: docs/kernels-log.md, session 38 helper B.
// The same bits: tdpbf16ps computes each row of C from its own row of A whatever the tile's row count, over
// the same k-tiles in the same order as decode_amx / prefill's amx_block (tests/kernels/test_amx_rows.py:
// every row of M = 2..16 bit for bit the row alone, switch on and off, 1 and 2 threads).
// CODESHELL_AMX_BF16_ROWS=0 (read per call; A/B runs and tests): decode_amx as before.
// What this is not: M = 1 (decode_amx_m1), M > 16 (prefill_amx's blocked GEMM).
#pragma once

inline bool amx_bf16_rows() { return codeshell::env_flag("CODESHELL_AMX_BF16_ROWS", true); }

// C tmm0..3 and A tmm4: M rows of x; B tmm5..7: 16 k-pairs x 16 weight rows x 2.
void amx_configure_rows(int64_t M) {
  codeshell::AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = t <= 4 ? uint8_t(M) : 16;
  }
  codeshell::amx_load_config(cfg);
}

// y [M, N] for M = 2..16 rows of x: `x` bf16 rows at a stride of lda bytes, k-tile kt at x + kt * as
// (in place: as = 32, lda = 2K; pack_a's tiles: as = 512, lda = 64).
void decode_amx_rows(const uint16_t* x, int64_t M, int64_t as, int64_t lda, int64_t Kt, const uint16_t* w, int64_t N,
                     int64_t Kh, const float* bias, float* out) {
  const int64_t P = (N + kPanel - 1) / kPanel;
  // decode_amx_m1's defaults (session 37: steps of 4 panels, owned shares, prefetch 4 tiles ahead into L1)
  const int64_t pfd = std::max<int64_t>(1, codeshell::env_int("CODESHELL_AMX_BF16_ROWS_PF", kAmxPrefetchTiles));
  const int64_t grain = std::max<int64_t>(4, codeshell::env_int("CODESHELL_AMX_BF16_ROWS_GRAIN", 4));
  const bool owned = codeshell::env_flag("CODESHELL_AMX_BF16_ROWS_SPLIT", true);
  chunks_scoped(
    P, 4, grain, owned, [M] { amx_configure_rows(M); },
    [&](int64_t p0, int64_t p1, int64_t pend) {
      alignas(64) float c[16 * 64];  // M rows x 4 panels
      for (int64_t p = p0; p < p1; p += 4) {
        const int64_t tn = std::min<int64_t>(4, p1 - p);
        if (tn == 4) amx_decode_block<4>(x, Kt, w, p, Kh, c, 64, pend, as, pfd, lda);
        else if (tn == 3) amx_decode_block<3>(x, Kt, w, p, Kh, c, 64, pend, as, pfd, lda);
        else if (tn == 2) amx_decode_block<2>(x, Kt, w, p, Kh, c, 64, pend, as, pfd, lda);
        else amx_decode_block<1>(x, Kt, w, p, Kh, c, 64, pend, as, pfd, lda);
        __asm__ volatile("" ::: "memory");  // c was written by tile stores (asm)
        const int64_t n0 = p * kPanel;
        store_rows(c, 64, M, out, N, n0, std::min(N, (p + tn) * kPanel) - n0, bias);
      }
    },
    [] { _tile_release(); });
}
