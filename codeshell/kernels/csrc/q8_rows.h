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
// The same T_b, so the same bits. Measured (docs/kernels-log.md, session 20 helper D): the small int8
// checkpoint's batch-8 step in the model (2 threads, weights from DRAM) 4.0% faster, its linears
// 5.4%; a 1-thread standalone copy ran the block linears 2-14% slower and the head 6-10% faster, so
// the model's figure is the reason. The L1 prefetch (kL1Blocks) went from 2 to 4 blocks with it.
// Prepared / run_chunk: the call's x side and one chunk of weight rows, so that a standalone harness
// (benchmarks/standalone/q8rows_ab.cpp) runs the kernel without the thread pool.
// Session 27 (helper B, docs/kernels-log.md): run_q4, int4 groups of 128 / 256 at M = 2..16 in this scheme
// on the CPUs that give int4 the epilogue's bits (qdot_int4.cpp q4_epi_kind: the Ice Lake-class
// Xeon), instead of q8_panel.h (CODESHELL_Q8R_INT4=0); M = 5..8's results stored as 8-float runs a
// row of x (store_t8; CODESHELL_Q8R_T8=0 / CODESHELL_Q8R_INT4_T8=0: scalar stores); Prepared's x
// layout at M = 5..8 by a qword transpose instead of gathers (CODESHELL_Q8R_PREP=0: gathers).
// What this is not: int4 on the per-lane bits (tile_q4v / q4_rows.h, the CPUs that keep them), M > 16
// (q8_panel.h), the AMX CPUs' default path (their rows below the AMX threshold stay on q8_panel.h, but for the
// native decode step of a model of at most 32 MiB of weights and CODESHELL_Q8_AMX_VROWS=1: session 37, qdot_int8.cpp
// q8_amx_vrows).
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
#include "q8_rows_t.h"
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
  bool t8 = true;        // E = 2 (M = 5..8) with lean_epi: store_t8 (false: scalar stores; CODESHELL_Q8R_T8=0)
};

// The L1 prefetch distance in 128-byte blocks (CODESHELL_Q8R_PF0 overrides it; 0 = none; past a
// row's end the next NR rows' first blocks, so K = 256 rows get it too). The
// T1 prefetch brings the next NR rows into L2, but the NR rows being read are 8 streams of 8-16
// bytes a vpdpbusd, and their L1 misses stalled the loop: prefetching each row's block 2 ahead
// into L1 cut the small shape's int8 block linears at M = 8 by 17-30% (bench_decode_step.py
// --profile, docs/kernels-log.md session 18 helper B); 1 and 4 blocks ran within a few % of 2 there.
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

