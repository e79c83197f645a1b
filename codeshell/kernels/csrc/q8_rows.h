// int8 x int8-activation batched decode kernel with the rows of x in the vector lanes
// (AVX512-VNNI, header-only): qdot.cpp's `avx512_vnni:q8` int8 at M = 3..16 (CPUs without AMX).
//
// What this is: y[M, N] = x[M, K] . W^T + bias for M <= 16 with the fp32 epilogue of
// q8_epilogue.h (exact int32 block sums T_b over blocks of 128 k, then its fixed fp32 order), so
// a row gets the bits that q8_panel.h, tile_v and the AMX-INT8 tiles give it, at every M.
// Layout: the M rows of x are padded to MP = 4, 8 or 16 (MP = 16 / E) and rearranged once per
// call (`prepare`) so that one zmm of x holds, in lane m * E + e, the 4-byte quad e of a run of
// E quads of row m; the matching E quads of one weight row are broadcast to all 16 lanes (4, 8
// or 16 bytes: vpbroadcastd / vpbroadcastq / vbroadcasti32x4, load-port operations), so one
// vpdpbusd multiplies one weight row by MP rows of x with every lane useful (M = 4, 8, 16; at
// M = 3, 5-7, 9-15 the pad lanes are wasted). After a block's 32 / E steps, lane m * E + e holds
// row m's sum over the quads e mod E; q8epi::combine (E - 1 per E weight rows) sums the E lanes,
// leaving one vector with lane i * MP + m = T_b of (row m, weight row i of the E).
// Why: the transposed panel (q8_panel.h) spends 64 shuffles per KiB of weight whatever M, and
// reads 16 weight rows side by side; measured on the Zen 5 EPYC (2 vpdpbusd zmm per cycle, 4
// cycles latency; 512-bit shuffles 2 per cycle) it ran int8 M = 8 at about a fifth of vpdpbusd's
// peak. Here the weight needs no shuffle at all (8 per E weight rows per block for the lane sums),
// each weight quad run is broadcast straight from the weight rows and offset in the register
// (xor 0x80: vpdpbusd's unsigned operand, which cannot take an embedded broadcast), and x
// (MP x 128 bytes per block, from L1 / L2) is loaded once per 8 weight rows. Measured (1 thread,
// the four 7B linears, cold, a standalone copy of the loop): M = 8 ~10 ms against 11-12 with the
// weights first xor-ed into a 1 KiB L1 stage (single or double buffered) and broadcast from it.
// The unsigned-weight operand costs: with x as the unsigned operand (x + 128) the weight quads
// could be vpdpbusd's embedded {1to16} memory operand (timed: M = 4 / 8 ~25% / 15% faster, cache
// warm), but T_b then needs each weight block's own sum (128 * sum w), which the packed weights
// do not carry.
// Prefetch: as each block of the NR rows is read, the same block of the next NR rows (NR x K
// bytes ahead: the rows of a group are one contiguous range) into L2, as q8_panel.h does. Measured
// (1 thread, cold, standalone copy, M = 8): the four 7B linears 8.3-10.0 ms against 10.4-11.8
// with qdot.cpp's 2 KiB-ahead L1 prefetch per row, the small model's 32 linears (K = 1024 / 4096)
// 4.1-4.4 against 6.1-7.0 (2 KiB ahead is inside the same group there); two groups ahead or
// 4 / 16 rows per group measured the same or slower.
// Weights are offset to unsigned (u = w ^ 0x80 = w + 128); T_b = S_b - 128 sx_b (sx_b = the
// block's exact sum of xq), as in q8_panel.h.
// Session 20 (v2, the default at M = 2..16; CODESHELL_Q8R_V2=0: the xor schedule above, read per call):
// x + 128 as the unsigned operand and the weight broadcast signed as stored, so no xor per broadcast;
// T_b = S'_b - 128 sum_b(w) with the 8 weight rows' block sums from two vpdpbusd a row (weight_sums).
// The same T_b, so the same bits. Measured (docs/kernels.md, session 20 helper D): the small int8
// checkpoint's batch-8 step in the model (2 threads, weights from DRAM) 4.0% faster, its linears
// 5.4%; a 1-thread standalone copy ran the block linears 2-14% slower and the head 6-10% faster, so
// the model's figure is the reason. The L1 prefetch (kL1Blocks) went from 2 to 4 blocks with it.
// Prepared / run_chunk: the call's x side and one chunk of weight rows, so that a standalone harness
// (benchmarks/standalone/q8rows_ab.cpp) runs the kernel without the thread pool.
// What this is not: int4 (its rows keep qdot.cpp's per-lane tile_q4v bits without AMX), M > 16
// (q8_panel.h), the AMX CPUs' path (their rows below the AMX threshold stay on q8_panel.h).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "isa.h"
#include "parallel.h"
#include "q8_epilogue.h"
#include "q8_wsum.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace q8rows {

