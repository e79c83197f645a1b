// AVX-512 prefill GEMMs for bf16 weights in the panel layout (M > 64): prefill_dot (vdpbf16ps,
// AVX512-BF16 CPUs without AMX) and prefill_fma (fp32 FMA on AVX-512 CPUs without AVX512-BF16).
//
// What this is: sections of panel_bf16.cpp kept in their own file for size (session 33 split): included
// once, by panel_bf16.cpp only, after the AMX section, inside that translation unit's
// CODESHELL_HAVE_AVX512 build; the layout and the row-invariance rule are in panel_bf16.cpp's opening
// comment. What this is not: the AVX2 prompt GEMM (gemm_fma.h) or a header to include elsewhere (it
// relies on panel_bf16.cpp's file-local helpers: padded_k, store_rows, the per-ISA structs).
#pragma once

// ---- vdpbf16ps prefill (AVX512-BF16 without AMX, M > 64) -----------------------------------
#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

// Register block of `prefill_dot`: NP panels (64 weight rows) x MR rows of x, NP x MR = 24 zmm
// accumulators + NP weight vectors + one broadcast pair of x = 29 of the 32 zmm. Per k-pair:
// NP 64-byte weight loads (L1), MR dword broadcasts of x, NP x MR vdpbf16ps. The weight stays in
// the panel layout (no second copy). Measured in a standalone copy (Zen 5, 2 threads, CPU time
// on a shared machine, M = 512, the four 7B shapes, in-process alternation with torch's bf16
// matmul at 0.72-0.78 TFLOP/s): 4x6 0.65-0.67, 2x12 0.57-0.61, 2x14 0.57.
constexpr int kDotNP = 4, kDotMR = 6;
// k-pairs per pass (KC): the NP panels' chunk (4 x 128 x 64 B = 32 KiB) stays in L1 (48 KiB)
// while every row tile of x streams past it from L2 (x's chunk: M x 128 x 4 B = 256 KiB at M =
// 512). KC 32 / 64 / 96 / 128 / 256 measured 0.56 / 0.60 / 0.65 / 0.67 / 0.65 (fewer, longer
// micro calls until the chunk spills L1). Work items of kDotItem panels keep their fp32 sums
// (M x 128 x 4 B) in L2 between passes; 16 panels measured the same (0.66).
// Session 14 (the same Zen 5, 2 threads, in-process A/B with the old schedule, 7B shapes,
// M = 512; figures and the harness in docs/kernels-log.md, "Session 14, helper D"): what kept the
// block below its L1 peak was the x stream, not the sums' round trip -- with every tile reading the same x the old
// schedule ran 0.78 vs 0.70 TFLOP/s, with the same sums 0.69, the same weight chunk 0.72. Each
// item re-reads all of x (M x K x 2 B: 4 MiB at K = 4096, 16 MiB at K = 16384, from L3 or DRAM)
// once per chunk pass, and the hardware prefetcher does not run far enough ahead of it. Hence
// two software prefetches (`dot_block<.., true>`, `prefill_dot`): the next row tile's x into L1 during
// this tile (one prefetch per 64-byte line, 3 per 8 k-pairs), and the next weight chunk (the
// next 4 panels' chunk, or the item's first panels at the next K chunk) into L2, spread over the
// row tiles (the old schedule's weight prefetch alone measured no gain: the x stream hid it).
// Measured: 0.80-0.83 vs 0.70-0.80 TFLOP/s for the old schedule (K = 16384: 0.80 vs 0.69), with
// the peak micro-kernel at 0.92-0.94 in the same runs. Still measured no better: KC 64 / 96 /
// 256 with the prefetches, items of 4 / 12 / 16 panels, one prefetch per k-pair, the sums of a
// tile's next block prefetched, the last chunk's sums stored straight into the output (no
// store_rows pass), single items claimed one at a time.
constexpr int64_t kDotKC = 128, kDotItem = 8;

// Panels per work item for P panels: kDotItem, or half of it where that leaves fewer than 4 items a
// thread. Why: codeshell-mini's c_attn (N = 384: 24 panels) made 3 items of 8 for 2 threads, one
// thread doing two thirds of the call (47% of the peak in the session-18 trace against 54-67% for
// the mini's other linears); items of 4 give 6. The bits do not depend on the item (each output's
// sum runs over the K chunks in order either way). CODESHELL_DOT_ITEM=<panels> overrides it (A/B).
inline int64_t dot_item(int64_t P) {
  if (const int64_t e = codeshell::env_int("CODESHELL_DOT_ITEM", 0); e > 0) return e;
  return (P + kDotItem - 1) / kDotItem < 4 * at::get_num_threads() ? kDotItem / 2 : kDotItem;
}

// c[MR rows][NP * 16] (row stride ldc, 64-byte aligned) (+)= x tile . NP panels over nj k-pairs.
// xp: the tile's k-pairs in order, MR dwords (bf16 pairs) each; w: panel q at w + q * pstride.
// With PF, the next row tile's x is prefetched into L1 on the way (pfd k-pairs ahead: the next
// tile of the chunk starts right after this one's nj x MR dwords): one prefetch per 64-byte line
// of x per 8 k-pairs (8 x MR x 4 B = 3 lines at MR = 6). nj is a multiple of 8 (Kh of 16).
// The same sums in the same order either way: prefetches do not change a bit.
template <int NP, int MR, bool PF = false>
inline void dot_block(const uint32_t* xp, const uint32_t* w, int64_t pstride, int64_t nj, float* c, int64_t ldc,
                      bool first, int64_t pfd = 0) {
  __m512 acc[NP][MR];
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i) acc[q][i] = first ? _mm512_setzero_ps() : _mm512_load_ps(c + i * ldc + q * 16);
  for (int64_t j8 = 0; j8 < nj; j8 += 8) {
    if constexpr (PF) {
      const char* pf = reinterpret_cast<const char*>(xp + (j8 + pfd) * MR);
      for (int l = 0; l < 8 * MR * 4; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int64_t j = j8; j < j8 + 8; ++j) {
      __m512bh wv[NP];
      for (int q = 0; q < NP; ++q) wv[q] = (__m512bh)_mm512_loadu_si512(w + q * pstride + j * kPanel);
      for (int i = 0; i < MR; ++i) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(xp[j * MR + i]));
        for (int q = 0; q < NP; ++q) acc[q][i] = _mm512_dpbf16_ps(acc[q][i], xb, wv[q]);
      }
    }
  }
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i) _mm512_store_ps(c + i * ldc + q * 16, acc[q][i]);
}

