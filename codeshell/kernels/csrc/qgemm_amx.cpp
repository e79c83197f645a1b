// AMX-INT8 prefill for int8 and int4 weights: y[M, N] = x[M, K] @ W^T (+ bias), x rounded to int8.
//
// What this is: the prefill (large M) counterpart of qdot.cpp's integer-dot decode kernels, with
// the same activation rounding (blocks along K of q8_block_int8(K) for int8 weights and of the
// group for int4; d = amax / 127, x' = round_half_even(x * 127 / amax)), so the path's reference
// is the VNNI path's (`ops.reference(x, p, bias, "amx:q8")`). The tiles compute the transposed
// product C^T = W . xq^T:
//   * A (tmm4/5) = 16 weight rows x D bytes of k, signed: int8 rows as stored, int4 unpacked to
//     nib - 8; a work item's rows are copied / unpacked to a contiguous chunk (kChunkK of k) once
//     per chunk, so each copy serves every row block of x (rows at a stride of K = 6144 would
//     share 2 L1 sets);
//   * B (tmm6/7) = D/4 k-quads x 16 rows of x x 4 bytes: x is quantised and transposed to this
//     layout once per call (`quantize_xt`, M x K bytes);
//   * tdpbssd (signed x signed) into C^T tiles (tmm0..3) of 16 weight rows x 16 rows of x, int32.
// D = 64 (a full tile depth) when the block is a multiple of 64, else 32.
// The int32 sums of each block leave the tiles (AMX has no tile -> zmm move: a tile store to L1)
// and are scaled into fp32 sums: by d[m, b] for int8 (its per-row weight scale is applied once at
// the end), by s[n, g] * d[m, g] for int4. The int4 offsets add sum_g off[n, g] * xs[m, g]
// (xs = d * sum of the block's xq), a [M, K/G] x [K/G, N] product done once after the tiles.
// Why transposed: in the x . W^T orientation every int8 weight tile would need a 4-byte transpose
// per call (N x K bytes); here the transposes are x's (M x K) and the output's (M x N, fp32).
// M <= 64 (decode, batched decode, verify steps: `rows_tiles` below) runs another loop order
// with the fp32 epilogue of qdot.cpp's 512-bit kernels (q8_epilogue.h), so a row's bits do not
// depend on M up to ops.ROW_INVARIANT_MAX_M nor on which of the two kernels ran it; qdot.cpp's
// decode entry points send M >= 2 rows here on AMX CPUs (`amx:q8`). The prefill loop (M > 64)
// scales each block's sums per row block as they come (its acc is 1/16 the size) and is not
// row-invariant.
// What this is not: a dispatcher: ops.py measures the prefill against the bf16 paths
// (AMX-BF16 on expanded rows, torch's oneDNN) and sgemm per shape and keeps the fastest.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "bf16_pack.h"
#include "isa.h"
#include "parallel.h"
#include "switches.h"
#include "q8_epilogue.h"
#include "quant_x.h"
#include "scratch.h"
#include "simd512.h"

int64_t q8_block_int8(int64_t K);  // qdot.cpp: the int8 weight's activation block for K

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

constexpr int64_t kChunkK = 512;    // k per pass: 4 panels of A (32 KiB) stay in L1 while B tiles stream past
constexpr int64_t kItemPanels = 16; // panels of 16 weight rows per work item (fewer when there are few panels)

// tmm0..3: C^T int32 [16 weight rows][16 rows of x]; tmm4/5: A [16 weight rows][D bytes];
// tmm6/7: B [D/4 k-quads][16 rows of x x 4 bytes].
void configure(int D) {
  codeshell::AmxTileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = t >= 6 ? uint8_t(D / 4) : 16;
    c.colsb[t] = t == 4 || t == 5 ? uint16_t(D) : 64;
  }
  codeshell::amx_load_config(c);
}


// Where k-quad k/4 of row block mt lives in xt: chunks of kChunkK along K outermost, then row
// blocks, then the chunk's k-quads (64 bytes: 16 rows x 4), so the B tiles one chunk pass reads
// (every row block) are contiguous; [Mt][K/4] put them 16 K bytes apart (96 KiB at K = 6144).
inline int64_t xt_offset(int64_t Mt, int64_t K, int64_t mt, int64_t k) {
  const int64_t c0 = k / kChunkK * kChunkK, kl = std::min(kChunkK, K - c0);
  return c0 * Mt * 16 + mt * kl * 16 + (k - c0) * 16;
}

// x fp32 [M, K] -> xt int8 B tiles (xt_offset: k-quad j of row block mt holds rows 16mt..16mt+15,
// 4 bytes each, zero past M), dxt fp32 [K/B][Mp] (block scales, zero past M), xs fp32 [M][K/B].
// xb (bf16 [M, K], session 38, the epilogue entry prefill_q8_amx_epi) instead of x: each row widened
// to fp32 (exact) into a row buffer first, so the integers and scales are x.float()'s, without the
// caller's M x K fp32 copy (2 MiB written and read back a linear at the small shape).
void quantize_xt(const float* x, int64_t M, int64_t K, int64_t B, int8_t* xt, float* dxt, float* xs,
                 const uint16_t* xb = nullptr) {
  const int64_t nb = K / B, Mt = (M + 15) / 16, Mp = Mt * 16;
  at::parallel_for(0, Mt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> rows(size_t(16) * K);
    std::vector<float> wide(xb ? size_t(K) : 0);
    for (int64_t mt = t0; mt < t1; ++mt) {
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t m = mt * 16 + r;
        int8_t* o = rows.data() + r * K;
        if (m < M) {
          const float* xr = x ? x + m * K : wide.data();
          if (xb) {
            codeshell::widen_bf16_row(xb + m * K, wide.data(), K);
          }
          codeshell::quantize_row_avx512(xr, K, B, /*perm=*/0, o, dxt + m, Mp, xs ? xs + m * nb : nullptr);
        } else {
          std::memset(o, 0, size_t(K));
          for (int64_t b = 0; b < nb; ++b) dxt[b * Mp + m] = 0.f;
        }
      }
      int64_t k = 0;
      for (; k + 64 <= K; k += 64) {  // 16 k-quads in a row of one chunk (chunks are multiples of 64)
        __m512i v[16];
        for (int r = 0; r < 16; ++r) v[r] = _mm512_loadu_si512(rows.data() + r * K + k);
        codeshell::transpose16(v);
        int8_t* dst = xt + xt_offset(Mt, K, mt, k);
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + j * 64, v[j]);
      }
      for (; k < K; k += 4)  // K % 64 == 32: the last 8 k-quads
        for (int r = 0; r < 16; ++r) std::memcpy(xt + xt_offset(Mt, K, mt, k) + r * 4, rows.data() + r * K + k, 4);
    }
  });
}

// int4 rows [16p, 16p+16) x k [k0, k1) (k0, k1 multiples of 64) -> a [16][k1 - k0] as nib - 8 in
// k order (zero rows past N). Packed: 32 bytes hold k0..63 as lo = k0..15 | k32..47, hi = k16..31 |
// k48..63 (codeshell/kernels/packing.py's run-of-32 order).
void unpack_int4(const uint8_t* q, int64_t N, int64_t K, int64_t p, int64_t k0, int64_t k1, int8_t* a) {
  const int64_t kl = k1 - k0;
  const __m256i m0f = _mm256_set1_epi8(0x0f);
  const __m512i eight = _mm512_set1_epi8(8);
  for (int64_t r = 0; r < 16; ++r) {
    const int64_t n = p * 16 + r;
    int8_t* o = a + r * kl;
    if (n >= N) {
      std::memset(o, 0, size_t(kl));
      continue;
    }
    const uint8_t* src = q + n * (K / 2) + k0 / 2;
    for (int64_t k = 0; k < kl; k += 64) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k / 2));
      const __m256i lo = _mm256_and_si256(v, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
      __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // [k0..15, k32..47, k16..31, k48..63]
      z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));
      _mm512_storeu_si512(o + k, _mm512_sub_epi8(z, eight));
    }
  }
}