// Quads per lane run for M rows of x: MP = 16 / E >= M.
inline int quads_per_lane(int64_t M) { return M <= 1 ? 16 : M <= 2 ? 8 : M <= 4 ? 4 : M <= 8 ? 2 : 1; }

struct Args {
  int64_t M, K, N, nb;   // nb = K / 128
  const int8_t* xt;      // [nb][32 / E][64]: prepare's layout of xq (zero in the pad rows)
  const int32_t* so;     // [nb][16]: 128 * sx[m][b] in lane i * MP + m (0 in pad rows)
  const float* dT;       // [nb][16]: dx[m][b] in lane i * MP + m (0 in pad rows)
  const uint8_t* w;      // int8 [N][K] (as stored, signed)
  const float* scale;    // [N]
  const float* bias;     // [N] or null
  float* out;            // [M][N]
  int64_t pf0 = 0;       // also prefetch the same NR rows' block b + pf0 into L1 (0: no)
  bool asm_dp = true;    // the step loop's vpdpbusd through dpbusd() (false: the intrinsic; CODESHELL_Q8R_ASM=0)
  bool lean_epi = true;  // run_rows' vector epilogue (false: its scalar loops and full tree16_v; CODESHELL_Q8R_EPI=0)
  int64_t pf1 = 1;       // the T1 prefetch: this many groups of NR rows ahead (0: none)
  bool v2 = true;        // x as the unsigned operand (xu), no per-broadcast xor (run_rows' XU; CODESHELL_Q8R_V2=0: off)
  const int8_t* xu = nullptr;  // xt ^ 0x80 (x + 128, unsigned), for v2
  const int32_t* wsum = nullptr;  // v2: q8_wsum.h's block_sums of w (null: weight_sums per block; CODESHELL_Q8R_WSUM=0)
};

// tree16_v over the 16 slots acc[0..15] (stride 16 floats) of which only slots < nb were written
// (the rest hold +0): the same sum without the adds of +0. Exact: a slot's acc is never -0
// (q8_epilogue.h: it starts at +0), so x + (+0) = x, and the tree's remaining pairs are the same.
inline __m512 tree16_prefix(const float* acc, int64_t nb) {
  auto ld = [&](int i) { return _mm512_load_ps(acc + 16 * i); };
  if (nb >= 9) return codeshell::q8epi::tree16_v(acc, 16);
  if (nb <= 1) return ld(0);
  if (nb <= 2) return _mm512_add_ps(ld(0), ld(1));
  __m512 a[4];
  if (nb <= 4) {
    for (int i = 0; i < 4; ++i) a[i] = i < nb ? ld(i) : _mm512_setzero_ps();
  } else {
    for (int i = 0; i < 4; ++i) a[i] = i + 4 < nb ? _mm512_add_ps(ld(i), ld(i + 4)) : ld(i);
  }
  // levels i + 2 and i + 1 as tree16_v (a slot past nb: +0, added as tree16_v adds it)
  const __m512 c0 = _mm512_add_ps(a[0], a[2]), c1 = _mm512_add_ps(a[1], a[3]);
  return _mm512_add_ps(c0, c1);
}

// The L1 prefetch distance in 128-byte blocks (CODESHELL_Q8R_PF0 overrides it; 0 = none; past a
// row's end the next NR rows' first blocks, so K = 256 rows get it too). The
// T1 prefetch brings the next NR rows into L2, but the NR rows being read are 8 streams of 8-16
// bytes a vpdpbusd, and their L1 misses stalled the loop: prefetching each row's block 2 ahead
// into L1 cut the small shape's int8 block linears at M = 8 by 17-30% (bench_decode_step.py
// --profile, docs/kernels.md session 18 helper B); 1 and 4 blocks ran within a few % of 2 there.
// Session 20 (helper D): 4 blocks, same process, 10 rounds: the small int8 batch-8 step 4.3% faster
// (its linears 4.9%), with v2 4.5% (linears 6.0%); 1 thread cold standalone 6% (6 blocks: 11%).
// CODESHELL_Q8R_PF0=2: session 18's distance.
// Batched calls only (M > 1): M = 1 at K > 4096 (qdot.cpp's m1_rows_q8) streams 16 rows from
// memory, was not measured with it, and keeps its schedule.
constexpr int64_t kL1Blocks = 4;