// E = 2 (M = 5..8): the 4 result vectors of 8 weight rows (y[g] lane i * 8 + m: row n + 2 g + i of
// row m of x) transposed to one run of 8 rows a row of x and stored with one masked 32-byte store
// each (rows < 8 at the end of the range). Why: 16 scalar stores a vector meant 64 stores a group of
// 8 weight rows, the rows of x N floats apart (one L1 set at N = 1024 / 16384); 12 shuffles + 8
// stores here. The same values: a store order.
inline void store_t8(const __m512 (&yv)[4], float* out, int64_t N, int64_t n, int64_t rows, int64_t M) {
  const __m512i il = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  __m512i z[4];
  for (int g = 0; g < 4; ++g) z[g] = _mm512_permutexvar_epi32(il, _mm512_castps_si512(yv[g]));  // qword m: rows 2g, 2g+1
  const __m512i lo01 = _mm512_unpacklo_epi64(z[0], z[1]), hi01 = _mm512_unpackhi_epi64(z[0], z[1]);
  const __m512i lo23 = _mm512_unpacklo_epi64(z[2], z[3]), hi23 = _mm512_unpackhi_epi64(z[2], z[3]);
  const __m512i p01 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), p23 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  const __m512i r[4] = {_mm512_permutex2var_epi64(lo01, p01, lo23), _mm512_permutex2var_epi64(hi01, p01, hi23),
                        _mm512_permutex2var_epi64(lo01, p23, lo23), _mm512_permutex2var_epi64(hi01, p23, hi23)};
  const __mmask8 k8 = __mmask8((1u << rows) - 1);
  for (int64_t m = 0; m < M; ++m) {  // m = 4 h + 2 t + u: r[2 h + u], 256-bit half t
    const __m512i v = r[2 * (m / 4) + (m % 2)];
    const __m256i h = (m / 2) % 2 ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
    _mm256_mask_storeu_ps(out + m * N + n, k8, _mm256_castsi256_ps(h));
  }
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
  // docs/kernels-log.md, session 15 helper C).
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
    if constexpr (E == 2 && NG == 4) {
      if (A.lean_epi && A.t8) {  // M = 5..8: store_t8 (the same values as the lean epilogue below)
        const int64_t rows = std::min<int64_t>(NR, n1 - n);
        const __mmask16 kb = __mmask16((1u << rows) - 1);
        const __m512 s8 = _mm512_maskz_loadu_ps(kb, A.scale + n);
        const __m512 b8 = A.bias ? _mm512_maskz_loadu_ps(kb, A.bias + n) : _mm512_setzero_ps();
        const __m512i half = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 3);
        __m512 yv[4];
        for (int g = 0; g < 4; ++g) {
          const __m512i ix = _mm512_add_epi32(half, _mm512_set1_epi32(2 * g));
          yv[g] = E_::finish_vec(codeshell::q8epi::tree16_v_prefix(&acc[g][0][0], 16, nb), _mm512_permutexvar_ps(ix, s8), _mm512_permutexvar_ps(ix, b8));
        }
        store_t8(yv, A.out, A.N, n, rows, A.M);
        continue;
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
        _mm512_store_ps(y, E_::finish_vec(codeshell::q8epi::tree16_v_prefix(&acc[g][0][0], 16, nb), s, bb));
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
  // int4 (run_q4): G = the group (128 / 256), soff = 8, dx / sx / xs per group ([M][K / G]; so, dT, xsT
  // [K / G][16]); the x layout (xt / xu) stays in blocks of 128 k.
  std::vector<float> xsv;
  float* xsT = nullptr;
  Prepared(const int8_t* xq, const float* dx, const int32_t* sx, int64_t M_, int64_t K_, bool with_xt = true,
           bool with_xu = true, int64_t G = 128, int32_t soff = 128, const float* xs = nullptr)
      : M(M_), K(K_), nb(K_ / 128), E(quads_per_lane(M_)) {
    const int MP = 16 / E;
    const int64_t np = 32 / E;
    if (with_xt) xtv.resize(size_t(nb * np * 64 + 64));
    if (with_xu) xuv.resize(size_t(nb * np * 64 + 64));
    const int64_t ng = K / G;
    sov.resize(size_t(ng * 16 + 16));
    dv.resize(size_t(ng * 16 + 16));
    if (xs) xsv.resize(size_t(ng * 16 + 16));
    auto align = [](auto* p) { return reinterpret_cast<decltype(p)>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63)); };
    xt = with_xt ? align(xtv.data()) : nullptr;
    xu = with_xu ? align(xuv.data()) : nullptr;
    so = align(sov.data());
    dT = align(dv.data());
    if (xs) xsT = align(xsv.data());
    // One gather per zmm of x: lane l = m * E + e reads the quad e of row m's run (masked: pad rows 0).
    alignas(64) int32_t idx[16];
    __mmask16 valid = 0;
    for (int l = 0; l < 16; ++l) {
      const int64_t m = l / E, e = l % E;
      idx[l] = int32_t(std::min<int64_t>(m, M - 1) * K + 4 * e);
      if (m < M) valid |= __mmask16(1u << l);
    }
    const __m512i vi = _mm512_load_si512(idx);
    // E = 2 (M = 5..8): zmm c of the layout is qword c of each row m (lane pair 2m, 2m + 1), so the
    // layout is the 8 rows' [8][K / 8] qwords transposed: 8 loads and 24 shuffles per 8 zmm instead
    // of 8 gathers (session 27: Prepared at M = 8 took 1.8 us at K = 256, 6 us at K = 1024, one
    // thread before the split; a gather ~9 ns). CODESHELL_Q8R_PREP=0 (read per call): the gathers.
    // The same bytes either way.
    const bool qt = E == 2 && codeshell::env_flag("CODESHELL_Q8R_PREP", true);
    if (qt) {
      const __m512i z = _mm512_setzero_si512(), s80 = _mm512_set1_epi8(int8_t(0x80));
      for (int64_t c0 = 0; c0 < K / 8; c0 += 8) {
        __m512i r[8], a[8], b[8];
        for (int m = 0; m < 8; ++m) r[m] = m < M ? _mm512_loadu_si512(xq + m * K + c0 * 8) : z;
        for (int i = 0; i < 4; ++i) {  // a[2i]: qwords 0, 2, 4, 6 of rows 2i, 2i + 1 interleaved; a[2i + 1]: 1, 3, 5, 7
          a[2 * i] = _mm512_unpacklo_epi64(r[2 * i], r[2 * i + 1]);
          a[2 * i + 1] = _mm512_unpackhi_epi64(r[2 * i], r[2 * i + 1]);
        }
        for (int h = 0; h < 2; ++h)  // rows 4h..4h+3: b[4h + j], j = 0: qwords 0 / 4, 1: 2 / 6, 2: 1 / 5, 3: 3 / 7
          for (int u = 0; u < 2; ++u) {
            b[4 * h + 2 * u] = _mm512_shuffle_i64x2(a[4 * h + u], a[4 * h + 2 + u], _MM_SHUFFLE(2, 0, 2, 0));
            b[4 * h + 2 * u + 1] = _mm512_shuffle_i64x2(a[4 * h + u], a[4 * h + 2 + u], _MM_SHUFFLE(3, 1, 3, 1));
          }
        // b[j] (rows 0-3) with b[4 + j] (rows 4-7): qword columns 0 / 4 (j = 0), 2 / 6, 1 / 5, 3 / 7
        const int col[4][2] = {{0, 4}, {2, 6}, {1, 5}, {3, 7}};
        for (int j = 0; j < 4; ++j) {
          const __m512i lo = _mm512_shuffle_i64x2(b[j], b[4 + j], _MM_SHUFFLE(2, 0, 2, 0));
          const __m512i hi = _mm512_shuffle_i64x2(b[j], b[4 + j], _MM_SHUFFLE(3, 1, 3, 1));
          for (int t = 0; t < 2; ++t) {
            const __m512i v = t ? hi : lo;
            const int64_t c = c0 + col[j][t];
            if (with_xt) _mm512_store_si512(xt + c * 64, v);
            if (with_xu) _mm512_store_si512(xu + c * 64, _mm512_xor_si512(v, s80));
          }
        }
      }
    }
    for (int64_t b = 0; b < nb && !qt; ++b) {
      for (int64_t p = 0; p < np; ++p) {
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, vi, xq + b * 128 + 4 * E * p, 1);
        if (with_xt) _mm512_store_si512(xt + (b * np + p) * 64, v);
        if (with_xu) _mm512_store_si512(xu + (b * np + p) * 64, _mm512_xor_si512(v, _mm512_set1_epi8(int8_t(0x80))));
      }
    }
    for (int64_t g = 0; g < ng; ++g)
      for (int l = 0; l < 16; ++l) {
        const int64_t m = l % MP;
        so[g * 16 + l] = m < M ? soff * sx[m * ng + g] : 0;
        dT[g * 16 + l] = m < M ? dx[m * ng + g] : 0.f;
        if (xs) xsT[g * 16 + l] = m < M ? xs[m * ng + g] : 0.f;
      }
  }
  // The call's Args with the switches at their defaults or as the environment sets them (A/B runs,
  // read per call): CODESHELL_Q8R_PF0 (unset: kL1Blocks), _ASM (unset: asm), _EPI (unset: lean), _V2 (unset: v2).
  Args args(int64_t N, const uint8_t* w, const float* scale, const float* bias, float* out) const {
    return Args{M, K, N, nb, xt, so, dT, w, scale, bias, out,
                std::max<int64_t>(0, codeshell::env_int("CODESHELL_Q8R_PF0", M > 1 ? kL1Blocks : 0)),
                codeshell::env_flag("CODESHELL_Q8R_ASM", true), codeshell::env_flag("CODESHELL_Q8R_EPI", true),
                1, codeshell::env_flag("CODESHELL_Q8R_V2", true), xu, nullptr, codeshell::env_flag("CODESHELL_Q8R_T8", true)};
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

// The hooks of run / run_q4 onto q8_rows_t.h's copy at M = 5..8 share these two pieces.
// x's [K / 4][8] copy and the rows' per-block terms so[i] = mult * sx[i] (int8: 128, int4: 8), on
// the stack for K <= 1024 and M * blocks <= 128 (made once, before the split).
struct TpRows {
  alignas(64) int32_t xbuf[8 * 256], sbuf[8 * 16];
  std::vector<int32_t> xv, sv;
  int32_t *xp = xbuf, *so = sbuf;
  TpRows(const int8_t* xq, const int32_t* sx, int64_t M, int64_t K, int64_t nb, int32_t mult) {
    if (K / 4 * 8 > 8 * 256) {
      xv.resize(size_t(K / 4 * 8));
      xp = xv.data();
    }
    if (M * nb > 8 * 16) {
      sv.resize(size_t(M * nb));
      so = sv.data();
    }
    for (int64_t i = 0; i < M * nb; ++i) so[i] = mult * sx[i];
    q8rt::pack_x(xq, M, K, xp);
  }
};

// cols(n0, n1) over the N weight rows: groups of 32, one contiguous share a thread. CODESHELL_Q8R_TP_SOLO=B
// (read per call; default 0: off): weights of at most B bytes run on the calling thread alone (no
// hand-off to the team): an A/B probe of the small linears' split.
template <class F>
void tp_split(int64_t N, int64_t K, const F& cols) {
  if (N * K <= codeshell::env_int("CODESHELL_Q8R_TP_SOLO", 0)) {
    cols(int64_t(0), N);
    return;
  }
  const int64_t step = std::max<int64_t>(64, (N + 15) / 16 + 31) / 32 * 32;
  codeshell::parallel_owned(N, 32, step, cols);
}

// y[M, N] = x . W^T (+ bias): prepare x, then the weight rows in parallel chunks.
inline void run(const int8_t* xq, const float* dx, const int32_t* sx, int64_t M, int64_t K, int64_t N,
                const int8_t* w, const float* scale, const float* bias, float* out) {
  // Session 29: M = 5..8 on the owner's transposed copy of this weight (q8_rows_t.h; the decode
  // step hands it over with the block sums) where CODESHELL_Q8R_TP (read per call) is not 0. The
  // same bits (q8_epilogue.h's order per output). Groups of 32 weight rows, one contiguous share a
  // thread as below; the x copy is made once here, before the split.
  {
    const SumsHint& h = sums_hint();
    if (M >= 5 && M <= 8 && K % 128 == 0 && h.packed != nullptr && h.w == static_cast<const void*>(w) && h.N == N &&
        h.K == K && codeshell::env_flag("CODESHELL_Q8R_TP", true)) {
      const int64_t nb = K / 128;
      const TpRows X(xq, sx, M, K, nb, 128);
      const q8rt::Args T{M, K, N, nb, X.xp, X.so, dx, h.packed, scale, bias, out,
                         std::max<int64_t>(0, codeshell::env_int("CODESHELL_Q8R_TP_PF", 0))};
      tp_split(N, K, [&](int64_t n0, int64_t n1) { q8rt::run_cols(T, n0, n1); });
      return;
    }
  }
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


// ---- int4 (groups of 128 / 256) at M = 2..16 in the same scheme (session 27, helper B) ----
// What: y[M, N] = x . W^T (+ bias) for int4 nibbles [N, K/2] with the shared epilogue's bits
// (q8_epilogue.h, as q8_panel.h's int4 and tile_v give them: T_g = S_g - 8 sx_g exact, then per group
// acc[g % 16] = fma(float(T_g), sc[n, g] * d[m, g], acc) (+ fma(of[n, g], xs[m, g], acc)), tree16,
// fma(r, 1, bias)). The rows of x sit in the lanes as in run_rows (prepare's xt layout of the
// perm-128 xq); each 8 weight rows' group of nibbles is unpacked once into a 1-2 KiB L1 buffer
// (byte j of a 64-byte run holds perm positions j (low nibble) and 64 + j (high), so lows then highs
// are the run's 128 k in xq's order) and broadcast from it as vpdpbusd's unsigned operand (0..15),
// x signed as it is: no xor, no weight sums. Why: on this CPU (AVX512-VNNI, no AMX) int4 at M >= 3
// ran q8_panel.h (16 x 16 transposes, 64 shuffles per KiB of packed weight whatever M): codeshell-mini's
// int4 block linears at batch 8 took 1.1-1.3x their int8 times on q8_rows.h (docs/kernels-log.md, session
// 25 helper B2). CODESHELL_Q8R_INT4=0 (read per call): q8_panel.h again.
struct Q4Args {
  int64_t M, K, N, ng;       // ng = K / G
  const int8_t* xt;          // Prepared's xt (blocks of 128 k)
  const int32_t* so;         // [ng][16]: 8 * sx[m][g] in lane i * MP + m
  const float* dT;           // [ng][16]: dx[m][g]
  const float* xsT;          // [ng][16]: xs[m][g] (offsets) or null
  const uint8_t* q;          // [N][K / 2]
  const float* scale;        // [N][ng]
  const float* offset;       // [N][ng] or null
  const float* bias;         // [N] or null
  float* out;                // [M][N]
  int64_t pf0 = 2;           // L1 prefetch: this many groups ahead (past a row's end: the next 8 rows')
  bool t8 = true;            // M = 5..8: results transposed to 8-float runs (false: scalar stores; CODESHELL_Q8R_INT4_T8=0)
};

template <int E, int RUNS, bool OFFS>
void run_rows_q4(const Q4Args& A, int64_t n0, int64_t n1) {
  namespace E_ = codeshell::q8epi;
  constexpr int NR = 8, NG = NR / E, NP = 32 / E, MP = 16 / E;
  static_assert(E <= 8, "M >= 2");
  constexpr int64_t G = 128 * RUNS;
  const int64_t K = A.K, ng = A.ng, ldq = K / 2;
  alignas(64) float acc[NG][16][16];
  alignas(64) float y[16];
  // wb[t]: a group's unpacked nibbles of the 8 rows, written one group ahead of its use (the next
  // group's, or the next 8 rows' first, while this one's vpdpbusd run). Why: the step loop's 8-byte
  // broadcasts read the 64-byte stores just made; unpacked right before, they waited on the stores.
  alignas(64) uint8_t wb[2][NR][RUNS][128];
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  auto unpack = [&](uint8_t (*dst)[RUNS][128], const uint8_t* const* rq, int64_t g) {
    for (int j = 0; j < NR; ++j)
      for (int r = 0; r < RUNS; ++r) {
        const __m512i v = _mm512_loadu_si512(rq[j] + g * (G / 2) + 64 * r);
        _mm512_store_si512(dst[j][r], _mm512_and_si512(v, m0f));
        _mm512_store_si512(dst[j][r] + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f));
      }
  };
  int cur = 0;
  for (int g = 0; g < NG; ++g)
    for (int64_t l = std::min<int64_t>(ng, 16); l < 16; ++l) std::memset(acc[g][l], 0, sizeof acc[g][l]);
  __m512i gix[NG];  // lane l = i * MP + m of sub-group g: weight row g E + i of the 8
  for (int g = 0; g < NG; ++g) {
    alignas(64) int32_t ix[16];
    for (int l = 0; l < 16; ++l) ix[l] = g * E + l / MP;
    gix[g] = _mm512_load_si512(ix);
  }
  // The 8 rows' scales (offsets) of group g, lane j = row n + j: at ng <= 2 the rows' [8][ng] block is
  // one zmm (a masked load a row group) and a permute picks lane j * ng + g; past that a table
  // [g][8] written by scalar moves a row group. Why not a gather: two vgatherdps a group were ~20% of
  // the loop's samples at K = 256 (perf, standalone); a gather costs ~9 ns here (session 25 helper C).
  const bool one = ng * 8 <= 16;
  std::vector<float> tabv(one ? 0 : size_t(ng * 16 * (OFFS ? 2 : 1) + 16));
  float* stab = one ? nullptr : reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tabv.data()) + 63) & ~uintptr_t(63));
  float* otab = stab && OFFS ? stab + ng * 8 : nullptr;
  const __m512i lane8 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t n = n0; n < n1; n += NR) {
    const uint8_t* rp[NR];
    for (int j = 0; j < NR; ++j) rp[j] = A.q + std::min(n + j, n1 - 1) * ldq;
    const int64_t rows = std::min<int64_t>(NR, n1 - n);
    __m512 scz = _mm512_setzero_ps(), ofz = _mm512_setzero_ps();
    if (one) {  // lanes j * ng + g (rows past n1: 0, computed, never stored)
      const __mmask16 km = __mmask16((1u << (rows * ng)) - 1);
      scz = _mm512_maskz_loadu_ps(km, A.scale + n * ng);
      if constexpr (OFFS) ofz = _mm512_maskz_loadu_ps(km, A.offset + n * ng);
    } else {
      for (int j = 0; j < NR; ++j)
        for (int64_t g = 0; g < ng; ++g) {
          const int64_t r = std::min<int64_t>(j, rows - 1);
          stab[g * 8 + j] = A.scale[(n + r) * ng + g];
          if constexpr (OFFS) otab[g * 8 + j] = A.offset[(n + r) * ng + g];
        }
    }
    if (n == n0) unpack(wb[cur], rp, 0);
    for (int64_t g = 0; g < ng; ++g) {
      for (int j = 0; j < NR; ++j) {
        for (int r = 0; r < RUNS; ++r) {  // the next 8 rows' same bytes into L2, pf0 groups ahead into L1
          const char* p = reinterpret_cast<const char*>(rp[j] + g * (G / 2) + 64 * r);
          _mm_prefetch(p + NR * ldq, _MM_HINT_T1);
          if (A.pf0 > 0) {
            const int64_t ahead = g + A.pf0 < ng ? A.pf0 * (G / 2) : NR * ldq + (A.pf0 - ng) * (G / 2);
            _mm_prefetch(p + ahead, _MM_HINT_T0);
          }
        }
      }
      if (g + 1 < ng) {
        unpack(wb[cur ^ 1], rp, g + 1);
      } else if (n + NR < n1) {
        const uint8_t* rn[NR];
        for (int j = 0; j < NR; ++j) rn[j] = A.q + std::min(n + NR + j, n1 - 1) * ldq;
        unpack(wb[cur ^ 1], rn, 0);
      }
      const uint8_t (*w8)[RUNS][128] = wb[cur];
      cur ^= 1;
      __m512i a[NR];
      for (int j = 0; j < NR; ++j) a[j] = _mm512_setzero_si512();
      for (int r = 0; r < RUNS; ++r) {
        const int8_t* xb = A.xt + (g * RUNS + r) * NP * 64;
#ifdef Q8R4_UNROLL
#pragma GCC unroll 32
#endif
        for (int p = 0; p < NP; ++p) {
          const __m512i xv = _mm512_load_si512(xb + 64 * p);
          for (int j = 0; j < NR; ++j) a[j] = dpbusd(a[j], bcast<E>(w8[j][r] + 4 * E * p), xv);
        }
      }
      const __m512i so = _mm512_load_si512(A.so + g * 16);
      const __m512 d = _mm512_load_ps(A.dT + g * 16);
      // sc8 / of8: lane j = row n + j's scale (offset) of group g (one: lane j * ng + g of scz)
      __m512 sc8, of8 = _mm512_setzero_ps(), xs = _mm512_setzero_ps();
      __m512i pick = lane8;
      if (one) {
        pick = _mm512_add_epi32(_mm512_mullo_epi32(lane8, _mm512_set1_epi32(int32_t(ng))), _mm512_set1_epi32(int32_t(g)));
        sc8 = scz;
        if constexpr (OFFS) of8 = ofz;
      } else {
        sc8 = _mm512_castps256_ps512(_mm256_load_ps(stab + g * 8));
        if constexpr (OFFS) of8 = _mm512_castps256_ps512(_mm256_load_ps(otab + g * 8));
      }
      if constexpr (OFFS) xs = _mm512_load_ps(A.xsT + g * 16);
      for (int gg = 0; gg < NG; ++gg) {
        const __m512i T = _mm512_sub_epi32(reduce<E>(a + gg * E), so);
        const __m512i ix = _mm512_permutexvar_epi32(gix[gg], pick);  // lane i * MP + m: row gg E + i's
        const __m512 mul = E_::int4_mul(_mm512_permutexvar_ps(ix, sc8), d);
        float* ac = acc[gg][g & 15];
        __m512 v = E_::epi_step(g < 16 ? _mm512_setzero_ps() : _mm512_load_ps(ac), T, mul);
        if constexpr (OFFS) v = E_::epi_offsets(v, _mm512_permutexvar_ps(ix, of8), xs);
        _mm512_store_ps(ac, v);
      }
    }
    if constexpr (E == 2) {
      if (A.t8) {
        const __mmask16 kb = __mmask16((1u << rows) - 1);
        const __m512 b8 = A.bias ? _mm512_maskz_loadu_ps(kb, A.bias + n) : _mm512_setzero_ps();
        const __m512i half = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 3);
        __m512 yv[4];
        for (int gg = 0; gg < 4; ++gg)  // bias lane i * 8 + m: row 2 gg + i's
          yv[gg] = E_::finish_vec(codeshell::q8epi::tree16_v_prefix(&acc[gg][0][0], 16, ng), _mm512_set1_ps(1.f),
                                  _mm512_permutexvar_ps(_mm512_add_epi32(half, _mm512_set1_epi32(2 * gg)), b8));
        store_t8(yv, A.out, A.N, n, rows, A.M);
        continue;
      }
    }
    for (int gg = 0; gg < NG; ++gg) {
      const int64_t r0 = n + gg * E, left = std::min<int64_t>(E, n1 - r0);
      if (left <= 0) break;
      const __mmask16 k = __mmask16((1u << left) - 1);
      alignas(64) int32_t ix[16];
      for (int l = 0; l < 16; ++l) ix[l] = int32_t(std::min<int64_t>(l / MP, left - 1));
      const __m512 bb = A.bias ? _mm512_permutexvar_ps(_mm512_load_si512(ix), _mm512_maskz_loadu_ps(k, A.bias + r0))
                               : _mm512_setzero_ps();
      _mm512_store_ps(y, E_::finish_vec(codeshell::q8epi::tree16_v_prefix(&acc[gg][0][0], 16, ng), _mm512_set1_ps(1.f), bb));
      for (int i = 0; i < left; ++i)
        for (int64_t m = 0; m < A.M; ++m) A.out[m * A.N + r0 + i] = y[i * MP + m];
    }
  }
}