// C^T tiles of up to 4 weight panels (A rows of panel i at a[i] + k, row stride la) x one row
// block of x (B: k-tile s at b + s * 16 * D) over `tiles` k-tiles, in tmm0..TP-1 (stored by
// tiles_store). A alternates between tmm4 and tmm5 and B between tmm6 and tmm7, so a tile load
// does not wait for the TMUL still reading that register's previous tile.
template <int TP>
inline void tiles_block(const int8_t* const* a, int64_t la, int64_t k, const int8_t* b, int64_t tiles, int D) {
  _tile_zero(0);
  if constexpr (TP > 1) _tile_zero(1);
  if constexpr (TP > 2) _tile_zero(2);
  if constexpr (TP > 3) _tile_zero(3);
  for (int64_t s = 0; s < tiles; ++s) {
    const int64_t ks = k + s * D;
    if (s & 1) {
      _tile_loadd(7, b + s * 16 * D, 64);
      _tile_loadd(4, a[0] + ks, la);
      _tile_dpbssd(0, 4, 7);
      if constexpr (TP > 1) { _tile_loadd(5, a[1] + ks, la); _tile_dpbssd(1, 5, 7); }
      if constexpr (TP > 2) { _tile_loadd(4, a[2] + ks, la); _tile_dpbssd(2, 4, 7); }
      if constexpr (TP > 3) { _tile_loadd(5, a[3] + ks, la); _tile_dpbssd(3, 5, 7); }
    } else {
      _tile_loadd(6, b + s * 16 * D, 64);
      _tile_loadd(4, a[0] + ks, la);
      _tile_dpbssd(0, 4, 6);
      if constexpr (TP > 1) { _tile_loadd(5, a[1] + ks, la); _tile_dpbssd(1, 5, 6); }
      if constexpr (TP > 2) { _tile_loadd(4, a[2] + ks, la); _tile_dpbssd(2, 4, 6); }
      if constexpr (TP > 3) { _tile_loadd(5, a[3] + ks, la); _tile_dpbssd(3, 5, 6); }
    }
  }
}

// tmm0..TP-1 -> ci [TP][16][16] int32.
template <int TP>
inline void tiles_store(int32_t* ci) {
  _tile_stored(0, ci, 64);
  if constexpr (TP > 1) _tile_stored(1, ci + 256, 64);
  if constexpr (TP > 2) _tile_stored(2, ci + 512, 64);
  if constexpr (TP > 3) _tile_stored(3, ci + 768, 64);
}

struct Problem {
  int64_t M, K, N, B, D, G;  // G = 0: int8 weight
  const int8_t* w8;          // int8 [N, K]
  const uint8_t* w4;         // int4 [N, K/2]
  const float* scale;        // int8 [N]; int4 [N, K/G]
  const float* bias;
  const int8_t* xt;          // quantize_xt
  const float* dxt;
  float* out;
  uint16_t* out16 = nullptr;  // bf16 [M, N] instead of out (prefill_q8_amx_epi), by `epi`
  int epi = 0;                // kEpiF32 / kEpiB16 / kEpiGeluFast / kEpiGelu
  bool hw = false;            // bf16_pack by vcvtneps2bf16 (bf16_pack.h: the same bits)
};

// store_item's epilogues (session 38): fp32 into out (as before); the fp32 value rounded to bf16
// (bf16_bits: the bits of out's `.to(torch.bfloat16)`, which the model does next anyway); the GELU of
// that rounded value, gelu16_fast (within one bf16 ulp) or gelu16 (the bits of the fused GELU on
// out, CODESHELL_GELU_FAST=0), as panel_bf16's store_rows_b16 / store_rows_gelu do for bf16 weights.
enum { kEpiF32 = 0, kEpiB16 = 1, kEpiGeluFast = 2, kEpiGelu = 3 };

// The fp32 sums of a work item: acc [Mt][item rows][16] (row block mt of x, weight row n: 16
// floats at (mt * rows + n) * 16), so the 4 panels x 1 row block a block updates are 4 KiB in a
// row (a [n][m] layout put them at a stride of M floats, 2 KiB at M = 512: 2 L1 sets).
struct Pending {  // a block's int32 sums waiting to be scaled (converted while the next block's TMULs run)
  const int32_t* ci = nullptr;
  int64_t blk = 0, p = 0, tp = 0, mt = 0;
};

// ci tile i (weight rows 16(p+i).., x rows 16mt..) into acc: += C[n][m] * d[m, blk] (* s[n, blk] for int4).
inline void scale_into(const Problem& P, const Pending& j, int64_t pa, int64_t rows_item, float* acc) {
  const int64_t Mp = (P.M + 15) / 16 * 16, ng = P.G ? P.K / P.G : 0;
  const __m512 dv = _mm512_loadu_ps(P.dxt + j.blk * Mp + j.mt * 16);
  for (int64_t i = 0; i < j.tp; ++i) {
    const int64_t n0 = (j.p + i) * 16, rows = std::min<int64_t>(16, P.N - n0);
    const int32_t* c = j.ci + i * 256;
    float* a = acc + (j.mt * rows_item + (n0 - pa * 16)) * 16;
    if (P.G) {
      const float* s = P.scale + n0 * ng + j.blk;
      for (int64_t r = 0; r < rows; ++r)
        _mm512_storeu_ps(a + r * 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + r * 16)),
                                                     _mm512_mul_ps(dv, _mm512_set1_ps(s[r * ng])),
                                                     _mm512_loadu_ps(a + r * 16)));
    } else {
      for (int64_t r = 0; r < rows; ++r)
        _mm512_storeu_ps(a + r * 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + r * 16)), dv,
                                                     _mm512_loadu_ps(a + r * 16)));
    }
  }
}

// Output columns of panels [pa, pb) from acc (transposed back, 16 x 16 at a time): out[m][n] =
// acc[n][m] (* int8 scale[n]) + bias[n].
void store_item(const Problem& P, int64_t pa, int64_t pb, const float* acc, int64_t rows_item) {
  const int64_t Mt = (P.M + 15) / 16;
  for (int64_t p = pa; p < pb; ++p) {
    const int64_t n0 = p * 16, cols = std::min<int64_t>(16, P.N - n0);
    const __mmask16 cm = __mmask16((1u << cols) - 1);
    const __m512 sv = P.G ? _mm512_set1_ps(1.f) : _mm512_maskz_loadu_ps(cm, P.scale + n0);
    const __m512 bv = P.bias ? _mm512_maskz_loadu_ps(cm, P.bias + n0) : _mm512_setzero_ps();
    for (int64_t mt = 0; mt < Mt; ++mt) {
      __m512i v[16];
      const float* a = acc + (mt * rows_item + (p - pa) * 16) * 16;
      for (int r = 0; r < 16; ++r) v[r] = _mm512_loadu_si512(a + r * 16);
      codeshell::transpose16(v);
      const int64_t rows = std::min<int64_t>(16, P.M - mt * 16);
      if (P.epi == kEpiF32) {
        for (int64_t j = 0; j < rows; ++j)
          _mm512_mask_storeu_ps(P.out + (mt * 16 + j) * P.N + n0, cm,
                                _mm512_fmadd_ps(_mm512_castsi512_ps(v[j]), sv, bv));
        continue;
      }
      for (int64_t j = 0; j < rows; ++j) {  // the fp32 path's value, then its epilogue
        __m512 y = _mm512_fmadd_ps(_mm512_castsi512_ps(v[j]), sv, bv);
        if (P.epi == kEpiGeluFast) y = codeshell::gelu16_fast(codeshell::round_bf16_fast(y));
        else if (P.epi == kEpiGelu) y = codeshell::gelu16(codeshell::round_bf16(y));
        _mm256_mask_storeu_epi16(P.out16 + (mt * 16 + j) * P.N + n0, cm, codeshell::bf16_pack(y, P.hw));
      }
    }
  }
}

