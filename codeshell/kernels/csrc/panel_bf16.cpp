// bf16 weight-only matmul over the panel layout, for each ISA level the CPU has.
//
// What this is: y[M, N] = x[M, K] @ W^T (+ bias) with W bfloat16 stored as panels of 16 output
// rows in k-pairs: data [P = ceil(N/16), Kp/2, 32] with Kp = K rounded up to 32; for panel p and
// k-pair j the 32 values are (row 16p+i, k = 2j+h) at position 2i+h (zero past N and past K).
// That is at once
//   * AMX-BF16's B-tile layout: 16 consecutive k-pairs of a panel are one 1 KiB tile (16 rows
//     of 64 bytes: k-pair r holds the 16 columns' (k, k+1) pairs);
//   * vdpbf16ps's operand: one 64-byte load is 16 lanes of (k, k+1) pairs, rows in lane order;
//   * cheap for AVX2: a 32-byte load is rows i..i+7 as 32-bit (even k, odd k); even k in fp32 is
//     v << 16, odd k is v & 0xffff0000.
// Kernels, one source with a section per ISA (`Avx2` and, in the CODESHELL_BEGIN_AVX512 section,
// `Bf16Dot` and the AMX tiles), chosen by ops.py (`plan`); two AVX-512 sections sit in files of their
// own for size, included once below: panel_bf16_amx.h (the AMX tiles) and prefill_bf16_avx512.h
// (the vdpbf16ps and AVX-512 fp32-FMA prefill GEMMs):
//   * decode_bf16 (M <= 64), isa kAvx2: fp32 x, FMA outer product (broadcast x[m, k] times 16
//     weights), 6 rows of x x 16 weight rows in registers, k-blocked so the panel chunk is
//     re-read from L1 by every tile; for M <= 3 several panels at once (more read streams);
//     from 12 rows (avx2_block_rows, session 32) gemm_fma.h's block on each panel chunk widened
//     once, x packed by tiles; at 2 / 3 rows x-stationary tiles over 8-output blocks (avx2_xrows,
//     session 33): the same bits. At M = 1 avx2_m1_tile (session 34): 4 panels, the next tile
//     prefetched into L2 at K <= 512.
//   * decode_bf16, isa kAvx512Bf16: bf16 x (the caller's activations are bf16 already: a bf16
//     model), vdpbf16ps: one instruction does 16 rows x 2 k for one row of x; at M = 1 several
//     panels at once, their number and the software prefetch by CPU kind (decode_panels).
//   * prefill_bf16_amx (any M; ops.py sends bf16 x here at every M on an AMX CPU), isa kAmx:
//     2x2 tiles of 16x16 fp32 accumulators (32 rows of x x 32 weight rows), tdpbf16ps over 32 k
//     per step; M <= 16 in a decode schedule (decode_amx: 4 panels over all of K, prefetched);
//     M = 1 on 1-row A / C tiles, x read in place, one tile configuration a thread and call
//     (decode_amx_m1, session 37; CODESHELL_AMX_BF16_M1=0: decode_amx).
// Row invariance (ops.ROW_INVARIANT_MAX_M): every kernel here sums each (row of x, output) in
// an order that does not depend on M or on the row's tile, so a row's bits are the same in a
// call of any M (tests/kernels/test_invariance.py).
//   * dequant_bf16 / rows_bf16: expand rows for the fp32 sgemm and torch's bf16 matmul paths.
// What this is not: the int8/int4 kernels (kernels.cpp, qdot.cpp) or a dispatcher.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#include "bf16_pack.h"
#include "amx_tiles.h"
#include "entry.h"
#include "isa.h"
#include "panel_rows.h"
#include "parallel.h"
#include "scratch.h"
#include "simd512.h"
#include "step_hints.h"

namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kKAlign = 32;      // K padded to this (one AMX tile depth)
constexpr int64_t kKBlock = 256;     // k-pairs per pass (16 KiB of panel): stays in L1 across m-tiles
constexpr int64_t kPrefetch = 64;    // k-pairs ahead (4 KiB) of software prefetch on the weight stream
constexpr int64_t kMaxRows = 64;     // rows of x per decode call: c [64][16] fp32 per-thread buffer

inline int64_t padded_k(int64_t K) { return (K + kKAlign - 1) / kKAlign * kKAlign; }


using Emit = std::function<void(int64_t, const float*)>;  // (panel, c [M][16] rows in order)

// The epilogue of every kernel here: c [M][ldc] (columns [0, cols)) -> out[:, n0 : n0 + cols)
// (out [M, N] fp32), plus bias[n0 + j] when given.
inline void store_rows(const float* c, int64_t ldc, int64_t M, float* out, int64_t N, int64_t n0, int64_t cols,
                       const float* bias) {
  for (int64_t m = 0; m < M; ++m) {
    float* o = out + m * N + n0;
    const float* cm = c + m * ldc;
    if (bias)
      for (int64_t j = 0; j < cols; ++j) o[j] = cm[j] + bias[n0 + j];
    else
      std::memcpy(o, cm, size_t(cols) * sizeof(float));
  }
}

// xt [Kp][M] = x [M, K] transposed, k rows K..Kp-1 zero into dst: Avx2::prepare's
// vector and, since session 34, the AVX2 decode's per-thread scratch (x without a std::vector a call).
inline void avx2_transpose_x(const float* x, int64_t M, int64_t K, int64_t Kp, float* dst) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) dst[k * M + m] = x[m * K + k];
  std::fill(dst + K * M, dst + Kp * M, 0.f);
}

// ---- AVX2 + FMA: fp32 x ------------------------------------------------------------------
struct Avx2 {
  static constexpr int kTileRows = 6;  // 12 accumulators + 2 weight vectors + a broadcast: 15 ymm
  using X = float;                     // x transposed [Kp][M], padded with zero k rows
  // c[q][MR][16] (+)= x[MR rows] . panel q over k-pairs [j0, j1); NP panels at w + q * pstride;
  // kPf: software prefetch on the weight streams (as Bf16Dot's). Always inlined (session 33): where
  // it runs out of line is the caller's choice (avx2_tile_ool), not GCC's (the old path's A/B twin).
  template <int MR, int NP, bool kPf = true>
  __attribute__((always_inline)) static void micro(const float* xt, int64_t ldx, const uint32_t* w, int64_t pstride,
                                                   int64_t j0, int64_t j1, float* c, bool first) {
    const __m256i hi_mask = _mm256_set1_epi32(int32_t(0xffff0000u));
    __m256 acc[NP][MR][2];
    for (int q = 0; q < NP; ++q)
      for (int i = 0; i < MR; ++i)
        for (int h = 0; h < 2; ++h)
          acc[q][i][h] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + q * kPanel * kPanel + i * kPanel + h * 8);
    for (int64_t j = j0; j < j1; ++j) {
      for (int q = 0; q < NP; ++q) {
        const uint32_t* wk = w + q * pstride + j * kPanel;
        if constexpr (kPf) _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetch * kPanel), _MM_HINT_T0);
        // even k then odd k: two passes keep 2 weight vectors live (15 ymm at MR = 6)
        for (int h = 0; h < 2; ++h) {
          const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk));
          const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 8));
          const __m256 w0 = _mm256_castsi256_ps(h ? _mm256_and_si256(v0, hi_mask) : _mm256_slli_epi32(v0, 16));
          const __m256 w1 = _mm256_castsi256_ps(h ? _mm256_and_si256(v1, hi_mask) : _mm256_slli_epi32(v1, 16));
          const float* xk = xt + (2 * j + h) * ldx;
          for (int i = 0; i < MR; ++i) {
            const __m256 xb = _mm256_broadcast_ss(xk + i);
            acc[q][i][0] = _mm256_fmadd_ps(xb, w0, acc[q][i][0]);
            acc[q][i][1] = _mm256_fmadd_ps(xb, w1, acc[q][i][1]);
          }
        }
      }
    }
    for (int q = 0; q < NP; ++q)
      for (int i = 0; i < MR; ++i)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(c + q * kPanel * kPanel + i * kPanel + h * 8, acc[q][i][h]);
  }
  // xt[k][m] = x[m][k] (fp32), k-rows K..Kp-1 zero
  static std::vector<float> prepare(const torch::Tensor& x, int64_t Kp) {
    const int64_t M = x.size(0), K = x.size(1);
    std::vector<float> xt(size_t(Kp) * M);
    avx2_transpose_x(x.data_ptr<float>(), M, K, Kp, xt.data());
    return xt;
  }
  static int64_t ld(int64_t M) { return M; }  // x row stride per k (Avx2) / per k-pair (Bf16Dot)
};

// The fp32-FMA prefill GEMM over a vector type (`avx2:gemm` with V256; session 30 helper A)
#include "gemm_fma.h"

}  // namespace

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

// Batched decode (M >= 4, session 18 helper B): Bf16Dot's tiles also prefetch J k-pairs ahead on
// each panel's stream into L2 (0: no), J = the native decode step's hint for a cache-resident
// model (step_hints.h), or CODESHELL_BF16_PF2=J (A/B runs). Set per decode_panels call (the tiles
// run on the threads of its parallel loop: a thread_local would not reach them, so it is one
// process-wide value).
inline std::atomic<int64_t>& far_prefetch_k() {
  static std::atomic<int64_t> v{0};
  return v;
}
inline int64_t far_prefetch() { return far_prefetch_k().load(std::memory_order_relaxed); }

