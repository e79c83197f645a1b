// Batched-decode bf16 panels on AVX-512F without AVX512-BF16: all of a call's rows over one widened
// weight vector (session 25, helper B). Included by panel_bf16.cpp inside its AVX-512 section, after
// `Avx512Fma` (it uses that file's kPanel, kPrefetch, kKBlock, far_prefetch, Emit).
//
// What this is: c [M rows][16] per panel = x [M, K] @ panel^T for 4 <= M <= 64 rows (decode batches,
// serving steps, prompt-lookup verify steps; 17..64 since session 26 helper B) on the panel layout (panel_bf16.cpp's header). For each k-pair j the NP panels'
// 64-byte vectors are loaded once, widened once (even k = v << 16, odd k = v & 0xffff0000: one ALU
// op per 16 weights), and each widened vector feeds all MR rows' FMAs (x[m, k] broadcast from the
// transposed x, xt [Kp][M]). With MR = M the weight is widened once per call instead of once per
// m-tile, and there is no k-blocking (nothing is re-read: the tile's accumulators stay in registers
// over all of K).
// Why: `Avx512Fma`'s decode tiles (12 rows x 2 panels, k-blocked) ran 16 rows as a 12-row and a
// 4-row tile at ~0.12 TFLOP/s on the 7B shapes where 8 rows ran at ~0.15 and the fp32-FMA peak
// is ~0.33 (docs/kernels-log.md, session 25 helper B).
// Bits: every (row, output) is one FMA chain over k-pairs in order, even k then odd k, as in
// Avx512Fma::micro (and Avx2::micro): the SAME BITS as `avx512_vnni:panel` / `avx2:panel` for every
// tile shape here, so row invariance is unchanged (tests/kernels/test_bf16_rows.py checks bits).
// Switches (read per call, A/B runs; docs/kernels.md):
//   CODESHELL_BF16_ROWS=0            the old Avx512Fma tiles (panel_product) at 4..64 rows
//   CODESHELL_BF16_ROWS_MAX=M        the tiles here up to M rows (default 64), the old ones above
//                                    (16: session 25's split, the old tiles at 17..64)
//   CODESHELL_BF16_ROWS_TILE=R       rows per tile (default 12: one tile of all rows up to 12); M > R
//                                    splits into near-equal tiles, then k-blocked by kKBlock so the
//                                    panels' chunk is re-read from L1 by the next tile
//   CODESHELL_BF16_ROWS_NP=P         panels per pass (1..3; default: 2 for tiles <= 12 rows, else 1)
//   CODESHELL_BF16_ROWS_KB=J         k-pairs a k-block when M takes several tiles (default kKBlock)
//   CODESHELL_BF16_ROWS_G=G          panels a group when M takes several tiles (NP..16, default 8;
//                                    NP: each NP panels over all of K before the next, as first written)
//   CODESHELL_BF16_ROWS_PF=J         software prefetch J k-pairs ahead on each panel (default
//                                    kPrefetch; 0 none)
//   CODESHELL_BF16_ROWS_ORDER=0|1    several tiles: per k-block, each pass over every tile (0, default)
//                                    or each tile over every pass of the group (1)
// What this is not: the M = 1..3 schedules (panels_small_m), M > 64 (prefill paths), bf16 x
// (Bf16Dot), or the prefill GEMM (prefill_fma).
#pragma once