// Blocking (the loop order below): work items of up to kItemPanels panels; K in chunks of
// kChunkK; per chunk the item's A rows are made contiguous (int8 copied, int4 unpacked: 16 rows
// x kChunkK bytes per panel), then each group of 4 panels (32 KiB of A, in L1) meets every row
// block of x (B tiles from L2: one tile load per 4 TMULs). Each activation block's sums are
// scaled into acc while the next block's TMULs run: program order is TMULs(b), scale(b - 1),
// store(b), so no load of the scaling follows a tile store still waiting on its TMULs (4 KiB of
// C tiles cover every 4 KiB page offset: each load would match one in its low 12 address bits
// and wait for it). Without the TMULs' wait hidden this way (scaling right after each store)
// c_fc at M = 512 on 1 core ran 30-40% slower than without any scaling; with it, 20-25% (a busy
// machine: +-15%).
void prefill_q8_tiles(const Problem& P) {
  const int64_t M = P.M, K = P.K, N = P.N, D = P.D, Mt = (M + 15) / 16;
  const int64_t Pn = (N + 15) / 16, tpb = P.B / D;  // k-tiles per activation block
  // fewer panels per item when there are few panels: >= 4 items per thread to share out
  const int64_t nb = std::max<int64_t>(4, std::min<int64_t>(kItemPanels, Pn / (4 * at::get_num_threads()) / 4 * 4));
  const int64_t items = (Pn + nb - 1) / nb, kc = std::min(K, kChunkK);
  codeshell::parallel_chunks(items, 1, 1, [&](int64_t i0, int64_t i1) {
    configure(int(D));
    // A rows at 64-byte boundaries, sums kept between calls (scratch.h: alignment, page faults)
    static thread_local codeshell::ThreadScratch a_keep, acc_keep;
    const size_t acc_n = size_t(nb) * 16 * Mt * 16;
    codeshell::Scratch<float> accv(acc_keep, acc_n);
    codeshell::Scratch<int8_t> abuf_mem(a_keep, size_t(nb) * 16 * kc);
    int8_t* const abuf = abuf_mem.data();
    alignas(64) int32_t ci[2][4 * 256];
    float* acc = accv.data();
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t pa = it * nb, pb = std::min(Pn, pa + nb), rows_item = (pb - pa) * 16;
      std::fill(accv.data(), accv.data() + acc_n, 0.f);
      Pending pend;
      int cur = 0;
      for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
        const int64_t k1 = std::min(K, k0 + kChunkK), kl = k1 - k0;
        for (int64_t p = pa; p < pb; ++p) {  // A rows of the chunk: buf [panel][16][kl]
          int8_t* buf = abuf + (p - pa) * 16 * kl;
          if (P.G) {
            unpack_int4(P.w4, N, K, p, k0, k1, buf);
          } else {
            for (int64_t r = 0; r < 16; ++r) {
              if (p * 16 + r < N) std::memcpy(buf + r * kl, P.w8 + (p * 16 + r) * K + k0, size_t(kl));
              else std::memset(buf + r * kl, 0, size_t(kl));
            }
          }
        }
        __asm__ volatile("" ::: "memory");  // tile loads are asm without memory operands
        for (int64_t p = pa; p < pb; p += 4) {
          const int64_t tp = std::min<int64_t>(4, pb - p);
          const int8_t* a[4];
          for (int64_t i = 0; i < 4; ++i) a[i] = abuf + (p - pa + std::min(i, tp - 1)) * 16 * kl;
          for (int64_t mt = 0; mt < Mt; ++mt) {
            const int8_t* b = P.xt + xt_offset(Mt, K, mt, k0);
            for (int64_t kb = 0; kb < kl; kb += P.B) {
              int32_t* c = ci[cur];
              switch (tp) {
                case 4: tiles_block<4>(a, kl, kb, b + kb * 16, tpb, int(D)); break;
                case 3: tiles_block<3>(a, kl, kb, b + kb * 16, tpb, int(D)); break;
                case 2: tiles_block<2>(a, kl, kb, b + kb * 16, tpb, int(D)); break;
                default: tiles_block<1>(a, kl, kb, b + kb * 16, tpb, int(D)); break;
              }
              if (pend.ci) scale_into(P, pend, pa, rows_item, acc);
              __asm__ volatile("" ::: "memory");  // the scaling's loads stay before the tile stores (asm)
              switch (tp) {
                case 4: tiles_store<4>(c); break;
                case 3: tiles_store<3>(c); break;
                case 2: tiles_store<2>(c); break;
                default: tiles_store<1>(c); break;
              }
              __asm__ volatile("" ::: "memory");  // c is written by tile stores (asm)
              pend = Pending{c, (k0 + kb) / P.B, p, tp, mt};
              cur ^= 1;
            }
          }
        }
      }
      if (pend.ci) scale_into(P, pend, pa, rows_item, acc);
      store_item(P, pa, pb, acc, rows_item);
    }
    _tile_release();  // AMX state off: cheaper context switches for this thread
  });
}


// ---- M <= 64 (ops.ROW_INVARIANT_MAX_M): row-invariant tiles ---------------------------------
// The same tiles (C^T = W . xq^T, tdpbssd) for decode, batched decode and verify steps, with the
// fp32 epilogue of the 512-bit vpdpbusd kernels (q8_epilogue.h), so every row gets the bits it
// gets alone from qdot.cpp at M = 1. Loop order: one panel of 16 weight rows at a time against
// all Mt <= 4 row blocks of x (tmm0..3), all of K: the weight is read from memory once per call
// (int8 A tiles straight from the rows, the next panel prefetched into L2; int4 unpacked
// per kRowsChunkK into an L1 buffer), x's B tiles (M x K bytes, <= 384 KiB) come from L2. Per
// block the C tiles are stored and folded into acc [mt][L = block mod 16][weight row][16 rows of
// x] while the next block's TMULs run (the prefill's TMULs(b), epilogue(b - 1), store(b) order).
// Prefetch: a panel's 16 weight rows are one contiguous range of memory (16 x K bytes, int4
// 16 x K / 2), consumed 16 rows side by side; while a panel runs, the next panel's range is
// prefetched into L2 in step (the same fraction of it per k as of this one), so the tile loads
// and the unpacking find it there. (Prefetching 2 KiB ahead within each row, as the one-row
// vpdpbusd kernels do, reached past the end of the 1536-byte rows and left the tiles waiting
// on memory: M = 2 ran 1.2-2x slower than the vpdpbusd kernel.)
inline void prefetch_l2(const void* base, int64_t from, int64_t to, int64_t size) {
  const char* b = static_cast<const char*>(base);
  for (int64_t o = from; o < std::min(to, size); o += 64) _mm_prefetch(b + o, _MM_HINT_T1);
}
constexpr int64_t kRowsChunkK = 1024;    // int4: k unpacked per pass (16 KiB of A)
constexpr int64_t kRowsMaxM = 64;        // = ops.ROW_INVARIANT_MAX_M (4 row blocks in tmm0..3)

struct RowsProblem {
  int64_t M, K, N, B, D, G, Mt, Mp, nb;
  const int8_t* w8;
  const uint8_t* w4;
  const float *scale, *offset, *bias;
  const int8_t* xt;   // quantize_xt
  const float* dxt;   // [nb][Mp]
  const float* xst;   // [nb][Mp]: xs transposed (int4 offsets), or null
  float* out;
  bool pf8 = true;    // int8: the next panel prefetched into L2 (session 38: CODESHELL_Q8_TILES_PF_MAXK)
};

// One k-tile of all MT row blocks: A (weight rows at a, stride la) into tmm4 (even k-tiles) or
// tmm5 (odd: the load need not wait for the TMULs still reading tmm4), B tiles of row block mt at
// b[mt] alternating tmm6 / tmm7, C^T of row block mt in tmm mt. (GCC's tile intrinsics are macros
// that paste the register number: literals only, hence the macro.)
// With MT <= 2 row blocks the C tiles of odd blocks are tmm1 (MT = 1) / tmm2, tmm3 (MT = 2), so
// a block's TMULs do not wait for the previous block's C tiles to be stored (a tile register is
// not renamed): with one C set the blocks ran strictly one after another.
// B of row block 0 goes to tmm6 with A in tmm4 and to tmm7 with A in tmm5, so with MT = 1 its
// load need not wait for the previous TMUL to finish reading the register. (Neither this nor
// the C tiles alternating by block changed the time measurably: ~1.1-1.8 us per panel of
// 16 x 1536 int8 weights even from L2, ~150 cycles per k-tile against the TMUL's 16; not
// understood yet -- a suspect is each block's C tile store waiting on its TMULs and the
// epilogue's loads waiting on that store.)
#define CODESHELL_ROWS_STEP(TA, TB, C0, C1)                                           \
  _tile_loadd(TA, a, la);                                                             \
  _tile_loadd(TB, b[0], 64);                                                          \
  _tile_dpbssd(C0, TA, TB);                                                           \
  if constexpr (MT > 1) { _tile_loadd(7, b[1], 64); _tile_dpbssd(C1, TA, 7); }        \
  if constexpr (MT > 2) { _tile_loadd(6, b[2], 64); _tile_dpbssd(2, TA, 6); }         \
  if constexpr (MT > 3) { _tile_loadd(7, b[3], 64); _tile_dpbssd(3, TA, 7); }
template <int MT, bool ODD>
inline void rows_step4(const int8_t* a, int64_t la, const int8_t* const* b) {
  if constexpr (ODD && MT == 1) { CODESHELL_ROWS_STEP(4, 6, 1, 1) }
  else if constexpr (ODD && MT == 2) { CODESHELL_ROWS_STEP(4, 6, 2, 3) }
  else { CODESHELL_ROWS_STEP(4, 6, 0, 1) }
}
template <int MT, bool ODD>
inline void rows_step5(const int8_t* a, int64_t la, const int8_t* const* b) {
  if constexpr (ODD && MT == 1) { CODESHELL_ROWS_STEP(5, 7, 1, 1) }
  else if constexpr (ODD && MT == 2) { CODESHELL_ROWS_STEP(5, 6, 2, 3) }
  else if constexpr (MT == 1) { CODESHELL_ROWS_STEP(5, 7, 0, 1) }
  else { CODESHELL_ROWS_STEP(5, 6, 0, 1) }
}
#undef CODESHELL_ROWS_STEP