// ---- AVX512-BF16: bf16 x, vdpbf16ps ------------------------------------------------------
struct Bf16Dot {
  static constexpr int kTileRows = 8;  // 2 panels x 8 rows = 16 zmm accumulators
  using X = uint32_t;                  // x as bf16 pairs [Kp/2][M]: (x[m, 2j], x[m, 2j+1])
  // One accumulator chain per (panel, row of x), k-pairs in order, at every MR: a row's result
  // is then the same bits whatever M the call has (row invariance, see decode_panels). At
  // MR = 1 the latency of vdpbf16ps (5 cycles) is hidden by NP panels in flight instead.
  // kPf: software prefetch kPrefetch k-pairs ahead on each panel's stream (false: the hardware
  // prefetchers alone, which read faster on Zen 5 at M = 1: decode_panels).
  template <int MR, int NP, bool kPf = true>
  static void micro(const uint32_t* xp, int64_t ldx, const uint32_t* w, int64_t pstride, int64_t j0, int64_t j1,
                    float* c, bool first) {
    const int64_t far = kPf ? far_prefetch() : 0;  // 0 unless a batched decode call set it (decode_panels)
    __m512 acc[NP][MR];
    for (int q = 0; q < NP; ++q)
      for (int i = 0; i < MR; ++i)
        acc[q][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + q * kPanel * kPanel + i * kPanel);
    for (int64_t j = j0; j < j1; ++j)
      for (int q = 0; q < NP; ++q) {
        const uint32_t* wk = w + q * pstride + j * kPanel;
        if constexpr (kPf) _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetch * kPanel), _MM_HINT_T0);
        if (far > 0) _mm_prefetch(reinterpret_cast<const char*>(wk + far * kPanel), _MM_HINT_T1);
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wk);
        for (int i = 0; i < MR; ++i)
          acc[q][i] = _mm512_dpbf16_ps(acc[q][i], (__m512bh)_mm512_set1_epi32(int(xp[j * ldx + i])), wv);
      }
    for (int q = 0; q < NP; ++q)
      for (int i = 0; i < MR; ++i) _mm512_storeu_ps(c + q * kPanel * kPanel + i * kPanel, acc[q][i]);
  }
  // xp[j][m] = bf16 pair of x[m][2j], x[m][2j+1] (x is a bf16 tensor: no rounding here)
  static std::vector<uint32_t> prepare(const torch::Tensor& x, int64_t Kp) {
    const int64_t M = x.size(0), K = x.size(1), Kh = Kp / 2;
    std::vector<uint32_t> xp(size_t(Kh) * M, 0u);
    const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    // M = 1: the row's pairs are its bf16 values in order, so a copy (the 2-byte loop below took
    // ~0.6 us per 1,024 of K on the calling thread before the parallel loop: 16 x 16384 weight,
    // 24 against 15 us a call through the binding)
    if (M == 1) {
      std::memcpy(xp.data(), src, size_t(K) * sizeof(uint16_t));
      return xp;
    }
    // M > 1: a transpose of the rows' bf16 pairs as 32-bit words (an odd K's last value alone)
    const int64_t full = K / 2;
    for (int64_t j = 0; j < full; ++j)
      for (int64_t m = 0; m < M; ++m) std::memcpy(&xp[j * M + m], src + m * K + 2 * j, sizeof(uint32_t));
    if (K & 1)
      for (int64_t m = 0; m < M; ++m) xp[full * M + m] = src[m * K + K - 1];  // (x, 0): the pair's low half
    return xp;
  }
  static int64_t ld(int64_t M) { return M; }
};

// ---- AVX-512F: fp32 x, FMA (CPUs without AVX512-BF16, e.g. Ice Lake; session 23 helper A) ----------
// Avx2's math at 512 bits: one 64-byte load is a panel's 16 (even k, odd k) bf16 pairs, even k
// in fp32 = v << 16, odd k = v & 0xffff0000; per (row of x, panel) one zmm chain that adds
// x[m, 2j] * w_even then x[m, 2j+1] * w_odd, k-pairs in order: per lane the same FMAs in the
// same order as Avx2::micro's two ymm halves, so the SAME BITS as `avx2:panel` (tested:
// tests/kernels/test_bf16_fma512.py) and the same row invariance. 32 zmm: tiles of up to 12
// rows x 2 panels (24 accumulators + 2 weight vectors + a broadcast).
struct Avx512Fma {
  static constexpr int kTileRows = 12;
  using X = float;  // x transposed [Kp][M] (Avx2::prepare), zero k rows K..Kp-1
  template <int MR, int NP, bool kPf = true>
  static void micro(const float* xt, int64_t ldx, const uint32_t* w, int64_t pstride, int64_t j0, int64_t j1,
                    float* c, bool first) {
    const int64_t far = kPf ? far_prefetch() : 0;
    const __m512i hi_mask = _mm512_set1_epi32(int32_t(0xffff0000u));
    __m512 acc[NP][MR];
    for (int q = 0; q < NP; ++q)
      for (int i = 0; i < MR; ++i)
        acc[q][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + q * kPanel * kPanel + i * kPanel);
    for (int64_t j = j0; j < j1; ++j) {
      const float* xe = xt + (2 * j) * ldx;
      const float* xo = xe + ldx;
      for (int q = 0; q < NP; ++q) {
        const uint32_t* wk = w + q * pstride + j * kPanel;
        if constexpr (kPf) _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetch * kPanel), _MM_HINT_T0);
        if (far > 0) _mm_prefetch(reinterpret_cast<const char*>(wk + far * kPanel), _MM_HINT_T1);
        const __m512i v = _mm512_loadu_si512(wk);
        const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
        for (int i = 0; i < MR; ++i) acc[q][i] = _mm512_fmadd_ps(_mm512_set1_ps(xe[i]), we, acc[q][i]);
        for (int i = 0; i < MR; ++i) acc[q][i] = _mm512_fmadd_ps(_mm512_set1_ps(xo[i]), wo, acc[q][i]);
      }
    }
    for (int q = 0; q < NP; ++q)
      for (int i = 0; i < MR; ++i) _mm512_storeu_ps(c + q * kPanel * kPanel + i * kPanel, acc[q][i]);
  }
  static std::vector<float> prepare(const torch::Tensor& x, int64_t Kp) { return Avx2::prepare(x, Kp); }
  static int64_t ld(int64_t M) { return M; }
};

// Batched decode at 4..16 rows: all rows over one widened weight vector (session 25 helper B)
#include "panel_bf16_rows.h"
// vdpbf16ps at 9..64 rows: tiles of up to 16 rows x 1 panel (session 39 helper D)
#include "panel_bf16_dot_rows.h"

#include "panel_bf16_m1.h"  // ---- vdpbf16ps at M = 1 without AMX (session 39)

}  // namespace
CODESHELL_END_AVX512
#endif