namespace fma_rows {

// c[q * 256 + i * 16 + lane] (+)= x rows [0, MR) (xt + row offset, row stride ldx per k) . panel q
// over k-pairs [j0, j1); NP panels at w + q * pstride (uint32 units).
// x rows are packed per tile (pack below): xt [Kp][MR], so the broadcasts' offsets are constants (a
// runtime row stride cost GCC a stack reload per odd-k broadcast at 16 rows). Each x value is
// broadcast once into a register and used for all NP panels: without the empty asm GCC folds the
// broadcast into every FMA ({1to16} operand), one load per FMA, which held 2 loads a cycle at the
// FMA ports' rate with no room for the weights.
template <int MR, int NP>
inline void tile(const float* xt, const uint32_t* w, int64_t pstride, int64_t j0, int64_t j1,
                 float* c, int64_t cstride, bool first, int64_t pf) {
  constexpr int64_t ldx = MR;
  const int64_t far = far_prefetch();
  const __m512i hi_mask = _mm512_set1_epi32(int32_t(0xffff0000u));
  __m512 acc[NP][MR];
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i)
      acc[q][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + q * cstride + i * kPanel);
  for (int64_t j = j0; j < j1; ++j) {
    const float* xe = xt + (2 * j) * ldx;
    const float* xo = xe + ldx;
    __m512i v[NP];
    __m512 wv[NP];
    for (int q = 0; q < NP; ++q) {
      const uint32_t* wk = w + q * pstride + j * kPanel;
      if (pf > 0) _mm_prefetch(reinterpret_cast<const char*>(wk + pf * kPanel), _MM_HINT_T0);
      if (far > 0) _mm_prefetch(reinterpret_cast<const char*>(wk + far * kPanel), _MM_HINT_T1);
      v[q] = _mm512_loadu_si512(wk);
      wv[q] = _mm512_castsi512_ps(_mm512_slli_epi32(v[q], 16));  // even k
    }
    for (int i = 0; i < MR; ++i) {
      __m512 b = _mm512_set1_ps(xe[i]);
      if constexpr (NP > 1) asm("" : "+v"(b));  // a register broadcast shared by the NP FMAs
      for (int q = 0; q < NP; ++q) acc[q][i] = _mm512_fmadd_ps(b, wv[q], acc[q][i]);
    }
    for (int q = 0; q < NP; ++q) wv[q] = _mm512_castsi512_ps(_mm512_and_si512(v[q], hi_mask));  // odd k
    for (int i = 0; i < MR; ++i) {
      __m512 b = _mm512_set1_ps(xo[i]);
      if constexpr (NP > 1) asm("" : "+v"(b));  // a register broadcast shared by the NP FMAs
      for (int q = 0; q < NP; ++q) acc[q][i] = _mm512_fmadd_ps(b, wv[q], acc[q][i]);
    }
  }
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i) _mm512_storeu_ps(c + q * cstride + i * kPanel, acc[q][i]);
}

template <int NP>
inline void tile_rows(int64_t rows, const float* xt, const uint32_t* w, int64_t pstride, int64_t j0, int64_t j1,
                      float* c, int64_t cstride, bool first, int64_t pf) {
#define CODESHELL_ROWS_TILE(R) \
  case R: tile<R, NP>(xt, w, pstride, j0, j1, c, cstride, first, pf); return;
  switch (rows) {
    CODESHELL_ROWS_TILE(1) CODESHELL_ROWS_TILE(2) CODESHELL_ROWS_TILE(3) CODESHELL_ROWS_TILE(4)
    CODESHELL_ROWS_TILE(5) CODESHELL_ROWS_TILE(6) CODESHELL_ROWS_TILE(7) CODESHELL_ROWS_TILE(8)
    default: break;
  }
  if constexpr (NP <= 2) {  // 2 x 12 = 24 accumulators; 3 panels stop at 8 rows
    switch (rows) {
      CODESHELL_ROWS_TILE(9) CODESHELL_ROWS_TILE(10) CODESHELL_ROWS_TILE(11) CODESHELL_ROWS_TILE(12)
      default: break;
    }
  }
  if constexpr (NP == 1) {  // up to 16 accumulators
    switch (rows) {
      CODESHELL_ROWS_TILE(13) CODESHELL_ROWS_TILE(14) CODESHELL_ROWS_TILE(15) CODESHELL_ROWS_TILE(16)
      default: break;
    }
  }
#undef CODESHELL_ROWS_TILE
  TORCH_CHECK(false, "fma_rows: no tile of ", rows, " rows x ", NP, " panels");
}

constexpr int64_t kMaxGroup = 16;  // panels a group (run_panels, several tiles): 16 KiB of sums

// The largest tile a pass of np panels holds (accumulators <= 24, or 16 at one panel).
constexpr int64_t max_rows(int64_t np) { return np == 1 ? 16 : np == 2 ? 12 : 8; }

