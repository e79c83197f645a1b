// Prefill attention over the engine's KV cache on AVX512-BF16 (or AVX-512 emulating it): T new queries per row, causal by
// position, grouped-query heads, bf16 in and out, fp32 math.
//
// What this is: y[b, t, h] = softmax(scale * q[b, h, t] . K[slot_b, g]^T over keys 0..pos[b, t])
// V[slot_b, g] with g = h / (H / G), K and V read in place from the cache layer [slots, G,
// max_len, D] (the new keys already stored there), in the flash-attention order: per block of KB
// keys (64 by default, 16 or 32 by the caller's `key_block`), the scores of every query of a work
// item, an online softmax (running max and sum per query), and the value rows accumulated in
// fp32; keys past a query's position never computed (a whole key block is skipped once it is
// past every query of the item).
// Key blocks (session 18): each block costs every query row two horizontal reductions, a scalar
// exp and the rescale of its fp32 output (now folded into the value product's load of o), and
// the 16-key block ran 8 vdpbf16ps chains in both products; 64 keys x 4 rows (16 chains in both
// products) measured 1.83x / 1.78x / 1.64x faster than 16 x 8 at the small / 7B / codeshell-mini
// shapes (T = 512 / 512 / 256; docs/kernels-log.md "Session 18, helper C"). Another block gives other
// last bits (another running-max schedule); the 16-key block gives the session-15 kernel's.
// What this is not: decode attention (one query per row: attention.cpp), a training kernel (no
// gradient, no dropout), or an AVX2 kernel. Without AVX512-BF16 (AVX-512 F/BW only: Ice Lake /
// Cascade Lake Xeons) the same kernel runs with vdpbf16ps and vcvtneps2bf16 emulated (`dpbf16`,
// `to_bf16` below; session 23: 1.09x / 1.16x whole prompts over PyTorch's SDPA there).
//
// Why: PyTorch's CPU SDPA (its flash kernel, bf16) ran 66-125 GFLOP/s on a 2-core Zen 4 against
// 0.81 TFLOP/s for its own bf16 matmul there, and took 39% of a 512-token prefill of a 1024-wide
// model (8 layers: 66 of 167 ms, the linears 84); with a boolean mask (what a cache with a
// prefix needs) it also computes the masked half of the causal square. Here both products are
// vdpbf16ps on blocks packed once for all the item's query rows: the scores over a key block laid
// out as a weight panel (16 keys x 2 dims per 64-byte vector, the bf16 matmul kernels' operand),
// the values over key pairs (16 dims x 2 keys) with the probabilities rounded to bf16 once, as
// PyTorch's own CPU flash kernel rounds them for its bf16 value product (fp32 FMAs on the values
// ran the whole kernel at 161-182 GFLOP/s; vdpbf16ps does twice the multiply-adds an instruction).
// Work item: (row b, KV group g, 32 consecutive queries) = the r = H / G query heads of the group
// x 32 queries, R = 32 r rows of queries sharing each packed key/value block.
// Session 27 (the widened kernel on an Ice Lake-class Xeon without AVX512-BF16; all the same bits,
// each behind a switch for A/B): block_rows4 in row groups of 32 (score tiles, softmax, value
// product per group; CODESHELL_PREFILL_ATTN_GROUP=4 is the kernel before), the probabilities'
// rounding by round_bf16_pos (CODESHELL_PREFILL_ATTN_ROUND=0: to_bf16), the keys packed by 16 x 16
// transposes (CODESHELL_PREFILL_ATTN_KPACK=0: scalar), the costliest items claimed first
// (CODESHELL_PREFILL_ATTN_ORDER=0: row, group, query order); CODESHELL_PREFILL_ATTN_DOUT=1 (off: no
// gain measured) runs a group's value product dims outside. docs/kernels-log.md "Session 27, helper A".

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "amx_tiles.h"
#include "isa.h"
#include "parallel.h"
#include "scratch.h"
#include "simd.h"
#include "simd512.h"
#include "switches.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

constexpr int64_t kTq = 32;   // queries per work item (per head of the group)
constexpr int64_t kKbMax = 64;  // the largest key block (scratch sizes)
constexpr int kMrMax = 8;       // the most query rows per score tile (scratch sizes, tile padding)
constexpr int kGroupMax = 32;   // the most rows of a block_rows4 row group (its probabilities' scratch)

// The two AVX512-BF16 instructions the kernel uses, and their emulation on AVX-512 F/BW (E = true:
// CPUs without AVX512-BF16, such as Ice Lake / Cascade Lake Xeons; session 23). vdpbf16ps adds the
// products of a lane's two bf16 pairs to its fp32 sum; a bf16 x bf16 product is exact in fp32, so
// each step is one rounded add, which an FMA on the operands widened to fp32 (the odd element:
// the high 16 bits kept, the even one: shifted up) gives exactly; the odd pair first, then the
// even one, as the SDM's pseudo-code orders them. The emulation's bits are its own (an AVX512-BF16
// CPU may round the pair's sum once); it is checked against fp32 attention like the instruction.
// vcvtneps2bf16: round to nearest even, denormals flushed to signed zero, NaN kept quiet.
template <bool E>
inline __m512 dpbf16(__m512 acc, __m512i a, __m512i b) {
  if constexpr (!E) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  } else {
    const __m512i hi = _mm512_set1_epi32(int(0xffff0000u));
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)), _mm512_castsi512_ps(_mm512_and_si512(b, hi)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)),
                           acc);
  }
}

template <bool E>
inline __m256i to_bf16(__m512 v) {
  if constexpr (!E) {
    return (__m256i)_mm512_cvtneps_pbh(v);
  } else {
    __m512i u = _mm512_castps_si512(v);
    const __mmask16 den = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000));  // zero or denormal
    u = _mm512_mask_and_epi32(u, den, u, _mm512_set1_epi32(int(0x80000000u)));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                              _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
  }
}

// The fp32 value of to_bf16<true>(v), v an exp16 result: finite and >= +0 (exp16 clamps its input
// to [-88, 88], a NaN included, and returns +0 or y 2^n), for the widened kernel's probabilities
// (W: only the rounded value as fp32 is stored and summed). to_bf16<true> flushes a denormal to
// +0, rounds to nearest even ((u + 0x7fff + lsb) >> 16) and keeps a NaN quiet; here the flush is
// the and's zero mask and the shift back is the and with 0xffff0000: 6 instructions against
// to_bf16's 12 plus the widening's 2 (vpmovdw is 2 uops on the FMA ports' port 5), the same bits
// for every such v (session 27; CODESHELL_PREFILL_ATTN_ROUND=0 keeps to_bf16, A/B).
inline __m512 round_bf16_pos(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __mmask16 normal = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x7f800000));  // not zero or denormal
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_maskz_and_epi32(normal, r, _mm512_set1_epi32(int(0xffff0000u))));
}

struct Item {
  const uint16_t* q;      // q[b] base: [H][T][D] with strides qh, qt (elements)
  int64_t qh, qt;
  const uint16_t* k;      // cache rows of (slot, g): [max_len][D]
  const uint16_t* v;
  const int64_t* pos;     // positions[b] [T]
  uint16_t* y;            // y[b] [T][H][D]
  int64_t H, D, r, g, t0, t1;
  float scale;
  bool trim;              // a partial last key block computes only its chunks with keys (block_rows)
  uint32_t* pk;           // the (row, group)'s key blocks, packed once for all its items (prepack), or null:
  std::atomic<int>* ready;  // per block 0 not packed, 1 being packed, 2 packed
  int64_t nkeys;          // the row's keys (its last position + 1): what a shared block holds
  bool full;              // block_rows4: tiles whose keys are all visible skip the masks (the same bits)
  int64_t group;          // block_rows4: rows per row group (a multiple of 4 up to kGroupMax)
  bool dout;              // block_rows4 (W): the group's value product dims outside, rows inside (pv_tile)
  bool round;             // block_rows4 (W): the probabilities' bf16 rounding by round_bf16_pos
  bool kpack;             // pack_block_w: the keys by 16 x 16 transposes
  bool fexp = false;      // run_item_amx, block_rows4 (not E): the softmax's exp by exp2_poly4 (sessions 38, 39; other last bits)
  bool fsum = false;      // with fexp: fp32 row sums and the four rows' alpha in one vector
  bool vsm = false;       // with fexp and fsum: block_rows4's row maxima, alpha, sums in vector lanes (session 40)
  bool pv8 = false;       // block_rows4 (not W), D = 32: the value product 8 rows at a time (session 40)
};

// kp[d2][j] = the (2 d2, 2 d2 + 1) pair of key j0 + j, vp[j2][d] = (value 2 j2, value 2 j2 + 1) of
// dim d, for the KB keys j0..j0+KB-1 (zero past `n`): both operands of vdpbf16ps as they are (the
// scores sum over dims in pairs, the values over keys in pairs).
template <int KB>
inline void pack_block(const Item& it, int64_t j0, int64_t n, uint32_t* kp, uint32_t* vp) {
  const int64_t D = it.D, D2 = D / 2;
  for (int64_t j = 0; j < KB; ++j) {
    const uint32_t* kr = reinterpret_cast<const uint32_t*>(it.k + (j0 + j) * D);
    if (j < n)
      for (int64_t d2 = 0; d2 < D2; ++d2) kp[d2 * KB + j] = kr[d2];
    else
      for (int64_t d2 = 0; d2 < D2; ++d2) kp[d2 * KB + j] = 0u;
  }
  for (int64_t j2 = 0; j2 < KB / 2; ++j2) {
    const int64_t a = 2 * j2, b = a + 1;
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i lo = a < n ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                     it.v + (j0 + a) * D + d)))
                               : _mm512_setzero_si512();
      const __m512i hi = b < n ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                     it.v + (j0 + b) * D + d)))
                               : _mm512_setzero_si512();
      _mm512_store_si512(vp + j2 * D + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// The widened layout (session 25, W: the emulated kernel without AVX512-BF16): both operands of
// every emulated vdpbf16ps widened to fp32 once here, not in the products' inner loops, where each
// operand vector cost two ALU ops (a mask and a shift) on the two ports that also run the FMAs
// (about a third of the port work of a 64-key x 4-row score tile on an Ice Lake Xeon).
// kw[d2][0][j] = dim 2 d2 + 1 of key j0 + j (the pair's high half), kw[d2][1][j] = dim 2 d2;
// vw[j2][0][d] = dim d of value 2 j2 + 1, vw[j2][1][d] = of value 2 j2 (zero past `n`). The
// products then run dpbf16<true>'s two FMAs on the same values in the same order: the same bits.
// The keys 16 x 16 pairs at a time (session 27; CODESHELL_PREFILL_ATTN_KPACK=0: a value at a time,
// as before): 16 keys' rows of 16 dim pairs loaded (zeros past `n`), transposed in registers
// (transpose16), each pair vector then stored as its high halves (and 0xffff0000) and its low ones
// (shifted up): the same values, one vector op per 16 where the scalar loop did two shifts and two
// stores per pair (~8 K a block: ~3% of a small-shape call's samples with the other packing).
template <int KB>
inline void pack_block_w(const Item& it, int64_t j0, int64_t n, float* kw, float* vw) {
  const int64_t D = it.D, D2 = D / 2;
  if (it.kpack) {
    const __m512i hm = _mm512_set1_epi32(int(0xffff0000u));
    for (int64_t jc = 0; jc < KB; jc += 16)
      for (int64_t d2c = 0; d2c < D2; d2c += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = jc + i < n ? _mm512_loadu_si512(it.k + (j0 + jc + i) * D + 2 * d2c) : _mm512_setzero_si512();
        codeshell::transpose16(r);
        for (int q = 0; q < 16; ++q) {
          float* dst = kw + (d2c + q) * 2 * KB + jc;
          _mm512_store_si512(dst, _mm512_and_si512(r[q], hm));
          _mm512_store_si512(dst + KB, _mm512_slli_epi32(r[q], 16));
        }
      }
  } else
  for (int64_t j = 0; j < KB; ++j) {
    const uint16_t* kr = it.k + (j0 + j) * D;
    for (int64_t d2 = 0; d2 < D2; ++d2) {
      const uint32_t hi = j < n ? uint32_t(kr[2 * d2 + 1]) << 16 : 0u, lo = j < n ? uint32_t(kr[2 * d2]) << 16 : 0u;
      std::memcpy(kw + d2 * 2 * KB + j, &hi, 4);
      std::memcpy(kw + d2 * 2 * KB + KB + j, &lo, 4);
    }
  }
  for (int64_t j2 = 0; j2 < KB / 2; ++j2)
    for (int u = 0; u < 2; ++u) {  // u = 0: value 2 j2 + 1 (the high half), 1: value 2 j2
      const int64_t j = 2 * j2 + 1 - u;
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 w = j < n ? codeshell::load_bf16x16(it.v + (j0 + j) * D + d) : _mm512_setzero_ps();
        _mm512_store_si512(vw + (2 * j2 + u) * D + d, _mm512_castps_si512(w));
      }
    }
}