namespace {

// c[M][16] = x[M rows] @ panel^T over all k-pairs, m-tiles of up to Isa::kTileRows (the rest split so
// no 1-row tile is left when it can be avoided), k-blocked so the panel chunk stays in L1.
// NP panels side by side (pstride: uint32 from one panel to the next); c holds panel q's rows at
// c + q * kPanel * kPanel, so NP > 1 takes M <= kPanel.
template <class Isa, int MR, int NP>
void tile_call(const typename Isa::X* x, int64_t ldx, const uint32_t* w, int64_t pstride, int64_t j0, int64_t j1,
               float* c, bool first) {
  Isa::template micro<MR, NP>(x, ldx, w, pstride, j0, j1, c, first);
}
// Avx2::micro's tile of MR rows as a function of its own (session 33 helper B, below: GCC spilled
// the 6-row tile's accumulators inlined into panel_product's loop)
template <int MR>
__attribute__((noinline)) void avx2_tile_ool(const float* xt, int64_t ldx, const uint32_t* w, int64_t j0, int64_t j1,
                                             float* c, bool first) {
  Avx2::micro<MR, 1>(xt, ldx, w, 0, j0, j1, c, first);
}

// c = x [M rows] @ NP panels^T (panel q's c rows at c + q * kPanel * kPanel when NP > 1, else c + m * kPanel
// for any M <= kMaxRows). NP = 2 at 4..16 rows (decode_panels): one chain per (row, panel) either way, so
// the same bits; two panels give a vdpbf16ps tile of 8 rows 16 independent chains (8 left the
// chain latency exposed) and halve the broadcasts of x per weight load.
// sizes: the row tiles' sizes in order (even_tiles), or null: tiles of T rows, the rest split in two.
// s33 (Avx2, NP = 1; session 33 helper B): the tiles out of line (avx2_tile_ool: GCC 12 spilled the
// 6-row tile's accumulators inlined here in one build, not in another: its choice, so not left to it).
template <class Isa, int NP = 1>
void panel_product(const typename Isa::X* x, int64_t M, int64_t Kh, const uint32_t* w, float* c,
                   int64_t pstride = 0, const int8_t* sizes = nullptr, bool s33 = false) {
  constexpr int T = Isa::kTileRows;
  for (int64_t j0 = 0; j0 < Kh; j0 += kKBlock) {
    const int64_t j1 = std::min(Kh, j0 + kKBlock);
    const bool first = j0 == 0;
    for (int64_t m = 0, s = 0; m < M; ++s) {
      const int64_t r = M - m;
      const typename Isa::X* xm = x + m;
      float* cm = c + m * kPanel;
      int64_t take = sizes ? sizes[s] : r >= T + 2 || r == T ? T : (r > T ? (r + 1) / 2 : r);  // T+1 -> two halves
      if constexpr (std::is_same_v<Isa, Avx2> && NP == 1)
        if (s33) {
          switch (take) {
            case 1: avx2_tile_ool<1>(xm, M, w, j0, j1, cm, first); break;
            case 2: avx2_tile_ool<2>(xm, M, w, j0, j1, cm, first); break;
            case 3: avx2_tile_ool<3>(xm, M, w, j0, j1, cm, first); break;
            case 4: avx2_tile_ool<4>(xm, M, w, j0, j1, cm, first); break;
            case 5: avx2_tile_ool<5>(xm, M, w, j0, j1, cm, first); break;
            default: avx2_tile_ool<6>(xm, M, w, j0, j1, cm, first); break;
          }
          m += take;
          continue;
        }
      switch (take) {
#define CODESHELL_TILE(R) \
  case R:                 \
    if constexpr (R <= T) tile_call<Isa, R, NP>(xm, M, w, pstride, j0, j1, cm, first); \
    break;
        CODESHELL_TILE(1) CODESHELL_TILE(2) CODESHELL_TILE(3) CODESHELL_TILE(4)
        CODESHELL_TILE(5) CODESHELL_TILE(6) CODESHELL_TILE(7) CODESHELL_TILE(8)
        CODESHELL_TILE(9) CODESHELL_TILE(10) CODESHELL_TILE(11) CODESHELL_TILE(12)
#undef CODESHELL_TILE
        default: TORCH_CHECK(false, "bad tile");
      }
      m += take;
    }
  }
}

// M rows as ceil(M / T) tiles of near-equal size (the larger first) into sizes; returns the count.
// Why (AVX2, session 30 helper A): Avx2::micro keeps 2 accumulator chains per row, each 2 FMAs per
// k-pair, and an FMA has 4 cycles of latency on 2 pipes, so a tile needs >= 4 rows (8 chains) to
// run at the FMA pipes' rate: the old split ran M = 8 as 6 + 2 rows, the 2-row tile at half rate
// (latency bound), where 4 + 4 is rate bound in both. Every (row, output) is the same FMA chain
// whatever the tile: the same bits.
inline int even_tiles(int64_t M, int T, int8_t* sizes) {
  const int64_t nt = (M + T - 1) / T, base = M / nt, extra = M % nt;
  for (int64_t t = 0; t < nt; ++t) sizes[t] = int8_t(base + (t < extra ? 1 : 0));
  return int(nt);
}

// ---- AVX2 decode rows at M = 2..11 (session 33 helper B) ------------------------------------
// What: (1) Avx2::micro's row tiles as functions of their own (avx2_tile_ool<MR>, called by
// panel_product at M = 4..31: the block from 32 rows, kAvx2BlockMinM33); (2) M = 2 and 3 on x-stationary tiles over 8-output
// blocks (avx2_xtile: block b = panel b / 2, outputs 8 (b % 2) .. + 8; per k the MR rows' x
// broadcast once, then per block one weight load, its widening and MR FMAs), in place of
// panels_small_m's 2 x 3 and 3 x 2 panel tiles. CODESHELL_BF16_AVX2_SMALL=0 (read per call through
// switches.h's cache; A/B runs): the code before at every M.
// Why: inlined into decode_panels' loop, GCC 12 kept the 6-row tile's 12 accumulators + 2 weight
// vectors + the broadcast + the 0xffff0000 mask in 16 ymm by spilling 5 accumulators a k-pair (a
// store and an FMA with a memory operand each: store-to-load forwarding on the FMA chains), and the
// 2 x 3 / 3 x 2 panel tiles made 10 stack loads or stores a k-pair (objdump of the built
// panel_bf16.o: `rsp` operands in the loops; docs/kernels-log.md session 33 helper B). Out of line the
// same 6-row loop keeps them in registers; the x-stationary tiles keep MR x NB accumulators + MR
// broadcasts + 1 weight vector + the mask (2 x 5 and 3 x 3: 14 ymm) and broadcast each x once a k
// for all NB blocks (the panel tiles broadcast it again for each panel).
// Bits: every (row, output) is still one FMA chain over k = 0 .. Kp - 1 in order (even then odd k of
// each pair) from zero: the same bits as Avx2::micro at every M (tests/kernels/test_bf16_avx2_rows.py).
// c [MR][ldc] (columns [0, 8 NB)) = x rows (xt [Kp][MR], transposed) . blocks b0 .. b0 + NB - 1 of
// the panels at w (ps uint32 a panel) over all Kh k-pairs; the next lines of each panel touched are
// prefetched kPrefetch k-pairs ahead (as Avx2::micro).
template <int MR, int NB>
__attribute__((noinline)) void avx2_xtile(const float* xt, const uint32_t* w, int64_t ps, int64_t b0, int64_t Kh,
                                          float* c, int64_t ldc) {
  const __m256i hi_mask = _mm256_set1_epi32(int32_t(0xffff0000u));
  const uint32_t* wb[NB];
#pragma GCC unroll 16
  for (int v = 0; v < NB; ++v) wb[v] = w + ((b0 + v) >> 1) * ps + ((b0 + v) & 1) * 8;
  __m256 acc[MR][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NB; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t j = 0; j < Kh; ++j) {
#pragma GCC unroll 16
    for (int v = 0; v < NB; ++v)  // one prefetch a panel line: the blocks that start a panel, and the first
      if (v == 0 || ((b0 + v) & 1) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(wb[v] + (j + kPrefetch) * kPanel), _MM_HINT_T0);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const float* xk = xt + (2 * j + h) * MR;
      __m256 xb[MR];
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) xb[i] = _mm256_broadcast_ss(xk + i);
#pragma GCC unroll 16
      for (int v = 0; v < NB; ++v) {
        const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb[v] + j * kPanel));
        const __m256 wv = _mm256_castsi256_ps(h ? _mm256_and_si256(r, hi_mask) : _mm256_slli_epi32(r, 16));
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) acc[i][v] = _mm256_fmadd_ps(xb[i], wv, acc[i][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NB; ++v) _mm256_storeu_ps(c + i * ldc + v * 8, acc[i][v]);
}

// Rows of x (MR = 2 or 3, xt [Kp][MR]) @ panels [p0, p1) -> out (+ bias): the panels' 8-output blocks
// NB at a time (the rest at the end), avx2_xtile over all of K (no reuse of a chunk: one tile).
template <int MR, int NB>
void avx2_xrows(const float* xt, int64_t Kh, const uint32_t* w, int64_t N, int64_t p0, int64_t p1, const float* bias,
                float* out) {
  constexpr int64_t ldc = NB * 8;
  alignas(64) float c[MR * ldc];
  const int64_t ps = Kh * kPanel, b1 = 2 * p1;
  for (int64_t b = 2 * p0; b < b1; b += NB) {
    switch (std::min<int64_t>(NB, b1 - b)) {
#define CODESHELL_XTILE(R) \
  case R:                  \
    if constexpr (R <= NB) avx2_xtile<MR, R>(xt, w, ps, b, Kh, c, ldc); \
    break;
      CODESHELL_XTILE(1) CODESHELL_XTILE(2) CODESHELL_XTILE(3) CODESHELL_XTILE(4) CODESHELL_XTILE(5)
#undef CODESHELL_XTILE
      default: TORCH_CHECK(false, "bad block count");
    }
    const int64_t n0 = b * 8, cols = std::min<int64_t>(std::min<int64_t>(NB, b1 - b) * 8, N - n0);
    if (cols > 0) store_rows(c, ldc, MR, out, N, n0, cols, bias);
  }
}

