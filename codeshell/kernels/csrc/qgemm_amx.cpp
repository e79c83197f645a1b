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
// What this is not: decode (M <= 64 stays on qdot.cpp's VNNI kernels: x padded to 16 rows would
// waste the tiles at M = 1, and a row's result must not depend on M up to
// ops.ROW_INVARIANT_MAX_M, while this path's block sums are scaled in another order), nor a dispatcher: ops.py measures this path against the bf16 paths
// (AMX-BF16 on expanded rows, torch's oneDNN) and sgemm per shape and keeps the fastest.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "isa.h"
#include "parallel.h"
#include "quant_x.h"
#include "scratch.h"

int64_t q8_block_int8(int64_t K);  // qdot.cpp: the int8 weight's activation block for K

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

constexpr int64_t kChunkK = 512;    // k per pass: 4 panels of A (32 KiB) stay in L1 while B tiles stream past
constexpr int64_t kItemPanels = 16; // panels of 16 weight rows per work item (fewer when there are few panels)

struct alignas(64) TileCfg {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0..3: C^T int32 [16 weight rows][16 rows of x]; tmm4/5: A [16 weight rows][D bytes];
// tmm6/7: B [D/4 k-quads][16 rows of x x 4 bytes].
void configure(int D) {
  TileCfg c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = t >= 6 ? uint8_t(D / 4) : 16;
    c.colsb[t] = t == 4 || t == 5 ? uint16_t(D) : 64;
  }
  _tile_loadconfig(&c);
}

// In-register transpose of a 16 x 16 matrix of 32-bit elements (r[i] = row i): unpack 32 and 64
// within 128-bit lanes, then two rounds of lane shuffles (64 shuffles for 1 KiB).
inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // b[4g + j], lane L: column 4L + j of rows 4g..4g+3
  for (int g = 0; g < 4; ++g) {
    b[4 * g + 0] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], _MM_SHUFFLE(3, 2, 3, 2));
    r[j] = _mm512_shuffle_i32x4(c0, c2, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + j] = _mm512_shuffle_i32x4(c0, c2, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + j] = _mm512_shuffle_i32x4(c1, c3, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + j] = _mm512_shuffle_i32x4(c1, c3, _MM_SHUFFLE(3, 1, 3, 1));
  }
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
void quantize_xt(const float* x, int64_t M, int64_t K, int64_t B, int8_t* xt, float* dxt, float* xs) {
  const int64_t nb = K / B, Mt = (M + 15) / 16, Mp = Mt * 16;
  at::parallel_for(0, Mt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> rows(size_t(16) * K);
    for (int64_t mt = t0; mt < t1; ++mt) {
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t m = mt * 16 + r;
        int8_t* o = rows.data() + r * K;
        if (m < M) {
          codeshell::quantize_row_avx512(x + m * K, K, B, /*perm=*/0, o, dxt + m, Mp, xs ? xs + m * nb : nullptr);
        } else {
          std::memset(o, 0, size_t(K));
          for (int64_t b = 0; b < nb; ++b) dxt[b * Mp + m] = 0.f;
        }
      }
      int64_t k = 0;
      for (; k + 64 <= K; k += 64) {  // 16 k-quads in a row of one chunk (chunks are multiples of 64)
        __m512i v[16];
        for (int r = 0; r < 16; ++r) v[r] = _mm512_loadu_si512(rows.data() + r * K + k);
        transpose16(v);
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
};

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
      transpose16(v);
      for (int64_t j = 0; j < 16 && mt * 16 + j < P.M; ++j)
        _mm512_mask_storeu_ps(P.out + (mt * 16 + j) * P.N + n0, cm,
                              _mm512_fmadd_ps(_mm512_castsi512_ps(v[j]), sv, bv));
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

}  // namespace
CODESHELL_END_AVX512
#endif

// x [M, K] fp32 @ W^T + bias -> fp32 [M, N] on AMX-INT8 tiles, x rounded to int8 per block.
// G = 0: W = q int8 [N, K] * scale [N] (blocks of q8_block_int8(K)); G > 0: int4 q uint8 [N, K/2],
// scale [N, K/G], offset [N, K/G] or None (blocks = groups; K % 64 == 0, G in 32..256).
torch::Tensor prefill_q8_amx(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& offset, int64_t G,
                             const c10::optional<torch::Tensor>& bias) {
  codeshell::check_isa(codeshell::kAmx);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous fp32 [M, K] tensor");
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
    TORCH_CHECK(B > 0, "the AMX int8 kernel needs K % 32 == 0, got K=", K);
  } else {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8 && q.is_contiguous() && q.size(1) * 2 == K,
                "int4 weight must be a contiguous uint8 [N, K/2] tensor with K=", K);
    TORCH_CHECK(K % 64 == 0 && G % 32 == 0 && G <= 256 && K % G == 0,
                "the AMX int4 kernel needs K % 64 == 0 and a group size in 32..256 dividing K; got K=", K, ", group ", G);
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
  auto out = codeshell::cached_output(M, N, x.options());  // large results reuse freed blocks (scratch.h)
#if CODESHELL_HAVE_AVX512
  const int64_t Mt = (M + 15) / 16, Mp = Mt * 16, nb = K / B;
  static thread_local codeshell::ThreadScratch xt_keep;  // x's B tiles, kept between calls (scratch.h)
  codeshell::Scratch<int8_t> xt(xt_keep, size_t(Mt) * 16 * K);
  auto dxt = torch::empty({nb * Mp}, x.options());
  const bool offs = G > 0 && offset.has_value();
  auto xs = torch::empty({offs ? M : 0, nb}, x.options());
  quantize_xt(x.data_ptr<float>(), M, K, B, xt.data(), dxt.data_ptr<float>(),
              offs ? xs.data_ptr<float>() : nullptr);
  Problem P{M, K, N, B, B % 64 == 0 ? 64 : 32, G,
            G ? nullptr : q.data_ptr<int8_t>(), G ? q.data_ptr<uint8_t>() : nullptr,
            scale.data_ptr<float>(), b, xt.data(), dxt.data_ptr<float>(), out.data_ptr<float>()};
  prefill_q8_tiles(P);
  if (offs) out.addmm_(xs, offset->view({N, nb}).t());  // sum_g off[n, g] * xs[m, g]
#endif
  return out;
}