// scores<true, ..> on the widened layout: qr[i] a query row widened to fp32 (dims in order), kw as
// pack_block_w lays it out; per dim pair the high halves' FMA, then the low halves' (dpbf16<true>).
template <int MR, int NB, int KB = 16 * NB>
inline void scores_w(const float* const* qr, const float* kw, int64_t D2, __m512* s) {
  __m512 acc[MR][NB];
  const float* q[MR];
  for (int i = 0; i < MR; ++i) {
    q[i] = qr[i];
    for (int c = 0; c < NB; ++c) acc[i][c] = _mm512_setzero_ps();
  }
  for (int64_t d2 = 0; d2 < D2; ++d2) {
    __m512 kh[NB], kl[NB];
    for (int c = 0; c < NB; ++c) {
      kh[c] = _mm512_load_ps(kw + d2 * 2 * KB + 16 * c);
      kl[c] = _mm512_load_ps(kw + d2 * 2 * KB + KB + 16 * c);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 qh = _mm512_set1_ps(q[i][2 * d2 + 1]), ql = _mm512_set1_ps(q[i][2 * d2]);
      for (int c = 0; c < NB; ++c) acc[i][c] = _mm512_fmadd_ps(ql, kl[c], _mm512_fmadd_ps(qh, kh[c], acc[i][c]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < NB; ++c) s[i * (KB / 16) + c] = acc[i][c];
}

// pv_chunk<true, ..> on the widened layout: p[r] a row's probabilities as fp32 (keys in order, each
// the bf16-rounded value), vw as pack_block_w lays it out; per key pair the odd key's FMA, then the
// even key's (dpbf16<true> on the pair (p[2 j2], p[2 j2 + 1])).
template <int NR, int NC>
inline void pv_chunk_w(float* const* o, const float* const* p, const float* alpha, const float* vw, int64_t D,
                       int64_t d, int64_t KP, bool first) {
  __m512 a[NR][NC];
  for (int r = 0; r < NR; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < NC; ++c)
      a[r][c] = first ? _mm512_setzero_ps() : _mm512_mul_ps(_mm512_load_ps(o[r] + d + 16 * c), al);
  }
  for (int64_t j2 = 0; j2 < KP; ++j2) {
    __m512 bh[NR], bl[NR];
    for (int r = 0; r < NR; ++r) bh[r] = _mm512_set1_ps(p[r][2 * j2 + 1]), bl[r] = _mm512_set1_ps(p[r][2 * j2]);
    for (int c = 0; c < NC; ++c) {
      const __m512 vh = _mm512_load_ps(vw + 2 * j2 * D + d + 16 * c), vl = _mm512_load_ps(vw + (2 * j2 + 1) * D + d + 16 * c);
      for (int r = 0; r < NR; ++r) a[r][c] = _mm512_fmadd_ps(bl[r], vl, _mm512_fmadd_ps(bh[r], vh, a[r][c]));
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) _mm512_store_ps(o[r] + d + 16 * c, a[r][c]);
}

// Scores of MR query rows (row pointers qr[i], bf16 pairs) against the packed block of NB x 16
// keys: s[i * NB + c] (keys 16c..16c+15). The sums and the row pointers are locals: __m512 is a
// may-alias type, so accumulating through `s` itself kept every sum in memory (a store and a
// reload per vdpbf16ps, perf on Zen 5) and reloaded the row pointers each step. MR x NB
// independent chains (16 at the default tiles: 8 left vdpbf16ps's latency exposed).
template <bool E, int MR, int NB, int KB = 16 * NB>
inline void scores(const uint32_t* const* qr, const uint32_t* kp, int64_t D2, __m512* s) {
  __m512 acc[MR][NB];
  const uint32_t* q[MR];
  for (int i = 0; i < MR; ++i) {
    q[i] = qr[i];
    for (int c = 0; c < NB; ++c) acc[i][c] = _mm512_setzero_ps();
  }
  for (int64_t d2 = 0; d2 < D2; ++d2) {
    __m512i kv[NB];
    for (int c = 0; c < NB; ++c) kv[c] = _mm512_load_si512(kp + d2 * KB + 16 * c);
    for (int i = 0; i < MR; ++i) {
      const __m512i qb = _mm512_set1_epi32(int(q[i][d2]));
      for (int c = 0; c < NB; ++c) acc[i][c] = dpbf16<E>(acc[i][c], qb, kv[c]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < NB; ++c) s[i * (KB / 16) + c] = acc[i][c];
}

// o[r] = alpha[r] o[r] + p[r] . V for NR query rows sharing each value vector, over the block's
// KP key pairs, for dims [d, d + 16 NC): the value operand vp[j2][d] (key pairs) as pack_block lays
// it out. The online softmax's rescale of o (alpha: 1 where the row's max did not move, exact) is
// done on the load here, not in a pass of its own: the same multiply before the same sums.
// first: the item's first key block (keys 0..): every row's alpha is 0 there (its running max moves
// from -inf) and o would be zeros, so the sums start from +0 without reading o (+0 x 0 = +0: the
// same bits), and o need not be zero-filled before (run_item).
template <bool E, int NR, int NC>
inline void pv_chunk(float* const* o, const uint32_t* const* p, const float* alpha, const uint32_t* vp,
                     int64_t D, int64_t d, int64_t KP, bool first) {
  __m512 a[NR][NC];
  for (int r = 0; r < NR; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < NC; ++c)
      a[r][c] = first ? _mm512_setzero_ps() : _mm512_mul_ps(_mm512_load_ps(o[r] + d + 16 * c), al);
  }
  for (int64_t j2 = 0; j2 < KP; ++j2) {
    __m512i b[NR];
    for (int r = 0; r < NR; ++r) b[r] = _mm512_set1_epi32(int(p[r][j2]));
    for (int c = 0; c < NC; ++c) {
      const __m512i vv = _mm512_load_si512(vp + j2 * D + d + 16 * c);
      for (int r = 0; r < NR; ++r) a[r][c] = dpbf16<E>(a[r][c], b[r], vv);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) _mm512_store_ps(o[r] + d + 16 * c, a[r][c]);
}

// A score tile on either layout: scores<E> on bf16 pairs, or (W) scores_w on pack_block_w's fp32
// keys with qrowp pointing at fp32 query rows (run_item widens them). Shared by block_rows and
// block_rows4.
template <bool E, bool W, int MR, int NB, int KB>
inline void scores_tile(const uint32_t* const* qrowp, const uint32_t* kp, int64_t D2, __m512* s) {
  if constexpr (W)
    scores_w<MR, NB, KB>(reinterpret_cast<const float* const*>(qrowp), reinterpret_cast<const float*>(kp), D2, s);
  else
    scores<E, MR, NB, KB>(qrowp, kp, D2, s);
}

// Chunk c (16 keys) of a probability row p: the bf16 values eb as pairs, or (W) their fp32 widening er.
template <bool W>
inline void store_probs(uint32_t* p, int c, __m256i eb, __m512 er) {
  if constexpr (W) _mm512_store_ps(reinterpret_cast<float*>(p) + 16 * c, er);
  else _mm256_store_si256(reinterpret_cast<__m256i*>(p + 8 * c), eb);
}

// pv_chunk over all D dims: 64 at a time, then a last 32 where D % 64 == 32 (head dim 32, 96, ..:
// codeshell-mini's heads are 32 wide). Each lane's sum runs over the key pairs in the same order
// whatever the chunk width, so the width does not change a bit.
template <bool E, int NR, bool W = false>
inline void pv_rows(float* const* o, const uint32_t* const* p, const float* alpha, const uint32_t* vp, int64_t D,
                    int64_t KP, bool first) {
  int64_t d = 0;
  if constexpr (W) {  // p: fp32 rows, vp: pack_block_w's values
    const float* const* pf = reinterpret_cast<const float* const*>(p);
    const float* vw = reinterpret_cast<const float*>(vp);
    for (; d + 64 <= D; d += 64) pv_chunk_w<NR, 4>(o, pf, alpha, vw, D, d, KP, first);
    if (d < D) pv_chunk_w<NR, 2>(o, pf, alpha, vw, D, d, KP, first);
    return;
  }
  for (; d + 64 <= D; d += 64) pv_chunk<E, NR, 4>(o, p, alpha, vp, D, d, KP, first);
  if (d < D) pv_chunk<E, NR, 2>(o, p, alpha, vp, D, d, KP, first);
}

// o[i0 + ii] = alpha[ii] o[i0 + ii] + p[ii] . V for a score tile's `rows` rows (probabilities prow
// [rows][kP] key pairs): PR rows at a time sharing each value vector, then one at a time. Shared by
// block_rows and block_rows4.
// dout (W only, block_rows4's row groups; session 27): the dims outside, the rows inside: each 64-dim
// chunk of the value block (16 KiB of widened values at KB = 64) for all the group's rows, then the
// next, where each PR rows read all D dims (the whole 32 KiB block at D = 128) before the next PR
// rows: the block and the group's o rows then stay in L1 through the group (its value loads were the
// hottest instructions of pv_chunk_w in a profile). Each (row, dim) sum is the same chain: the same bits.
template <bool E, int PR, bool W = false>
inline void pv_tile(const int64_t rows, const int64_t i0, float* o, const uint32_t* prow, const int64_t kP,
                    const float* alpha, const uint32_t* vp, const int64_t D, const int64_t kPe, const bool first,
                    const bool dout = false) {
  if constexpr (W) if (dout) {
    const float* vw = reinterpret_cast<const float*>(vp);
    auto chunk = [&](auto nc, int64_t d) {
      constexpr int NC = decltype(nc)::value;
      int64_t ii = 0;
      for (; ii + PR <= rows; ii += PR) {
        float* orow[PR];
        const float* pr[PR];
        for (int r = 0; r < PR; ++r)
          orow[r] = o + (i0 + ii + r) * D, pr[r] = reinterpret_cast<const float*>(prow + (ii + r) * kP);
        pv_chunk_w<PR, NC>(orow, pr, alpha + ii, vw, D, d, kPe, first);
      }
      for (; ii < rows; ++ii) {
        float* const orow[1] = {o + (i0 + ii) * D};
        const float* const pr[1] = {reinterpret_cast<const float*>(prow + ii * kP)};
        pv_chunk_w<1, NC>(orow, pr, alpha + ii, vw, D, d, kPe, first);
      }
    };
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) chunk(std::integral_constant<int, 4>{}, d);
    if (d < D) chunk(std::integral_constant<int, 2>{}, d);
    return;
  }
  int64_t ii = 0;
  for (; ii + PR <= rows; ii += PR) {
    float* orow[PR];
    const uint32_t* pr[PR];
    for (int r = 0; r < PR; ++r) orow[r] = o + (i0 + ii + r) * D, pr[r] = prow + (ii + r) * kP;
    pv_rows<E, PR, W>(orow, pr, alpha + ii, vp, D, kPe, first);
  }
  for (; ii < rows; ++ii) {
    float* const orow[1] = {o + (i0 + ii) * D};
    const uint32_t* const pr[1] = {prow + ii * kP};
    pv_rows<E, 1, W>(orow, pr, alpha + ii, vp, D, kPe, first);
  }
}

// The score tiles and value products of one key block for all R rows: NBE of the block's KB / 16
// key chunks hold keys (a last, partial block: the chunks past its keys are never computed) and
// kPe key pairs (the value product stops there). The chunks and pairs left out hold only keys no
// query sees (zero probabilities on zero values): the same sums, the same bits as the whole block.
template <bool E, int KB, int MR, int PR, int NBE, bool W = false>
inline void block_rows(const int64_t R, const int64_t D, const int64_t D2, const int64_t j0, const int64_t kPe,
                       const uint32_t* const* qrowp, const int64_t* qpos, const uint32_t* kp, const uint32_t* vp,
                       float* o, float* mrow, float* lrow, uint32_t* prow, const __m512 sc, const __m512i lane,
                       const bool first) {
  constexpr int NB = KB / 16;
  // a probability row: KB / 2 bf16 pairs, or (W) KB floats
  constexpr int64_t kP = W ? KB : KB / 2;
    for (int64_t i0 = 0; i0 < R; i0 += MR) {
      __m512 s[MR * NB];
      scores_tile<E, W, MR, NBE, KB>(qrowp + i0, kp, D2, s);
      const int64_t rows = std::min<int64_t>(MR, R - i0);
      float alpha[MR];
      for (int64_t ii = 0; ii < rows; ++ii) {
        const int64_t i = i0 + ii;
        uint32_t* p = prow + ii * kP;
        alpha[ii] = 1.f;
        // keys j0 + 16c + lane <= pos of this query are visible
        const int64_t last = qpos[i] - j0;
        if (last < 0) {  // a block wholly past this query: nothing to add
          std::memset(p, 0, kP * 4);
          continue;
        }
        __m512 x[NB];
        __mmask16 vis[NB];
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int c = 0; c < NBE; ++c) {
          vis[c] = _mm512_cmp_epi32_mask(lane, _mm512_set1_epi32(int32_t(std::min<int64_t>(last - 16 * c, 16))),
                                         _MM_CMPINT_LE);
          x[c] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), vis[c], _mm512_mul_ps(s[ii * NB + c], sc));
          mx = _mm512_max_ps(mx, x[c]);
        }
        const float mnew = std::max(mrow[i], _mm512_reduce_max_ps(mx));
        const float al = std::exp(mrow[i] - mnew);  // 0 on the first visible block (-inf)
        // the probabilities rounded to bf16 once (the values' vdpbf16ps operand); the row sum
        // adds the rounded values, so the weights that multiply V are the ones normalised
        const __m512 mv = _mm512_set1_ps(mnew);
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < NBE; ++c) {
          const __m256i eb = to_bf16<E>(_mm512_maskz_mov_ps(vis[c], codeshell::exp16(_mm512_sub_ps(x[c], mv))));
          const __m512 er = codeshell::widen_bf16x16(eb);
          store_probs<W>(p, c, eb, er);
          sum = NBE == 1 ? er : _mm512_add_ps(sum, er);
        }
        // l a l + sum as a rounded product then a rounded sum: not contracted into an FMA (whether the
        // compiler contracts it depends on the inlining around it; the bits must not)
        float lp = lrow[i] * al;
        __asm__("" : "+x"(lp));
        lrow[i] = lp + _mm512_reduce_add_ps(sum);
        mrow[i] = mnew;
        alpha[ii] = al;
      }
      // o[i] = alpha o[i] + p[i] . V: vdpbf16ps over key pairs, PR rows at a time sharing each value vector
      pv_tile<E, PR, W>(rows, i0, o, prow, kP, alpha, vp, D, kPe, first);
    }
}