// ---- AVX2 decode at M = 1, and x without a std::vector a call (session 34 helper B) ----------
// What: (1) M = 1 on a tile of its own (avx2_m1_tile<NP, kIn, kNext>: NP = 4 panels, per k x broadcast
// once, then per 8-output block one weight load, its widening and one FMA), in place of
// panels_small_m's Avx2::micro<1, 4> inlined into decode_panels' lambda; it prefetches the next tile's
// weight (NP panels, contiguous) into L2 spread evenly over this tile's k-pairs (NP lines a k-pair: the
// rate the tile reads), in place of each panel's own stream kPrefetch k-pairs ahead into L1, where a
// tile's weight is at most kAvx2M1NextMax (K <= 512; above it the stream prefetch as before);
// x itself is the tile's x when K == Kp (no copy), else a zero-padded copy in a per-thread scratch.
// (2) At M >= 2 x's transpose [Kp][M] goes to a per-thread scratch (csrc/scratch.h) in place of
// Avx2::prepare's new zero-filled std::vector a call.
// Switches (read per call through switches.h's cache; A/B runs; the same bits either way):
//   CODESHELL_BF16_AVX2_M1=0        M = 1 on the code before (Avx2::prepare + Avx2::micro<1, 4>)
//   CODESHELL_BF16_AVX2_M1_PF=0|1|2 M = 1's prefetch: 0 each panel's stream kPrefetch ahead into L1
//                                   (the code before's), 1 that and the next tile into L2, 2 the next
//                                   tile into L2 only; default: 2 where a tile's weight is at most
//                                   kAvx2M1NextMax bytes (K <= 512), else 0
//   CODESHELL_BF16_AVX2_XKEEP=0     M >= 2: x's transpose into a std::vector a call again
//   CODESHELL_BF16_AVX2_M1_SPLIT=0|1 M = 1's split over the threads (session 35, avx2_m1_owned below)
// Why (docs/kernels-log.md, session 34 helper B): the tile before was spill-free in this build (54
// instructions a k-pair, as this one's 54-57), but at K = 256 a tile's 4 panels are 32 KiB of
// contiguous weight whose stream prefetches land inside the tile and the next tile started cold:
// with the next tile in L2 codeshell-mini's M = 1 linears ran 1.10-1.15x (head 1.08-1.17x); x's
// std::vector cost ~1.2 us a call at M = 8 (16 x 256 weight: 4.0 against 5.2 us).
// Bits: every output is still one FMA chain over k = 0 .. Kp - 1 in order (even then odd k of each
// pair) from zero, over the same zero k rows past K: the same bits as Avx2::micro at every M
// (tests/kernels/test_bf16_avx2_m1.py, test_bf16_avx2_rows.py).
constexpr int kAvx2M1Panels = 4;  // 8 accumulators = 8 FMA chains: 4 cycles of latency x 2 pipes
// The next tile prefetched into L2 up to this tile size (4 panels x Kh k-pairs x 64 bytes): at K = 4096
// (512 KiB, all of Zen 3's L2) it read the small shape's mlp.c_proj 0.74x the code before (1 thread).
constexpr int64_t kAvx2M1NextMax = int64_t(64) << 10;

// c [16 NP] = x (Kp floats) . NP panels at w (ps uint32 a panel) over all Kh k-pairs; next: the next
// tile's first panel (contiguous) or null, prefetched over this tile's first next_kh k-pairs (NP lines
// a k-pair: next_kh = Kh for a full next tile of NP panels, Kh * n / NP for one of n panels).
template <int NP, bool kIn, bool kNext>
__attribute__((noinline)) void avx2_m1_tile(const float* x, const uint32_t* w, int64_t ps, int64_t Kh, float* c,
                                            const uint32_t* next, int64_t next_kh) {
  const __m256i hi_mask = _mm256_set1_epi32(int32_t(0xffff0000u));
  __m256 acc[NP][2];
#pragma GCC unroll 16
  for (int q = 0; q < NP; ++q) acc[q][0] = acc[q][1] = _mm256_setzero_ps();
  const char* nx = reinterpret_cast<const char*>(next);
  for (int64_t j = 0; j < Kh; ++j) {
    if constexpr (kIn) {
#pragma GCC unroll 16
      for (int q = 0; q < NP; ++q)
        _mm_prefetch(reinterpret_cast<const char*>(w + q * ps + (j + kPrefetch) * kPanel), _MM_HINT_T0);
    }
    if constexpr (kNext) {
      if (nx != nullptr && j < next_kh) {
#pragma GCC unroll 16
        for (int q = 0; q < NP; ++q) _mm_prefetch(nx + (j * NP + q) * 64, _MM_HINT_T1);
      }
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256 xb = _mm256_broadcast_ss(x + 2 * j + h);
#pragma GCC unroll 16
      for (int q = 0; q < NP; ++q)
#pragma GCC unroll 2
        for (int v = 0; v < 2; ++v) {
          const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * ps + j * kPanel + v * 8));
          const __m256 wv = _mm256_castsi256_ps(h ? _mm256_and_si256(r, hi_mask) : _mm256_slli_epi32(r, 16));
          acc[q][v] = _mm256_fmadd_ps(xb, wv, acc[q][v]);
        }
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < NP; ++q)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) _mm256_storeu_ps(c + q * kPanel + v * 8, acc[q][v]);
}

// M = 1: panels [p0, p1) of the weight -> out (+ bias), kAvx2M1Panels a tile (the rest in one
// smaller tile); pf: CODESHELL_BF16_AVX2_M1_PF. A tile prefetches the panels after it up to pend, never
// past it: p1 under parallel_chunks (the chunk after p1 is usually the other thread's: prefetched into
// this core's L2 it made codeshell-mini's c_fc 0.83x in the step, session 35), the weight's P under
// parallel_owned (the next step of this thread's own share; only a share's last tile crosses).
template <bool kIn, bool kNext>
void avx2_m1_panels(const float* x, int64_t Kh, const uint32_t* w, int64_t N, int64_t p0, int64_t p1, int64_t pend,
                    const float* bias, float* out) {
  constexpr int NP = kAvx2M1Panels;
  alignas(64) float c[NP * kPanel];
  const int64_t ps = Kh * kPanel;
  for (int64_t p = p0; p < p1; p += NP) {
    const int64_t np = std::min<int64_t>(NP, p1 - p), nn = std::min<int64_t>(NP, pend - p - np);
    const uint32_t* wp = w + p * ps;
    const uint32_t* next = nn > 0 ? wp + np * ps : nullptr;  // the next tile's nn panels
    const int64_t next_kh = nn > 0 ? Kh * nn / NP : 0;
    switch (np) {
      case 1: avx2_m1_tile<1, kIn, kNext>(x, wp, ps, Kh, c, nullptr, 0); break;
      case 2: avx2_m1_tile<2, kIn, kNext>(x, wp, ps, Kh, c, nullptr, 0); break;
      case 3: avx2_m1_tile<3, kIn, kNext>(x, wp, ps, Kh, c, nullptr, 0); break;
      default: avx2_m1_tile<NP, kIn, kNext>(x, wp, ps, Kh, c, next, next_kh); break;
    }
    const int64_t n0 = p * kPanel;
    store_rows(c, NP * kPanel, 1, out, N, n0, std::min<int64_t>(np * kPanel, N - n0), bias);
  }
}

void avx2_m1_rows(int64_t pf, const float* x, int64_t Kh, const uint32_t* w, int64_t N, int64_t p0, int64_t p1,
                  int64_t pend, const float* bias, float* out) {
  if (pf == 0) avx2_m1_panels<true, false>(x, Kh, w, N, p0, p1, pend, bias, out);
  else if (pf == 1) avx2_m1_panels<true, true>(x, Kh, w, N, p0, p1, pend, bias, out);
  else avx2_m1_panels<false, true>(x, Kh, w, N, p0, p1, pend, bias, out);
}

// Session 35 (helper B): M = 1 with the next-tile prefetch (pf != 0) on a weight over kAvx2M1OwnedMin
// bytes splits its panels by parallel_owned (parallel.h: one contiguous share a thread, in steps of
// P / (4 threads) panels, 4..64; a thread done with its share takes steps from the back of the other's)
// in place of parallel_chunks' ~8 chunks a thread taken in turn, and a step's last tile prefetches the
// next step's first tile. Why: codeshell-mini's head (16384 x 256, 8 MiB) inside the decode step at 2
// threads, 21 alternating rounds: 117.4 us against 124.3 (1.06x; docs/kernels-log.md, session 35 helper B);
// the K = 256 linears (<= 1 MiB) run a few chunks each and stay on parallel_chunks. K > 512 (the stream
// prefetch, the DRAM-sized small shape) stays as it was. The same tiles and chunk-independent sums:
// the same bits whichever thread runs a panel (tests/kernels/test_bf16_avx2_m1.py).
// CODESHELL_BF16_AVX2_M1_SPLIT (read per call through switches.h's cache): 0 parallel_chunks at every
// size (session 34's), 1 parallel_owned at every size and prefetch mode (tests), unset: the rule above.
constexpr int64_t kAvx2M1OwnedMin = int64_t(1) << 20;
bool avx2_m1_owned(int64_t pf, int64_t bytes) {
  const int64_t v = codeshell::env_int("CODESHELL_BF16_AVX2_M1_SPLIT", -1);
  if (v == 0 || v == 1) return v == 1;
  return pf != 0 && bytes > kAvx2M1OwnedMin;
}

// Panels [p0, p1) for M <= 3: NP at a time (the rest one at a time); c holds NP panels.
template <class Isa, int MR, int NP, bool kPf = true>
void panels_small_m(const typename Isa::X* x, int64_t Kh, const uint32_t* w, int64_t p0, int64_t p1, float* c,
                    const Emit& emit) {
  const int64_t ps = Kh * kPanel;  // uint32 per panel
  int64_t p = p0;
  for (; p + NP <= p1; p += NP) {
    Isa::template micro<MR, NP, kPf>(x, MR, w + p * ps, ps, 0, Kh, c, true);
    for (int q = 0; q < NP; ++q) emit(p + q, c + q * kPanel * kPanel);
  }
  for (; p < p1; ++p) {
    Isa::template micro<MR, 1, kPf>(x, MR, w + p * ps, ps, 0, Kh, c, true);
    emit(p, c);
  }
}