struct Plan {
  int64_t tile_rows;  // rows per tile (the last tiles may have one less)
  int64_t tiles;
  int64_t np;         // panels a pass
  int64_t pf;         // software prefetch distance (k-pairs)
  int64_t kb;         // k-pairs a block when tiles > 1
  int64_t group;      // panels a group when tiles > 1
  int64_t order;      // tiles > 1: 0 per k-block, each pass of NP panels over every tile (the pass's
                      // weight chunk re-read from L1 by the tiles); 1 per k-block, each tile over every
                      // pass of the group (the tile's x block re-read from L1 by the passes)
};

// The schedule for M rows (4..kMaxRows) from the switches (read per call).
inline Plan plan(int64_t M) {
  const int64_t want = std::clamp<int64_t>(codeshell::env_int("CODESHELL_BF16_ROWS_TILE", 12), 1, 16);
  const int64_t tiles = (M + want - 1) / want;
  const int64_t rows = (M + tiles - 1) / tiles;
  int64_t np = codeshell::env_int("CODESHELL_BF16_ROWS_NP", rows <= 12 ? 2 : 1);
  np = std::clamp<int64_t>(np, 1, 3);
  while (np > 1 && rows > max_rows(np)) --np;
  // (the group below is at least np panels: a smaller one would run one panel a pass)
  Plan p{rows, tiles, np, codeshell::env_int("CODESHELL_BF16_ROWS_PF", kPrefetch),
         std::max<int64_t>(16, codeshell::env_int("CODESHELL_BF16_ROWS_KB", kKBlock)),
         std::clamp<int64_t>(codeshell::env_int("CODESHELL_BF16_ROWS_G", 8), 1, kMaxGroup),
         std::clamp<int64_t>(codeshell::env_int("CODESHELL_BF16_ROWS_ORDER", 0), 0, 1)};
  // a tile over one pass's limit (rows > 16 at one panel, > 12 at two) is split further
  while (p.tile_rows > max_rows(p.np)) {
    ++p.tiles;
    p.tile_rows = (M + p.tiles - 1) / p.tiles;
  }
  p.group = std::max(p.group, p.np);
  return p;
}

// Tile t's first row (the tiles split M rows evenly, the later ones one row more where needed).
inline int64_t tile_start(const Plan& pl, int64_t M, int64_t t) {
  int64_t m = 0;
  for (int64_t u = 0; u < t; ++u) m += (M - m) / (pl.tiles - u);
  return m;
}

// x [M, K] fp32 (contiguous) -> per tile t, [Kp][r_t] at the result + Kp * tile_start(t), k rows
// K..Kp-1 zero: each tile reads its r_t rows as r_t sequential streams and writes one.
inline std::unique_ptr<float[]> pack(const Plan& pl, const float* x, int64_t M, int64_t K, int64_t Kp) {
  std::unique_ptr<float[]> out(new float[size_t(Kp) * M]);
  for (int64_t t = 0; t < pl.tiles; ++t) {
    const int64_t m0 = tile_start(pl, M, t), r = tile_start(pl, M, t + 1) - m0;
    float* dst = out.get() + Kp * m0;
    const float* src = x + m0 * K;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < r; ++i) dst[k * r + i] = src[i * K + k];
    std::fill(dst + K * r, dst + Kp * r, 0.f);
  }
  return out;
}