// dot_block on x's own rows (no pack): rp[i] is row i of the tile as bf16 pairs (k-pair 0), the
// block's k-pairs start at j0; rn, when given, the next tile's rows, prefetched into L1 on the way
// (one 64-byte line = 16 k-pairs of a row: MR prefetches per 16 k-pairs, as many lines as
// dot_block's 3 per 8). The same products in the same order as dot_block on the packed copy of
// the same x: the same bits. Why: the pack (one 4-byte copy per row and k-pair, a parallel region
// of its own) cost 7-8% of a small-shape GEMM call (M = 512, K = 1024: ~55 of ~1130 us; session 18).
template <int NP, int MR>
inline void dot_block_rows(const uint32_t* const* rp, int64_t j0, const uint32_t* const* rn, const uint32_t* w,
                           int64_t pstride, int64_t nj, float* c, int64_t ldc, bool first) {
  __m512 acc[NP][MR];
  const uint32_t* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = rp[i] + j0;
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i) acc[q][i] = first ? _mm512_setzero_ps() : _mm512_load_ps(c + i * ldc + q * 16);
  for (int64_t j8 = 0; j8 < nj; j8 += 8) {
    if (rn != nullptr && (j8 & 15) == 0)
      for (int i = 0; i < MR; ++i) _mm_prefetch(reinterpret_cast<const char*>(rn[i] + j0 + j8), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int64_t j = j8; j < j8 + 8; ++j) {
      __m512bh wv[NP];
      for (int q = 0; q < NP; ++q) wv[q] = (__m512bh)_mm512_loadu_si512(w + q * pstride + j * kPanel);
      for (int i = 0; i < MR; ++i) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(xr[i][j]));
        for (int q = 0; q < NP; ++q) acc[q][i] = _mm512_dpbf16_ps(acc[q][i], xb, wv[q]);
      }
    }
  }
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i) _mm512_store_ps(c + i * ldc + q * 16, acc[q][i]);
}

// Whether prefill_dot reads x's rows in place (dot_block_rows) rather than a packed copy: K a
// multiple of 32 (the panels' padded K: no k past a row's end is read) and N <= 512, where the
// pack's cost (per row of x) is spread over few outputs. Measured (session 18, one process,
// alternating calls, 4 weights cycled, medians of 15): N = 256 / 384 (codeshell-mini, M = 256)
// 0.92-0.94x the packed path's time, N = 1024 at K = 256 1.00x; N >= 1024 at M = 512 (the small
// shape) 1.01-1.04x, i.e. slower: there the pack is ~2-3% of the call, and six rows 2-8 KiB apart
// share L1 sets with the weight chunk. CODESHELL_DOT_XPACK=1 packs at every shape, =0 reads rows
// in place at every K % 32 == 0 (A/B; read each call).
inline bool dot_rows_direct(int64_t K, int64_t N) {
  if (K % kKAlign != 0) return false;
  if (const int64_t e = codeshell::env_int("CODESHELL_DOT_XPACK", -1); e == 0 || e == 1) return e == 0;
  return N <= 512;
}

// store_rows_gelu's rows with gelu16_fast (FAST) or gelu16, each on its input rounded to bf16.
// hw: bf16_pack by vcvtneps2bf16 (bf16_pack.h; the same bits).
template <bool FAST>
inline void gelu_rows(const float* c, int64_t ldc, int64_t M, uint16_t* out, int64_t N, int64_t n0, int64_t cols,
                      const float* bias, bool x4, bool hw) {
  auto gelu = [](__m512 v) {
    return FAST ? codeshell::gelu16_fast(codeshell::round_bf16_fast(v)) : codeshell::gelu16(codeshell::round_bf16(v));
  };
  for (int64_t m = 0; m < M; ++m) {
    const float* cm = c + m * ldc;
    uint16_t* o = out + m * N + n0;
    int64_t j = 0;
    if (x4)
      for (; j + 64 <= cols; j += 64) {  // four independent vectors a step: the same lanes, the same bits
        __m512 v[4];
        for (int u = 0; u < 4; ++u) {
          v[u] = _mm512_loadu_ps(cm + j + 16 * u);
          if (bias) v[u] = _mm512_add_ps(v[u], _mm512_loadu_ps(bias + n0 + j + 16 * u));
          v[u] = gelu(v[u]);
        }
        for (int u = 0; u < 4; ++u)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j + 16 * u), codeshell::bf16_pack(v[u], hw));
      }
    for (; j < cols; j += 16) {
      const __mmask16 k = cols - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (cols - j)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(k, cm + j);
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + n0 + j));
      const __m512 g = gelu(v);
      _mm256_mask_storeu_epi16(o + j, k, codeshell::bf16_pack(g, hw));
    }
  }
}