// 2^t for the prefill softmax (session 38, helper A, for the AMX kernel; session 39 helper A: also
// block_rows4's, the vdpbf16ps kernel's; CODESHELL_PREFILL_ATTN_FEXP=0: exp16 as before):
// n = round(t), f = t - n in [-1/2, 1/2], 2^f by a degree-4 polynomial (Taylor in f ln 2: relative
// error <= 4.5e-5, against the 2^-9 of the bf16 rounding every probability gets next), 2^n by
// vscalefps (0 for t below -149, no clamp needed). t = s * scale * log2(e) - m * log2(e) comes from
// one fmsub on the raw score: the scale multiply, the subtraction and exp16's range reduction
// (mul, roundscale, two fnmadd), its 6 fmadds, clamps and exponent arithmetic were ~18 vector ops a
// 16 scores; this is 8. Why: at codeshell-mini's head dim 32 a score costs one 32-deep k-tile of
// TMUL work and the softmax's vector ops bound the kernel (session 37, helper C: 0.15 TFLOP/s a core,
// 30% of the prompt). Masked lanes (-inf) give NaN here and are zeroed by the caller's mask.
inline __m512 exp2_poly4(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 y = _mm512_set1_ps(9.6181291e-3f);                  // ln2^4 / 24
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504109e-2f));  // ln2^3 / 6
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022651e-1f));  // ln2^2 / 2
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718e-1f));  // ln2
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

// The horizontal max (MAX) or sum of four rows' vectors v[0..3] at once, lane 4 r holding row r's:
// the same tree, operand for operand, as GCC's _mm512_reduce_max_ps / _mm512_reduce_add_ps
// (avx512fintrin.h's __MM512_REDUCE_OP: the high 256 bits op the low, then the high 128 op the
// low, then lanes {2,3} op {0,1}, then lane 1 op lane 0 with lane 0 first), so each row gets the
// bits the one-row reduction gives, in 3 shuffle-op steps for four rows instead of four chains of
// extracts and scalar ops (the softmax's reductions were a per-row latency chain between the score
// and the value products).
template <bool MAX>
inline __m512 reduce4(const __m512* v) {
  auto op = [](__m512 a, __m512 b) { return MAX ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b); };
  // [hi256(v0) | hi256(v1)] op [lo256(v0) | lo256(v1)]: T3 of rows 0 and 1 (and 2, 3)
  const __m512 c01 = op(_mm512_shuffle_f32x4(v[0], v[1], _MM_SHUFFLE(3, 2, 3, 2)),
                        _mm512_shuffle_f32x4(v[0], v[1], _MM_SHUFFLE(1, 0, 1, 0)));
  const __m512 c23 = op(_mm512_shuffle_f32x4(v[2], v[3], _MM_SHUFFLE(3, 2, 3, 2)),
                        _mm512_shuffle_f32x4(v[2], v[3], _MM_SHUFFLE(1, 0, 1, 0)));
  // T6 of rows 0..3 in 128-bit lanes 0..3: high 128 of each T3 op its low 128
  const __m512 t6 = op(_mm512_shuffle_f32x4(c01, c23, _MM_SHUFFLE(3, 1, 3, 1)),
                       _mm512_shuffle_f32x4(c01, c23, _MM_SHUFFLE(2, 0, 2, 0)));
  const __m512 t8 = op(t6, _mm512_permute_ps(t6, _MM_SHUFFLE(1, 0, 3, 2)));   // T6 op {2,3,0,1}
  return op(t8, _mm512_permute_ps(t8, _MM_SHUFFLE(2, 3, 0, 1)));             // lane 0 op lane 1
}

// block_rows with the softmax's bookkeeping for MR = 4 rows at a time (the default 64-key tile):
// the four rows' maxima and sums by reduce4 (the same trees), the scalar exp of the running max's
// move only where it moved (exp(0) = 1 exactly: the same alpha), the scores rescaled and masked
// again in the exp pass instead of being kept (the same multiply). The same products in the same
// order: the same bits as block_rows (tests/kernels/test_prefill_attention.py checks them equal).
//
// Row groups (session 27; `group` rows, a multiple of MR, CODESHELL_PREFILL_ATTN_GROUP): the score
// tiles of a group's rows first (each tile's sums kept in `sg`), then their softmax, then one value
// product over the whole group, instead of score tile, softmax and value product four rows at a
// time. Why: at D = 128 the widened key block and value block are 32 KiB each (W), 64 KiB together
// against a 48 KiB L1d (Ice Lake), so with four rows a tile each score tile streamed the key block
// and each value product the value block from L2 again, 64 KiB per four rows; a group of 32 rows
// (the default) reads each block from L2 once per 32 rows and from L1 for its other tiles. The rows are
// independent and each row's products, softmax and sums are the same operations in the same
// order: the same bits for every group (group = MR is the kernel before; test_prefill_attention*).
//
// fexp (session 39 helper A; vdpbf16ps only, not the emulation (E, W), whose forms keep one
// another's bits; CODESHELL_PREFILL_ATTN_FEXP=0: exp16 as above, block_rows' bits):
// the AMX kernel's softmax arithmetic (run_item_amx, session 38): the row max taken on the raw
// scores (scale > 0: max(s) * scale is the max of the scaled ones), exp2_poly4 on one fmsub of the raw
// score, and with fsum (CODESHELL_PREFILL_ATTN_FSUM, default on) the row sums of the fp32
// probabilities and the four rows' alpha in one vector exp2_poly4 instead of scalar expf calls. Other
// last bits (within the tests' tolerance against fp32 attention, as the AMX kernel's). Why: at
// codeshell-mini's head dim 32 a 64-key block of four rows is 256 vdpbf16ps of scores, 256 of values
// and 16 vectors of softmax at ~25 vector ops each (the scale multiply twice, exp16's ~18, the
// probabilities widened back for the sum); perf on the 2-core Zen 4 of session 39 (one thread,
// T = 512, H 8, G 2): the softmax 33% of the kernel's samples, the scores 25%, the values 27%.
template <bool E, int KB, int MR, int PR, int NBE, bool W = false>
inline void block_rows4(const int64_t R, const int64_t D, const int64_t D2, const int64_t j0, const int64_t kPe,
                        const uint32_t* const* qrowp, const int64_t* qpos, const uint32_t* kp, const uint32_t* vp,
                        float* o, float* mrow, float* lrow, uint32_t* prow_g, const __m512 sc, const __m512i lane,
                       const bool first, const bool full_tiles, const int64_t group, const bool dout,
                       const bool round, const bool fexp, const bool fsum, const bool vsm, const bool pv8) {
  static_assert(MR == 4, "block_rows4: four rows a tile");
  constexpr int NB = KB / 16;
  constexpr int64_t kP = W ? KB : KB / 2;  // a probability row (as block_rows)
  for (int64_t g0 = 0; g0 < R; g0 += group) {
  const int64_t grows = std::min<int64_t>(group, R - g0), ntiles = (grows + MR - 1) / MR;
  alignas(64) __m512 sg[kGroupMax / MR][MR * NB];
  float alpha_g[kGroupMax];
  for (int64_t t = 0; t < ntiles; ++t) scores_tile<E, W, MR, NBE, KB>(qrowp + g0 + t * MR, kp, D2, sg[t]);
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t i0 = g0 + t * MR;
    const __m512* s = sg[t];
    uint32_t* prow = prow_g + t * MR * kP;
    float* alpha = alpha_g + t * MR;
    const int64_t rows = std::min<int64_t>(MR, R - i0);
    int64_t last[MR];
    bool all_seen = rows == MR;  // every key of the block's NBE chunks visible to all four rows
    for (int ii = 0; ii < MR; ++ii) {
      last[ii] = ii < rows ? qpos[i0 + ii] - j0 : -1;
      all_seen = all_seen && last[ii] >= 16 * NBE - 1;
    }
    // FULL: the tile's masks are all ones (a key block wholly before the tile's queries: all but
    // the diagonal blocks of a causal prompt), so the compares and masked moves are left out:
    // a masked move under an all-ones mask is the value itself, the same bits (session 22;
    // CODESHELL_PREFILL_ATTN_FULL=0 keeps the masks everywhere, A/B).
    auto softmax = [&](auto full_c, auto round_c, auto fexp_c) {
      constexpr bool FULL = decltype(full_c)::value, ROUND = W && decltype(round_c)::value;
      constexpr bool FEXP = !E && !W && decltype(fexp_c)::value;
      constexpr float kLog2e = 1.44269504088896341f;
      const float scale = _mm512_cvtss_f32(sc);
      const __m512 sc2 = _mm512_set1_ps(scale * kLog2e);  // FEXP: the fmsub's scale (run_item_amx's)
      auto visible = [&](int ii, int c) -> __mmask16 {
        if constexpr (FULL) return __mmask16(0xffff);
        return _mm512_cmp_epi32_mask(lane, _mm512_set1_epi32(int32_t(std::min<int64_t>(last[ii] - 16 * c, 16))),
                                     _MM_CMPINT_LE);
      };
      auto masked = [&](__mmask16 vis, __m512 v) {
        // FULL: v as it is, but kept out of an FMA with the following subtraction (GCC contracts
        // the intrinsics' multiply and subtract into vfmsub, one rounding: other bits)
        if constexpr (FULL) { __asm__("" : "+v"(v)); return v; }
        return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), vis, v);
      };
      auto zeroed = [&](__mmask16 vis, __m512 v) {
        if constexpr (FULL) return v;
        return _mm512_maskz_mov_ps(vis, v);
      };
      // vsm (session 40, helper C; CODESHELL_PREFILL_ATTN_VSM=0: the scalar bookkeeping below): the
      // four rows' new maxima, alpha, sums and the running max / sum updates kept in the lanes of one
      // 128-bit vector (the reductions' lanes 0, 4, 8, 12 picked by one permute), each row's max
      // broadcast by a permute. Why: the path below stores each reduction to memory and reads it
      // back a float at a time (a 512-bit store forwarded to 32-bit loads), takes std::max as a
      // data-dependent branch (whether the running max moved; a mispredicted one flushes the work in
      // flight; not measured apart) and updates the rows one at a time: a
      // latency chain between the score tile and the probabilities that the out-of-order window did
      // not hide (perf, one thread: the softmax ~44% of block_rows4's samples at head dim 32, ~19
      // cycles a 16 scores against ~9 of FMA-pipe operations). The same operations lane for lane:
      // max(m scale, mo) keeps std::max(mo, m scale)'s operand (the same value, NaN included),
      // the rows without keys here get mo = mnew = 0 (alpha 1) and no update, as below: the same bits.
      if constexpr (FEXP) if (fsum && vsm) {
        __m512 mx[MR];
        __mmask8 kv = 0;  // the rows with keys in this block
        for (int ii = 0; ii < MR; ++ii) {
          mx[ii] = _mm512_set1_ps(-INFINITY);
          if (last[ii] < 0) continue;
          kv = __mmask8(kv | (1u << ii));
          for (int c = 0; c < NBE; ++c) mx[ii] = _mm512_max_ps(mx[ii], masked(visible(ii, c), s[ii * NB + c]));
        }
        const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m128 rmax = _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, reduce4<true>(mx)));
        const __m128 mo = _mm_maskz_loadu_ps(kv, mrow + i0);
        const __m128 mn = _mm_maskz_max_ps(kv, _mm_mul_ps(rmax, _mm_set1_ps(scale)), mo);
        const __m512 mnl = _mm512_castps128_ps512(_mm_mul_ps(mn, _mm_set1_ps(kLog2e)));
        __m512 sum[MR];
        for (int ii = 0; ii < MR; ++ii) {
          sum[ii] = _mm512_setzero_ps();
          uint32_t* p = prow + ii * kP;
          if (last[ii] < 0) {  // a block wholly past this query (or a row past R): nothing to add
            if (ii < rows) std::memset(p, 0, kP * 4);
            continue;
          }
          const __m512 mv = _mm512_permutexvar_ps(_mm512_set1_epi32(ii), mnl);
          for (int c = 0; c < NBE; ++c) {
            const __m512 pe = zeroed(visible(ii, c), exp2_poly4(_mm512_fmsub_ps(s[ii * NB + c], sc2, mv)));
            store_probs<false>(p, c, to_bf16<E>(pe), pe);
            sum[ii] = NBE == 1 ? pe : _mm512_add_ps(sum[ii], pe);
          }
        }
        const __m512 t = _mm512_zextps128_ps512(_mm_mul_ps(_mm_sub_ps(mo, mn), _mm_set1_ps(kLog2e)));
        const __m128 a = _mm_mask_mov_ps(_mm512_castps512_ps128(exp2_poly4(t)),
                                         _mm_cmp_ps_mask(mo, _mm_set1_ps(-INFINITY), _CMP_EQ_OQ), _mm_setzero_ps());
        _mm_storeu_ps(alpha, a);
        const __m128 rsum = _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, reduce4<false>(sum)));
        // l alpha + sum: a rounded product then a rounded sum (not an FMA), as below
        __m128 lp = _mm_mul_ps(_mm_maskz_loadu_ps(kv, lrow + i0), a);
        __asm__("" : "+x"(lp));
        _mm_mask_storeu_ps(lrow + i0, kv, _mm_add_ps(lp, rsum));
        _mm_mask_storeu_ps(mrow + i0, kv, mn);
        return;
      }
      __m512 mx[MR];
      for (int ii = 0; ii < MR; ++ii) {
        mx[ii] = _mm512_set1_ps(-INFINITY);
        if (last[ii] < 0) continue;
        for (int c = 0; c < NBE; ++c)
          mx[ii] = _mm512_max_ps(mx[ii], masked(visible(ii, c), FEXP ? s[ii * NB + c] : _mm512_mul_ps(s[ii * NB + c], sc)));
      }
      alignas(64) float red[16];
      _mm512_store_ps(red, reduce4<true>(mx));
      float mnew[MR];
      __m512 sum[MR];
      alignas(16) float mo4[MR] = {}, mn4[MR] = {};  // FEXP with fsum: alpha's inputs (0, 0: alpha 1)
      for (int ii = 0; ii < MR; ++ii) {
        sum[ii] = _mm512_setzero_ps();
        alpha[ii] = 1.f;
        uint32_t* p = prow + ii * kP;
        if (last[ii] < 0) {  // a block wholly past this query (or a row past R): nothing to add
          if (ii < rows) std::memset(p, 0, kP * 4);
          continue;
        }
        const float mo = mrow[i0 + ii];
        mnew[ii] = std::max(mo, FEXP ? red[4 * ii] * scale : red[4 * ii]);
        if (FEXP && fsum) mo4[ii] = mo, mn4[ii] = mnew[ii];
        else alpha[ii] = mo == mnew[ii] ? 1.f : std::exp(mo - mnew[ii]);  // 0 on the first visible block (-inf)
        const __m512 mv = _mm512_set1_ps(FEXP ? mnew[ii] * kLog2e : mnew[ii]);
        for (int c = 0; c < NBE; ++c) {
          const __mmask16 vis = visible(ii, c);
          if constexpr (FEXP) {  // masked lanes (any score) are zeroed after the exp
            const __m512 pe = zeroed(vis, exp2_poly4(_mm512_fmsub_ps(s[ii * NB + c], sc2, mv)));
            const __m256i eb = to_bf16<E>(pe);
            store_probs<false>(p, c, eb, pe);
            const __m512 er = fsum ? pe : codeshell::widen_bf16x16(eb);
            sum[ii] = NBE == 1 ? er : _mm512_add_ps(sum[ii], er);
            continue;
          }
          const __m512 x = masked(vis, _mm512_mul_ps(s[ii * NB + c], sc));
          const __m512 pe = zeroed(vis, codeshell::exp16(_mm512_sub_ps(x, mv)));
          __m512 er;
          if constexpr (ROUND) {  // W: only the fp32 value of the rounding is used (round_bf16_pos)
            er = round_bf16_pos(pe);
            _mm512_store_ps(reinterpret_cast<float*>(p) + 16 * c, er);
          } else {
            const __m256i eb = to_bf16<E>(pe);
            er = codeshell::widen_bf16x16(eb);
            store_probs<W>(p, c, eb, er);
          }
          sum[ii] = NBE == 1 ? er : _mm512_add_ps(sum[ii], er);
        }
      }
      if (FEXP && fsum) {  // the four rows' alpha = e^(mo - mnew) in one vector (as run_item_amx)
        const __m128 mo_v = _mm_load_ps(mo4);
        const __m512 t = _mm512_zextps128_ps512(_mm_mul_ps(_mm_sub_ps(mo_v, _mm_load_ps(mn4)), _mm_set1_ps(kLog2e)));
        const __m128 a = _mm512_castps512_ps128(exp2_poly4(t));
        _mm_storeu_ps(alpha, _mm_mask_mov_ps(a, _mm_cmp_ps_mask(mo_v, _mm_set1_ps(-INFINITY), _CMP_EQ_OQ), _mm_setzero_ps()));
      }
      _mm512_store_ps(red, reduce4<false>(sum));
      for (int ii = 0; ii < rows; ++ii) {
        if (last[ii] < 0) continue;
        const int64_t i = i0 + ii;
        // l alpha + sum as a rounded product then a rounded sum (not an FMA), as block_rows
        float lp = lrow[i] * alpha[ii];
        __asm__("" : "+x"(lp));
        lrow[i] = lp + red[4 * ii];
        mrow[i] = mnew[ii];
      }
    };
    const bool fl = all_seen && full_tiles;
    if (W && round) {
      if (fl) softmax(std::true_type{}, std::true_type{}, std::false_type{});
      else softmax(std::false_type{}, std::true_type{}, std::false_type{});
    } else if (!E && !W && fexp) {
      if (fl) softmax(std::true_type{}, std::false_type{}, std::true_type{});
      else softmax(std::false_type{}, std::false_type{}, std::true_type{});
    } else {
      if (fl) softmax(std::true_type{}, std::false_type{}, std::false_type{});
      else softmax(std::false_type{}, std::false_type{}, std::false_type{});
    }
  }
  // pv8 (session 40, helper C; CODESHELL_PREFILL_ATTN_PV8=0: PR rows at a time throughout): at head
  // dim 32 the group's rows 8 at a time (16 accumulators sharing each value vector, half the value
  // loads and twice the independent vdpbf16ps chains of 4 rows), the rest PR at a time. Each (row,
  // dim) sum is the same chain over the key pairs: the same bits.
  int64_t done = 0;
  if constexpr (!W) if (pv8 && D == 32) {
    for (; done + 8 <= grows; done += 8) {
      float* orow[8];
      const uint32_t* pr[8];
      for (int r = 0; r < 8; ++r) orow[r] = o + (g0 + done + r) * D, pr[r] = prow_g + (done + r) * kP;
      pv_chunk<E, 8, 2>(orow, pr, alpha_g + done, vp, D, 0, kPe, first);
    }
  }
  if (done < grows)
    pv_tile<E, PR, W>(grows - done, g0 + done, o, prow_g + done * kP, kP, alpha_g + done, vp, D, kPe, first, dout);
  }
}