template <int RUNS, bool OFFS>
inline void run_chunk_q4(const Q4Args& A, int64_t n0, int64_t n1) {
  switch (quads_per_lane(A.M)) {
    case 1: run_rows_q4<1, RUNS, OFFS>(A, n0, n1); break;
    case 2: run_rows_q4<2, RUNS, OFFS>(A, n0, n1); break;
    case 4: run_rows_q4<4, RUNS, OFFS>(A, n0, n1); break;
    default: run_rows_q4<8, RUNS, OFFS>(A, n0, n1); break;
  }
}

// y[M, N] = x . W^T (+ bias), int4 groups G = 128 / 256, M = 2..16: xq in quantize_x's perm-128
// order, dx / sx / xs [M][K / G]. Same split as run.
inline void run_q4(const int8_t* xq, const float* dx, const int32_t* sx, const float* xs, int64_t M, int64_t K,
                   int64_t N, int64_t G, const uint8_t* q, const float* scale, const float* offset, const float* bias,
                   float* out) {
  // Session 29: M = 5..8 on the owner's byte-a-weight transposed copy (q8_rows_t.h Pack4, hinted by
  // the decode step) where CODESHELL_Q8R_TP4 (read per call) is not 0: the same bits.
  {
    const SumsHint& h = sums_hint();
    if (M >= 5 && M <= 8 && h.packed4 != nullptr && h.w == static_cast<const void*>(q) && h.N == N && h.K == K &&
        codeshell::env_flag("CODESHELL_Q8R_TP4", true)) {
      const auto& pk = *static_cast<const q8rt::Pack4*>(h.packed4);
      const int64_t ng = K / G;
      const TpRows X(xq, sx, M, K, ng, 8);
      const bool offs = offset != nullptr && !pk.of.empty();
      const q8rt::Args4 T{M, K, N, ng, G, X.xp, X.so, dx, offs ? xs : nullptr, pk.w.data(), pk.sc.data(),
                          offs ? pk.of.data() : nullptr, bias, out};
      tp_split(N, K, [&](int64_t n0, int64_t n1) {
        offs ? q8rt::run_cols_q4<true>(T, n0, n1) : q8rt::run_cols_q4<false>(T, n0, n1);
      });
      return;
    }
  }
  const Prepared P(xq, dx, sx, M, K, true, false, G, 8, offset ? xs : nullptr);
  Q4Args A{M, K, N, K / G, P.xt, P.so, P.dT, P.xsT, q, scale, offset, bias, out,
           std::max<int64_t>(0, codeshell::env_int("CODESHELL_Q8R_INT4_PF0", 2)),
           codeshell::env_flag("CODESHELL_Q8R_INT4_T8", true)};
  auto chunk = [&](int64_t n0, int64_t n1) {
    if (G == 256) offset ? run_chunk_q4<2, true>(A, n0, n1) : run_chunk_q4<2, false>(A, n0, n1);
    else offset ? run_chunk_q4<1, true>(A, n0, n1) : run_chunk_q4<1, false>(A, n0, n1);
  };
  const int64_t step = std::max<int64_t>(64, (N + 15) / 16 + 15) / 16 * 16;
  codeshell::parallel_owned(N, 16, step, chunk);
}

}  // namespace q8rows
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