// prefill_dot's GELU epilogue (`out_gelu`): c [M][ldc] (columns [0, cols)) + bias[n0 + j] ->
// gelu_tanh of the sum rounded to bf16 -> out_gelu[:, n0 : n0 + cols) (bf16 [M, N]). With
// CODESHELL_GELU_FAST=0 exactly what store_rows and then fused_gelu_tanh(out, None, out_bf16=True)
// compute (the same fp32 bias add, the rounding to bf16 that the model's cast does, the shared
// gelu16: the same bits); by default gelu16_fast (within one bf16 ulp of it, see simd512.h), while the
// item's sums are still in L2: the c_fc output of a 7B prefill (512 x 16384) is otherwise written
// as 32 MiB of fp32 and read back by the GELU, 3-5 ms a layer on this 2-core Zen 5.
inline void store_rows_gelu(const float* c, int64_t ldc, int64_t M, uint16_t* out, int64_t N, int64_t n0,
                            int64_t cols, const float* bias) {
  // Four vectors a step where a row has 64 columns left (their exp16 / divide chains overlap):
  // one process, alternating calls, medians of 25 (session 18): c_fc + GELU 0.982x the time at the
  // small shape (512 x 4096 x 1024), 0.954x at codeshell-mini's (256 x 1024 x 256), the same bits.
  // CODESHELL_GELU_X4=0: one vector a step (A/B; read each call).
  const bool x4 = codeshell::env_flag("CODESHELL_GELU_X4", true);
  // gelu16_fast (simd512.h: a shorter dependency chain; within one bf16 ulp of the exact GELU,
  // as gelu16) unless CODESHELL_GELU_FAST=0: gelu16, the bits of forward_raw + fused_gelu_tanh
  // (A/B and the reference; read each call).
  const bool hw = codeshell::bf16_cvt_hw();
  if (codeshell::env_flag("CODESHELL_GELU_FAST", true)) {
    gelu_rows<true>(c, ldc, M, out, N, n0, cols, bias, x4, hw);
    return;
  }
  gelu_rows<false>(c, ldc, M, out, N, n0, cols, bias, x4, hw);
}

// prefill_dot's bf16 epilogue (`out_b16`): c [M][ldc] (columns [0, cols)) + bias[n0 + j], rounded
// to bf16 (to nearest even, NaN -> 0x7fc0: bf16_bits, torch's `.to(torch.bfloat16)`) ->
// out_b16[:, n0 : n0 + cols) (bf16 [M, N]): store_rows' fp32 value and then the cast the model
// does anyway (the fused RoPE's cast of c_attn's rows, the residual add's of attn.c_proj /
// mlp.c_proj), the same bits. Why: at the small shape (M = 512, N = 1536 / 1024 / 1024) each
// layer wrote 7 MiB of fp32 for the next op to read back and round; bf16 halves both.
inline void store_rows_b16(const float* c, int64_t ldc, int64_t M, uint16_t* out, int64_t N, int64_t n0,
                           int64_t cols, const float* bias) {
  const bool hw = codeshell::bf16_cvt_hw();  // vcvtneps2bf16 where it gives bf16_bits' bits (bf16_pack.h)
  for (int64_t m = 0; m < M; ++m) {
    const float* cm = c + m * ldc;
    uint16_t* o = out + m * N + n0;
    int64_t j = 0;
    for (; j + 32 <= cols; j += 32) {  // two vectors a step (independent rounding chains)
      __m512 v0 = _mm512_loadu_ps(cm + j), v1 = _mm512_loadu_ps(cm + j + 16);
      if (bias) {
        v0 = _mm512_add_ps(v0, _mm512_loadu_ps(bias + n0 + j));
        v1 = _mm512_add_ps(v1, _mm512_loadu_ps(bias + n0 + j + 16));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j), codeshell::bf16_pack(v0, hw));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j + 16), codeshell::bf16_pack(v1, hw));
    }
    for (; j < cols; j += 16) {
      const __mmask16 k = cols - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (cols - j)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(k, cm + j);
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + n0 + j));
      _mm256_mask_storeu_epi16(o + j, k, codeshell::bf16_pack(v, hw));
    }
  }
}