// acc += u . s (vpdpbusd) with the accumulator as the instruction's own in-out register. Why:
// GCC 12 compiled the intrinsic in run_rows' step loop with a register copy before and after
// every vpdpbusd (16 vmovdqa per 8 vpdpbusd, and each chain's latency through two moves); the
// asm names the tied operand, so the 8 chains stay in their registers. The same instruction on
// the same operands: the same integers.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// E quads (4E bytes) at p, broadcast to the 16 lanes.
template <int E>
inline __m512i bcast(const uint8_t* p) {
  if constexpr (E == 1) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  } else if constexpr (E == 2) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm512_set1_epi64(v);
  } else if constexpr (E == 4) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (E == 8) {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    return _mm512_loadu_si512(p);
  }
}

// a[0..E-1] (lane m * E + e: row m's sum over the quads e mod E against weight row i) -> lane
// i * MP + m = row m's whole sum against weight row i (integers: exact in any order).
template <int E>
inline __m512i reduce(const __m512i* a) {
  if constexpr (E == 1) {
    return a[0];
  } else {
    __m512i c[E / 2];
    for (int i = 0; i < E / 2; ++i) c[i] = codeshell::q8epi::combine(a[2 * i], a[2 * i + 1]);
    return reduce<E / 2>(c);
  }
}

// XU (x + 128 as vpdpbusd's unsigned operand, the weight signed as stored): S'_b = sum (x + 128) w
// = T_b + 128 sum_b(w), so T_b = S'_b - 128 sum_b(w) (exact integers, the same T_b as u = w ^ 0x80
// against x less 128 sx_b). 128 sum_b(w) of the 8 rows rp[0..7]: per row two vpdpbusd of the
// block's 128 bytes (L1: just read) against bytes of 128, then a transposing tree of combines
// (q8epi::combine: pair sums, a's in lanes 0-7, b's in 8-15) to lane j (and j + 8) = row j's.
inline __m512i weight_sums(const uint8_t* const* rp, int64_t b) {
  namespace E_ = codeshell::q8epi;
  const __m512i c128 = _mm512_set1_epi8(int8_t(0x80)), z = _mm512_setzero_si512();
  __m512i s[8];
  for (int j = 0; j < 8; ++j)
    s[j] = dpbusd(dpbusd(z, c128, _mm512_loadu_si512(rp[j] + b * 128)), c128, _mm512_loadu_si512(rp[j] + b * 128 + 64));
  const __m512i c0 = E_::combine(s[0], s[1]), c1 = E_::combine(s[2], s[3]), c2 = E_::combine(s[4], s[5]),
                c3 = E_::combine(s[6], s[7]);
  const __m512i e = E_::combine(E_::combine(c0, c1), E_::combine(c2, c3));  // lanes 2j, 2j + 1: row j's halves
  return E_::combine(e, e);
}