// The C tiles of one block: zero / store (ci [MT][256]) the set rows_step<MT, ODD> accumulates in.
template <int MT, bool ODD>
inline void rows_zero() {
  if constexpr (ODD && MT == 1) { _tile_zero(1); }
  else if constexpr (ODD && MT == 2) { _tile_zero(2); _tile_zero(3); }
  else {
    _tile_zero(0);
    if constexpr (MT > 1) _tile_zero(1);
    if constexpr (MT > 2) _tile_zero(2);
    if constexpr (MT > 3) _tile_zero(3);
  }
}
template <int MT, bool ODD>
inline void rows_store_c(int32_t* ci) {
  if constexpr (ODD && MT == 1) { _tile_stored(1, ci, 64); }
  else if constexpr (ODD && MT == 2) { _tile_stored(2, ci, 64); _tile_stored(3, ci + 256, 64); }
  else tiles_store<MT>(ci);
}

// Block blk's sums ci [MT][16 weight rows][16 rows of x] (weight rows n0..n0+rows-1) into acc.
template <int MT>
inline void rows_epilogue(const RowsProblem& P, const int32_t* ci, int64_t blk, int64_t n0, int64_t rows, float* acc) {
  namespace E = codeshell::q8epi;
  const int64_t L = blk & 15, ng = P.nb;
  const bool first = blk < 16;
  for (int mt = 0; mt < MT; ++mt) {
    const __m512 dv = _mm512_loadu_ps(P.dxt + blk * P.Mp + mt * 16);
    const __m512 xv = P.xst ? _mm512_loadu_ps(P.xst + blk * P.Mp + mt * 16) : _mm512_setzero_ps();
    float* a = acc + (mt * 16 + L) * 256;
    const int32_t* c = ci + mt * 256;
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 mul = P.G ? E::int4_mul(_mm512_set1_ps(P.scale[(n0 + r) * ng + blk]), dv) : dv;
      __m512 v = E::epi_step(first ? _mm512_setzero_ps() : _mm512_load_ps(a + r * 16), _mm512_load_si512(c + r * 16), mul);
      if (P.xst) v = E::epi_offsets(v, _mm512_set1_ps(P.offset[(n0 + r) * ng + blk]), xv);
      _mm512_store_ps(a + r * 16, v);
    }
  }
}

// tree16 of acc for each (weight row, row of x), transposed to rows of x, finished (scale, bias)
// and stored: out[m, n0..n0+cols).
template <int MT>
inline void rows_store(const RowsProblem& P, int64_t n0, int64_t cols, const float* acc) {
  namespace E = codeshell::q8epi;
  const __mmask16 cm = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
  const __m512 sv = P.G ? _mm512_set1_ps(1.f) : _mm512_maskz_loadu_ps(cm, P.scale + n0);
  const __m512 bv = P.bias ? _mm512_maskz_loadu_ps(cm, P.bias + n0) : _mm512_setzero_ps();
  for (int mt = 0; mt < MT; ++mt) {
    __m512i v[16];
    // session 38: the slots past nb (+0, never written) not added (tree16_v_prefix: exact, the same bits);
    // K = 1024 (8 blocks) read and added 16 slots for 8 per (weight row, row block) at the panel's end
    for (int r = 0; r < 16; ++r)
      v[r] = _mm512_castps_si512(E::tree16_v_prefix(acc + mt * 16 * 256 + r * 16, 256, std::min<int64_t>(P.nb, 16)));
    codeshell::transpose16(v);  // v[j]: row 16 mt + j of x, lane = weight row
    for (int64_t j = 0; j < 16 && mt * 16 + j < P.M; ++j)
      _mm512_mask_storeu_ps(P.out + (mt * 16 + j) * P.N + n0, cm, E::finish_vec(_mm512_castsi512_ps(v[j]), sv, bv));
  }
}

struct RowsScratch {
  float* acc;    // [Mt][16][16][16], 64-byte aligned
  int8_t* abuf;  // int4: [16][kRowsChunkK]; int8: [16][K] for a last partial panel
  int32_t* ci;   // [kRing][4][256]
};
constexpr int64_t kLag = 3, kRing = 4;  // blocks between a C tile store and its epilogue; C buffers

template <int MT>
void rows_panel(const RowsProblem& P, int64_t p, const RowsScratch& S) {
  const int64_t K = P.K, D = P.D, tpb = P.B / D, n0 = p * 16, rows = std::min<int64_t>(16, P.N - n0);
  const int8_t* bt[4];
  const bool direct = !P.G && rows == 16;  // int8 A tiles straight from the weight rows
  if (!P.G && !direct) {
    for (int64_t r = 0; r < 16; ++r) {
      if (r < rows) std::memcpy(S.abuf + r * K, P.w8 + (n0 + r) * K, size_t(K));
      else std::memset(S.abuf + r * K, 0, size_t(K));
    }
  }
  const int64_t kc = P.G ? std::min(K, kRowsChunkK) : K;
  // the next panel's bytes (16 rows, fewer at the end), prefetched in step with this one's k
  const int64_t next_rows = std::max<int64_t>(0, std::min<int64_t>(16, P.N - n0 - 16));
  const int64_t row_bytes = P.G ? K / 2 : K, next_size = next_rows * row_bytes;
  const void* next = P.G ? static_cast<const void*>(P.w4 + (n0 + 16) * row_bytes)
                         : static_cast<const void*>(P.w8 + (n0 + 16) * row_bytes);
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t k1 = std::min(K, k0 + kc);
    if (P.G) prefetch_l2(next, k0 * 8, k1 * 8, next_size);  // 16 rows x (k1 - k0) / 2 bytes
    const int8_t* a;  // A row r, k at a + r * la + (k - ka)
    int64_t la, ka;
    if (P.G) {
      unpack_int4(P.w4, P.N, K, p, k0, k1, S.abuf);
      a = S.abuf;
      la = k1 - k0;
      ka = k0;
    } else {
      a = direct ? P.w8 + n0 * K : S.abuf;
      la = K;
      ka = 0;
    }
    __asm__ volatile("" ::: "memory");  // tile loads are asm without memory operands
    for (int64_t kb = k0; kb < k1; kb += P.B) {
      const bool odd = MT <= 2 && ((kb / P.B) & 1);
      if (odd) rows_zero<MT, true>();
      else rows_zero<MT, false>();
      for (int64_t s = 0; s < tpb; ++s) {
        const int64_t k = kb + s * D;
        if (!P.G && P.pf8) prefetch_l2(next, k * 16, (k + D) * 16, next_size);  // 16 rows x D bytes
        for (int mt = 0; mt < MT; ++mt) bt[mt] = P.xt + xt_offset(P.Mt, K, mt, k);
        const int8_t* at = a + (k - ka);
        if (odd) {
          if (s & 1) rows_step5<MT, true>(at, la, bt);
          else rows_step4<MT, true>(at, la, bt);
        } else {
          if (s & 1) rows_step5<MT, false>(at, la, bt);
          else rows_step4<MT, false>(at, la, bt);
        }
      }
      // epilogue of block j - kLag, whose C tiles were stored kLag blocks ago (the prefill's
      // TMULs(b), scale(b - 1), store(b) order at kLag = 1; 3 measured the same)
      const int64_t j = kb / P.B;
      if (j >= kLag) rows_epilogue<MT>(P, S.ci + ((j - kLag) % kRing) * 1024, j - kLag, n0, rows, S.acc);
      __asm__ volatile("" ::: "memory");  // the epilogue's loads stay before the tile stores (asm)
      int32_t* c = S.ci + (j % kRing) * 1024;
      if (odd) rows_store_c<MT, true>(c);
      else rows_store_c<MT, false>(c);
      __asm__ volatile("" ::: "memory");  // c is written by tile stores (asm)
    }
  }
  for (int64_t j = std::max<int64_t>(0, P.nb - kLag); j < P.nb; ++j)
    rows_epilogue<MT>(P, S.ci + (j % kRing) * 1024, j, n0, rows, S.acc);
  rows_store<MT>(P, n0, rows, S.acc);
}