// bf16 x [M, K] @ panels^T (+ bias) -> out fp32 [M, N] by vdpbf16ps, any M (meant for M > 64;
// M <= 64 keeps decode_bf16, whose per-row order ops.ROW_INVARIANT_MAX_M relies on).
// x is packed once per call into the micro-kernel's order: [K chunk][row tile][k-pair][MR]
// (zero rows past M, zero k past K), so one pass's x (all tiles) is contiguous.
// With out_gelu (bf16 [M, N]) the result goes there through the GELU (store_rows_gelu), not to out;
// with out_b16 (bf16 [M, N]) it goes there rounded to bf16 (store_rows_b16).
void prefill_dot(const uint16_t* x, int64_t M, int64_t K, const uint32_t* w, int64_t N, const float* bias,
                 float* out, uint16_t* out_gelu = nullptr, uint16_t* out_b16 = nullptr) {
  constexpr int NP = kDotNP, MR = kDotMR;
  const int64_t Kh = padded_k(K) / 2, P = (N + kPanel - 1) / kPanel, T = (M + MR - 1) / MR;
  const bool direct = dot_rows_direct(K, N);
  // direct: row pointers (bf16 pairs) of every tile's rows, rows past M (and one tile past the
  // last, the prefetch's) on a row of zeros; else x packed [K chunk][row tile][k-pair][MR]
  std::vector<const uint32_t*> rows(direct ? size_t(T + 1) * MR : 0);
  std::vector<uint32_t> zeros(direct ? size_t(Kh) : 0, 0u);
  for (int64_t m = 0; m < int64_t(rows.size()); ++m)
    rows[m] = m < M ? reinterpret_cast<const uint32_t*>(x + m * K) : zeros.data();
  static thread_local codeshell::ThreadScratch x_keep;
  codeshell::Scratch<uint32_t> xs(x_keep, direct ? 0 : size_t(T) * MR * Kh);
  uint32_t* xp = xs.data();
  if (!direct) at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j0 = 0; j0 < Kh; j0 += kDotKC) {
        const int64_t nj = std::min(kDotKC, Kh - j0);
        uint32_t* d = xp + j0 * T * MR + t * nj * MR;
        if ((t + 1) * MR <= M && 2 * (j0 + nj) <= K) {  // all rows and k-pairs inside x: no tests per value
          const uint16_t* src[MR];
          for (int i = 0; i < MR; ++i) src[i] = x + (t * MR + i) * K + 2 * j0;
          for (int64_t j = 0; j < nj; ++j)
            for (int i = 0; i < MR; ++i) std::memcpy(d + j * MR + i, src[i] + 2 * j, 4);
          continue;
        }
        for (int i = 0; i < MR; ++i) {
          const int64_t m = t * MR + i;
          const uint16_t* src = x + m * K;
          for (int64_t j = 0; j < nj; ++j) {
            const int64_t k = 2 * (j0 + j);
            uint32_t v = 0;
            if (m < M && k + 1 < K) std::memcpy(&v, src + k, 4);
            else if (m < M && k < K) v = src[k];
            d[j * MR + i] = v;
          }
        }
      }
  });
  const int64_t item = dot_item(P), items = (P + item - 1) / item, ldc = item * kPanel;
  codeshell::parallel_chunks(items, 1, 1, [&](int64_t i0, int64_t i1) {
    static thread_local codeshell::ThreadScratch c_keep;
    codeshell::Scratch<float> cs(c_keep, size_t(T) * MR * ldc);
    float* c = cs.data();
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t pa = it * item, pb = std::min(P, pa + item);
      for (int64_t j0 = 0; j0 < Kh; j0 += kDotKC) {
        const int64_t nj = std::min(kDotKC, Kh - j0);
        const uint32_t* xb = direct ? nullptr : xp + j0 * T * MR;
        for (int64_t p = pa; p < pb;) {
          const int64_t np = std::min<int64_t>(NP, pb - p);  // a tail of 1-3 panels
          const uint32_t* wp = w + (p * Kh + j0) * kPanel;
          float* cp = c + (p - pa) * kPanel;
          // The weight chunk that comes next in this order (the next panels at this chunk, else
          // the item's first panels at the next chunk), into L2 a few lines per row tile; its
          // lines are one k-pair of one panel (64 B). None after the item's last pass.
          const bool more = p + np < pb;
          const int64_t pn = more ? p + np : pa, jn = more ? j0 : j0 + kDotKC;
          const int64_t npn = std::min<int64_t>(NP, pb - pn), njn = std::min(kDotKC, Kh - jn);
          const uint32_t* wn = w + (pn * Kh + jn) * kPanel;
          const int64_t lines = jn < Kh ? npn * njn : 0, per = (lines + T - 1) / T;
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t l = t * per, le = std::min(lines, l + per); l < le; ++l)
              _mm_prefetch(reinterpret_cast<const char*>(wn + (l / njn) * Kh * kPanel + (l % njn) * kPanel),
                           _MM_HINT_T1);
            float* ct = cp + t * MR * ldc;
            if (direct) {
              const uint32_t* const* rt = rows.data() + t * MR;
              switch (np) {
                case 4: dot_block_rows<4, MR>(rt, j0, rt + MR, wp, Kh * kPanel, nj, ct, ldc, j0 == 0); break;
                case 3: dot_block_rows<3, MR>(rt, j0, nullptr, wp, Kh * kPanel, nj, ct, ldc, j0 == 0); break;
                case 2: dot_block_rows<2, MR>(rt, j0, nullptr, wp, Kh * kPanel, nj, ct, ldc, j0 == 0); break;
                default: dot_block_rows<1, MR>(rt, j0, nullptr, wp, Kh * kPanel, nj, ct, ldc, j0 == 0); break;
              }
              continue;
            }
            const uint32_t* xt = xb + t * nj * MR;
            switch (np) {
              case 4: dot_block<4, MR, true>(xt, wp, Kh * kPanel, nj, ct, ldc, j0 == 0, nj); break;
              case 3: dot_block<3, MR>(xt, wp, Kh * kPanel, nj, ct, ldc, j0 == 0); break;
              case 2: dot_block<2, MR>(xt, wp, Kh * kPanel, nj, ct, ldc, j0 == 0); break;
              default: dot_block<1, MR>(xt, wp, Kh * kPanel, nj, ct, ldc, j0 == 0); break;
            }
          }
          p += np;
        }
      }
      const int64_t n0 = pa * kPanel;
      if (out_gelu) store_rows_gelu(c, ldc, M, out_gelu, N, n0, std::min(N, pb * kPanel) - n0, bias);
      else if (out_b16) store_rows_b16(c, ldc, M, out_b16, N, n0, std::min(N, pb * kPanel) - n0, bias);
      else store_rows(c, ldc, M, out, N, n0, std::min(N, pb * kPanel) - n0, bias);
    }
  });
}

// The vdpbf16ps ceiling of one thread: `reps` passes of the prefill's register block (kDotNP
// panels x kDotMR rows, 24 accumulators) over one KC chunk of L1-resident operands (32 KiB of
// panels, 3 KiB of x), i.e. dot_block with memory out of the way (its sums still stored and
// reloaded between passes, as between the prefill's K chunks). Returns the flops done.
int64_t peak_dot(int64_t reps) {
  constexpr int64_t Kh = kDotKC;
  std::unique_ptr<uint32_t, decltype(&std::free)> wb(
      static_cast<uint32_t*>(std::aligned_alloc(64, kDotNP * Kh * 64)), &std::free),
      xb(static_cast<uint32_t*>(std::aligned_alloc(64, Kh * kDotMR * 4 + 64)), &std::free);
  TORCH_CHECK(wb && xb, "bf16_dot_peak: out of memory");
  std::fill(wb.get(), wb.get() + kDotNP * Kh * kPanel, 0x3f803f80u);  // pairs of 1.0 in bf16
  std::fill(xb.get(), xb.get() + Kh * kDotMR, 0u);                     // zeros: the sums stay finite
  alignas(64) float c[kDotMR * kDotNP * 16];
  for (int64_t r = 0; r < reps; ++r) {
    dot_block<kDotNP, kDotMR>(xb.get(), wb.get(), Kh * kPanel, Kh, c, kDotNP * 16, r == 0);
    __asm__ volatile("" ::"r"(c) : "memory");  // the sums are used: the passes cannot be dropped
  }
  return reps * Kh * kDotNP * kDotMR * 16 * 2 * 2;  // flops: 16 lanes x 2 k x 2 per vdpbf16ps
}