// Weight rows [n0, n1), all M rows of x: NR weight rows at a time (8, or E where E > 8), the
// last group's missing rows repeating row n1 - 1 (computed, not stored).
template <int E, bool XU = false>
void run_rows(const Args& A, int64_t n0, int64_t n1) {
  namespace E_ = codeshell::q8epi;
  constexpr int NR = E > 8 ? E : 8, NG = NR / E, NP = 32 / E, MP = 16 / E;
  static_assert(!XU || NR == 8, "XU: 8 weight rows a group");
  const int64_t K = A.K, nb = A.nb;
  alignas(64) float acc[NG][16][16];
  alignas(64) float y[16], sv[16], bv[16];
  const __m512i s80 = _mm512_set1_epi8(int8_t(0x80));
  // acc[g][L] sums blocks L, L + 16, ... from +0. Blocks 0..15 start from a zero register
  // instead of a load (the same +0), so only the slots no block reaches (L >= nb) are zeroed,
  // once per call: a memset of all NG x 16 slots per NR weight rows (4 KiB at E = 2) cost as
  // much as the rows' vpdpbusd at K = 256 (codeshell-mini's head at M = 8: 162 -> see
  // docs/kernels.md, session 15 helper C).
  for (int g = 0; g < NG; ++g)
    for (int64_t l = std::min<int64_t>(nb, 16); l < 16; ++l) std::memset(acc[g][l], 0, sizeof acc[g][l]);
  __m512i gix[NG];  // XU: lane l = i * MP + m of group g takes weight row g E + i's sum (weight_sums' lane)
  for (int g = 0; g < NG; ++g) {
    alignas(64) int32_t ix[16];
    for (int l = 0; l < 16; ++l) ix[l] = g * E + l / MP;
    gix[g] = _mm512_load_si512(ix);
  }
  // v2 with the weight's block sums table (q8_wsum.h; [n / 8][b][8], so groups must start at a
  // multiple of 8 rows: parallel_chunks' chunks start at multiples of 16): one 32-byte load per
  // block instead of weight_sums. Lanes past n1 read rows the group does not store.
  const bool tab = XU && A.wsum != nullptr && n0 % 8 == 0;
  for (int64_t n = n0; n < n1; n += NR) {
    const uint8_t* rp[NR];
    for (int j = 0; j < NR; ++j) rp[j] = A.w + std::min(n + j, n1 - 1) * K;
    for (int64_t b = 0; b < nb; ++b) {
      for (int j = 0; j < NR; ++j) {  // the next NR rows' same bytes into L2 (past n1: harmless)
        const char* p = reinterpret_cast<const char*>(rp[j] + b * 128 + A.pf1 * NR * K);
        _mm_prefetch(p, _MM_HINT_T1);
        _mm_prefetch(p + 64, _MM_HINT_T1);
      }
      if (tab && A.pf1 > 0)  // the block sums of the T1-prefetched rows (a block's 32 bytes; one line every 2 blocks)
        _mm_prefetch(reinterpret_cast<const char*>(A.wsum + ((n / 8 + A.pf1) * nb + b) * 8), _MM_HINT_T0);
      if (A.pf0 > 0)
        for (int j = 0; j < NR; ++j) {  // block b + pf0 of the row, past its end the next group's (L2 -> L1)
          const int64_t ahead = b + A.pf0 < nb ? (b + A.pf0) * 128 : NR * K + (b + A.pf0 - nb) * 128;
          const char* p = reinterpret_cast<const char*>(rp[j] + ahead);
          _mm_prefetch(p, _MM_HINT_T0);
          _mm_prefetch(p + 64, _MM_HINT_T0);
        }
      __m512i a[NR];
      for (int j = 0; j < NR; ++j) a[j] = _mm512_setzero_si512();
      const int8_t* xb = (XU ? A.xu : A.xt) + b * NP * 64;
      if constexpr (XU) {
        for (int p = 0; p < NP; ++p) {
          const __m512i xv = _mm512_load_si512(xb + 64 * p);
          for (int j = 0; j < NR; ++j) a[j] = dpbusd(a[j], xv, bcast<E>(rp[j] + b * 128 + 4 * E * p));
        }
      } else if (A.asm_dp) {
        for (int p = 0; p < NP; ++p) {
          const __m512i xv = _mm512_load_si512(xb + 64 * p);
          for (int j = 0; j < NR; ++j) a[j] = dpbusd(a[j], _mm512_xor_si512(bcast<E>(rp[j] + b * 128 + 4 * E * p), s80), xv);
        }
      } else {
        for (int p = 0; p < NP; ++p) {
          const __m512i xv = _mm512_load_si512(xb + 64 * p);
          for (int j = 0; j < NR; ++j)
            a[j] = _mm512_dpbusd_epi32(a[j], _mm512_xor_si512(bcast<E>(rp[j] + b * 128 + 4 * E * p), s80), xv);
        }
      }
      __m512i so = _mm512_load_si512(A.so + b * 16), sw = so;
      if constexpr (XU) {
        if (tab)  // lanes j and j + 8: row n + j's 128 sum_b(w), as weight_sums leaves them
          sw = _mm512_broadcast_i32x8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.wsum + ((n / 8) * nb + b) * 8)));
        else
          sw = weight_sums(rp, b);
      }
      const __m512 d = _mm512_load_ps(A.dT + b * 16);
      for (int g = 0; g < NG; ++g) {
        if constexpr (XU) so = _mm512_permutexvar_epi32(gix[g], sw);  // lane i * MP + m: row g E + i's
        const __m512i T = _mm512_sub_epi32(reduce<E>(a + g * E), so);
        float* ac = acc[g][b & 15];
        _mm512_store_ps(ac, E_::epi_step(b < 16 ? _mm512_setzero_ps() : _mm512_load_ps(ac), T, d));
      }
    }
    for (int g = 0; g < NG; ++g) {
      if (A.lean_epi) {
        // lane l = i * MP + m takes weight row n + g E + i (clamped to n1 - 1): the E scales and
        // biases from one masked load each, spread by a permute; the tree without its +0 slots
        const int64_t r0 = n + g * E, left = std::min<int64_t>(E, n1 - r0);
        if (left <= 0) break;  // this group and the next hold no row below n1
        const __mmask16 k = __mmask16((1u << left) - 1);
        alignas(64) int32_t ix[16];
        for (int l = 0; l < 16; ++l) ix[l] = int32_t(std::min<int64_t>(l / MP, left - 1));
        const __m512i iv = _mm512_load_si512(ix);
        const __m512 s = _mm512_permutexvar_ps(iv, _mm512_maskz_loadu_ps(k, A.scale + r0));
        const __m512 bb = A.bias ? _mm512_permutexvar_ps(iv, _mm512_maskz_loadu_ps(k, A.bias + r0)) : _mm512_setzero_ps();
        _mm512_store_ps(y, E_::finish_vec(tree16_prefix(&acc[g][0][0], nb), s, bb));
      } else {
        for (int l = 0; l < 16; ++l) {
          const int64_t r = std::min<int64_t>(n + g * E + l / MP, n1 - 1);
          sv[l] = A.scale[r];
          bv[l] = A.bias ? A.bias[r] : 0.f;
        }
        _mm512_store_ps(y, E_::finish_vec(E_::tree16_v(&acc[g][0][0], 16), _mm512_load_ps(sv), _mm512_load_ps(bv)));
      }
      for (int i = 0; i < E; ++i) {
        const int64_t r = n + g * E + i;
        if (r >= n1) break;
        for (int64_t m = 0; m < A.M; ++m) A.out[m * A.N + r] = y[i * MP + m];
      }
    }
  }
}