void check_panels(const torch::Tensor& w, int64_t N, int64_t K) {
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 2 * kPanel && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(),
              "bf16 weight must be contiguous bf16 panels [ceil(N/16), Kp/2, 32]");
  TORCH_CHECK(N > 0 && (N + kPanel - 1) / kPanel == w.size(0), "N=", N, " does not match ", w.size(0), " panels");
  TORCH_CHECK(w.size(1) * 2 == padded_k(K), "panels hold ", w.size(1) * 2, " k, expected K=", K,
              " padded to ", padded_k(K));
}

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
              "bias must be a contiguous fp32 tensor with ", N, " elements");
  return bias->data_ptr<float>();
}

// ---- AVX2 batched decode on gemm_fma.h's register block (session 32 helper B) ----------------
// What: decode_bf16 at isa kAvx2 for M >= kAvx2BlockMinM rows (default; CODESHELL_BF16_AVX2_BLOCK=<min
// M>, 0 = off: Avx2::micro's tiles at every M, the path before): x's rows split into near-equal tiles
// of <= 6 (even_tiles), each tile packed once per call as gemm_fma.h's x pack ([Kp / 8][mr][8], a
// vector copy of each row's 8 k: no transpose), and per panel and K chunk (kc k) the panel's chunk
// widened once to fp32 (fma_gemm::widen, [kc][16], 16 KiB at kc = 256: L1) and run by every tile
// through fma_gemm::block<V256, mr, 2> (the prefill GEMM's 6 x 16 block: per k 2 weight loads, mr
// broadcasts, 2 mr FMAs, no widening in the inner loop).
// Why: Avx2::micro widens the panel's bf16 pairs in registers again for every tile (4 integer ops a
// k-pair a tile, two of them shifts) and reads x from the transposed [Kp][M] copy (prepare's scalar
// transpose, a std::vector a call). Measured (1 thread, docs/kernels-log.md session 32 helper B): at
// tiles of 6 rows Avx2::micro ran 42-66% of the fp32-FMA ceiling and this block 62-93% (a verify step
// of 24 rows 1.26x faster); at 4..11 rows the block lost (25-45%: its widening pass is not overlapped
// with the FMAs, and 4-row tiles are 8 chains either way), hence kAvx2BlockMinM = 12.
// Bits: each (row, output) is one FMA chain over k = 0 .. Kp - 1 in order from zero, as
// Avx2::micro's (even then odd k of each pair) and `avx2:gemm`'s: the same bits at every M and
// tile (tests/kernels/test_bf16_avx2_rows.py: every M in 1..64 against M = 1 rows and against
// CODESHELL_BF16_AVX2_BLOCK=0).
constexpr int64_t kAvx2BlockMinM = 12;
// Session 33 helper B: with Avx2::micro's tiles out of line (no spills, panel_product's s33) the tiles
// beat this block up to ~30 rows (1 thread, thread CPU time, same minute: codeshell-mini M = 12 / 14 /
// 16 / 24 / 30 1.19 / 1.20 / 1.13 / 1.07 / 1.05x, the small shape M = 12 / 16 / 24 1.21 / 1.16 / 1.09x;
// M = 36 within 3% either way; M = 48 / 64 the block 1.03 / 1.09x): the block from 32 rows then
// (CODESHELL_BF16_AVX2_BLOCK still sets it; CODESHELL_BF16_AVX2_SMALL=0: 12, the threshold before).
constexpr int64_t kAvx2BlockMinM33 = 32;
constexpr int64_t kAvx2BlockKC = 256;  // k per chunk (a multiple of 32): [256][16] fp32 = 16 KiB

template <int R>
inline void avx2_block_tile(const float* a, const float* b, int64_t kc, float* c, bool first) {
  fma_gemm::block<fma_gemm::V256, R, 2>(a, b, kc, c, kPanel, first, nullptr);
}

void avx2_block_rows(const float* x, int64_t M, int64_t K, int64_t Kp, const uint32_t* wp, int64_t N,
                     const float* bias, float* op) {
  using V = fma_gemm::V256;
  const int64_t Kh = Kp / 2, P = (N + kPanel - 1) / kPanel;
  const int64_t KC = std::max<int64_t>(32, codeshell::env_int("CODESHELL_BF16_AVX2_KC", kAvx2BlockKC) / 32 * 32);
  const int64_t wpf = codeshell::env_int("CODESHELL_BF16_AVX2_WPF", 1);  // 0 none, 1 into L2, 2 into L1
  int8_t sizes[kMaxRows];
  const int nt = even_tiles(M, Avx2::kTileRows, sizes);
  // x packed by tiles: tile t (rows r0 .. r0 + mr - 1) at xp + r0 * Kp as [Kp / 8][mr][8], zero k >= K
  static thread_local codeshell::ThreadScratch x_keep;
  codeshell::Scratch<float> xs(x_keep, size_t(M) * Kp);
  float* xp = xs.data();
  for (int t = 0, r0 = 0; t < nt; r0 += sizes[t++]) {
    const int mr = sizes[t];
    float* d = xp + r0 * Kp;
    for (int64_t k = 0; k < Kp; k += 8)
      for (int i = 0; i < mr; ++i) {
        const float* s = x + (r0 + i) * K + k;
        float* dv = d + k * mr + i * 8;
        if (k + 8 <= K) {
          V::store(dv, V::loadu(s));
        } else {
          for (int l = 0; l < 8; ++l) dv[l] = k + l < K ? s[l] : 0.f;
        }
      }
  }
  codeshell::parallel_chunks(P, 4, 4, [&](int64_t p0, int64_t p1) {
    static thread_local codeshell::ThreadScratch b_keep;
    codeshell::Scratch<float> bs(b_keep, size_t(KC) * kPanel);
    float* bw = bs.data();
    alignas(64) float c[kMaxRows * kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t k0 = 0; k0 < Kp; k0 += KC) {
        const int64_t kc = std::min(KC, Kp - k0);
        fma_gemm::widen<V, 2>(wp + p * Kh * kPanel, Kh * kPanel, 1, k0 / 2, kc, bw);
        // The chunk widened next (this panel's next chunk, else the next panel's first: the
        // panels are one stream) prefetched a line (a k-pair) at a time, spread over the tiles.
        const uint32_t* wn = nullptr;
        int64_t lines = 0, per = 0, l = 0;
        if (wpf) {
          const int64_t kn = k0 + KC < Kp ? k0 + KC : 0, pn = k0 + KC < Kp ? p : p + 1;
          if (pn < p1) {
            wn = wp + (pn * Kh + kn / 2) * kPanel;
            lines = std::min(KC, Kp - kn) / 2;
            per = (lines + nt - 1) / nt;
          }
        }
        for (int t = 0, r0 = 0; t < nt; r0 += sizes[t++]) {
          for (int64_t e = std::min(lines, l + per); l < e; ++l) {
            if (wpf == 2) _mm_prefetch(reinterpret_cast<const char*>(wn + l * kPanel), _MM_HINT_T0);
            else _mm_prefetch(reinterpret_cast<const char*>(wn + l * kPanel), _MM_HINT_T1);
          }
          const float* a = xp + r0 * Kp + k0 * sizes[t];
          float* cm = c + r0 * kPanel;
          switch (sizes[t]) {
            case 1: avx2_block_tile<1>(a, bw, kc, cm, k0 == 0); break;
            case 2: avx2_block_tile<2>(a, bw, kc, cm, k0 == 0); break;
            case 3: avx2_block_tile<3>(a, bw, kc, cm, k0 == 0); break;
            case 4: avx2_block_tile<4>(a, bw, kc, cm, k0 == 0); break;
            case 5: avx2_block_tile<5>(a, bw, kc, cm, k0 == 0); break;
            default: avx2_block_tile<6>(a, bw, kc, cm, k0 == 0); break;
          }
        }
      }
      const int64_t n0 = p * kPanel;
      store_rows(c, kPanel, M, op, N, n0, std::min(kPanel, N - n0), bias);
    }
  });
}