// ---- fp32-FMA GEMM for bf16 weights on AVX-512 CPUs without AVX512-BF16 (session 24 helper A) --
// `avx512_vnni:gemm` (ops.py): x [M, K] (bf16 or fp32) @ panels^T (+ bias), BLIS style. Why: on
// an Ice Lake-class Xeon (no vdpbf16ps, no AMX) the bf16 prefill ran as `sgemm:fp32` (each block
// of weight rows widened to fp32 in memory, then MKL's sgemm: 0.21-0.22 TFLOP/s on the small
// shape's linears at M = 512) or as Avx512Fma's decode panels in 64-row calls (slower still).
// Here:
//   * x is widened once per call to fp32 and packed [K chunk][row tile][k / 16][kFmaMR][16] (zero
//     rows past M, zero k past K: every tile is a full kFmaMR rows, the padding rows are not stored;
//     session 26: a vector copy of each row's 16 k; CODESHELL_FMA_XPACK=0: [K chunk][row tile][k]
//     [kFmaMR], session 24's layout, a transpose);
//   * work items of 4 panels (fp32 sums [T * MR][64] in L2 between K chunks, as prefill_dot);
//     per K chunk (KC = 256 k) and group of NP = 4 panels the chunk is widened (v << 16,
//     v & 0xffff0000) into a per-thread fp32 buffer [kc][64], then every row tile runs the
//     register block over it: 6 rows x 64 columns = 24 zmm accumulators, per k four fp32 loads
//     of the weights and 6 broadcasts of x for 24 FMAs; no widening in the inner loop
//     (Avx512Fma::micro widens each weight vector once per tile: 2 ALU ops per 2 x MR FMAs on
//     the FMA ports);
//   * the next row tile's x is prefetched into L1 on the way;
//   * session 26, CODESHELL_FMA_EPI=1 (off by default: not faster): each tile's last K chunk
//     writes the output from its accumulators (+ bias, bf16 / GELU epilogues: FmaEpi), not c;
//     default: sums to c, store_rows* after the item.
//     The loop runs at 98-99% of its L1-resident ceiling (benchmarks/standalone/fma_gemm_loop.cpp);
//     what is left is outside it (docs/kernels-log.md, Session 26 helper A).
// Measured (session 24 helper A, Ice Lake-class Xeon, 2 threads, M = 512, best of 4 alternating
// calls, TFLOP/s; `sgemm:fp32` in the same runs 0.22-0.26): register block 4 panels x 6 rows,
// KC 256, items of 4 panels 0.29-0.31 on the small shape's and 7B's linears (c_attn 1536x1024
// 0.297, 4096x4096 0.306), 0.24-0.29 on codeshell-mini's; 3 x 8 (KC 128-256, items of 6-12)
// 0.24-0.30 (1024-wide weights split into uneven items over 2 threads); 2 x 12 0.25-0.27; 2 x 14
// 0.26 (28 accumulators + 2 weights + a broadcast: GCC spills moves, its L1 peak 0.26 against
// 0.34 for 4 x 6); KC 128 / 192 0.28-0.30. CODESHELL_FMA_BLOCK=0 (3 x 8) / 2 (2 x 12) / 3 (2 x 14),
// CODESHELL_FMA_KC=<k>, CODESHELL_FMA_ITEM=<groups of NP panels>, CODESHELL_FMA_WPF=0,
// CODESHELL_FMA_XPACK=0 (+ CODESHELL_FMA_XPACK_V=0), CODESHELL_FMA_EPI=0 (A/B runs; read per call).
constexpr int kFmaNP = 4, kFmaMR = 6;
constexpr int64_t kFmaKC = 256;  // k per chunk (a multiple of 32)

// c[MR][NP * 16] (row stride ldc) (+)= a . b [kc][NP * 16] (fp32); a is the tile's x, [kc][MR]
// or, with KB, [kc / 16][MR][16] (16 k of a row contiguous: prefill_fma's default pack, a copy of
// each row's 16 k rather than a transpose; the same values, the same FMAs in the same order);
// pf: the next tile's a (prefetched into L1, 8 k at a time), or null.
// The epilogue of a tile's last K chunk, fused into fma_block (session 26 helper A): the tile's
// sums (+ bias[col0 + j]) go from the accumulators straight to the output rows [row0, row0 + rows)
// x columns [col0, col0 + cols): fp32 (out, store_rows' values), bf16 (ob, store_rows_b16's bits)
// or GELU'd bf16 (og, store_rows_gelu's bits: gelu16_fast of the bf16-rounded sum when fast, else
// gelu16). Why: the item's sums were stored to c (L2) after the last chunk and read back by a
// separate pass over the item's 512 rows; here they never leave the registers, and the output
// stores overlap the next tile's FMAs. The same fp32 adds and roundings: the same bits.
struct FmaEpi {
  float* out;
  uint16_t* ob;
  uint16_t* og;
  const float* bias;
  int64_t N, row0, rows, col0, cols;
  bool fast;
};

// s: the tile's sums [NP][MR][16] (fma_block stores its accumulators there first: passing the
// accumulator array itself by reference took its address, and GCC then kept all 24 in memory
// through the k loop, 3x slower).
template <int NP, int MR>
__attribute__((noinline)) void fma_epilogue(const float* s, const FmaEpi& e) {
  for (int i = 0; i < MR && i < e.rows; ++i) {
    const int64_t o = (e.row0 + i) * e.N + e.col0;
    for (int q = 0; q < NP; ++q) {
      const int64_t j = q * 16;
      if (j >= e.cols) break;
      const __mmask16 mk = e.cols - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (e.cols - j)) - 1);
      __m512 v = _mm512_load_ps(s + (q * MR + i) * 16);
      if (e.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, e.bias + e.col0 + j));
      if (e.og) {
        const __m512 g = e.fast ? codeshell::gelu16_fast(codeshell::round_bf16_fast(v))
                                : codeshell::gelu16(codeshell::round_bf16(v));
        _mm256_mask_storeu_epi16(e.og + o + j, mk, _mm512_cvtepi32_epi16(codeshell::bf16_bits(g)));
      } else if (e.ob) {
        _mm256_mask_storeu_epi16(e.ob + o + j, mk, _mm512_cvtepi32_epi16(codeshell::bf16_bits(v)));
      } else {
        _mm512_mask_storeu_ps(e.out + o + j, mk, v);
      }
    }
  }
}