// Panels [p0, p1) of w (Kh k-pairs a panel) for x rows packed per tile (pack); emit(p, c rows of panel p).
// c holds NP panels x 16 rows.
//   * one tile (M <= 12 by default): NP panels a pass over all of K, accumulators in registers.
//   * several tiles (13..64 rows): groups of pl.group panels; per k-block (pl.kb k-pairs), every NP
//     panels of the group and every tile (pl.order: which loop is inside), accumulating into the
//     group's fp32 sums (gc [group][M][16], M KiB / 16 a panel; exact: the same chain per output as
//     one pass). The x k-block (all rows) is then read once a group, from L1/L2, instead of all of x
//     once per NP panels: at K = 16384 and 16 rows x is 1 MiB, re-read per pass from L2/L3 as much
//     as the weight itself (7B mlp.c_proj M = 16 ran at half c_fc's rate before the groups).
template <int NP>
inline void run_panels(const Plan& pl, const float* xt, int64_t M, int64_t Kh, const uint32_t* w, int64_t p0,
                       int64_t p1, float* c, const Emit& emit) {
  const int64_t ps = Kh * kPanel;  // uint32 per panel
  if (pl.tiles == 1) {
    int64_t p = p0;
    for (; p + NP <= p1; p += NP) {
      tile_rows<NP>(M, xt, w + p * ps, ps, 0, Kh, c, kPanel * kPanel, true, pl.pf);
      for (int q = 0; q < NP; ++q) emit(p + q, c + q * kPanel * kPanel);
    }
    for (; p < p1; ++p) {
      tile_rows<1>(M, xt, w + p * ps, ps, 0, Kh, c, kPanel * kPanel, true, pl.pf);
      emit(p, c);
    }
    return;
  }
  const int64_t Kp = 2 * Kh, cs = M * kPanel;  // cs: floats a panel in gc
  // the group's sums, panel g at gc + g * cs: on the stack up to 16 rows (16 KiB), else one heap
  // buffer a call (up to 64 KiB at 64 rows, 16 panels)
  alignas(64) float gc_stack[kMaxGroup * kPanel * kPanel];
  std::unique_ptr<float[]> gc_heap;
  float* gc = gc_stack;
  if (M > kPanel) {
    gc_heap.reset(new float[size_t(pl.group) * cs]);
    gc = gc_heap.get();
  }
  for (int64_t g0 = p0; g0 < p1; g0 += pl.group) {
    const int64_t g1 = std::min(p1, g0 + pl.group);
    for (int64_t j0 = 0; j0 < Kh; j0 += pl.kb) {
      const int64_t j1 = std::min(Kh, j0 + pl.kb);
      // NP panels from p, rows [m, m + r) (one tile) over [j0, j1)
      auto one = [&](auto np_tag, int64_t p, int64_t m, int64_t r) {
        constexpr int P = decltype(np_tag)::value;
        tile_rows<P>(r, xt + Kp * m, w + p * ps, ps, j0, j1, gc + (p - g0) * cs + m * kPanel, cs, j0 == 0, pl.pf);
      };
      auto passes = [&](int64_t m, int64_t r) {  // every pass of the group over one tile
        int64_t p = g0;
        for (; p + NP <= g1; p += NP) one(std::integral_constant<int, NP>{}, p, m, r);
        for (; p < g1; ++p) one(std::integral_constant<int, 1>{}, p, m, r);
      };
      if (pl.order == 1) {
        int64_t m = 0;
        for (int64_t t = 0; t < pl.tiles; ++t) {
          const int64_t r = (M - m) / (pl.tiles - t);  // split the rest evenly (= tile_start)
          passes(m, r);
          m += r;
        }
        continue;
      }
      auto pass = [&](auto np_tag, int64_t p) {  // NP panels from p: every tile over [j0, j1)
        int64_t m = 0;
        for (int64_t t = 0; t < pl.tiles; ++t) {
          const int64_t r = (M - m) / (pl.tiles - t);  // split the rest evenly (= tile_start)
          one(np_tag, p, m, r);
          m += r;
        }
      };
      int64_t p = g0;
      for (; p + NP <= g1; p += NP) pass(std::integral_constant<int, NP>{}, p);
      for (; p < g1; ++p) pass(std::integral_constant<int, 1>{}, p);
    }
    for (int64_t p = g0; p < g1; ++p) emit(p, gc + (p - g0) * cs);
  }
}

inline void run(const Plan& pl, const float* xt, int64_t M, int64_t Kh, const uint32_t* w, int64_t p0, int64_t p1,
                float* c, const Emit& emit) {
  if (pl.np == 3) run_panels<3>(pl, xt, M, Kh, w, p0, p1, c, emit);
  else if (pl.np == 2) run_panels<2>(pl, xt, M, Kh, w, p0, p1, c, emit);
  else run_panels<1>(pl, xt, M, Kh, w, p0, p1, c, emit);
}

}  // namespace fma_rows