// One work item with key blocks of KB keys and score tiles of MR query rows; o += p . V in
// groups of PR rows sharing each value vector.
// R4: the softmax of four rows at a time (block_rows4, MR = 4 only; the same bits).
// nofill: o is not zero-filled; the first key block's value product starts its sums from zero
// instead (pv_chunk's `first`: the same bits).
template <bool E, int KB, int MR, int PR, bool R4 = false, bool W = false>
void run_item(const Item& it, uint32_t* kp, uint32_t* vp, float* o, float* mrow, float* lrow, uint32_t* prow,
              bool nofill) {
  constexpr int NB = KB / 16;
  constexpr int64_t kP = KB / 2;  // key pairs per block
  static_assert(KB <= kKbMax && MR <= kMrMax && MR % PR == 0, "prefill attention tile");
  const int64_t D = it.D, D2 = D / 2, T = it.t1 - it.t0, R = it.r * T;
  // row i = (head h_local = i / T, query t = t0 + i % T)
  std::vector<const uint32_t*> qrow(size_t(R) + kMrMax);
  std::vector<int64_t> qpos(size_t(R) + kMrMax);
  int64_t maxpos = 0;
  for (int64_t i = 0; i < R; ++i) {
    const int64_t h = it.g * it.r + i / T, t = it.t0 + i % T;
    qrow[i] = reinterpret_cast<const uint32_t*>(it.q + h * it.qh + t * it.qt);
    qpos[i] = it.pos[t];
    maxpos = std::max(maxpos, qpos[i]);
  }
  // W: the query rows widened to fp32 once per item (dims in order), for scores_w
  static thread_local codeshell::ThreadScratch qw_keep;
  codeshell::Scratch<float> qw(qw_keep, W ? size_t(R) * D : 0);
  if constexpr (W)
    for (int64_t i = 0; i < R; ++i) {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(qrow[i]);
      float* dst = qw.data() + i * D;
      codeshell::widen_bf16_row(src, dst, D);
      qrow[i] = reinterpret_cast<const uint32_t*>(dst);
    }
  for (int64_t i = R; i < R + kMrMax; ++i) qrow[i] = qrow[0], qpos[i] = qpos[0];  // tile padding
  if (!nofill) std::fill(o, o + R * D, 0.f);
  std::fill(mrow, mrow + R, -INFINITY);
  std::fill(lrow, lrow + R, 0.f);
  const __m512 sc = _mm512_set1_ps(it.scale);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t j0 = 0; j0 <= maxpos; j0 += KB) {
    const uint32_t* kb = kp;
    const uint32_t* vb = vp;
    // a packed block: keys then values, KB * D / 2 dwords each (bf16 pairs), or KB * D (W: fp32)
    constexpr int64_t half = W ? 2 : 1;
    if (it.pk != nullptr) {  // packed once for the (row, group): by the first item to reach the block
      uint32_t* kw = it.pk + (j0 / KB) * KB * D * half;
      std::atomic<int>& f = it.ready[j0 / KB];
      if (f.load(std::memory_order_acquire) != 2) {
        int idle = 0;
        if (f.compare_exchange_strong(idle, 1, std::memory_order_acq_rel)) {
          if constexpr (W)
            pack_block_w<KB>(it, j0, std::min<int64_t>(KB, it.nkeys - j0), reinterpret_cast<float*>(kw),
                             reinterpret_cast<float*>(kw + KB * D));
          else
            pack_block<KB>(it, j0, std::min<int64_t>(KB, it.nkeys - j0), kw, kw + KB * D / 2);
          f.store(2, std::memory_order_release);
        } else {
          while (f.load(std::memory_order_acquire) != 2) _mm_pause();  // the other thread is packing it (~1 us)
        }
      }
      kb = kw, vb = kw + KB * D * half / 2;
    } else if constexpr (W) {
      pack_block_w<KB>(it, j0, std::min<int64_t>(KB, maxpos + 1 - j0), reinterpret_cast<float*>(kp),
                       reinterpret_cast<float*>(vp));
    } else {
      pack_block<KB>(it, j0, std::min<int64_t>(KB, maxpos + 1 - j0), kp, vp);
    }
    const int64_t n = it.trim ? std::min<int64_t>(KB, maxpos + 1 - j0) : KB, nb = (n + 15) / 16,
                  kPe = std::min<int64_t>(kP, (n + 1) / 2);
    auto block = [&](auto nbe) {
      constexpr int NBE = decltype(nbe)::value;
      if constexpr (R4 && MR == 4)
        block_rows4<E, KB, MR, PR, NBE, W>(R, D, D2, j0, kPe, qrow.data(), qpos.data(), kb, vb, o, mrow, lrow, prow, sc, lane,
                                     nofill && j0 == 0, it.full, it.group, it.dout, it.round, it.fexp, it.fsum,
                                     it.vsm, it.pv8);
      else
        block_rows<E, KB, MR, PR, NBE, W>(R, D, D2, j0, kPe, qrow.data(), qpos.data(), kb, vb, o, mrow, lrow, prow, sc, lane,
                                    nofill && j0 == 0);
    };
    if constexpr (NB >= 4) if (nb == 3) { block(std::integral_constant<int, 3>{}); continue; }
    if constexpr (NB >= 2) if (nb == 1) { block(std::integral_constant<int, 1>{}); continue; }
    if constexpr (NB >= 4) if (nb == 2) { block(std::integral_constant<int, 2>{}); continue; }
    block(std::integral_constant<int, NB>{});
  }
  // y[t][h] = o / l, rounded to bf16 (round to nearest even)
  for (int64_t i = 0; i < R; ++i) {
    const int64_t h = it.g * it.r + i / T, t = it.t0 + i % T;
    const __m512 inv = _mm512_set1_ps(1.f / lrow[i]);
    uint16_t* yr = it.y + (t * it.H + h) * D;
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + d),
                          to_bf16<E>(_mm512_mul_ps(_mm512_load_ps(o + i * D + d), inv)));
  }
}