// Panels shared out by parallel_chunks (claimed chunks, ~8 per thread, at least 4 panels), with the
// tile configuration loaded once per chunk and the scratch kept per thread between calls.
// Session 37 (helper B): parallel_chunks rather than an at::parallel_for region of its own, so that
// inside the native decode step (a Team's call, OpenMP at 1 thread there) the panels go to the team's
// threads: before, at::get_num_threads() read 1 in a step and every AMX rows call (batched decode at
// M >= the AMX threshold) ran on the step's master alone. The same panels, the same bits.
// CODESHELL_Q8_TILES_TEAM=0 (read per call; A/B only): inside a team, all panels on the calling thread
// as before.
void rows_tiles(const RowsProblem& P) {
  const int64_t Pn = (P.N + 15) / 16;
  auto body = [&](int64_t p0, int64_t p1) {
    configure(int(P.D));
    const size_t acc_n = size_t(P.Mt) * 16 * 256;
    const size_t abuf_n = P.G ? size_t(16) * std::min(P.K, kRowsChunkK) : (P.N % 16 ? size_t(16) * P.K : 0);
    static thread_local std::vector<float> accv;
    static thread_local std::vector<int8_t> abufv;
    if (accv.size() < acc_n + 16) accv.resize(acc_n + 16);
    if (abufv.size() < abuf_n + 64) abufv.resize(abuf_n + 64);
    alignas(64) int32_t ci[kRing * 1024];
    float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(accv.data()) + 63) & ~uintptr_t(63));
    // lanes L >= nb are never written: +0 for the tree (as the VNNI kernels' empty lanes)
    for (int64_t mt = 0; mt < P.Mt; ++mt)
      for (int64_t L = P.nb; L < 16; ++L) std::memset(acc + (mt * 16 + L) * 256, 0, 256 * sizeof(float));
    const RowsScratch S{acc, abufv.data(), ci};
    for (int64_t p = p0; p < p1; ++p) {
      switch (P.Mt) {
        case 1: rows_panel<1>(P, p, S); break;
        case 2: rows_panel<2>(P, p, S); break;
        case 3: rows_panel<3>(P, p, S); break;
        default: rows_panel<4>(P, p, S); break;
      }
    }
    _tile_release();
  };
  if (codeshell::current_team() != nullptr && !codeshell::env_flag("CODESHELL_Q8_TILES_TEAM", true)) body(0, Pn);
  else codeshell::parallel_chunks(Pn, 1, 4, body);
}

}  // namespace
CODESHELL_END_AVX512
#endif

// x [M, K] fp32 @ W^T + bias -> fp32 [M, N] on AMX-INT8 tiles, x rounded to int8 per block.
// G = 0: W = q int8 [N, K] * scale [N] (blocks of q8_block_int8(K)); G > 0: int4 q uint8 [N, K/2],
// scale [N, K/G], offset [N, K/G] or None (blocks = groups; K % 64 == 0, G in 32..256).
// ---- AVX512-VNNI prefill (no AMX): vpdpbusd on the same int8-rounded x ----------------------
// The AMX-INT8 path's arithmetic without tiles, for AVX-512 CPUs that have VNNI but no AMX
// (ops.py: `avx512_vnni:q8` at M > 64, measured against torch's bf16 matmul on expanded rows).
// x is rounded exactly as above (quantize_row_avx512, blocks of B), then offset to unsigned
// (u = xq + 128: vpdpbusd multiplies unsigned by signed bytes) and packed once per call as
// dwords (4 consecutive k of one row) in [K chunk][row tile][k-quad][MR] order. Each work item
// (kVnItem panels of 16 weight rows) repacks its rows one K chunk at a time to [panel][k-quad]
// [16] dwords (int8 as stored, int4 as nib - 8), with -128 * (the block's weight sum) per row
// and block (the offset taken back), and for int4 the group's scales / offsets as 16-lane
// vectors. The register block: NP = 4 panels x MR = 6 rows of int32 sums of one block (24 zmm +
// 4 weight vectors + a broadcast); at each block's end they are converted and scaled into the
// fp32 sums in L1 (int8: by d[m, b]; int4: by s[n, g] * d[m, g], plus off[n, g] * xs[m, g]);
// the int8 per-row scale and the bias come when the item's rows are stored. Not row-invariant (M > 64 only), like the AMX loop.
#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

constexpr int kVnNP = 4, kVnMR = 6;
constexpr int64_t kVnKC = 512;   // k per pass: a multiple of every block (32..256); 4 panels' chunk = 32 KiB in L1
constexpr int64_t kVnItem = 8;   // panels per work item: its fp32 sums (M x 128 x 4 B) stay in L2

struct VnniProblem {
  int64_t M, K, N, B, G, nb, T;  // nb = K / B blocks; T row tiles of kVnMR
  const int8_t* q8;              // int8 [N, K] (G == 0)
  const uint8_t* q4;             // int4 nibbles [N, K/2] (G > 0)
  const float *scale, *offset, *bias;
  const uint32_t* xp;            // packed u8 x (see above)
  const float *d, *xs;           // [T * MR][nb]: block scales, d * (sum of the block's xq) (int4 offsets)
  float* out;
  const int32_t* cx = nullptr;   // [T * MR][nb]: -8 * (sum of the block's xq) (int4 on nibbles, see vnni_repack_nib)
};

// Rows of panel p, k in [k0, k0 + kc), to w [kc/4][16] dwords (signed bytes), the block
// corrections to corr [kc/B][16] (-128 * block sum), int4 scales / offsets to sc / of [kc/B][16].
void vnni_repack(const VnniProblem& P, int64_t p, int64_t k0, int64_t kc, uint32_t* w, int32_t* corr, float* sc,
                 float* of) {
  const int64_t nbc = kc / P.B;
  alignas(64) int8_t row[kVnKC];
  for (int64_t r = 0; r < 16; ++r) {
    const int64_t n = p * 16 + r;
    if (n >= P.N) {
      for (int64_t j = 0; j < kc / 4; ++j) w[j * 16 + r] = 0;
      for (int64_t b = 0; b < nbc; ++b) {
        corr[b * 16 + r] = 0;
        if (sc) sc[b * 16 + r] = 0.f;
        if (of) of[b * 16 + r] = 0.f;
      }
      continue;
    }
    if (P.G == 0) {
      std::memcpy(row, P.q8 + n * P.K + k0, size_t(kc));
    } else {  // 32 k per 16 bytes: byte i holds k = i (low nibble) and k = 16 + i (high)
      const uint8_t* src = P.q4 + n * (P.K / 2) + k0 / 2;
      const __m128i lo4 = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
      for (int64_t k = 0; k < kc; k += 32) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k / 2));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + k), _mm_sub_epi8(_mm_and_si128(v, lo4), eight));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + k + 16),
                         _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), lo4), eight));
      }
    }
    for (int64_t j = 0; j < kc / 4; ++j) std::memcpy(&w[j * 16 + r], row + 4 * j, 4);
    for (int64_t b = 0; b < nbc; ++b) {
      int32_t sum = 0;
      for (int64_t k = b * P.B; k < (b + 1) * P.B; ++k) sum += row[k];
      corr[b * 16 + r] = -128 * sum;
      const int64_t g = (k0 / P.B) + b;
      if (sc) sc[b * 16 + r] = P.scale[n * P.nb + g];
      if (of) of[b * 16 + r] = P.offset[n * P.nb + g];
    }
  }
}

// 16 rows of 16 dwords -> r[j] = dword j of the 16 rows (lane i = row i): a 16 x 16 transpose by 32-bit and 64-bit
// unpacks within 128-bit lanes, then two rounds of 128-bit lane shuffles.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);      // lane L: r0[4L], r1[4L], r0[4L+1], r1[4L+1]
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);  // lane L: r0[4L+2], r1[4L+2], r0[4L+3], r1[4L+3]
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c] lane L = dword 4L + c of rows 4i..4i+3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);       // dword c: lane 0 of u[c], u[4+c], u[8+c], u[12+c]
    r[4 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);   // dword 4 + c: their lane 1
    r[8 + c] = _mm512_shuffle_i32x4(v0, w0, 0xdd);   // lane 2
    r[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xdd);  // lane 3
  }
}