template <class Isa>
void decode_panels(const torch::Tensor& x, const uint32_t* wp, int64_t N, int64_t Kp, const float* b, float* op) {
  const int64_t M = x.size(0), Kh = Kp / 2, P = (N + kPanel - 1) / kPanel;
  // AVX2 at M >= 2: the session-33 tiles (avx2_xrows at M = 2 / 3, Avx2::micro's tiles out of line,
  // gemm_fma.h's block from kAvx2BlockMinM33 rows); CODESHELL_BF16_AVX2_SMALL=0: the code before
  // (inlined tiles, the block from 12 rows; A/B runs; the same bits either way)
  const bool small33 = std::is_same_v<Isa, Avx2> && M >= 2 && codeshell::env_flag("CODESHELL_BF16_AVX2_SMALL", true);
  if constexpr (std::is_same_v<Isa, Avx2>) {
    const int64_t from =
        codeshell::env_int("CODESHELL_BF16_AVX2_BLOCK", small33 ? kAvx2BlockMinM33 : kAvx2BlockMinM);
    if (from > 0 && M >= from) {
      avx2_block_rows(x.data_ptr<float>(), M, x.size(1), Kp, wp, N, b, op);
      return;
    }
  }
#if CODESHELL_HAVE_AVX512
  // Avx512Fma at 4..64 rows: panel_bf16_rows.h's tiles (CODESHELL_BF16_ROWS=0: the tiles below at
  // every M; CODESHELL_BF16_ROWS_MAX=16: them above 16 rows, session 25's split). Same bits either way.
  // Their x is packed per tile straight from x (fma_rows::pack), in place of prepare's transpose.
  bool rows16 = false;
  fma_rows::Plan rows_plan{};
  std::unique_ptr<float[]> x_tiles;
  if constexpr (std::is_same_v<Isa, Avx512Fma>) {
    rows16 = M >= 4 && M <= std::min<int64_t>(kMaxRows, codeshell::env_int("CODESHELL_BF16_ROWS_MAX", kMaxRows)) &&
             codeshell::env_flag("CODESHELL_BF16_ROWS", true);
    if (rows16) {
      rows_plan = fma_rows::plan(M);
      x_tiles = fma_rows::pack(rows_plan, x.data_ptr<float>(), M, x.size(1), Kp);
    }
  }
  // Bf16Dot at 9..64 rows: panel_bf16_dot_rows.h's tiles (CODESHELL_BF16_DOT_ROWS=0: the 8-row tiles
  // below). Same bits either way.
  dot_rows::Plan dot_plan{};
  if constexpr (std::is_same_v<Isa, Bf16Dot>) dot_plan = dot_rows::plan(M);
#else
  constexpr bool rows16 = false;
#endif
  // AVX2 (session 34): x at M = 1 as it is (K == Kp) or padded, at M >= 2 transposed, in a per-thread
  // scratch; CODESHELL_BF16_AVX2_M1=0 / CODESHELL_BF16_AVX2_XKEEP=0: Avx2::prepare's vector (see above)
  const bool m1_34 = std::is_same_v<Isa, Avx2> && M == 1 && codeshell::env_flag("CODESHELL_BF16_AVX2_M1", true);
  const bool keep34 = std::is_same_v<Isa, Avx2> && (m1_34 || (M >= 2 && codeshell::env_flag("CODESHELL_BF16_AVX2_XKEEP", true)));
  const int64_t m1_pf =
      m1_34 ? codeshell::env_int("CODESHELL_BF16_AVX2_M1_PF", kAvx2M1Panels * Kh * 64 <= kAvx2M1NextMax ? 2 : 0) : 0;
  static thread_local codeshell::ThreadScratch xt_keep;
  codeshell::Scratch<float> xt_s(xt_keep, keep34 ? size_t(Kp) * M : 0);
  const typename Isa::X* xp = nullptr;
  decltype(Isa::prepare(x, Kp)) xv;
  if constexpr (std::is_same_v<Isa, Avx2>) {
    if (keep34) {
      const float* xs = x.data_ptr<float>();
      if (M == 1 && x.size(1) == Kp) {
        xp = xs;  // [Kp][1] is x itself
      } else {
        avx2_transpose_x(xs, M, x.size(1), Kp, xt_s.data());
        xp = xt_s.data();
      }
    }
  }
  if (xp == nullptr) {
    if (!rows16) xv = Isa::prepare(x, Kp);
    xp = xv.data();
  }
  // M = 1: the weight is streamed once, so the kernel is bound by reads; NP panels in flight
  // are NP read streams and NP independent vdpbf16ps chains (one chain per panel: row
  // invariance). Two schedules, by the CPU they were measured on:
  //   * with AMX (Sapphire Rapids, where this path runs only under CODESHELL_KERNEL_ISA's cap):
  //     NP = 8 and the software prefetch kPrefetch k-pairs ahead on every stream. Per core, 7B
  //     shapes, caches flushed, medians of 3 alternating processes: NP = 8 c_attn 4.69 ms,
  //     attn.c_proj 3.31, c_fc 11.45, mlp.c_proj 11.03, against 4.58 / 3.37 / 12.37 / 12.24 for
  //     the earlier 2 chains x 4 panels; NP = 4 (one chain) 4.86 / 3.52 / 12.10 / 10.54 and
  //     NP = 12 6.15 / 3.42 / 11.59 / 12.42 (the machine was shared: +-15%).
  //   * without AMX (measured on Zen 5, 2 threads): NP = 4 and no software prefetch, the
  //     hardware prefetchers alone. The prefetch was what held the old schedule back: at NP = 8
  //     it read 49-51 GB/s on the 7B shapes, without it 58-60, NP = 4 without it 62-64, where
  //     read_stream read 63-69 in the same rounds; NP = 4 with the prefetch 58-61, NP = 2, 6, 12,
  //     16 without it and prefetch to L2 / non-temporal / 32-256 k-pairs ahead no better
  //     (docs/kernels-log.md, session 14 helper A).
  // Both sum each (row, output) the same way (one chain per panel, k-pairs in order): only
  // which panels share a pass and the prefetch differ, so a row's bits are the same either way.
  constexpr bool kDot = !std::is_same_v<Isa, Avx2>;
  static const bool amx = codeshell::cpu_features().amx_bf16;  // the CPU kind (cpuid), not the OS permission
  const bool lean = kDot && !amx;              // NP = 4 without software prefetch
  const int64_t np1 = kDot && amx ? 8 : 4;     // AVX2: 2 ymm per panel, 16 registers: NP = 4
#if CODESHELL_HAVE_AVX512
  if constexpr (kDot) {
    const int64_t hint = M > 3 ? codeshell::bf16_far_prefetch_hint().load(std::memory_order_relaxed) : 0;
    far_prefetch_k().store(M > 3 ? codeshell::env_int("CODESHELL_BF16_PF2", hint) : 0, std::memory_order_relaxed);
  }
#endif
  // AVX2 at M >= 4: near-equal row tiles (even_tiles); CODESHELL_BF16_AVX2_EVEN=0: the old split (A/B)
  int8_t sizes_buf[kMaxRows];
  const int8_t* sizes = nullptr;
  if constexpr (std::is_same_v<Isa, Avx2>)
    if (M >= 4 && codeshell::env_flag("CODESHELL_BF16_AVX2_EVEN", true)) {
      even_tiles(M, Isa::kTileRows, sizes_buf);
      sizes = sizes_buf;
      // EXPERIMENT (A/B runs): CODESHELL_BF16_AVX2_TILES=<digits>, e.g. 53: tiles of 5 then 3 rows
      // when the digits (each 1..6) sum to M. The same bits (one chain per output whatever the tile).
      int64_t d = codeshell::env_int("CODESHELL_BF16_AVX2_TILES", 0), sum = 0, n = 0;
      int8_t dig[kMaxRows];
      for (; d > 0 && n < kMaxRows; d /= 10) sum += dig[n++] = int8_t(d % 10);
      bool ok = sum == M;
      for (int64_t i = 0; i < n; ++i) ok = ok && dig[i] >= 1 && dig[i] <= Isa::kTileRows;
      if (ok)
        for (int64_t i = 0; i < n; ++i) sizes_buf[i] = dig[n - 1 - i];
    }
  if constexpr (std::is_same_v<Isa, Avx2>) {
    if (m1_34 && avx2_m1_owned(m1_pf, P * Kh * 64)) {
      const int64_t T = std::max<int64_t>(1, codeshell::current_threads());
      const int64_t step = std::clamp<int64_t>(P / (4 * T) / kAvx2M1Panels * kAvx2M1Panels, kAvx2M1Panels, 64);
      codeshell::parallel_owned(P, kAvx2M1Panels, step, [&](int64_t p0, int64_t p1) {
        avx2_m1_rows(m1_pf, xp, Kh, wp, N, p0, p1, P, b, op);
      });
      return;
    }
  }
#if CODESHELL_HAVE_AVX512
  if constexpr (std::is_same_v<Isa, Bf16Dot>)
    if (M == 1 && lean) {  // panel_bf16_m1.h: the same bits as panels_small_m<Bf16Dot, 1, 4, false>
      bf16m1::run(xp, Kh, wp, N, P, b, op);
      return;
    }
#endif
  codeshell::parallel_chunks(P, M == 1 ? np1 : 4, M == 1 ? np1 : 4, [&](int64_t p0, int64_t p1) {
    if constexpr (std::is_same_v<Isa, Avx2>) {
      if (m1_34) return avx2_m1_rows(m1_pf, xp, Kh, wp, N, p0, p1, p1, b, op);
      if (small33 && M == 2) return avx2_xrows<2, 5>(xp, Kh, wp, N, p0, p1, b, op);
      if (small33 && M == 3) return avx2_xrows<3, 3>(xp, Kh, wp, N, p0, p1, b, op);
    }
    alignas(64) float c[std::max<int64_t>(kMaxRows, 8 * kPanel) * kPanel];  // also NP panels x 16 rows for M <= 3
    const Emit emit = [&](int64_t p, const float* cp) {  // c rows of panel p -> out[:, 16p : 16p+16) + bias
      const int64_t n0 = p * kPanel;
      store_rows(cp, kPanel, M, op, N, n0, std::min(kPanel, N - n0), b);
    };
    if (M == 1 && lean) panels_small_m<Isa, 1, 4, false>(xp, Kh, wp, p0, p1, c, emit);
    else if (M == 1 && kDot) panels_small_m<Isa, 1, 8>(xp, Kh, wp, p0, p1, c, emit);
    else if (M == 1) panels_small_m<Isa, 1, 4>(xp, Kh, wp, p0, p1, c, emit);
    else if (M == 2) panels_small_m<Isa, 2, 3>(xp, Kh, wp, p0, p1, c, emit);
    else if (M == 3) panels_small_m<Isa, 3, 2>(xp, Kh, wp, p0, p1, c, emit);
#if CODESHELL_HAVE_AVX512
    else if (rows16) {
      if constexpr (std::is_same_v<Isa, Avx512Fma>) fma_rows::run(rows_plan, x_tiles.get(), M, Kh, wp, p0, p1, c, emit);
    } else if (dot_plan.tiles > 0) {
      if constexpr (std::is_same_v<Isa, Bf16Dot>) dot_rows::run(dot_plan, xp, M, Kh, wp, p0, p1, c, emit);
    }
#endif
    else {
      int64_t p = p0;
      if constexpr (kDot) {  // two panels at a time (the Bf16Dot tile: 8 rows x 2 panels)
        if (M <= kPanel)
          for (; p + 2 <= p1; p += 2) {
            panel_product<Isa, 2>(xp, M, Kh, wp + p * Kh * kPanel, c, Kh * kPanel);
            emit(p, c);
            emit(p + 1, c + kPanel * kPanel);
          }
      }
      for (; p < p1; ++p) {
        panel_product<Isa>(xp, M, Kh, wp + p * Kh * kPanel, c, 0, sizes, small33);
        emit(p, c);
      }
    }
  });
}

}  // namespace