// ---- AMX-BF16 (session 37, helper C) --------------------------------------------------------------
// The same item (a (row, group)'s r heads x 32 queries), the same 64-key blocks packed by pack_block
// (or prepack: the same layout), the same online softmax per key block (running max and sum per
// query row, probabilities rounded to bf16), but both products on AMX tiles instead of vdpbf16ps
// chains: on the Sapphire Rapids-class Xeon of session 37 the vdpbf16ps kernel ran 0.07-0.09 TFLOP/s
// a core (its inner loops are vdpbf16ps-bound: perf annotate, 16 chains; the emulated fp32-FMA
// kernel ran faster, 0.12), 28% of a 512-token small-shape prompt and 54% of codeshell-mini's.
// Per row tile of 16 query rows (one head, 16 consecutive queries): scores S [16 x 64] = Q . K^T in
// 4 C tiles over D / 32 k-tiles (A = the queries, copied once per item into qa [16][D]; B = 16 dim
// pairs x 16 keys of the packed keys, row stride 256 bytes); the softmax on S in 512-bit vectors;
// o [16 x D] = alpha o + P . V in C tiles of 16 dims (4 at a time; A = the probabilities P [16][64]
// bf16, two k-tiles of 32 keys; B = 16 key pairs x 16 dims of the packed values), o rescaled by
// alpha in memory before its C tiles load it (the first block's tiles start from zero: o is not
// filled). Other last bits than the vdpbf16ps kernel (the tile sums a pair's products in its own
// order); a row's result depends only on its own query and keys (row tiles never mix rows' sums), so
// a row does not depend on the batch around it. CODESHELL_PREFILL_ATTN_AMX=0 (prefill_attention.py):
// the vdpbf16ps kernel.
inline void attn_amx_configure() {
  codeshell::AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  codeshell::amx_load_config(cfg);  // (its barrier: this copy's stores were dropped without it, a #GP)
}

void attn_amx_release() { _tile_release(); }  // (a function of this section: the caller's lambda is not)

void run_item_amx(const Item& it, uint32_t* kp, uint32_t* vp, float* o, float* mrow, float* lrow, uint16_t* qa) {
  constexpr int64_t KB = 64;
  const int64_t D = it.D, Dt = D / 32, Tn = it.t1 - it.t0, nsub = (Tn + 15) / 16, RT = it.r * nsub, NR = RT * 16;
  std::vector<int64_t> qpos(static_cast<size_t>(NR), 0);
  std::vector<int64_t> tmax(static_cast<size_t>(RT), -1);
  std::vector<int64_t> tmin(static_cast<size_t>(RT), std::numeric_limits<int64_t>::max());
  int64_t maxpos = 0;
  // row ri = rt * 16 + ii of row tile rt = hl * nsub + sub: head g r + hl, query t0 + 16 sub + ii
  for (int64_t rt = 0; rt < RT; ++rt) {
    const int64_t hl = rt / nsub, sub = rt % nsub, h = it.g * it.r + hl;
    for (int64_t ii = 0; ii < 16; ++ii) {
      const int64_t ri = rt * 16 + ii, t = it.t0 + sub * 16 + ii;
      uint16_t* dst = qa + ri * D;
      if (t < it.t1) {
        std::memcpy(dst, it.q + h * it.qh + t * it.qt, size_t(D) * 2);
        qpos[ri] = it.pos[t];
      } else {
        std::memset(dst, 0, size_t(D) * 2);
        qpos[ri] = -1;  // a padding row: past every key block, never stored
      }
      tmax[rt] = std::max(tmax[rt], qpos[ri]);
      tmin[rt] = std::min(tmin[rt], qpos[ri]);  // a padding row (-1): never a full block
    }
    maxpos = std::max(maxpos, tmax[rt]);
  }
  std::fill(mrow, mrow + NR, -INFINITY);
  std::fill(lrow, lrow + NR, 0.f);
  const __m512 sc = _mm512_set1_ps(it.scale);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  alignas(64) float S[16 * KB];
  alignas(64) uint16_t P[16 * KB];
  alignas(64) float alpha[16];
  __asm__ volatile("" ::: "memory");  // qa written above; the tile loads below are asm
  for (int64_t j0 = 0; j0 <= maxpos; j0 += KB) {
    const uint32_t* kb = kp;
    const uint32_t* vb = vp;
    if (it.pk != nullptr) {  // packed once for the (row, group), as run_item does
      uint32_t* kw = it.pk + (j0 / KB) * KB * D;
      std::atomic<int>& f = it.ready[j0 / KB];
      if (f.load(std::memory_order_acquire) != 2) {
        int idle = 0;
        if (f.compare_exchange_strong(idle, 1, std::memory_order_acq_rel)) {
          pack_block<KB>(it, j0, std::min<int64_t>(KB, it.nkeys - j0), kw, kw + KB * D / 2);
          f.store(2, std::memory_order_release);
        } else {
          while (f.load(std::memory_order_acquire) != 2) _mm_pause();
        }
      }
      kb = kw, vb = kw + KB * D / 2;
    } else {
      pack_block<KB>(it, j0, std::min<int64_t>(KB, maxpos + 1 - j0), kp, vp);
    }
    __asm__ volatile("" ::: "memory");
    const bool first = j0 == 0;
    for (int64_t rt = 0; rt < RT; ++rt) {
      if (tmax[rt] < j0) continue;  // every query of the tile before this block
      const uint16_t* qt = qa + rt * 16 * D;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kt = 0; kt < Dt; ++kt) {
        const uint32_t* bk = kb + kt * 16 * KB;
        _tile_loadd(4, qt + kt * 32, D * 2);
        _tile_loadd(5, bk, KB * 4);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, bk + 16, KB * 4);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(7, bk + 32, KB * 4);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, bk + 48, KB * 4);
        _tile_dpbf16ps(3, 4, 5);
      }
      _tile_stored(0, S, KB * 4);
      _tile_stored(1, S + 16, KB * 4);
      _tile_stored(2, S + 32, KB * 4);
      _tile_stored(3, S + 48, KB * 4);
      __asm__ volatile("" ::: "memory");
      // the softmax four rows at a time: their maxima and sums reduced together (reduce4, as
      // block_rows4), the rows' exp16 chains interleaved; FULL: every row of the tile sees all 64
      // keys of the block (no masks: the same values; CODESHELL_PREFILL_ATTN_FULL=0 masks every block)
      auto softmax = [&](auto full_c, auto fexp_c) {
      constexpr bool FULL = decltype(full_c)::value, FEXP = decltype(fexp_c)::value;
      // FEXP: x holds the raw scores (the maxima scaled after the reduction: scale > 0), the exp
      // argument one fmsub of them (exp2_poly4 above)
      const __m512 sc2 = _mm512_set1_ps(it.scale * 1.44269504088896341f);
      for (int64_t i4 = 0; i4 < 16; i4 += 4) {
        int64_t last[4];
        __m512 x[4][4], mx[4];
        __mmask16 vis[4][4];
        for (int u = 0; u < 4; ++u) {
          last[u] = qpos[rt * 16 + i4 + u] - j0;
          mx[u] = _mm512_set1_ps(-INFINITY);
          for (int c = 0; c < 4; ++c) {
            const __m512 sv = FEXP ? _mm512_load_ps(S + (i4 + u) * KB + 16 * c)
                                   : _mm512_mul_ps(_mm512_load_ps(S + (i4 + u) * KB + 16 * c), sc);
            if constexpr (FULL) {
              vis[u][c] = __mmask16(0xffff);
              x[u][c] = sv;
            } else {
              vis[u][c] = _mm512_cmp_epi32_mask(
                  lane, _mm512_set1_epi32(int32_t(std::clamp<int64_t>(last[u] - 16 * c, -1, 16))), _MM_CMPINT_LE);
              x[u][c] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), vis[u][c], sv);
            }
            mx[u] = _mm512_max_ps(mx[u], x[u][c]);
          }
        }
        alignas(64) float red[16];
        _mm512_store_ps(red, reduce4<true>(mx));
        __m512 sum[4];
        float mnew[4];
        alignas(16) float mo4[4] = {0.f, 0.f, 0.f, 0.f}, mn4[4] = {0.f, 0.f, 0.f, 0.f};  // FEXP: alpha's inputs
        for (int u = 0; u < 4; ++u) {
          const int64_t ri = rt * 16 + i4 + u;
          uint16_t* p = P + (i4 + u) * KB;
          sum[u] = _mm512_setzero_ps();
          alpha[i4 + u] = 1.f;
          if (last[u] < 0) {  // a block wholly past this query (or a padding row): nothing to add
            std::memset(p, 0, KB * 2);
            continue;
          }
          const float mo = mrow[ri];
          mnew[u] = std::max(mo, FEXP ? red[4 * u] * it.scale : red[4 * u]);
          if (FEXP && it.fsum) mo4[u] = mo, mn4[u] = mnew[u];
          else alpha[i4 + u] = mo == mnew[u] ? 1.f : std::exp(mo - mnew[u]);  // 0 on the first visible block (-inf)
          const __m512 mv = _mm512_set1_ps(FEXP ? mnew[u] * 1.44269504088896341f : mnew[u]);
          for (int c = 0; c < 4; ++c) {
            __m512 e = FEXP ? exp2_poly4(_mm512_fmsub_ps(x[u][c], sc2, mv))
                            : codeshell::exp16(_mm512_sub_ps(x[u][c], mv));
            if constexpr (!FULL) e = _mm512_maskz_mov_ps(vis[u][c], e);
            const __m256i eb = (__m256i)_mm512_cvtneps_pbh(e);
            _mm256_store_si256(reinterpret_cast<__m256i*>(p + 16 * c), eb);
            // FEXP: the row sum of the fp32 probabilities (as torch's CPU flash kernel sums them; the
            // bf16 rounding of each is within 2^-9 and unbiased), not of their bf16 roundings widened
            // back: two ops fewer a vector
            if (FEXP && it.fsum) sum[u] = _mm512_add_ps(sum[u], e);
            else sum[u] = _mm512_add_ps(sum[u], codeshell::widen_bf16x16(eb));
          }
        }
        if (FEXP && it.fsum) {  // the four rows' alpha = e^(mo - mnew) in one vector, not four scalar expf calls:
          // exp2_poly4 (0 exactly where mo = mnew: 2^0 = 1; the first visible block's mo = -inf gives NaN there,
          // set to 0; a skipped row's 0 - 0 gives 1, unused). An alpha error scales o and l alike.
          const __m128 mo_v = _mm_load_ps(mo4);
          const __m512 t = _mm512_zextps128_ps512(_mm_mul_ps(_mm_sub_ps(mo_v, _mm_load_ps(mn4)), _mm_set1_ps(1.44269504088896341f)));
          const __m128 a = _mm512_castps512_ps128(exp2_poly4(t));
          _mm_storeu_ps(alpha + i4, _mm_mask_mov_ps(a, _mm_cmp_ps_mask(mo_v, _mm_set1_ps(-INFINITY), _CMP_EQ_OQ), _mm_setzero_ps()));
        }
        _mm512_store_ps(red, reduce4<false>(sum));
        for (int u = 0; u < 4; ++u) {
          if (last[u] < 0) continue;
          const int64_t ri = rt * 16 + i4 + u;
          const float al = alpha[i4 + u];
          float lp = lrow[ri] * al;
          __asm__("" : "+x"(lp));
          lrow[ri] = lp + red[4 * u];
          mrow[ri] = mnew[u];
          if (!first && al != 1.f) {
            float* orow = o + ri * D;
            const __m512 a = _mm512_set1_ps(al);
            for (int64_t d = 0; d < D; d += 16) _mm512_store_ps(orow + d, _mm512_mul_ps(_mm512_load_ps(orow + d), a));
          }
        }
      }
      };
      const bool fl = it.full && tmin[rt] - j0 >= KB - 1;
      if (it.fexp) {
        if (fl) softmax(std::true_type{}, std::true_type{});
        else softmax(std::false_type{}, std::true_type{});
      } else {
        if (fl) softmax(std::true_type{}, std::false_type{});
        else softmax(std::false_type{}, std::false_type{});
      }
      __asm__ volatile("" ::: "memory");  // P and o written above, read by the tile loads below
      float* ot = o + rt * 16 * D;
      for (int64_t d0 = 0; d0 < D; d0 += 64) {
        const int nc = D - d0 >= 64 ? 4 : 2;
        if (first) {
          _tile_zero(0);
          _tile_zero(1);
          if (nc == 4) {
            _tile_zero(2);
            _tile_zero(3);
          }
        } else {
          _tile_loadd(0, ot + d0, D * 4);
          _tile_loadd(1, ot + d0 + 16, D * 4);
          if (nc == 4) {
            _tile_loadd(2, ot + d0 + 32, D * 4);
            _tile_loadd(3, ot + d0 + 48, D * 4);
          }
        }
        for (int64_t k2 = 0; k2 < 2; ++k2) {  // keys 32 k2 .. 32 k2 + 31: key pairs 16 k2 ..
          const uint32_t* bv = vb + k2 * 16 * D + d0;
          _tile_loadd(4, P + k2 * 32, KB * 2);
          _tile_loadd(5, bv, D * 4);
          _tile_dpbf16ps(0, 4, 5);
          _tile_loadd(6, bv + 16, D * 4);
          _tile_dpbf16ps(1, 4, 6);
          if (nc == 4) {
            _tile_loadd(7, bv + 32, D * 4);
            _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(5, bv + 48, D * 4);
            _tile_dpbf16ps(3, 4, 5);
          }
        }
        _tile_stored(0, ot + d0, D * 4);
        _tile_stored(1, ot + d0 + 16, D * 4);
        if (nc == 4) {
          _tile_stored(2, ot + d0 + 32, D * 4);
          _tile_stored(3, ot + d0 + 48, D * 4);
        }
      }
      __asm__ volatile("" ::: "memory");
    }
  }
  for (int64_t ri = 0; ri < NR; ++ri) {
    if (qpos[ri] < 0) continue;
    const int64_t rt = ri / 16, hl = rt / nsub, t = it.t0 + (rt % nsub) * 16 + ri % 16, h = it.g * it.r + hl;
    const __m512 inv = _mm512_set1_ps(1.f / lrow[ri]);
    uint16_t* yr = it.y + (t * it.H + h) * D;
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + d),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(o + ri * D + d), inv)));
  }
}