// int4 (session 41): rows of panel p, k in [k0, k0 + kc), to w [kc/4][16] dwords of the nibbles as stored (0..15,
// unsigned: vpdpbusd's first operand, x's int8 the second), the group scales / offsets to sc / of [kc/B][16]. The
// packed row holds 32 k in 16 bytes (byte i: k = i low, k = 16 + i high), so its dword c (c = 0..3) holds quad c
// in its low nibbles and quad 4 + c in its high ones: a 16 x 16 transpose of 16 rows x 64 bytes (128 k) and a mask
// and a shift give 32 quads of the panel. No block sums: the offset's correction, -8 * (the block's xq sum),
// belongs to x's row (vnni_pack_x), where the offset form (x + 128, nib - 8) needs -128 * (the block's weight sum)
// per weight row -- the scalar repack (vnni_repack) took ~1/3 of an int4 prompt call at M = 90 on Zen 4.
void vnni_repack_nib(const VnniProblem& P, int64_t p, int64_t k0, int64_t kc, uint32_t* w, float* sc, float* of) {
  const int64_t n0 = p * 16, rows = std::min<int64_t>(16, P.N - n0), rb = P.K / 2;
  const __m512i lo4 = _mm512_set1_epi8(0x0f);
  for (int64_t kk = 0; kk < kc; kk += 128) {
    const int64_t nd = std::min<int64_t>(16, (kc - kk) / 8);  // packed dwords of this run (kc % 64 == 0: 8 or 16)
    const __mmask16 m = nd == 16 ? __mmask16(0xffff) : __mmask16((1u << nd) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i < rows ? _mm512_maskz_loadu_epi32(m, P.q4 + (n0 + i) * rb + (k0 + kk) / 2) : _mm512_setzero_si512();
    transpose16x16(r);
    for (int64_t j = 0; j < nd; ++j) {  // dword j = 4g + c of the run: quads 8g + c (low) and 8g + 4 + c (high)
      uint32_t* dst = w + (kk / 4 + 8 * (j / 4) + j % 4) * 16;
      _mm512_store_si512(dst, _mm512_and_si512(r[j], lo4));
      _mm512_store_si512(dst + 4 * 16, _mm512_and_si512(_mm512_srli_epi16(r[j], 4), lo4));
    }
  }
  const int64_t nbc = kc / P.B, g0 = k0 / P.B;
  for (int64_t r = 0; r < 16; ++r) {
    const bool in = r < rows;
    for (int64_t b = 0; b < nbc; ++b) {
      sc[b * 16 + r] = in ? P.scale[(n0 + r) * P.nb + g0 + b] : 0.f;
      if (of) of[b * 16 + r] = in ? P.offset[(n0 + r) * P.nb + g0 + b] : 0.f;
    }
  }
}

// acc + the 4-byte dot of unsigned u and signed s per int32 lane (vpdpbusd), as inline asm:
// with the intrinsic, GCC 12 copied every accumulator to a spare register and stored it to the
// stack around each vpdpbusd of vnni_block (3 extra moves per instruction, in the 2 x 6 block
// with fp32 sums in registers and in this 4 x 6 one alike); with a plain "+v" operand the sums
// stay in their registers (checked in the object code).
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "vm"(s));
  return acc;
}

// fp32 sums c [MR rows][NP * 16] (row stride ldc) (+)= one row tile x NP panels over a chunk of
// nbc blocks of bq k-quads. xt: the tile's chunk [quad][MR]; w: panel q at w + q * pstride
// ([quad][16]); corr / sc / of: panel q at + q * vstride ([block][16]); d / xs: row i's block b
// at [i * nb + b0 + b]. Only the int32 sums live in registers (NP x MR = 24 + NP weight
// vectors + a broadcast); the fp32 sums are read and written in c (L1) once per block (24
// loads + 24 stores per 768 vpdpbusd at a block of 128), which leaves 4 x 6 sums room; the
// first version kept 2 x 6 int32 and 2 x 6 fp32 sums in registers. int8 at M = 512, the four
// 7B shapes, 2 threads, alternating processes on a loaded machine: first 0.52 and 0.25 TOP/s
// wall, this 0.22 and 0.56 -- no difference shown beyond the noise.
// NIB (int4, session 41): w holds the nibbles (unsigned), xt x's int8 (signed), and the block's correction is
// cx[i * nb + b0 + b] (-8 * its xq sum) for row i, not corr[] a weight row: the same int32 sums, the same bits.
template <int NP, int MR, bool I4, bool OFF, bool NIB = false>
inline void vnni_block(const uint32_t* xt, const uint32_t* w, int64_t pstride, const int32_t* corr, const float* sc,
                       const float* of, int64_t vstride, const float* d, const float* xs, int64_t nb, int64_t b0,
                       int64_t nbc, int64_t bq, float* c, int64_t ldc, bool first, const int32_t* cx = nullptr) {
  for (int64_t b = 0; b < nbc; ++b) {
    // every loop over q / i fully unrolled (the pragmas): ia[][] is indexed by constants only
    __m512i ia[NP][MR];
#pragma GCC unroll 8
    for (int q = 0; q < NP; ++q)
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) ia[q][i] = _mm512_setzero_si512();
    const uint32_t* xb = xt + b * bq * MR;
    const uint32_t* wb = w + b * bq * 16;
    for (int64_t j = 0; j < bq; ++j) {
      __m512i wv[NP];
#pragma GCC unroll 8
      for (int q = 0; q < NP; ++q) wv[q] = _mm512_load_si512(wb + q * pstride + j * 16);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512i xv = _mm512_set1_epi32(int(xb[j * MR + i]));
#pragma GCC unroll 8
        for (int q = 0; q < NP; ++q) ia[q][i] = NIB ? dpbusd(ia[q][i], wv[q], xv) : dpbusd(ia[q][i], xv, wv[q]);
      }
    }
    const bool zero = first && b == 0;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 dv = _mm512_set1_ps(d[i * nb + b0 + b]);
      const __m512i cv = NIB ? _mm512_set1_epi32(cx[i * nb + b0 + b]) : _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int q = 0; q < NP; ++q) {
        float* cp = c + i * ldc + q * 16;
        const __m512 s = I4 ? _mm512_mul_ps(dv, _mm512_load_ps(sc + q * vstride + b * 16)) : dv;
        const __m512i sum = _mm512_add_epi32(ia[q][i], NIB ? cv : _mm512_load_si512(corr + q * vstride + b * 16));
        __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, zero ? _mm512_setzero_ps() : _mm512_load_ps(cp));
        if (OFF)
          v = _mm512_fmadd_ps(_mm512_load_ps(of + q * vstride + b * 16), _mm512_set1_ps(xs[i * nb + b0 + b]), v);
        _mm512_store_ps(cp, v);
      }
    }
  }
}

template <bool I4, bool OFF, bool NIB = false>
void vnni_items(const VnniProblem& P) {
  constexpr int NP = kVnNP, MR = kVnMR;
  const int64_t Pn = (P.N + 15) / 16, items = (Pn + kVnItem - 1) / kVnItem, ldc = kVnItem * 16;
  const int64_t bq = P.B / 4, nbmax = kVnKC / P.B;
  codeshell::parallel_chunks(items, 1, 1, [&](int64_t i0, int64_t i1) {
    static thread_local codeshell::ThreadScratch c_keep, w_keep, v_keep;
    codeshell::Scratch<float> cs(c_keep, size_t(P.T) * MR * ldc);
    codeshell::Scratch<uint32_t> ws(w_keep, size_t(kVnItem) * (kVnKC / 4) * 16);
    codeshell::Scratch<float> vs(v_keep, size_t(kVnItem) * nbmax * 16 * 3);  // corr (int32), sc, of
    float* c = cs.data();
    uint32_t* wbuf = ws.data();
    int32_t* corr = reinterpret_cast<int32_t*>(vs.data());
    float* sc = vs.data() + kVnItem * nbmax * 16;
    float* of = sc + kVnItem * nbmax * 16;
    const int64_t vstride = nbmax * 16, pstride = (kVnKC / 4) * 16;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t pa = it * kVnItem, pb = std::min(Pn, pa + kVnItem);
      for (int64_t k0 = 0; k0 < P.K; k0 += kVnKC) {
        const int64_t kc = std::min(kVnKC, P.K - k0), nbc = kc / P.B;
        for (int64_t p = pa; p < pb; ++p)
          if (NIB)
            vnni_repack_nib(P, p, k0, kc, wbuf + (p - pa) * pstride, sc + (p - pa) * vstride,
                            OFF ? of + (p - pa) * vstride : nullptr);
          else
            vnni_repack(P, p, k0, kc, wbuf + (p - pa) * pstride, corr + (p - pa) * vstride,
                        I4 ? sc + (p - pa) * vstride : nullptr, OFF ? of + (p - pa) * vstride : nullptr);
        const uint32_t* xc = P.xp + k0 / 4 * P.T * MR;
        for (int64_t p = pa; p < pb; p += NP) {
          const int64_t l = p - pa;
          for (int64_t t = 0; t < P.T; ++t) {
            const uint32_t* xt = xc + t * (kc / 4) * MR;
            const float* dt = P.d + t * MR * P.nb;
            const float* xst = OFF ? P.xs + t * MR * P.nb : nullptr;
            const int32_t* cxt = NIB ? P.cx + t * MR * P.nb : nullptr;
            float* ct = c + t * MR * ldc + l * 16;
            switch (std::min<int64_t>(NP, pb - p)) {  // a tail of 1-3 panels in the last item
#define CODESHELL_VNNI(R)                                                                                   \
  case R:                                                                                                   \
    vnni_block<R, MR, I4, OFF, NIB>(xt, wbuf + l * pstride, pstride, corr + l * vstride, sc + l * vstride,  \
                                    of + l * vstride, vstride, dt, xst, P.nb, k0 / P.B, nbc, bq, ct, ldc,      \
                                    k0 == 0, cxt);                                                             \
    break;
              CODESHELL_VNNI(4) CODESHELL_VNNI(3) CODESHELL_VNNI(2) CODESHELL_VNNI(1)
#undef CODESHELL_VNNI
            }
          }
        }
      }
      const int64_t n0 = pa * 16, cols = std::min(P.N, pb * 16) - n0;
      for (int64_t m = 0; m < P.M; ++m) {
        float* o = P.out + m * P.N + n0;
        const float* cm = c + m * ldc;
        for (int64_t j = 0; j < cols; ++j) {
          const float v = I4 ? cm[j] : cm[j] * P.scale[n0 + j];
          o[j] = P.bias ? v + P.bias[n0 + j] : v;
        }
      }
    }
  });
}