// ep: the tile's last chunk with the fused epilogue (the sums go to the output, not to c), or null.
template <int NP, int MR = kFmaMR, bool KB = false>
inline void fma_block(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, bool first,
                      const float* pf, const FmaEpi* ep = nullptr) {
  __m512 acc[NP][MR];
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i) acc[q][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + q * 16);
  if constexpr (KB) {
    // 8 k a step (as below), their x at a8[i * 16 + j] (constant offsets; GCC left the form with
    // the index (k >> 4) * MR * 16 + i * 16 + (k & 15) rolled, with that arithmetic each k). Unrolled
    // by 4, not 8: with 8 (or 16) GCC's schedule shuffled the accumulators through ~50 register moves
    // (14 with 4, as the [kc][MR] loop); a standalone copy under the extension's flags ran 4% slower
    // that way (1.76 against 1.83 FMAs a cycle), as fast as the [kc][MR] loop at 4.
    for (int64_t k8 = 0; k8 < kc; k8 += 8) {
      const float* a8 = a + (k8 >> 4) * (MR * 16) + (k8 & 15);
      const float* b8 = b + k8 * NP * 16;
      if (pf)
        for (int l = 0; l < 8 * MR * 4; l += 64) _mm_prefetch(reinterpret_cast<const char*>(pf + k8 * MR) + l, _MM_HINT_T0);
#pragma GCC unroll 4
      for (int j = 0; j < 8; ++j) {
        __m512 bv[NP];
        for (int q = 0; q < NP; ++q) bv[q] = _mm512_load_ps(b8 + j * NP * 16 + q * 16);
        for (int i = 0; i < MR; ++i) {
          const __m512 xb = _mm512_set1_ps(a8[i * 16 + j]);
          for (int q = 0; q < NP; ++q) acc[q][i] = _mm512_fmadd_ps(xb, bv[q], acc[q][i]);
        }
      }
    }
  } else {
    for (int64_t k8 = 0; k8 < kc; k8 += 8) {
      if (pf)
        for (int l = 0; l < 8 * MR * 4; l += 64) _mm_prefetch(reinterpret_cast<const char*>(pf + k8 * MR) + l, _MM_HINT_T0);
#pragma GCC unroll 8
      for (int64_t k = k8; k < k8 + 8; ++k) {
        __m512 bv[NP];
        for (int q = 0; q < NP; ++q) bv[q] = _mm512_load_ps(b + k * NP * 16 + q * 16);
        for (int i = 0; i < MR; ++i) {
          const __m512 xb = _mm512_set1_ps(a[k * MR + i]);
          for (int q = 0; q < NP; ++q) acc[q][i] = _mm512_fmadd_ps(xb, bv[q], acc[q][i]);
        }
      }
    }
  }
  if (ep) {
    alignas(64) float s[NP * MR * 16];
    for (int q = 0; q < NP; ++q)
      for (int i = 0; i < MR; ++i) _mm512_store_ps(s + (q * MR + i) * 16, acc[q][i]);
    fma_epilogue<NP, MR>(s, *ep);
    return;
  }
  for (int q = 0; q < NP; ++q)
    for (int i = 0; i < MR; ++i) _mm512_storeu_ps(c + i * ldc + q * 16, acc[q][i]);
}

