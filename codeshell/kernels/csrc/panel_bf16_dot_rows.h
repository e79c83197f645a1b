// `avx512_bf16:panel` at 9..64 rows (prompt-lookup verify steps, batched decode past 8 rows): vdpbf16ps
// tiles of up to 16 rows x 1 panel (session 39 helper D). Included by panel_bf16.cpp inside its AVX-512
// section, after `Bf16Dot` (it uses that file's kPanel, kPrefetch, Emit and Bf16Dot::prepare's x layout,
// xp [Kh][M] bf16 pairs).
//
// What this is: c = x [M rows] @ panels^T for decode_panels<Bf16Dot> at M = 9..64, panel by panel (or
// two at a time), the rows in near-equal tiles of at most `tile_rows`, k-blocked so each tile re-reads
// the panels' k-block from L1.
// Why: Bf16Dot's tiles hold 8 rows x 2 panels, so M = 16 was two passes over every weight vector and
// M = 24 / 32 (past 16 rows the 2-panel c layout does not fit) three / four 8-row passes of one panel,
// 8 chains each. A tile of up to 16 rows over one panel loads each weight vector once a tile and keeps 16
// chains in flight: on Zen 4 (1 thread, codeshell-mini's shapes, weights from L3) 1.1-1.5x faster at
// M = 9..16 (head M = 16: 657 against 806 us, 204 GFLOP/s of a 221 peak), 1.0-1.25x at 24..32; in the
// native verify step 2-4% of the call at 16..24 rows (docs/kernels-log.md, session 39 helper D;
// benchmarks/bench_bf16_dot_rows.py).
// Bits: every (row, output) is one vdpbf16ps chain over the k-pairs in order from zero, as in
// Bf16Dot::micro (k-blocks stored and reloaded in fp32: exact), so the SAME BITS as the 8-row tiles and
// as the row alone (row invariance; tests/kernels/test_bf16_dot_rows.py).
// Switches (read per call through switches.h's cache; A/B runs):
//   CODESHELL_BF16_DOT_ROWS=0         Bf16Dot's 8-row x 2-panel tiles (panel_product) at 9..64 rows
//   CODESHELL_BF16_DOT_ROWS_TILE=R    rows a tile at most (1..16; default 16, 12 at two panels)
//   CODESHELL_BF16_DOT_ROWS_NP=P      panels a pass (1 or 2; default 1): 2 share each broadcast of x
//   CODESHELL_BF16_DOT_ROWS_KB=J      k-pairs a k-block (default 128: 8 KiB a panel)
//   CODESHELL_BF16_DOT_ROWS_PF=J      software prefetch J k-pairs ahead on each panel (default
//                                     kPrefetch, as Bf16Dot; 0 none)
// What this is not: M <= 8 (Bf16Dot's tiles and panels_small_m), fp32 x (Avx2 / Avx512Fma,
// panel_bf16_rows.h), AMX, or M > 64 (the prefill GEMMs).
#pragma once

namespace dot_rows {

// 16 accumulators + the weight vector: one tile of M = 9..16, 17..32 as two. 24-row tiles (24 accumulators)
// measured ~1.8x slower a row than 16 at M = 24 (Zen 4, 1 thread: c_fc 174 vs 122 us, head 3025 vs 1437 us).
constexpr int64_t kMaxTile = 16;

// c[q * cstride + i * 16 + lane] (+)= x rows [0, MR) (xp + row offset, ldx pairs per k-pair) . panel q
// over k-pairs [j0, j1); NP panels at w + q * pstride (uint32 units). At NP = 2 each broadcast of x
// is a register shared by both panels' vdpbf16ps (the empty asm keeps GCC from folding it into both
// as a {1to16} load); at NP = 1 the folded broadcast is one load a vdpbf16ps either way.
template <int MR, int NP>
inline void tile(const uint32_t* xp, int64_t ldx, const uint32_t* w, int64_t pstride, int64_t j0, int64_t j1,
                 float* c, int64_t cstride, bool first, int64_t pf) {
  const int64_t far = far_prefetch();  // the step's L2 prefetch, as Bf16Dot::micro (decode_panels sets it)
  __m512 acc[NP][MR];
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i)
      acc[q][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + q * cstride + i * kPanel);
  for (int64_t j = j0; j < j1; ++j) {
    __m512bh wv[NP];
    for (int q = 0; q < NP; ++q) {
      const uint32_t* wk = w + q * pstride + j * kPanel;
      if (pf > 0) _mm_prefetch(reinterpret_cast<const char*>(wk + pf * kPanel), _MM_HINT_T0);
      if (far > 0) _mm_prefetch(reinterpret_cast<const char*>(wk + far * kPanel), _MM_HINT_T1);
      wv[q] = (__m512bh)_mm512_loadu_si512(wk);
    }
    const uint32_t* xj = xp + j * ldx;
    for (int i = 0; i < MR; ++i) {
      __m512i b = _mm512_set1_epi32(int(xj[i]));
      if constexpr (NP > 1) asm("" : "+v"(b));
      for (int q = 0; q < NP; ++q) acc[q][i] = _mm512_dpbf16_ps(acc[q][i], (__m512bh)b, wv[q]);
    }
  }
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i) _mm512_storeu_ps(c + q * cstride + i * kPanel, acc[q][i]);
}