using RunItem = void (*)(const Item&, uint32_t*, uint32_t*, float*, float*, float*, uint32_t*, bool);

}  // namespace
CODESHELL_END_AVX512
#endif

// q bf16 [B, H, T, D] (last dim contiguous; any other strides: a view of the qkv projection);
// k_cache, v_cache bf16 [slots, G, max_len, D] contiguous, the new keys already stored; slots int64
// [B]; positions int64 [B, T]: query t of row b sits at positions[b, t] and sees keys
// 0..positions[b, t] of slot slots[b]. Returns y bf16 [B, T, H, D].
// key_block: keys per block, 16, 32 or 64 (prefill_attention.py's `key_block` picks it by head dim).
torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                const torch::Tensor& slots, const torch::Tensor& positions, double scale, int64_t key_block,
                                bool amx) {
  codeshell::check_isa(amx ? codeshell::kAmx : codeshell::kAvx512Vnni);  // AVX-512 F/BW: the emulated BF16 steps without AVX512-BF16
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kBFloat16 && q.stride(3) == 1,
              "prefill_attention: q must be bf16 [B, H, T, D] with a contiguous last dim");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == torch::kBFloat16 && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == torch::kBFloat16 &&
                  v_cache.is_contiguous(),
              "prefill_attention: k_cache and v_cache must be contiguous bf16 [slots, G, max_len, D] of one shape");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), G = k_cache.size(1), L = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 32 == 0 && D <= 256 && G > 0 && H % G == 0,
              "prefill_attention: head dim ", D, " (a multiple of 32 up to 256 needed) or groups ", G,
              " not dividing ", H, " heads");
  TORCH_CHECK(key_block == 16 || key_block == 32 || key_block == 64, "prefill_attention: key block ", key_block, " (16, 32 or 64)");
  TORCH_CHECK(!amx || key_block == 64, "prefill_attention: the AMX kernel takes 64-key blocks, not ", key_block);
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.dim() == 1 && slots.size(0) == B && slots.is_contiguous(),
              "prefill_attention: slots must be int64 [B]");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.dim() == 2 && positions.size(0) == B &&
                  positions.size(1) == T && positions.is_contiguous(),
              "prefill_attention: positions must be contiguous int64 [B, T]");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= sp[b] && sp[b] < k_cache.size(0), "prefill_attention: slot ", sp[b], " out of range");
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(0 <= pp[b * T + t] && pp[b * T + t] < L, "prefill_attention: position ", pp[b * T + t],
                  " outside the cache's ", L);
  }
  auto y = torch::empty({B, T, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
#if CODESHELL_HAVE_AVX512
  const int64_t r = H / G, nq = (T + kTq - 1) / kTq, items = B * G * nq;
  const auto* qb = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kb = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vb = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  auto* yb = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t Rmax = r * kTq;
  // The tile per key block (see the header): 16 keys x 8 query rows, values 2 rows at a time
  // (the session-15 kernel's bits); 32 keys x 8 rows (16 score chains), values 4 rows at a time
  // (16 chains of 64 dims), or 8 rows where D = 32 (codeshell-mini: 16 chains of 32 dims);
  // 64 keys x 4 rows.
  // CODESHELL_PREFILL_ATTN_TRIM=0: every key block whole (A/B; the same bits either way)
  const bool trim = codeshell::env_flag("CODESHELL_PREFILL_ATTN_TRIM", true);
  // CODESHELL_PREFILL_ATTN_R4=0: the 64-key tile's softmax one row at a time (block_rows; A/B, the same bits)
  const bool r4 = codeshell::env_flag("CODESHELL_PREFILL_ATTN_R4", true);
  // CODESHELL_PREFILL_ATTN_FULL=0: block_rows4 computes the visibility masks of every tile, also
  // where all its keys are visible (A/B; the same bits)
  const bool full = codeshell::env_flag("CODESHELL_PREFILL_ATTN_FULL", true);
  // CODESHELL_PREFILL_ATTN_GROUP: rows per row group of block_rows4 (4, 8, .., 32; 4 = the kernel
  // before session 27, A/B; the same bits for any): the score tiles of a group, then their softmax,
  // then their value product, so each key / value block is read from L2 once per group
  // CODESHELL_PREFILL_ATTN_DOUT=1: a group's value product each 64-dim chunk of the value block for
  // all the group's rows (pv_tile's dout), not PR rows at a time over all dims. Off by default: 0.99-1.02x
  // the time on one thread (bench_prefill_attn.py, two runs), nothing gained; the same bits.
  const bool dout = codeshell::env_flag("CODESHELL_PREFILL_ATTN_DOUT", false);
  // CODESHELL_PREFILL_ATTN_ROUND=0: block_rows4's probabilities rounded by to_bf16<true> and widened
  // back (A/B; the same bits), not by round_bf16_pos (the widened kernel only)
  const bool round = codeshell::env_flag("CODESHELL_PREFILL_ATTN_ROUND", true);
  // CODESHELL_PREFILL_ATTN_KPACK=0: pack_block_w's keys a value at a time (A/B; the same values)
  const bool kpack = codeshell::env_flag("CODESHELL_PREFILL_ATTN_KPACK", true);
  const int64_t group = std::clamp<int64_t>(codeshell::env_int("CODESHELL_PREFILL_ATTN_GROUP", 32), 4, kGroupMax) / 4 * 4;
  // Without AVX512-BF16 (or CODESHELL_PREFILL_ATTN_EMU=1, to run it on a CPU with it: A/B and
  // tests) the same kernel with the two instructions emulated (dpbf16 / to_bf16 above).
  const bool emu = !codeshell::cpu_features().avx512bf16 || codeshell::env_flag("CODESHELL_PREFILL_ATTN_EMU", false);
  // e: emulated products, w: the widened layout (emulation only: called with (true, true),
  // (true, false) and (false, false))
  auto pick = [&](auto e, auto w) -> RunItem {
    constexpr bool E = decltype(e)::value, W = decltype(w)::value;
    return key_block == 16 ? run_item<E, 16, 8, 2, false, W>
           : key_block == 32 ? (D == 32 ? run_item<E, 32, 8, 8, false, W> : run_item<E, 32, 8, 4, false, W>)
                             : (r4 ? run_item<E, 64, 4, 4, true, W> : run_item<E, 64, 4, 4, false, W>);
  };
  // CODESHELL_PREFILL_ATTN_WIDE=0: the emulated kernel widens its operands in the products' inner
  // loops (session 23's); by default (emulation only) keys, values, queries and probabilities are
  // widened to fp32 once (pack_block_w, scores_w, pv_chunk_w): the same FMAs, the same bits.
  const bool wide = !amx && emu && codeshell::env_flag("CODESHELL_PREFILL_ATTN_WIDE", true);
  const RunItem run = wide  ? pick(std::true_type{}, std::true_type{})
                      : emu ? pick(std::true_type{}, std::false_type{})
                            : pick(std::false_type{}, std::false_type{});
  // Prepack (CODESHELL_PREFILL_ATTN_PREPACK=0: off, A/B): each (row, group)'s key blocks packed once
  // for all its T / 32 query items (by the first item to reach a block; another item needing it
  // meanwhile waits for it), where every item packed its own copy of each block it reads (a
  // 512-token prompt's last item reads all 8 blocks, its first one): the packing ran ~T / 64 times
  // per block. In the items' own parallel region: no second fork and join. A block packed for
  // the row holds the row's keys up to its last position (the per-item pack zeroed keys past the
  // item's last query): those keys sit past every query of the item, get probability 0 and add
  // +-0 to the value sums; keys past the row's last position (never written: NaN in tests) are
  // zero either way.
  const bool prepack = codeshell::env_flag("CODESHELL_PREFILL_ATTN_PREPACK", true) && nq > 1;
  std::vector<int64_t> nkeys(size_t(B), 0);
  int64_t nblk = 0;
  for (int64_t b = 0; b < B && prepack; ++b) {
    nkeys[b] = *std::max_element(pp + b * T, pp + (b + 1) * T) + 1;
    nblk = std::max(nblk, (nkeys[b] + key_block - 1) / key_block);
  }
  const int64_t bstride = key_block * D * (wide ? 2 : 1);  // dwords per packed block (W: fp32, twice)
  // kept by the calling thread between calls (scratch.h): a 512-token prompt's blocks are 512 KiB at
  // the small shape (H 8, G 2, D 128), a fresh mapping with a page fault per 4 KiB each call
  static thread_local codeshell::ThreadScratch packed_keep;
  codeshell::Scratch<uint32_t> packed(packed_keep, prepack ? size_t(B * G * nblk * bstride) : 0);
  std::unique_ptr<std::atomic<int>[]> ready(prepack ? new std::atomic<int>[size_t(B * G * nblk)] : nullptr);
  for (int64_t i = 0; prepack && i < B * G * nblk; ++i) ready[i].store(0, std::memory_order_relaxed);
  auto item_of = [&](int64_t b, int64_t g, int64_t qi) {
    const int64_t cell = (sp[b] * G + g) * L * D;
    return Item{qb + b * q.stride(0), q.stride(1), q.stride(2), kb + cell, vb + cell, pp + b * T,
                yb + b * T * H * D, H, D, r, g, qi * kTq, std::min(T, (qi + 1) * kTq), float(scale), trim,
                prepack ? packed.data() + (b * G + g) * nblk * bstride : nullptr,
                prepack ? ready.get() + (b * G + g) * nblk : nullptr, nkeys[b], full, group, dout, round, kpack};
  };
  // CODESHELL_PREFILL_ATTN_SETUP=0: each parallel chunk's scratch a fresh zero-filled vector and o
  // zero-filled per item, as before (A/B; the same bits). By default the scratch is the thread's kept
  // buffer (no allocation, no fill: every part is written before it is read) and o is not filled
  // (run_item's nofill). Why: at the small shape (H 8, G 2, D 128, T 512) a call made 16 chunks of
  // ~100 KiB zero-filled and 32 items' o of 64 KiB each, ~3.6 MiB of stores before any product.
  const bool lean = codeshell::env_flag("CODESHELL_PREFILL_ATTN_SETUP", true);
  // CODESHELL_PREFILL_ATTN_ORDER=0: the items in (row, group, query block) order, as before (A/B;
  // the same bits: items are independent and a shared key block holds the same keys whoever packs
  // it). By default the costliest first (longest processing time first): query block qi of a causal
  // prompt reads ~qi + 1 key blocks, and the threads claim chunks of 2 items in order, so in the
  // old order the last chunk claimed was the costliest (2 x the last items: 31 of the 272 units
  // of a 512-token prompt at the small shape) and the other thread idled for up to that long.
  const bool lpt = codeshell::env_flag("CODESHELL_PREFILL_ATTN_ORDER", true);
  // CODESHELL_PREFILL_ATTN_FEXP=0: the AMX kernel's softmax through exp16 as in session 37, and (session
  // 39) the vdpbf16ps kernel's 64-key tiles' (block_rows4) as before (A/B and their bits); by default
  // exp2_poly4 on one fmsub of the raw score (other last bits)
  const bool fexp = codeshell::env_flag("CODESHELL_PREFILL_ATTN_FEXP", true);
  // CODESHELL_PREFILL_ATTN_FSUM=0 (with FEXP): the row sums of the bf16-rounded probabilities and a
  // scalar expf a row for alpha, as with exp16; by default fp32 sums and one vector exp2_poly4 for four rows
  const bool fsum = codeshell::env_flag("CODESHELL_PREFILL_ATTN_FSUM", true);
  // CODESHELL_PREFILL_ATTN_VSM=0 (with FEXP and FSUM): block_rows4's maxima, alpha and row sums one row
  // at a time through memory as in session 39; by default in vector lanes (the same bits, see block_rows4)
  const bool vsm = codeshell::env_flag("CODESHELL_PREFILL_ATTN_VSM", true);
  // CODESHELL_PREFILL_ATTN_PV8=0: block_rows4's value product 4 rows at a time at head dim 32 as before
  // session 40 (by default 8; the same bits, see block_rows4)
  const bool pv8 = codeshell::env_flag("CODESHELL_PREFILL_ATTN_PV8", true);
  const size_t nbuf = 2 * size_t(kKbMax) * D + size_t(Rmax) * D + size_t(kGroupMax) * kKbMax + 2 * Rmax + 64;
  codeshell::parallel_chunks(items, 1, 1, [&](int64_t a, int64_t e) {
    // per-thread scratch, 64-byte aligned: packed keys [D/2][KB] and values [KB/2][D] (pairs; W: fp32,
    // twice the dwords: each given kKbMax * D), o [R][D]
    // fp32, the probabilities of a score tile [MR rows][KB/2 key pairs] (bf16 pairs), row max and sum
    static thread_local codeshell::ThreadScratch buf_keep;
    std::vector<float> buf(lean ? 0 : nbuf);
    codeshell::Scratch<float> kept(buf_keep, lean ? nbuf : 0);
    float* const raw = lean ? kept.data() : buf.data();
    float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw) + 63) & ~uintptr_t(63));
    uint32_t* kp = reinterpret_cast<uint32_t*>(base);
    uint32_t* vp = kp + kKbMax * D;
    float* o = reinterpret_cast<float*>(vp + kKbMax * D);
    uint32_t* prow = reinterpret_cast<uint32_t*>(o + Rmax * D);
    float* mrow = reinterpret_cast<float*>(prow + kGroupMax * kKbMax);
    float* lrow = mrow + Rmax;
    if (amx) {  // the AMX item (run_item_amx): its queries copied into qa [r * 32][D] bf16 per item
      static thread_local codeshell::ThreadScratch qa_keep;
      codeshell::Scratch<uint16_t> qa(qa_keep, size_t(Rmax) * D);
      attn_amx_configure();
      for (int64_t w = a; w < e; ++w) {
        const int64_t b = lpt ? (w % (B * G)) / G : w / (G * nq), g = lpt ? w % G : (w / nq) % G,
                      qi = lpt ? nq - 1 - w / (B * G) : w % nq;
        Item item = item_of(b, g, qi);
        item.fexp = fexp;
        item.fsum = fsum;
        run_item_amx(item, kp, vp, o, mrow, lrow, qa.data());
      }
      attn_amx_release();
      return;
    }
    for (int64_t w = a; w < e; ++w) {
      // by default the last query items (the most keys) of every (row, group) first, the first ones
      // last: see `lpt` above
      const int64_t b = lpt ? (w % (B * G)) / G : w / (G * nq), g = lpt ? w % G : (w / nq) % G,
                    qi = lpt ? nq - 1 - w / (B * G) : w % nq;
      Item item = item_of(b, g, qi);
      item.fexp = fexp;  // block_rows4's softmax (session 39; the emulation keeps exp16)
      item.fsum = fsum;
      item.vsm = vsm;
      item.pv8 = pv8;
      run(item, kp, vp, o, mrow, lrow, prow, lean);
    }
  });