// (the vdpbf16ps GEMMs first: the AMX prefill shares their bf16 / GELU epilogues, session 37)
#include "prefill_bf16_avx512.h"  // ---- vdpbf16ps and AVX-512 fp32-FMA prefill GEMMs

#include "panel_bf16_amx.h"  // ---- AMX-BF16 prefill and decode tiles

// Runs peak_dot on every thread at once; returns the flops done (the caller times the call).
int64_t bf16_dot_peak(int64_t reps) {
  codeshell::check_isa(codeshell::kAvx512Bf16);
  std::atomic<int64_t> flops{0};
#if CODESHELL_HAVE_AVX512
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) flops += peak_dot(reps);
  });
#endif
  return flops.load();
}

// vdpbf16ps: bf16 x [M, K] @ panels^T + bias -> fp32 [M, N], any M (ops.py: `avx512_bf16:gemm`);
// gelu: bf16 gelu_tanh of that, rounded to bf16 first (the model's c_fc + fused_gelu_tanh in one);
// out_bf16 (without gelu): that fp32 result rounded to bf16 (as `.to(torch.bfloat16)`), bf16 [M, N].
torch::Tensor prefill_bf16_dot(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                               const c10::optional<torch::Tensor>& bias, bool gelu, bool out_bf16) {
  codeshell::check_isa(codeshell::kAvx512Bf16);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16,
              "x must be a contiguous bf16 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1);
  check_panels(w, N, K);
  const float* b = bias_ptr(bias, N);
  // large results reuse freed blocks (scratch.h); the bf16 GELU output is half the fp32 size
  const bool b16 = gelu || out_bf16;
  auto out = b16 ? codeshell::cached_output(1, (M * N + 1) / 2, x.options()).view(torch::kBFloat16)
                       .narrow(1, 0, M * N).view({M, N})
                 : codeshell::cached_output(M, N, x.options());
#if CODESHELL_HAVE_AVX512
  if (M > 0) {
    uint16_t* ob = b16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
    prefill_dot(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K,
                reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>()), N, b,
                b16 ? nullptr : out.data_ptr<float>(), gelu ? ob : nullptr, gelu ? nullptr : ob);
  }
#endif
  return out;
}

namespace {
// The AVX2 fp32-FMA ceiling of one thread: `reps` passes of Avx2::micro's register block (6 rows x
// 1 panel, 12 ymm accumulators; `avx2:panel`, the bf16 path of AVX2-only CPUs) over one k-block
// of L1-resident operands (128 k-pairs: 8 KiB of bf16 panel, 6 KiB of x). Returns the flops done.
int64_t peak_fma_avx2(int64_t reps) {
  constexpr int64_t Kh = 128, MR = Avx2::kTileRows;
  std::vector<uint32_t> w(size_t(Kh) * kPanel, 0x3f803f80u);  // pairs of 1.0 in bf16
  std::vector<float> xt(size_t(2 * Kh) * MR, 0.f);             // zeros: the sums stay finite
  alignas(64) float c[MR * kPanel];
  for (int64_t r = 0; r < reps; ++r) {
    Avx2::micro<MR, 1, false>(xt.data(), MR, w.data(), 0, 0, Kh, c, r == 0);
    __asm__ volatile("" ::"r"(c) : "memory");
  }
  return reps * Kh * 2 * MR * kPanel * 2;
}
}  // namespace

// Runs the fp32-FMA ceiling (isa kAvx2: peak_fma_avx2; kAvx512Vnni: peak_fma, prefill_fma's block)
// on every thread at once; returns the flops done (the caller times the call).
int64_t bf16_fma_peak(int64_t reps, int64_t isa) {
  codeshell::check_isa(isa);
  TORCH_CHECK(isa == codeshell::kAvx2 || isa == codeshell::kAvx512Vnni, "bf16_fma_peak: isa 0 or 1");
  std::atomic<int64_t> flops{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
#if CODESHELL_HAVE_AVX512
      if (isa == codeshell::kAvx512Vnni) {
        flops += peak_fma(reps);
        continue;
      }
#endif
      flops += peak_fma_avx2(reps);
    }
  });
  return flops.load();
}

// fp32 FMA: x [M, K] (bf16 or fp32) @ panels^T + bias -> fp32 [M, N]. isa 1 (AVX-512F, any AVX-512
// CPU; ops.py `avx512_vnni:gemm`): prefill_fma, gelu / out_bf16 as prefill_bf16_dot's; isa 0 (AVX2,
// `avx2:gemm`): gemm_fma.h's GEMM on 256-bit vectors, fp32 out only.
torch::Tensor prefill_bf16_fma(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                               const c10::optional<torch::Tensor>& bias, bool gelu, bool out_bf16, int64_t isa) {
  TORCH_CHECK(isa == codeshell::kAvx2 || isa == codeshell::kAvx512Vnni, "prefill_bf16_fma: isa 0 (avx2) or 1, got ", isa);
  codeshell::check_isa(isa);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32),
              "x must be a contiguous bf16 or fp32 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1);
  check_panels(w, N, K);
  const float* b = bias_ptr(bias, N);
  if (isa == codeshell::kAvx2) {  // gemm_fma.h on 256-bit vectors: fp32 out only
    TORCH_CHECK(!gelu && !out_bf16, "prefill_bf16_fma: the AVX2 GEMM (isa 0) writes fp32 only (no gelu / out_bf16)");
    auto out = codeshell::cached_output(M, N, x.options().dtype(torch::kFloat32));
    if (M > 0)
      fma_gemm::run<fma_gemm::V256, Avx2::kTileRows, 2>(x.data_ptr(), x.scalar_type() == torch::kBFloat16, M, K,
                                                         reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>()),
                                                         N, b, out.data_ptr<float>());
    return out;
  }
  const bool b16 = gelu || out_bf16;
  auto out = b16 ? codeshell::cached_output(1, (M * N + 1) / 2, x.options().dtype(torch::kFloat32))
                       .view(torch::kBFloat16).narrow(1, 0, M * N).view({M, N})
                 : codeshell::cached_output(M, N, x.options().dtype(torch::kFloat32));
#if CODESHELL_HAVE_AVX512
  if (M > 0) {
    uint16_t* ob = b16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
    prefill_fma(x.data_ptr(), x.scalar_type() == torch::kBFloat16, M, K,
                reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>()), N, b,
                b16 ? nullptr : out.data_ptr<float>(), gelu ? ob : nullptr, gelu ? nullptr : ob);
  }
#endif
  return out;
}

// Runs peak_amx on every thread at once; returns the flops done (the caller times the call).
int64_t bf16_peak(int64_t Kt, int64_t reps, bool loads) {
  codeshell::check_isa(codeshell::kAmx);
  std::atomic<int64_t> flops{0};
#if CODESHELL_HAVE_AVX512
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) flops += peak_amx(Kt, reps, loads);
  });
#endif
  return flops.load();
}

// x [M, K] (fp32 for isa kAvx2, bf16 for kAvx512Bf16) @ panels^T + bias -> fp32 [M, N], M <= 64.
torch::Tensor decode_bf16(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                          const c10::optional<torch::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  check_panels(w, N, x.size(1));  // before N sizes the result
  auto out = torch::empty({x.size(0), N}, x.options().dtype(torch::kFloat32));
  decode_bf16_out(x, w, N, bias, isa, out);  // the other checks
  return out;
}