template <int NP>
inline void tile_rows(int64_t rows, const uint32_t* xp, int64_t ldx, const uint32_t* w, int64_t pstride, int64_t j0,
                      int64_t j1, float* c, int64_t cstride, bool first, int64_t pf) {
  constexpr int64_t kMax = NP == 1 ? kMaxTile : 12;  // 24 accumulators at most at two panels
#define CODESHELL_DOT_TILE(R) \
  case R:                     \
    if constexpr (R <= kMax) return tile<R, NP>(xp, ldx, w, pstride, j0, j1, c, cstride, first, pf); \
    break;
  switch (rows) {
    CODESHELL_DOT_TILE(1) CODESHELL_DOT_TILE(2) CODESHELL_DOT_TILE(3) CODESHELL_DOT_TILE(4)
    CODESHELL_DOT_TILE(5) CODESHELL_DOT_TILE(6) CODESHELL_DOT_TILE(7) CODESHELL_DOT_TILE(8)
    CODESHELL_DOT_TILE(9) CODESHELL_DOT_TILE(10) CODESHELL_DOT_TILE(11) CODESHELL_DOT_TILE(12)
    CODESHELL_DOT_TILE(13) CODESHELL_DOT_TILE(14) CODESHELL_DOT_TILE(15) CODESHELL_DOT_TILE(16)
    default: break;
  }
#undef CODESHELL_DOT_TILE
  TORCH_CHECK(false, "dot_rows: no tile of ", rows, " rows x ", NP, " panels");
}

struct Plan {
  int64_t tiles;  // near-equal row tiles (the later ones one row larger where M does not divide)
  int64_t np;     // panels a pass
  int64_t kb;     // k-pairs a k-block
  int64_t pf;     // software prefetch distance (k-pairs)
};

// The schedule for M rows from the switches; tiles = 0: the rows path is off (CODESHELL_BF16_DOT_ROWS=0
// or M outside 9..kMaxRows).
inline Plan plan(int64_t M) {
  if (M < 9 || M > kMaxRows || !codeshell::env_flag("CODESHELL_BF16_DOT_ROWS", true)) return Plan{0, 1, 0, 0};
  const int64_t np = std::clamp<int64_t>(codeshell::env_int("CODESHELL_BF16_DOT_ROWS_NP", 1), 1, 2);
  const int64_t most = np == 1 ? kMaxTile : 12;
  const int64_t rows = std::clamp<int64_t>(codeshell::env_int("CODESHELL_BF16_DOT_ROWS_TILE", most), 1, most);
  return Plan{(M + rows - 1) / rows, np, std::max<int64_t>(16, codeshell::env_int("CODESHELL_BF16_DOT_ROWS_KB", 128)),
              std::max<int64_t>(0, codeshell::env_int("CODESHELL_BF16_DOT_ROWS_PF", kPrefetch))};
}

// Panels [p0, p1) of w (Kh k-pairs a panel) for x pairs xp [Kh][M]; emit(p, c rows of panel p). c holds
// np panels x M rows x 16 (decode_panels' buffer: 2 x 64 x 16 floats).
template <int NP>
inline void run_np(const Plan& pl, const uint32_t* xp, int64_t M, int64_t Kh, const uint32_t* w, int64_t p0,
                   int64_t p1, float* c, const Emit& emit) {
  const int64_t ps = Kh * kPanel, cs = M * kPanel;
  auto pass = [&](auto np_tag, int64_t p) {  // panels p .. p + P - 1, every k-block, every tile
    constexpr int P = decltype(np_tag)::value;
    for (int64_t j0 = 0; j0 < Kh; j0 += pl.kb) {
      const int64_t j1 = std::min(Kh, j0 + pl.kb);
      for (int64_t t = 0, m = 0; t < pl.tiles; ++t) {
        const int64_t r = (M - m) / (pl.tiles - t);  // the rest split evenly
        tile_rows<P>(r, xp + m, M, w + p * ps, ps, j0, j1, c + m * kPanel, cs, j0 == 0, pl.pf);
        m += r;
      }
    }
    for (int q = 0; q < P; ++q) emit(p + q, c + q * cs);
  };
  int64_t p = p0;
  for (; p + NP <= p1; p += NP) pass(std::integral_constant<int, NP>{}, p);
  for (; p < p1; ++p) pass(std::integral_constant<int, 1>{}, p);
}

inline void run(const Plan& pl, const uint32_t* xp, int64_t M, int64_t Kh, const uint32_t* w, int64_t p0, int64_t p1,
                float* c, const Emit& emit) {
  if (pl.np == 2) run_np<2>(pl, xp, M, Kh, w, p0, p1, c, emit);
  else run_np<1>(pl, xp, M, Kh, w, p0, p1, c, emit);
}

}  // namespace dot_rows