// x fp32 [M, K] -> xp (u8 = xq + 128, packed as vnni_items reads it), d / xs [T * MR][nb]. cx (int4 on
// nibbles, NIB): xp holds xq itself (signed) and cx [T * MR][nb] -8 * (the block's xq sum).
void vnni_pack_x(const float* x, int64_t M, int64_t K, int64_t B, int64_t T, uint32_t* xp, float* d, float* xs,
                 int32_t* cx = nullptr) {
  constexpr int MR = kVnMR;
  const int64_t nb = K / B;
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> q(size_t(K) * MR);
    for (int64_t t = t0; t < t1; ++t) {
      for (int i = 0; i < MR; ++i) {
        const int64_t m = t * MR + i;
        float* dm = d + m * nb;
        float* xm = xs ? xs + m * nb : nullptr;
        int32_t* cm = cx ? cx + m * nb : nullptr;
        if (m < M) {
          codeshell::quantize_row_avx512(x + m * K, K, B, 0, q.data() + i * K, dm, 1, xm, cm);
          for (int64_t b = 0; cm && b < nb; ++b) cm[b] *= -8;
        } else {
          std::memset(q.data() + i * K, 0, size_t(K));
          for (int64_t b = 0; b < nb; ++b) {
            dm[b] = 0.f;
            if (xm) xm[b] = 0.f;
            if (cm) cm[b] = 0;
          }
        }
      }
      for (int64_t k0 = 0; k0 < K; k0 += kVnKC) {
        const int64_t kq = std::min(kVnKC, K - k0) / 4;
        uint32_t* dst = xp + k0 / 4 * T * MR + t * kq * MR;
        for (int64_t j = 0; j < kq; ++j)
          for (int i = 0; i < MR; ++i) {
            uint32_t v;
            std::memcpy(&v, q.data() + i * K + k0 + 4 * j, 4);
            dst[j * MR + i] = cx ? v : v ^ 0x80808080u;  // xq + 128 as unsigned bytes (NIB: xq, signed)
          }
      }
    }
  });
}

}  // namespace
CODESHELL_END_AVX512
#endif

// The argument checks of prefill_q8_amx and prefill_q8_vnni (below); returns the activation block B
// (int8: q8_block_int8(K); int4: the group) and sets *b to the bias (or null).
static int64_t check_q8_prefill(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                                const c10::optional<torch::Tensor>& offset, int64_t G,
                                const c10::optional<torch::Tensor>& bias, const float** bp, bool bf16_x = false) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == torch::kFloat32 || (bf16_x && x.scalar_type() == torch::kBFloat16)),
              bf16_x ? "x must be a contiguous bf16 or fp32 [M, K] tensor" : "x must be a contiguous fp32 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(M >= 1 && N >= 1, "empty matmul");
  int64_t B;
  if (G == 0) {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.size(1) == K,
                "int8 weight must be a contiguous int8 [N, K] tensor with K=", K);
    TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N,
                "int8 scales must be a contiguous fp32 [N] tensor");
    TORCH_CHECK(!offset.has_value(), "int8 weights have no offsets");
    B = q8_block_int8(K);
    TORCH_CHECK(B > 0, "the integer prefill kernels need K % 32 == 0, got K=", K);
  } else {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8 && q.is_contiguous() && q.size(1) * 2 == K,
                "int4 weight must be a contiguous uint8 [N, K/2] tensor with K=", K);
    TORCH_CHECK(K % 64 == 0 && G % 32 == 0 && G <= 256 && K % G == 0,
                "the integer prefill kernels need K % 64 == 0 and a group size in 32..256 dividing K; got K=", K, ", group ", G);
    TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N * (K / G),
                "int4 scales must be a contiguous fp32 [N, K/group] tensor");
    if (offset.has_value())
      TORCH_CHECK(offset->scalar_type() == torch::kFloat32 && offset->is_contiguous() &&
                      offset->numel() == N * (K / G),
                  "int4 offsets must be a contiguous fp32 [N, K/group] tensor");
    B = G;
  }
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                "bias must be a contiguous fp32 tensor with ", N, " elements");
    b = bias->data_ptr<float>();
  }
  *bp = b;
  return B;
}

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {
// M <= kRowsMaxM (decode / verify sizes) into out [M, N]: the row-invariant tiles (the VNNI kernels' bits).
// Session 38: x's B tiles, block scales and offsets' sums in buffers this thread keeps between calls
// (scratch.h) instead of two torch::empty and a std::vector a call, and the result straight into the
// caller's buffer: the decode step's `_out` calls copied the tiles' M x N result into theirs (the small
// shape's head at M = 8: 2.2 MB a step).
void rows_q8_amx_into(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                      const c10::optional<torch::Tensor>& offset, int64_t G, const float* b, int64_t B, float* out) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  const int64_t Mt = (M + 15) / 16, Mp = Mt * 16, nb = K / B;
  const bool offs = G > 0 && offset.has_value();
  static thread_local codeshell::ThreadScratch xt_keep, f_keep;
  codeshell::Scratch<int8_t> xt(xt_keep, size_t(Mt) * 16 * K);
  // dxt [nb][Mp], xs [M][nb], xst [nb][Mp] (zero past M)
  codeshell::Scratch<float> fb(f_keep, size_t(nb) * Mp + (offs ? size_t(M) * nb + size_t(nb) * Mp : 0));
  float* dxt = fb.data();
  float* xs = offs ? dxt + nb * Mp : nullptr;
  float* xst = offs ? xs + M * nb : nullptr;
  quantize_xt(x.data_ptr<float>(), M, K, B, xt.data(), dxt, xs);
  if (offs) {
    std::fill(xst, xst + nb * Mp, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < nb; ++g) xst[g * Mp + m] = xs[m * nb + g];
  }
  RowsProblem R{M, K, N, B, B % 64 == 0 ? 64 : 32, G, Mt, Mp, nb,
                G ? nullptr : q.data_ptr<int8_t>(), G ? q.data_ptr<uint8_t>() : nullptr, scale.data_ptr<float>(),
                offs ? offset->data_ptr<float>() : nullptr, b, xt.data(), dxt, xst, out};
  // session 38: int8 weights with K above CODESHELL_Q8_TILES_PF_MAXK (read per call; default 2048) skip the next
  // panel's L2 prefetch, whose bytes come row after row while the tiles read the 16 rows side by side. Alone,
  // from L3, M = 8, 1 thread (docs/kernels-log.md, session 38 helper B): K = 4096 1.07-1.15x faster without it
  // (the hardware's streams keep up with 4 KiB rows), K = 1024 1.3x slower
  R.pf8 = K <= codeshell::env_int("CODESHELL_Q8_TILES_PF_MAXK", 2048);
  rows_tiles(R);
}
}  // namespace
CODESHELL_END_AVX512
#endif

torch::Tensor prefill_q8_amx(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& offset, int64_t G,
                             const c10::optional<torch::Tensor>& bias);

// M <= 64 rows (the decode entry points' AMX rows, qdot_int8.cpp / qdot_int4.cpp) into out (fp32, at least M x N
// contiguous): prefill_q8_amx's bits without its result tensor. CODESHELL_Q8_TILES_OUT=0 (read per call):
// prefill_q8_amx and a copy, as before session 38.
void rows_q8_amx_out(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                     const c10::optional<torch::Tensor>& offset, int64_t G, const c10::optional<torch::Tensor>& bias,
                     torch::Tensor& out) {
  const int64_t M = x.size(0), N = q.size(0);
  if (M > 64 || !codeshell::env_flag("CODESHELL_Q8_TILES_OUT", true)) {
    const auto y = prefill_q8_amx(x, q, scale, offset, G, bias);
    std::memcpy(out.data_ptr<float>(), y.data_ptr<float>(), size_t(M * N) * sizeof(float));
    return;
  }
  codeshell::check_isa(codeshell::kAmx);
  const float* b = nullptr;
  const int64_t B = check_q8_prefill(x, q, scale, offset, G, bias, &b);
#if CODESHELL_HAVE_AVX512
  rows_q8_amx_into(x, q, scale, offset, G, b, B, out.data_ptr<float>());
#else
  (void)B;
#endif
}