// Rows of x [M, K] (k order, K % 128 == 0, M <= 16) -> the layout run_rows reads (xt, so, dT in
// buffers this object owns). dx, sx: [M][K / 128] block scales and exact block sums of xq.
// with_xt / with_xu: which of the x layouts to build (the xor schedule reads xt, v2 reads xu; null
// where not built): a call builds the one its schedule reads, the standalone harness both.
struct Prepared {
  int64_t M, K, nb;
  int E;
  std::vector<int8_t> xtv, xuv;
  std::vector<int32_t> sov;
  std::vector<float> dv;
  int8_t *xt, *xu;
  int32_t* so;
  float* dT;
  Prepared(const int8_t* xq, const float* dx, const int32_t* sx, int64_t M_, int64_t K_, bool with_xt = true,
           bool with_xu = true)
      : M(M_), K(K_), nb(K_ / 128), E(quads_per_lane(M_)) {
    const int MP = 16 / E;
    const int64_t np = 32 / E;
    if (with_xt) xtv.resize(size_t(nb * np * 64 + 64));
    if (with_xu) xuv.resize(size_t(nb * np * 64 + 64));
    sov.resize(size_t(nb * 16 + 16));
    dv.resize(size_t(nb * 16 + 16));
    auto align = [](auto* p) { return reinterpret_cast<decltype(p)>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63)); };
    xt = with_xt ? align(xtv.data()) : nullptr;
    xu = with_xu ? align(xuv.data()) : nullptr;
    so = align(sov.data());
    dT = align(dv.data());
    // One gather per zmm of x: lane l = m * E + e reads the quad e of row m's run (masked: pad rows 0).
    alignas(64) int32_t idx[16];
    __mmask16 valid = 0;
    for (int l = 0; l < 16; ++l) {
      const int64_t m = l / E, e = l % E;
      idx[l] = int32_t(std::min<int64_t>(m, M - 1) * K + 4 * e);
      if (m < M) valid |= __mmask16(1u << l);
    }
    const __m512i vi = _mm512_load_si512(idx);
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t p = 0; p < np; ++p) {
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, vi, xq + b * 128 + 4 * E * p, 1);
        if (with_xt) _mm512_store_si512(xt + (b * np + p) * 64, v);
        if (with_xu) _mm512_store_si512(xu + (b * np + p) * 64, _mm512_xor_si512(v, _mm512_set1_epi8(int8_t(0x80))));
      }
      for (int l = 0; l < 16; ++l) {
        const int64_t m = l % MP;
        so[b * 16 + l] = m < M ? 128 * sx[m * nb + b] : 0;
        dT[b * 16 + l] = m < M ? dx[m * nb + b] : 0.f;
      }
    }
  }
  // The call's Args with the switches at their defaults or as the environment sets them (A/B runs,
  // read per call): CODESHELL_Q8R_PF0 (unset: kL1Blocks), _ASM (unset: asm), _EPI (unset: lean), _V2 (unset: v2).
  Args args(int64_t N, const uint8_t* w, const float* scale, const float* bias, float* out) const {
    return Args{M, K, N, nb, xt, so, dT, w, scale, bias, out,
                std::max<int64_t>(0, codeshell::env_int("CODESHELL_Q8R_PF0", M > 1 ? kL1Blocks : 0)),
                codeshell::env_flag("CODESHELL_Q8R_ASM", true), codeshell::env_flag("CODESHELL_Q8R_EPI", true),
                1, codeshell::env_flag("CODESHELL_Q8R_V2", true), xu};
  }
};