#else
  TORCH_CHECK(false, "prefill_attention: built without AVX-512 support");
#endif
  return y;
}

// ---- AVX2: queries in lanes, decode's bits ---------------------------------------------------------
//
// What this is: prefill_attention_lanes, the same causal prompt attention (q [B, H, T, D] bf16 -> y
// [B, T, H, D] bf16) for CPUs without AVX-512 (x86-64-v3: the baseline of this file's build, no
// target pragma), whose every query gets exactly the bits decode's kernel gives it alone
// (attention.cpp attend_group on 8-lane registers: packed_attention / decode_attention). The
// engine's AVX2 prompt ran that kernel one query at a time (engine/kv_cache.py `_attend_as_decode`;
// session 31: decode's bits for every prompt row, whatever the padding or the batch around it).
// Why: at codeshell-mini's head dim 32 that path ran at 38% of the FMA rate (~24% of the prompt;
// docs/kernels-log.md session 36 helper B): per 8 scores its 4-head tree took 8 permutes + 8
// shuffles + 7 adds beside 32 FMAs, and every key / value vector was widened from bf16 in the inner
// loops for each query again.
// How (work item: row b, KV group g, 8 consecutive queries; the group's R = H / G heads):
//   * keys and values of each (row, group) widened to fp32 once per call (lanes_widen), shared by
//     all the row's query items;
//   * scores with the 8 QUERIES IN LANES: Qt[h][d] = the 8 queries' q[h][d], and score (key s,
//     head h) = for each d-residue j (0..7) an FMA chain over d = j, j + 8, .. from +0 (decode's
//     8 d-lane chains, the same operands in the same order), then hsum8's tree ((a0 + a4) + (a2 +
//     a6)) + ((a1 + a5) + (a3 + a7)) as vertical adds, times scale: a key broadcast serves the
//     tile's HB heads, a Qt vector its KB keys (lanes_scores);
//   * softmax per lane (lanes_softmax): the max over the query's own keys; exp8 (lane-wise, so
//     each lane's value is decode's) for the keys of the query's full 8-key chunks, summed into
//     8 registers by key % 8 (decode's sv lanes) and reduced by hsum8's tree; the keys past the
//     last full chunk (at most 7, on the diagonal) by std::exp in key order after it, as decode's
//     scalar tail; every probability times 1.f / sum;
//   * the probabilities transposed back to one row per query (Pt[query][h][s]) and the value
//     product in decode's own layout (d in lanes, 16-wide strips, each output lane an FMA chain
//     over the query's keys 0..S-1 in order from +0; weighted_values) on the widened values, so a
//     query reads only its own keys (no masks there);
//   * the output rounded to bf16 as attention_prims.h's to_bf16 (nearest even, NaN kept quiet).
// What this is not: faster on AVX-512 CPUs (prefill_attention above runs there), or for fp32 caches.

namespace {
namespace lanes {

constexpr int64_t kQ = 8;  // queries per item (the lanes)
constexpr int kMaxR = 64;  // the most query heads a KV group (an item's 1 / sum registers)

// 8 x 8 transpose: r[i] lane j <- r[j] lane i.
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// v, kept in a register: GCC otherwise folds a vector reused by several FMAs into each one as a
// memory operand (one load an FMA: the scores' Qt vectors and the values' rows measured ~1.5x slower
// with 1.25-1.5 loads an FMA).
inline __m256 in_reg(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

// hsum8's tree over 8 registers, lane by lane: ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)).
inline __m256 tree8(const __m256* v) {
  return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[4]), _mm256_add_ps(v[2], v[6])),
                       _mm256_add_ps(_mm256_add_ps(v[1], v[5]), _mm256_add_ps(v[3], v[7])));
}

// 16 fp32 -> 16 bf16, attention_prims.h to_bf16's rounding lane by lane (nearest even; a NaN keeps
// its top bits | 0x40).
inline void store_bf16x16(uint16_t* dst, __m256 a, __m256 b) {
  auto round = [](__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1)))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  };
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(round(a), round(b)), _MM_SHUFFLE(3, 1, 2, 0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), p);
}

// Scores of HB heads (Qt rows qt [HB][D][8]) against KB keys kf [KB][D] (fp32) into p [HB][.][8]
// (head h at p + h * hs, key k at + k * 8). res: scratch of KB * HB * 8 vectors. D % 8 == 0.
// Per residue j the KB x HB chains (decode's lane-j chain of each score) side by side: a Qt
// vector loaded once for the KB keys, a key value broadcast once for the HB heads.
template <int HB, int KB, int DT>
__attribute__((always_inline)) inline void scores_tile(const float* qt, int64_t Dr, const float* kf, __m256 sc, float* p, int64_t hs, __m256* res,
                        __m256* mx, bool masked, int64_t s, __m256i lenv) {
  const int64_t D = DT ? DT : Dr;  // DT: the head dim as a constant (the chains unrolled), 0: any
  for (int j = 0; j < 8; ++j) {
    __m256 acc[KB][HB];
    for (int k = 0; k < KB; ++k)
      for (int h = 0; h < HB; ++h) acc[k][h] = _mm256_setzero_ps();
    for (int64_t d = j; d < D; d += 8) {
      __m256 qv[HB];
      for (int h = 0; h < HB; ++h) qv[h] = in_reg(_mm256_load_ps(qt + (h * D + d) * kQ));
      for (int k = 0; k < KB; ++k) {
        const __m256 kv = _mm256_broadcast_ss(kf + k * D + d);
        for (int h = 0; h < HB; ++h) acc[k][h] = _mm256_fmadd_ps(qv[h], kv, acc[k][h]);
      }
    }
    for (int k = 0; k < KB; ++k)
      for (int h = 0; h < HB; ++h) res[(k * HB + h) * 8 + j] = acc[k][h];
  }
  for (int k = 0; k < KB; ++k) {
    // the running max of each lane over its own keys (keys past a lane's length: -inf)
    const __m256 in = masked ? _mm256_castsi256_ps(_mm256_cmpgt_epi32(lenv, _mm256_set1_epi32(int32_t(s + k))))
                             : _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int h = 0; h < HB; ++h) {
      const __m256 x = _mm256_mul_ps(tree8(res + (k * HB + h) * 8), sc);
      _mm256_store_ps(p + h * hs + k * kQ, x);
      mx[h] = _mm256_max_ps(mx[h], masked ? _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, in) : x);
    }
  }
}

// Scores of HB heads against keys [0, S): KB keys a tile, the rest one at a time.
// mx [HB]: each head's running max per lane (from -inf), over keys < len[lane] (lenv) only: keys
// [Smin, S) are some lanes' past their own.
template <int HB, int KB, int DT>
void scores_heads_d(const float* qt, int64_t D, const float* kf, int64_t S, int64_t Smin, __m256i lenv, __m256 sc,
                    float* p, int64_t hs, __m256* res, __m256* mx) {
  int64_t s = 0;
  for (; s + KB <= std::min(S, Smin); s += KB)  // every lane's keys
    scores_tile<HB, KB, DT>(qt, D, kf + s * D, sc, p + s * kQ, hs, res, mx, false, s, lenv);
  for (; s + KB <= S; s += KB)
    scores_tile<HB, KB, DT>(qt, D, kf + s * D, sc, p + s * kQ, hs, res, mx, true, s, lenv);
  for (; s < S; ++s) scores_tile<HB, 1, DT>(qt, D, kf + s * D, sc, p + s * kQ, hs, res, mx, s + 1 > Smin, s, lenv);
}

template <int HB, int KB>
void scores_heads(const float* qt, int64_t D, const float* kf, int64_t S, int64_t Smin, __m256i lenv, __m256 sc,
                  float* p, int64_t hs, __m256* res, __m256* mx) {
  switch (D) {
    case 32: scores_heads_d<HB, KB, 32>(qt, D, kf, S, Smin, lenv, sc, p, hs, res, mx); break;
    case 64: scores_heads_d<HB, KB, 64>(qt, D, kf, S, Smin, lenv, sc, p, hs, res, mx); break;
    case 128: scores_heads_d<HB, KB, 128>(qt, D, kf, S, Smin, lenv, sc, p, hs, res, mx); break;
    default: scores_heads_d<HB, KB, 0>(qt, D, kf, S, Smin, lenv, sc, p, hs, res, mx); break;
  }
}

// Every head of the group: blocks of 4 heads x 2 keys (8 chains: 4 + 2 loads an 8 FMAs), the
// rest as 3 x 2, 2 x 4 or 1 x 8.
// mx [R]: each head's max per lane over the lane's keys (0..len - 1; len[i] >= 1).
inline void scores_all(const float* qt, int R, int64_t D, const float* kf, int64_t S, int64_t Smin, const int32_t* len,
                       float scale, float* p, int64_t hs, __m256* res, __m256* mx) {
  const __m256 sc = _mm256_set1_ps(scale);
  const __m256i lenv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(len));
  for (int h = 0; h < R; ++h) mx[h] = _mm256_set1_ps(-INFINITY);
  int h = 0;
  for (; h + 4 <= R; h += 4) scores_heads<4, 2>(qt + h * D * kQ, D, kf, S, Smin, lenv, sc, p + h * hs, hs, res, mx + h);
  switch (R - h) {
    case 3: scores_heads<3, 2>(qt + h * D * kQ, D, kf, S, Smin, lenv, sc, p + h * hs, hs, res, mx + h); break;
    case 2: scores_heads<2, 4>(qt + h * D * kQ, D, kf, S, Smin, lenv, sc, p + h * hs, hs, res, mx + h); break;
    case 1: scores_heads<1, 8>(qt + h * D * kQ, D, kf, S, Smin, lenv, sc, p + h * hs, hs, res, mx + h); break;
    default: break;
  }
}