// AMX-BF16: bf16 x [M, K] @ panels^T + bias -> fp32 [M, N], any M; gelu / out_bf16 (M > 16 only:
// the prefill schedule's epilogue) as prefill_bf16_dot's: bf16 [M, N], the GELU'd or rounded result.
torch::Tensor prefill_bf16_amx(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                               const c10::optional<torch::Tensor>& bias, bool gelu, bool out_bf16) {
  codeshell::check_isa(codeshell::kAmx);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16,
              "x must be a contiguous bf16 [M, K] tensor");
  check_panels(w, N, x.size(1));  // before N sizes the result
  if (!gelu && !out_bf16) {
    auto out = codeshell::cached_output(x.size(0), N, x.options());  // large results reuse freed blocks (scratch.h)
    prefill_bf16_amx_out(x, w, N, bias, out);
    return out;
  }
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M > 16, "prefill_bf16_amx: gelu / out_bf16 take M > 16 (the prefill tiles), got M = ", M);
  const float* b = bias_ptr(bias, N);
  auto out = codeshell::cached_output(1, (M * N + 1) / 2, x.options().dtype(torch::kFloat32))
                 .view(torch::kBFloat16).narrow(1, 0, M * N).view({M, N});
#if CODESHELL_HAVE_AVX512
  uint16_t* ob = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  prefill_amx(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K,
              reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), N, b, nullptr, gelu ? ob : nullptr,
              gelu ? nullptr : ob);
#endif
  return out;
}

// Rows [n0, n1) of the weight (n0 a multiple of 16) as fp32 into out, K-major: out[k * R + j]
// = W[n0 + j, k] with R = n1 - n0, i.e. the block's transpose, which sgemm takes as is.
void dequant_bf16(const torch::Tensor& w, int64_t N, int64_t K, int64_t n0, int64_t n1, torch::Tensor& out) {
  check_panels(w, N, K);
  const int64_t R = n1 - n0, Kh = w.size(1);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N && n0 % kPanel == 0, "bad row range [", n0, ", ", n1, ")");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() >= R * K,
              "out buffer too small");
  const auto* wp = reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const int64_t pa = n0 / kPanel, pb = (n1 + kPanel - 1) / kPanel;
  const __m256i hi_mask = _mm256_set1_epi32(int32_t(0xffff0000u));
  at::parallel_for(0, (K + 1) / 2, 128, [&](int64_t j0, int64_t j1) {
    alignas(32) float tmp[kPanel];
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t p = pa; p < pb; ++p) {
        const uint32_t* src = wp + (p * Kh + j) * kPanel;
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 8));
        const int64_t cols = std::min(kPanel, n1 - p * kPanel);
        for (int h = 0; h < 2 && 2 * j + h < K; ++h) {
          const __m256 lo = _mm256_castsi256_ps(h ? _mm256_and_si256(v0, hi_mask) : _mm256_slli_epi32(v0, 16));
          const __m256 hi = _mm256_castsi256_ps(h ? _mm256_and_si256(v1, hi_mask) : _mm256_slli_epi32(v1, 16));
          float* o = op + (2 * j + h) * R + (p - pa) * kPanel;
          if (cols == kPanel) {
            _mm256_storeu_ps(o, lo);
            _mm256_storeu_ps(o + 8, hi);
          } else {
            _mm256_store_ps(tmp, lo);
            _mm256_store_ps(tmp + 8, hi);
            std::memcpy(o, tmp, size_t(cols) * sizeof(float));
          }
        }
      }
  });
}

// Rows [n0, n1) of the weight as a row-major bf16 [R, K] tensor (for torch's bf16 matmul and
// embedding lookups by rows): a transpose of 32-bit k-pairs.
void rows_bf16(const torch::Tensor& w, int64_t N, int64_t K, int64_t n0, int64_t n1, torch::Tensor& out) {
  check_panels(w, N, K);
  const int64_t R = n1 - n0, Kh = w.size(1);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N, "bad row range [", n0, ", ", n1, ")");
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 && out.is_contiguous() && out.numel() >= R * K,
              "out buffer must be contiguous bf16 with >= ", R * K, " elements");
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      codeshell::copy_panel_row(codeshell::panel_row(wp, Kh, n), K, op + (n - n0) * K);
    }
  });
}

// Rows ids[0..R) of the weight (any order, repeats allowed) as bf16 into out [R, K]: the tied
// embedding's lookup of a prompt's tokens from the output head's panels (module.py PackedEmbedding).
// A row's K values are Kh k-pairs 64 bytes apart (one line each), so a row is Kh line reads
// (512 at K = 1024) from anywhere in the weight (144 MB at the small shape): the lines of the next
// row are prefetched while this one is copied, and the rows split over the threads. Why: the torch
// gather of the same rows (packing.bf16_rows: advanced indexing, 4 bytes an element) took 1.3 ms
// of a 512-token small-shape prompt and 0.18 ms of codeshell-mini's 256 (docs/kernels-log.md, session 21 B).
void gather_bf16(const torch::Tensor& w, int64_t N, int64_t K, const torch::Tensor& ids, torch::Tensor& out) {
  check_panels(w, N, K);
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.dim() == 1 && ids.is_contiguous(), "ids must be int64 [R]");
  const int64_t R = ids.size(0), Kh = w.size(1);
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 && out.is_contiguous() && out.numel() >= R * K,
              "out buffer must be contiguous bf16 with >= ", R * K, " elements");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK_INDEX(0 <= id[i] && id[i] < N, "token id ", id[i], " is out of range for an embedding of ", N, " rows");
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  auto row = [&](int64_t n) { return codeshell::panel_row(wp, Kh, n); };
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const char* next = i + 1 < r1 ? reinterpret_cast<const char*>(row(id[i + 1])) : nullptr;
      codeshell::copy_panel_row(row(id[i]), K, op + i * K, next);
    }
  });
}

// The panel layout of a contiguous bf16 W [N, K] (what packing.panels_torch computes with torch
// ops, ~10x slower: a 7B model spent ~20 s of its load there).
torch::Tensor pack_bf16(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(),
              "weight must be a contiguous bf16 [N, K] tensor");
  const int64_t N = w.size(0), K = w.size(1), P = (N + kPanel - 1) / kPanel, Kh = padded_k(K) / 2;
  auto out = torch::zeros({P, Kh, 2 * kPanel}, w.options());
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // k-pairs outer, the panel's 16 rows inner: each k-pair's 64 bytes are written together from
  // 16 sequential row streams; row-outer order wrote 2 bytes at a stride of 64 (7B c_fc, 1 core:
  // 58-63 ms against 83-87). It runs at model load and for every int8/int4 block of an AMX prefill.
  const int64_t Kfull = K / 2;  // complete pairs
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t rows = std::min(kPanel, N - p * kPanel);
      const uint16_t* base = src + p * kPanel * K;
      uint32_t* o = reinterpret_cast<uint32_t*>(dst + p * Kh * 32);
      for (int64_t j = 0; j < Kfull; ++j)
        for (int64_t r = 0; r < rows; ++r) {
          uint32_t v;
          std::memcpy(&v, base + r * K + 2 * j, 4);
          o[j * kPanel + r] = v;
        }
      if (K & 1)
        for (int64_t r = 0; r < rows; ++r) dst[p * Kh * 32 + Kfull * 32 + 2 * r] = base[r * K + K - 1];
    }
  });
  return out;
}

// ---- Output-buffer variants (helper B, session 12: the native decode step's per-step buffers) ----
// decode_bf16 and prefill_bf16_amx writing into the caller's contiguous fp32 buffer `out` (at
// least M * N values; row m at out + m * N) instead of a new tensor: csrc/decode_step.cpp
// reuses one buffer per linear output across steps. The same checks and kernels as above.
void decode_bf16_out(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                     const c10::optional<torch::Tensor>& bias, int64_t isa, torch::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1);
  check_panels(w, N, K);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "decode_bf16 takes 1..", kMaxRows, " rows of x, got ", M);
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() >= M * N,
              "out must be a contiguous fp32 buffer of >= M * N values");
  const float* b = bias_ptr(bias, N);
  const auto* wp = reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>());
  if (isa == codeshell::kAvx2) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "the AVX2 bf16 kernel takes fp32 x");
    decode_panels<Avx2>(x, wp, N, padded_k(K), b, out.data_ptr<float>());
    return;
  }
  if (isa == codeshell::kAvx512Vnni) {  // AVX-512F fp32 FMA (Avx512Fma): the same bits as kAvx2
    codeshell::check_isa(isa);
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "the AVX-512 FMA bf16 kernel takes fp32 x");
#if CODESHELL_HAVE_AVX512
    decode_panels<Avx512Fma>(x, wp, N, padded_k(K), b, out.data_ptr<float>());
#endif
    return;
  }
  TORCH_CHECK(isa == codeshell::kAvx512Bf16, "decode_bf16: isa must be avx2 (0), avx512_vnni (1) or avx512_bf16 (2), got ", isa);
  codeshell::check_isa(isa);
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "the AVX512-BF16 kernel takes bf16 x");
#if CODESHELL_HAVE_AVX512
  decode_panels<Bf16Dot>(x, wp, N, padded_k(K), b, out.data_ptr<float>());
#endif
}

void prefill_bf16_amx_out(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                          const c10::optional<torch::Tensor>& bias, torch::Tensor& out) {
  codeshell::check_isa(codeshell::kAmx);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16,
              "x must be a contiguous bf16 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1);
  check_panels(w, N, K);
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() >= M * N,
              "out must be a contiguous fp32 buffer of >= M * N values");
  const float* b = bias_ptr(bias, N);
#if CODESHELL_HAVE_AVX512
  prefill_amx(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K,
              reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), N, b, out.data_ptr<float>());
#endif
}