// Weight rows [n0, n1) of one call (A.M rows of x, prepared): run_rows at the call's E.
inline void run_chunk(const Args& A, int64_t n0, int64_t n1) {
  if (A.v2 && A.xu) {
    switch (quads_per_lane(A.M)) {
      case 1: run_rows<1, true>(A, n0, n1); return;
      case 2: run_rows<2, true>(A, n0, n1); return;
      case 4: run_rows<4, true>(A, n0, n1); return;
      case 8: run_rows<8, true>(A, n0, n1); return;
      default: break;  // E = 16 (M = 1): 16 rows a group, the xor schedule
    }
  }
  switch (quads_per_lane(A.M)) {
    case 1: run_rows<1>(A, n0, n1); break;
    case 2: run_rows<2>(A, n0, n1); break;
    case 4: run_rows<4>(A, n0, n1); break;
    case 8: run_rows<8>(A, n0, n1); break;
    default: run_rows<16>(A, n0, n1); break;
  }
}

// y[M, N] = x . W^T (+ bias): prepare x, then the weight rows in parallel chunks.
inline void run(const int8_t* xq, const float* dx, const int32_t* sx, int64_t M, int64_t K, int64_t N,
                const int8_t* w, const float* scale, const float* bias, float* out) {
  // v2 reads xu where it applies (E < 16: M >= 2), the xor schedule xt: build only that one
  const bool v2 = codeshell::env_flag("CODESHELL_Q8R_V2", true) && quads_per_lane(M) != 16;
  const Prepared P(xq, dx, sx, M, K, !v2, v2);
  Args A = P.args(N, reinterpret_cast<const uint8_t*>(w), scale, bias, out);
  // the caller's block sums of this very weight (q8_wsum.h's hint; with CODESHELL_Q8R_WSUM=0 the
  // decode step, which reads the switch, hands over none: read once a call, there)
  const SumsHint& h = sums_hint();
  if (v2 && h.sums != nullptr && h.w == static_cast<const void*>(w) && h.N == N && h.K == K)
    A.wsum = h.sums;
  // The weight rows split (session 22): one contiguous share per thread, taken front to back in
  // steps (parallel_owned; a thread done early takes steps from the back of the other's share), so
  // each thread's T1 prefetch past a step's end reads the rows of its own next step. With
  // parallel_chunks (CODESHELL_Q8R_OWNED=0, read per call: before) the threads claim the ~16 chunks
  // in turn, a thread's next chunk is not the one after its last, and each chunk starts cold.
  // Rows are independent and groups start at multiples of 16 either way: the same bits.
  if (codeshell::env_flag("CODESHELL_Q8R_OWNED", true)) {
    const int64_t step = std::max<int64_t>(64, (N + 15) / 16 + 15) / 16 * 16;
    codeshell::parallel_owned(N, 16, step, [&](int64_t n0, int64_t n1) { run_chunk(A, n0, n1); });
    return;
  }
  codeshell::parallel_chunks(N, 16, 64, [&](int64_t n0, int64_t n1) { run_chunk(A, n0, n1); });
}

}  // namespace q8rows
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