// NP panels' k-pairs [j0, j0 + kc / 2) (panel q at w + q * pstride) widened into b [kc][NP * 16]
inline void widen_panels(const uint32_t* w, int64_t pstride, int NP, int64_t j0, int64_t kc, float* b) {
  const __m512i hi = _mm512_set1_epi32(int32_t(0xffff0000u));
  for (int64_t j = 0; j < kc / 2; ++j)
    for (int q = 0; q < NP; ++q) {
      const __m512i v = _mm512_loadu_si512(w + q * pstride + (j0 + j) * kPanel);
      _mm512_store_ps(b + (2 * j) * NP * 16 + q * 16, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
      _mm512_store_ps(b + (2 * j + 1) * NP * 16 + q * 16, _mm512_castsi512_ps(_mm512_and_si512(v, hi)));
    }
}

// x (bf16 when xb, else fp32) [M, K] -> out fp32 [M, N] / out_gelu / out_b16 (as prefill_dot's
// epilogues); register block NP panels x MR rows (prefill_fma picks it).
template <int NP, int MR, bool KB>
void prefill_fma_t(const void* x, bool xb, int64_t M, int64_t K, const uint32_t* w, int64_t N, const float* bias,
                   float* out, uint16_t* out_gelu, uint16_t* out_b16, int64_t KC, int64_t item) {
  const int64_t Kp = padded_k(K), Kh = Kp / 2, P = (N + kPanel - 1) / kPanel, T = (M + MR - 1) / MR;
  // x packed: chunk c (k [c * KC, c * KC + kc)) at xp + c * KC * T * MR, tile t at + t * kc * MR
  static thread_local codeshell::ThreadScratch x_keep;
  codeshell::Scratch<float> xs(x_keep, size_t(T + 1) * MR * Kp);
  float* xp = xs.data();
  // The pack 16 k of a row at a time (a widened vector scattered to stride MR) where a tile's rows
  // are all inside x, rather than a value at a time: the pack of mlp.c_proj's x (M = 512, K = 4096:
  // 2 M values) was a scalar load / shift / store each. CODESHELL_FMA_XPACK_V=0: the scalar pack
  // everywhere (A/B). The same values either way (widening is exact).
  const bool xvec = codeshell::env_flag("CODESHELL_FMA_XPACK_V", true);
  const __m512i xidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(MR));
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t k0 = 0; k0 < Kp; k0 += KC) {
        const int64_t kc = std::min(KC, Kp - k0);
        float* d = xp + k0 * T * MR + t * kc * MR;
        if (KB) {
          // [kc / 16][MR][16]: each row's 16 k widened and stored as one vector (a masked load where
          // K ends inside it; zeros past K and for rows past M). kc is a multiple of 32 (kKAlign).
          for (int64_t kb = 0; kb < kc; kb += 16)
            for (int i = 0; i < MR; ++i) {
              const int64_t m = t * MR + i, kin = m < M ? std::max<int64_t>(0, std::min<int64_t>(16, K - k0 - kb)) : 0;
              const __mmask16 mk = __mmask16((1u << kin) - 1);
              __m512 v;
              if (xb)
                v = codeshell::load_bf16x16(static_cast<const uint16_t*>(x) + m * K + k0 + kb, mk);
              else
                v = _mm512_maskz_loadu_ps(mk, static_cast<const float*>(x) + m * K + k0 + kb);
              _mm512_store_ps(d + kb * MR + i * 16, v);
            }
          continue;
        }
        const bool vec = xvec && (t + 1) * MR <= M;
        for (int i = 0; vec && i < MR; ++i) {
          const int64_t kin = std::max<int64_t>(0, std::min(kc, K - k0));
          int64_t k = 0;
          if (xb) {
            const uint16_t* src = static_cast<const uint16_t*>(x) + (t * MR + i) * K + k0;
            for (; k + 16 <= kin; k += 16) _mm512_i32scatter_ps(d + k * MR + i, xidx, codeshell::load_bf16x16(src + k), 4);
            for (; k < kin; ++k) d[k * MR + i] = codeshell::bf16_to_f32(src[k]);
          } else {
            const float* src = static_cast<const float*>(x) + (t * MR + i) * K + k0;
            for (; k + 16 <= kin; k += 16) _mm512_i32scatter_ps(d + k * MR + i, xidx, _mm512_loadu_ps(src + k), 4);
            for (; k < kin; ++k) d[k * MR + i] = src[k];
          }
          for (; k < kc; ++k) d[k * MR + i] = 0.f;
        }
        for (int i = 0; !vec && i < MR; ++i) {
          const int64_t m = t * MR + i;
          const int64_t kin = m < M ? std::max<int64_t>(0, std::min(kc, K - k0)) : 0;
          if (xb) {
            const uint16_t* src = static_cast<const uint16_t*>(x) + m * K + k0;
            for (int64_t k = 0; k < kin; ++k) d[k * MR + i] = codeshell::bf16_to_f32(src[k]);
          } else {
            const float* src = static_cast<const float*>(x) + m * K + k0;
            for (int64_t k = 0; k < kin; ++k) d[k * MR + i] = src[k];
          }
          for (int64_t k = kin; k < kc; ++k) d[k * MR + i] = 0.f;
        }
      }
  });
  const int64_t items = (P + item - 1) / item, ldc = item * kPanel;
  const bool wpf = codeshell::env_flag("CODESHELL_FMA_WPF", true);
  // The epilogue fused into each tile's last chunk (FmaEpi) with CODESHELL_FMA_EPI=1; by default
  // the sums of every chunk go to c and store_rows / _b16 / _gelu write the item's rows after its
  // last chunk (session 24's kernel). The same bits. Off by default: even on one thread, and in the
  // whole small prompt (2 threads, alternating, 8 rounds) 1.09x the time of the unfused epilogue
  // (a busy host; not confirmed, docs/kernels-log.md Session 26 helper A).
  const bool fuse = codeshell::env_flag("CODESHELL_FMA_EPI", false);
  const bool gfast = out_gelu && codeshell::env_flag("CODESHELL_GELU_FAST", true);
  codeshell::parallel_chunks(items, 1, 1, [&](int64_t i0, int64_t i1) {
    static thread_local codeshell::ThreadScratch c_keep, b_keep;
    codeshell::Scratch<float> cs(c_keep, size_t(T) * MR * ldc);
    codeshell::Scratch<float> bs(b_keep, size_t(KC) * NP * kPanel + 16);
    float* c = cs.data();
    float* b = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(bs.data()) + 63) & ~uintptr_t(63));
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t pa = it * item, pb = std::min(P, pa + item);
      for (int64_t k0 = 0; k0 < Kp; k0 += KC) {
        const int64_t kc = std::min(KC, Kp - k0);
        const float* xc = xp + k0 * T * MR;
        for (int64_t p = pa; p < pb; p += NP) {
          const int np = int(std::min<int64_t>(NP, pb - p));
          widen_panels(w + p * Kh * kPanel, Kh * kPanel, np, k0 / 2, kc, b);
          float* cp = c + (p - pa) * kPanel;
          // The weight chunk widened next (this item's next group at this chunk, else its first
          // group at the next chunk, else the next item's first chunk), into L2 a few lines per
          // row tile (a line: one k-pair of one panel), so that the widening does not wait on
          // memory: the small shape's weights (2-8 MiB a call, 168 MiB for 8 layers) come from
          // DRAM each prompt, and each panel's chunk (128 lines, 8 KiB) spans two 4 KiB pages,
          // where the L2 streamer stops. CODESHELL_FMA_WPF=0: none (session 24's kernel; A/B).
          int64_t wl = 0, wnj = 1, wper = 0, wq = 0, wj = 0;  // wq, wj: line l's panel and k-pair (l = wq * wnj + wj)
          const uint32_t* wn = nullptr;
          if (wpf) {
            int64_t pn = p + NP, kn = k0, pend = pb;
            if (pn >= pb) pn = pa, kn = k0 + KC;
            if (kn >= Kp && it + 1 < i1) pn = pb, kn = 0, pend = std::min(P, pb + item);
            if (kn < Kp && pn < pend) {
              wnj = std::min(KC, Kp - kn) / 2;
              wl = std::min<int64_t>(NP, pend - pn) * wnj;
              wper = (wl + T - 1) / T;
              wn = w + (pn * Kh + kn / 2) * kPanel;
            }
          }
          for (int64_t t = 0; t < T; ++t) {
            // (a panel / k-pair counter: l / wnj and l % wnj were two 64-bit divisions a line, ~1.5%
            // of a c_attn call's samples at M = 512)
            for (int64_t l = t * wper, le = std::min(wl, l + wper); l < le; ++l) {
              _mm_prefetch(reinterpret_cast<const char*>(wn + wq * Kh * kPanel + wj * kPanel), _MM_HINT_T1);
              if (++wj == wnj) wj = 0, ++wq;
            }
            const float* pf = t + 1 < T ? xc + (t + 1) * kc * MR : nullptr;
            const float* a = xc + t * kc * MR;
            float* ct = cp + t * MR * ldc;
            FmaEpi e;
            const FmaEpi* ep = nullptr;
            if (fuse && k0 + kc >= Kp) {
              e = FmaEpi{out, out_b16, out_gelu, bias, N, t * MR, std::min<int64_t>(MR, M - t * MR), p * kPanel,
                         std::min(N, (p + np) * kPanel) - p * kPanel, gfast};
              ep = &e;
            }
            // a tail of fewer panels at the item's end
            if (np == NP) fma_block<NP, MR, KB>(a, b, kc, ct, ldc, k0 == 0, pf, ep);
            else if (np == 3) fma_block<3, MR, KB>(a, b, kc, ct, ldc, k0 == 0, pf, ep);
            else if (np == 2) fma_block<2, MR, KB>(a, b, kc, ct, ldc, k0 == 0, pf, ep);
            else fma_block<1, MR, KB>(a, b, kc, ct, ldc, k0 == 0, pf, ep);
          }
        }
      }
      if (fuse) continue;  // the tiles' last chunks wrote the output
      const int64_t n0 = pa * kPanel, cols = std::min(N, pb * kPanel) - n0;
      if (out_gelu) store_rows_gelu(c, ldc, M, out_gelu, N, n0, cols, bias);
      else if (out_b16) store_rows_b16(c, ldc, M, out_b16, N, n0, cols, bias);
      else store_rows(c, ldc, M, out, N, n0, cols, bias);
    }
  });
}