torch::Tensor prefill_q8_amx(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& offset, int64_t G,
                             const c10::optional<torch::Tensor>& bias) {
  codeshell::check_isa(codeshell::kAmx);
  const float* b = nullptr;
  const int64_t B = check_q8_prefill(x, q, scale, offset, G, bias, &b);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto out = codeshell::cached_output(M, N, x.options());  // large results reuse freed blocks (scratch.h)
#if CODESHELL_HAVE_AVX512
  if (M <= kRowsMaxM && codeshell::env_flag("CODESHELL_Q8_TILES_OUT", true)) {  // session 38: rows_q8_amx_into
    rows_q8_amx_into(x, q, scale, offset, G, b, B, out.data_ptr<float>());
    return out;
  }
  const int64_t Mt = (M + 15) / 16, Mp = Mt * 16, nb = K / B;
  static thread_local codeshell::ThreadScratch xt_keep;  // x's B tiles, kept between calls (scratch.h)
  codeshell::Scratch<int8_t> xt(xt_keep, size_t(Mt) * 16 * K);
  auto dxt = torch::empty({nb * Mp}, x.options());
  const bool offs = G > 0 && offset.has_value();
  auto xs = torch::empty({offs ? M : 0, nb}, x.options());
  quantize_xt(x.data_ptr<float>(), M, K, B, xt.data(), dxt.data_ptr<float>(),
              offs ? xs.data_ptr<float>() : nullptr);
  if (M <= kRowsMaxM) {  // decode / verify sizes: the row-invariant tiles (the VNNI kernels' bits)
    std::vector<float> xst(offs ? size_t(nb) * Mp : 0, 0.f);
    const float* xsp = offs ? xs.data_ptr<float>() : nullptr;
    for (int64_t m = 0; offs && m < M; ++m)
      for (int64_t g = 0; g < nb; ++g) xst[g * Mp + m] = xsp[m * nb + g];
    RowsProblem R{M, K, N, B, B % 64 == 0 ? 64 : 32, G, Mt, Mp, nb,
                  G ? nullptr : q.data_ptr<int8_t>(), G ? q.data_ptr<uint8_t>() : nullptr, scale.data_ptr<float>(),
                  offs ? offset->data_ptr<float>() : nullptr, b, xt.data(), dxt.data_ptr<float>(),
                  offs ? xst.data() : nullptr, out.data_ptr<float>()};
    rows_tiles(R);
    return out;
  }
  Problem P{M, K, N, B, B % 64 == 0 ? 64 : 32, G,
            G ? nullptr : q.data_ptr<int8_t>(), G ? q.data_ptr<uint8_t>() : nullptr,
            scale.data_ptr<float>(), b, xt.data(), dxt.data_ptr<float>(), out.data_ptr<float>()};
  prefill_q8_tiles(P);
  if (offs) out.addmm_(xs, offset->view({N, nb}).t());  // sum_g off[n, g] * xs[m, g]
#endif
  return out;
}

// prefill_q8_amx's prompt tiles (M > 64) with a bf16 result [M, N] (session 38): `gelu`: the GELU of
// each sum rounded to bf16 (c_fc), else the sum rounded to bf16 (the other linears), from store_item
// while the item's sums are in L2, as prefill_bf16_amx's epilogues do for bf16 weights; x bf16 (read
// as x.float(): the same integers) or fp32. Why: the int8 / int4 prompt wrote c_fc's 8 MiB of fp32 a
// layer (small shape) for the fused GELU to read back and round, and the other linears' fp32 for the
// RoPE / residual casts, plus a fp32 copy of x for every linear. The int4 offsets' correction (an
// addmm on the fp32 result) has no place before the rounding here: weights with offsets keep
// prefill_q8_amx (the caller, module.py FastLinear, sends only offset-free weights).
torch::Tensor prefill_q8_amx_epi(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                                 int64_t G, const c10::optional<torch::Tensor>& bias, bool gelu) {
  codeshell::check_isa(codeshell::kAmx);
  const float* b = nullptr;
  const int64_t B = check_q8_prefill(x, q, scale, c10::nullopt, G, bias, &b, /*bf16_x=*/true);
  const bool b16 = x.scalar_type() == torch::kBFloat16;
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(M > kRowsMaxM, "prefill_q8_amx_epi takes the prompt's M > ", kRowsMaxM, " rows, got M = ", M);
  auto out = torch::empty({M, N}, x.options().dtype(torch::kBFloat16));
#if CODESHELL_HAVE_AVX512
  const int64_t Mt = (M + 15) / 16, Mp = Mt * 16, nb = K / B;
  static thread_local codeshell::ThreadScratch xt_keep;
  codeshell::Scratch<int8_t> xt(xt_keep, size_t(Mt) * 16 * K);
  auto dxt = torch::empty({nb * Mp}, x.options().dtype(torch::kFloat32));
  quantize_xt(b16 ? nullptr : x.data_ptr<float>(), M, K, B, xt.data(), dxt.data_ptr<float>(), nullptr,
              b16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr);
  Problem P{M, K, N, B, B % 64 == 0 ? 64 : 32, G,
            G ? nullptr : q.data_ptr<int8_t>(), G ? q.data_ptr<uint8_t>() : nullptr,
            scale.data_ptr<float>(), b, xt.data(), dxt.data_ptr<float>(), nullptr};
  P.out16 = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  P.hw = codeshell::bf16_cvt_hw();
  P.epi = !gelu ? kEpiB16 : codeshell::env_flag("CODESHELL_GELU_FAST", true) ? kEpiGeluFast : kEpiGelu;
  prefill_q8_tiles(P);
#endif
  return out;
}

// AVX512-VNNI: x fp32 [M, K] rounded to int8 per block as the decode kernels round it, times an
// int8 / int4 weight, + bias -> fp32 [M, N]; any M (ops.py sends M > 64: `avx512_vnni:q8`).
torch::Tensor prefill_q8_vnni(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                              const c10::optional<torch::Tensor>& offset, int64_t G,
                              const c10::optional<torch::Tensor>& bias) {
  codeshell::check_isa(codeshell::kAvx512Vnni);
  const float* b = nullptr;
  const int64_t B = check_q8_prefill(x, q, scale, offset, G, bias, &b);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto out = codeshell::cached_output(M, N, x.options());  // large results reuse freed blocks (scratch.h)
#if CODESHELL_HAVE_AVX512
  const int64_t T = (M + kVnMR - 1) / kVnMR, nb = K / B;
  const bool offs = G > 0 && offset.has_value();
  // session 41: int4 on its nibbles (vnni_repack_nib); CODESHELL_VNNI_Q4_NIB=0 (read per call): the offset form
  // (vnni_repack's scalar repack with its block sums), as before. The same bits.
  const bool nib = G > 0 && codeshell::env_flag("CODESHELL_VNNI_Q4_NIB", true);
  static thread_local codeshell::ThreadScratch x_keep, d_keep;
  codeshell::Scratch<uint32_t> xp(x_keep, size_t(T) * kVnMR * K / 4);
  codeshell::Scratch<float> dx(d_keep, size_t(T) * kVnMR * nb * 3);  // d, then xs, then cx (int32)
  float* xsp = offs ? dx.data() + T * kVnMR * nb : nullptr;
  int32_t* cxp = nib ? reinterpret_cast<int32_t*>(dx.data() + 2 * T * kVnMR * nb) : nullptr;
  vnni_pack_x(x.data_ptr<float>(), M, K, B, T, xp.data(), dx.data(), xsp, cxp);
  VnniProblem P{M, K, N, B, G, nb, T,
                G ? nullptr : q.data_ptr<int8_t>(), G ? q.data_ptr<uint8_t>() : nullptr,
                scale.data_ptr<float>(), offs ? offset->data_ptr<float>() : nullptr, b,
                xp.data(), dx.data(), xsp, out.data_ptr<float>(), cxp};
  if (G == 0) vnni_items<false, false>(P);
  else if (nib && offs) vnni_items<true, true, true>(P);
  else if (nib) vnni_items<true, false, true>(P);
  else if (offs) vnni_items<true, true>(P);
  else vnni_items<true, false>(P);
#endif
  return out;
}