// softmax_rows for the 8 lanes of one head's scores p [Smax][8] (lane i: query i with len[i]
// keys; len >= 1; m: each lane's max over its keys, from scores_all): the probabilities of lane i's keys 0..len[i]-1 in place, times 1 / sum in
// `inv` (not yet applied: lanes_probs does it while transposing). What lane i gets is what
// softmax_rows computes for that query's row alone (see the section's header).
inline __m256 lanes_softmax(float* p, const int32_t* len, __m256 m, int64_t Smax) {
  const __m256i lenv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(len));
  const __m256i fullv = _mm256_and_si256(lenv, _mm256_set1_epi32(~7));  // each lane's end of its full 8-key chunks
  int64_t s = 0;
  alignas(32) int32_t full[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(full), fullv);
  int64_t fmin = full[0];
  for (int i = 1; i < 8; ++i) fmin = std::min<int64_t>(fmin, full[i]);
  __m256 sv[8];
  for (int l = 0; l < 8; ++l) sv[l] = _mm256_setzero_ps();
  for (s = 0; s < fmin; s += 8)
    for (int l = 0; l < 8; ++l) {
      const __m256 e = codeshell::exp8(_mm256_sub_ps(_mm256_load_ps(p + (s + l) * kQ), m));
      _mm256_store_ps(p + (s + l) * kQ, e);
      sv[l] = _mm256_add_ps(sv[l], e);
    }
  for (; s < Smax; s += 8)  // lanes still in a full chunk: exp8 and its sum; the others keep their score
    for (int l = 0; l < 8 && s + l < Smax; ++l) {  // (fmin % 8 == 0: key s + l goes to sv[l])
      const __m256 in = _mm256_castsi256_ps(_mm256_cmpgt_epi32(fullv, _mm256_set1_epi32(int32_t(s + l))));
      const __m256 x = _mm256_load_ps(p + (s + l) * kQ);
      const __m256 e = codeshell::exp8(_mm256_sub_ps(x, m));
      _mm256_store_ps(p + (s + l) * kQ, _mm256_blendv_ps(x, e, in));
      sv[l] = _mm256_add_ps(sv[l], _mm256_and_ps(e, in));  // + (+0) where out: sv stays as it was
    }
  alignas(32) float sum[8], mx[8];
  _mm256_store_ps(sum, tree8(sv));
  _mm256_store_ps(mx, m);
  for (int i = 0; i < 8; ++i)  // decode's scalar tail: the keys past lane i's last full chunk, in order
    for (int64_t j = full[i]; j < len[i]; ++j) sum[i] += (p[j * kQ + i] = std::exp(p[j * kQ + i] - mx[i]));
  return _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_load_ps(sum));  // 1.f / sum, lane by lane
}

// pt [8][R][Sp] (query i, head h: its probabilities over keys 0..Sp-1, Sp % 8 == 0) <- p [R][Sp][8] times inv[h].
inline void lanes_probs(const float* p, const __m256* inv, int R, int64_t Sp, float* pt) {
  for (int h = 0; h < R; ++h)
    for (int64_t s = 0; s < Sp; s += 8) {
      __m256 r[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_mul_ps(_mm256_load_ps(p + (h * Sp + s + k) * kQ), inv[h]);
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_store_ps(pt + (i * R + h) * Sp + s, r[i]);
    }
}

// attention_prims.h weighted_values on fp32 values, for keys [s0, s1) of one query (o carries the
// sums from s0 > 0: a store and reload of fp32, exact): RB heads' probabilities p [RB][ps],
// values vf [S][D], o [RB][D]. Each output lane an FMA chain over the keys in order from +0.
template <int RB>
inline void values_block(const float* p, int64_t ps, int64_t s0, int64_t s1, const float* vf, int64_t D, float* o) {
  for (int64_t d = 0; d < D; d += 16) {
    __m256 acc[RB][2];
    for (int r = 0; r < RB; ++r)
      for (int h = 0; h < 2; ++h) acc[r][h] = s0 == 0 ? _mm256_setzero_ps() : _mm256_load_ps(o + r * D + d + 8 * h);
    for (int64_t s = s0; s < s1; ++s) {
      const __m256 a = in_reg(_mm256_load_ps(vf + s * D + d)), b = in_reg(_mm256_load_ps(vf + s * D + d + 8));
      for (int r = 0; r < RB; ++r) {
        const __m256 w = _mm256_broadcast_ss(p + r * ps + s);
        acc[r][0] = _mm256_fmadd_ps(w, a, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w, b, acc[r][1]);
      }
    }
    for (int r = 0; r < RB; ++r) {
      _mm256_store_ps(o + r * D + d, acc[r][0]);
      _mm256_store_ps(o + r * D + d + 8, acc[r][1]);
    }
  }
}

inline void values_query(const float* p, int R, int64_t ps, int64_t s0, int64_t s1, const float* vf, int64_t D, float* o) {
  int h = 0;
  for (; h + 4 <= R; h += 4) values_block<4>(p + h * ps, ps, s0, s1, vf, D, o + h * D);
  switch (R - h) {
    case 3: values_block<3>(p + h * ps, ps, s0, s1, vf, D, o + h * D); break;
    case 2: values_block<2>(p + h * ps, ps, s0, s1, vf, D, o + h * D); break;
    case 1: values_block<1>(p + h * ps, ps, s0, s1, vf, D, o + h * D); break;
    default: break;
  }
}

}  // namespace lanes
}  // namespace

// q bf16 [B, H, T, D] (last dim contiguous); k_cache, v_cache bf16 [slots, G, max_len, D] contiguous,
// the new keys stored; slots int64 [B]; positions int64 [B, T] (query t of row b sees keys
// 0..positions[b, t]). Returns y bf16 [B, T, H, D]: each query's row the bits decode_attention
// gives that query alone. D % 16 == 0 (decode's vector path).
torch::Tensor prefill_attention_lanes(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                      const torch::Tensor& slots, const torch::Tensor& positions, double scale) {
  using namespace lanes;
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kBFloat16 && q.stride(3) == 1,
              "prefill_attention_lanes: q must be bf16 [B, H, T, D] with a contiguous last dim");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == torch::kBFloat16 && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == torch::kBFloat16 &&
                  v_cache.is_contiguous(),
              "prefill_attention_lanes: k_cache and v_cache must be contiguous bf16 [slots, G, max_len, D] of one shape");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), G = k_cache.size(1), L = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 16 == 0 && D > 0 && G > 0 && H % G == 0,
              "prefill_attention_lanes: head dim ", D, " (a multiple of 16 needed) or groups ", G, " not dividing ", H,
              " heads");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.dim() == 1 && slots.size(0) == B && slots.is_contiguous(),
              "prefill_attention_lanes: slots must be int64 [B]");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.dim() == 2 && positions.size(0) == B &&
                  positions.size(1) == T && positions.is_contiguous(),
              "prefill_attention_lanes: positions must be contiguous int64 [B, T]");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  std::vector<int64_t> rowlen(size_t(B), 0);  // keys each row's queries reach (its largest position + 1)
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= sp[b] && sp[b] < k_cache.size(0), "prefill_attention_lanes: slot ", sp[b], " out of range");
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(0 <= pp[b * T + t] && pp[b * T + t] < L, "prefill_attention_lanes: position ", pp[b * T + t],
                  " outside the cache's ", L);
      rowlen[b] = std::max(rowlen[b], pp[b * T + t] + 1);
    }
  }
  auto y = torch::empty({B, T, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || T == 0) return y;
  const int R = int(H / G);
  TORCH_CHECK(R <= kMaxR, "prefill_attention_lanes: more than ", kMaxR, " query heads a KV group");
  const int64_t Lmax = *std::max_element(rowlen.begin(), rowlen.end());
  const int64_t Sp = (Lmax + 7) / 8 * 8;
  const auto* qb = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kb = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vb = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  auto* yb = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t qsB = q.stride(0), qsH = q.stride(1), qsT = q.stride(2);
  // 1. each (row, group)'s keys and values 0..rowlen-1 widened to fp32 (kf, vf [B][G][Lmax][D]), in
  // chunks of 64 keys over the threads. The buffer is the calling thread's, kept between calls.
  static thread_local codeshell::ThreadScratch kv_keep;
  codeshell::Scratch<float> kv(kv_keep, 2 * size_t(B * G) * Lmax * D);
  float* const kf = kv.data();
  float* const vf = kf + size_t(B * G) * Lmax * D;
  constexpr int64_t kWiden = 64;
  const int64_t wchunks = (Lmax + kWiden - 1) / kWiden;
  codeshell::parallel_grain(B * G * wchunks, 1, [&](int64_t a, int64_t e) {
    for (int64_t w = a; w < e; ++w) {
      const int64_t bg = w / wchunks, b = bg / G, g = bg % G, s0 = (w % wchunks) * kWiden;
      const int64_t s1 = std::min(rowlen[b], s0 + kWiden);
      const size_t src = size_t((sp[b] * G + g) * L) * D, dst = size_t(bg * Lmax) * D;
      for (int64_t x = s0 * D; x < s1 * D; x += 8) {
        _mm256_store_ps(kf + dst + x, codeshell::load_bf16x8(kb + src + x));
        _mm256_store_ps(vf + dst + x, codeshell::load_bf16x8(vb + src + x));
      }
    }
  });
  // 2. items (row, group, 8 queries), the latest queries (the most keys) first, claimed by the
  // threads one at a time.
  const int64_t nq = (T + kQ - 1) / kQ, items = B * G * nq;
  const float fscale = float(scale);
  const int64_t qt_n = int64_t(R) * D * kQ, p_n = int64_t(R) * Sp * kQ, o_n = int64_t(R) * D * kQ;
  codeshell::parallel_grain(items, 1, [&](int64_t a, int64_t e) {
    static thread_local codeshell::ThreadScratch keep;
    // Qt [R][D][8], scores / probabilities [R][Sp][8], their rows Pt [8][R][Sp], outputs [8][R][D],
    // the score tiles' residues (64 vectors)
    codeshell::Scratch<float> buf(keep, size_t(qt_n + 2 * p_n + o_n + 64 * 8));
    float* const qt = buf.data();
    float* const p = qt + qt_n;
    float* const pt = p + p_n;
    float* const o = pt + p_n;
    __m256* const res = reinterpret_cast<__m256*>(o + o_n);
    for (int64_t w = a; w < e; ++w) {
      const int64_t qi = nq - 1 - w / (B * G), bg = w % (B * G), b = bg / G, g = bg % G, t0 = qi * kQ;
      const int n = int(std::min<int64_t>(kQ, T - t0));
      alignas(32) int32_t len[8];
      int64_t Smin = INT64_MAX, Smax = 0;
      for (int i = 0; i < n; ++i) {
        len[i] = int32_t(pp[b * T + t0 + i] + 1);
        Smin = std::min<int64_t>(Smin, len[i]);
        Smax = std::max<int64_t>(Smax, len[i]);
      }
      for (int i = n; i < 8; ++i) len[i] = int32_t(Smin);  // idle lanes: zero queries over the shortest keys
      // Qt: the 8 queries' q of each head, 8 dims at a time transposed to [d][query]
      for (int h = 0; h < R; ++h) {
        const uint16_t* qh = qb + b * qsB + (g * R + h) * qsH + t0 * qsT;
        for (int64_t d = 0; d < D; d += 8) {
          __m256 r[8];
          for (int i = 0; i < 8; ++i) r[i] = i < n ? codeshell::load_bf16x8(qh + i * qsT + d) : _mm256_setzero_ps();
          transpose8(r);
          for (int k = 0; k < 8; ++k) _mm256_store_ps(qt + (h * D + d + k) * kQ, r[k]);
        }
      }
      const int64_t Spi = (Smax + 7) / 8 * 8;  // this item's key stride (p, pt)
      const float* kfg = kf + size_t(bg * Lmax) * D;
      const float* vfg = vf + size_t(bg * Lmax) * D;
      __m256 mx[kMaxR], inv[kMaxR];
      scores_all(qt, R, D, kfg, Smax, Smin, len, fscale, p, Spi * kQ, res, mx);
      for (int h = 0; h < R; ++h) inv[h] = lanes_softmax(p + h * Spi * kQ, len, mx[h], Smax);
      lanes_probs(p, inv, R, Spi, pt);
      // values: keys in chunks whose fp32 rows (16 KiB) stay in L1 for the 8 queries
      const int64_t kc = std::max<int64_t>(16, 4096 / D);
      for (int64_t s0 = 0; s0 < Smax; s0 += kc)
        for (int i = 0; i < n; ++i)
          if (s0 < len[i])
            values_query(pt + i * R * Spi, R, Spi, s0, std::min<int64_t>(len[i], s0 + kc), vfg, D, o + i * R * D);
      for (int i = 0; i < n; ++i) {
        uint16_t* yr = yb + ((b * T + t0 + i) * H + g * R) * D;
        for (int64_t x = 0; x < R * D; x += 16)
          store_bf16x16(yr + x, _mm256_load_ps(o + i * R * D + x), _mm256_load_ps(o + i * R * D + x + 8));
      }
    }
  });
  return y;
}