void prefill_fma(const void* x, bool xb, int64_t M, int64_t K, const uint32_t* w, int64_t N, const float* bias,
                 float* out, uint16_t* out_gelu, uint16_t* out_b16) {
  const int64_t v = codeshell::env_int("CODESHELL_FMA_BLOCK", 1);
  const int64_t np = v == 0 ? 3 : v == 2 || v == 3 ? 2 : kFmaNP;
  const int64_t KC = std::max<int64_t>(32, codeshell::env_int("CODESHELL_FMA_KC", kFmaKC) / 32 * 32);
  const int64_t item = std::max<int64_t>(1, codeshell::env_int("CODESHELL_FMA_ITEM", 1)) * np;
  // x's pack: [kc / 16][MR][16] a tile (KB, the default since session 26 helper A: a vector copy of
  // each row's 16 k) or CODESHELL_FMA_XPACK=0: [kc][MR] (session 24's layout, a transpose: a
  // scatter per 16 k of a row, or scalar with CODESHELL_FMA_XPACK_V=0). The same bits.
  if (codeshell::env_flag("CODESHELL_FMA_XPACK", true)) switch (v) {
      case 0: return prefill_fma_t<3, 8, true>(x, xb, M, K, w, N, bias, out, out_gelu, out_b16, KC, item);
      case 2: return prefill_fma_t<2, 12, true>(x, xb, M, K, w, N, bias, out, out_gelu, out_b16, KC, item);
      case 3: return prefill_fma_t<2, 14, true>(x, xb, M, K, w, N, bias, out, out_gelu, out_b16, KC, item);
      default: return prefill_fma_t<kFmaNP, kFmaMR, true>(x, xb, M, K, w, N, bias, out, out_gelu, out_b16, KC, item);
    }
  switch (v) {
    case 0: return prefill_fma_t<3, 8, false>(x, xb, M, K, w, N, bias, out, out_gelu, out_b16, KC, item);
    case 2: return prefill_fma_t<2, 12, false>(x, xb, M, K, w, N, bias, out, out_gelu, out_b16, KC, item);
    case 3: return prefill_fma_t<2, 14, false>(x, xb, M, K, w, N, bias, out, out_gelu, out_b16, KC, item);
    default: return prefill_fma_t<kFmaNP, kFmaMR, false>(x, xb, M, K, w, N, bias, out, out_gelu, out_b16, KC, item);
  }
}

// The fp32-FMA ceiling of one thread: `reps` passes of prefill_fma's register block (4 panels x 6
// rows, 24 accumulators) over one chunk of L1-resident operands (128 k: 32 KiB of widened
// weights, 3 KiB of x), the sums stored and reloaded between passes as between K chunks. The
// ceiling of a bf16 prefill on AVX-512 CPUs without AVX512-BF16, whose bf16 path is fp32 FMA.
// Returns the flops done.
int64_t peak_fma(int64_t reps) {
  constexpr int64_t kc = 128, cols = kFmaNP * kPanel;
  std::unique_ptr<float, decltype(&std::free)> bb(
      static_cast<float*>(std::aligned_alloc(64, kc * cols * 4)), &std::free),
      ab(static_cast<float*>(std::aligned_alloc(64, kc * kFmaMR * 4 + 64)), &std::free);
  TORCH_CHECK(bb && ab, "bf16_fma_peak: out of memory");
  std::fill(bb.get(), bb.get() + kc * cols, 1.0f);
  std::fill(ab.get(), ab.get() + kc * kFmaMR, 0.0f);  // zeros: the sums stay finite
  alignas(64) float c[kFmaMR * cols];
  for (int64_t r = 0; r < reps; ++r) {
    fma_block<kFmaNP, kFmaMR>(ab.get(), bb.get(), kc, c, cols, r == 0, nullptr);
    __asm__ volatile("" ::"r"(c) : "memory");  // the sums are used: the passes cannot be dropped
  }
  return reps * kc * kFmaMR * cols * 2;  // flops: 2 per FMA lane
}

}  // namespace
CODESHELL_END_AVX512
#endif
