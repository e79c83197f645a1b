// int8 / int4 x int8-activation decode kernel on transposed weight panels (AVX512-VNNI),
// header-only (qdot.cpp's `amx:q8` below the AMX row threshold, and `avx512_vnni:q8` int8 from 17
// rows, 3 with CODESHELL_Q8_ROWS_MAX_M=0: q8_rows.h takes M = 3-16 there with the same bits).
//
// What this is: y[M, N] = x[M, K] . W^T for M <= ops.ROW_INVARIANT_MAX_M with the fp32 epilogue
// of q8_epilogue.h (exact int32 block sums T_b, then one fixed fp32 order), so a row gets the
// bits qgemm_amx.cpp's AMX-INT8 row tiles give it, at every M. Loop order: a panel of 16 weight
// rows at a time; per block (int8: 128 k; int4: the group) the panel's 16 rows are loaded 64
// bytes at a time and transposed in registers (16 x 16 int32: 64 shuffles per KiB, port 5) into
// wt[quad][16 rows], so one vpdpbusd with a broadcast 4-byte quad of x sums 16 weight rows at
// once, lane r = weight row r: after the block's quads each lane holds T_b of (row of x, weight
// row r) exactly, with no lane reduction. The epilogue then runs once per 16 outputs per block
// (cvt + fma on a zmm of 16 weight rows) instead of once per output per block.
// Why: the per-row kernels (tile_q8v: one weight row, its 16 int32 lanes per block converted and
// scaled per lane) spend a cvt + fma per (row of x, weight row, block) on the port vpdpbusd
// needs, and a lane reduction to get T_b (what the AMX tiles produce) cost more still (session
// 11: 1.2-1.9x slower at M >= 2); here the transpose is per weight block, shared by all M rows.
// Weights: int8 offset to unsigned (u = w ^ 0x80 = w + 128: vpdpbusd's unsigned operand), int4
// nibbles as stored (0..15); the offset comes back out of the exact sums in integers:
// T_b = S_b - 128 sx_b (int8) or S_b - 8 sx_b (int4), sx_b = the block's sum of xq.
// Cost: the transposes are per weight byte whatever M (64 shuffles per KiB), so where int4
// reads twice the weights per byte at M = 1-2 qdot.cpp runs its per-row kernels instead.
// Prefetch: the next panel's same bytes into L2 as each row is read (a panel's rows are one
// contiguous range); a near L1 prefetch (256-1024 bytes ahead per row) measured the same.
// Session 41 (helper C): int4 groups of 32 / 64 too (a GGUF Q4_0's), on CPUs without AMX from
// q4_panel_g32_min_m rows (qdot_int4.cpp; Zen 4's batched decode, where tile_v's lane reduction per
// 16 blocks of 32 k cost more than the block's 8 vpdpbusd: the 1.7B q4_0 model's 16-row step 249 ms).
// A run of 128 k is transposed once and holds 128 / G blocks: with x in quantize_x's perm-128 order,
// group g of the run is perm positions [16g, 16g + 16) and [64 + 16g, 64 + 16g + 16), i.e. the
// transposed quads [4g, 4g + 4) (low nibbles) and [16 + 4g, 16 + 4g + 4) (high); G = 64: [8h, 8h + 8)
// and [16 + 8h, 16 + 8h + 8). The same T_b, the same epilogue: tile_v's bits.
// What this is not: the AVX2 kernels.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"
#include "q8_epilogue.h"
#include "simd512.h"
#include "switches.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace q8panel {


struct Args {
  const int8_t* xq;   // [M][K] (int4: quantize_x's perm 128 order)
  const float* dx;    // [M][nb] block scales of x
  const int32_t* sx;  // [M][nb] exact block sums of xq
  const float* xs;    // [M][nb] dx * sx (int4 offsets) or null
  int64_t M, K, N;
  const uint8_t* w;      // int8 [N][K] / int4 [N][K/2] (packing.py)
  const float* scale;    // int8 [N] / int4 [N][nb]
  const float* offset;   // int4 [N][nb] or null
  int64_t G;             // int4 group (a multiple of 128); 0 for int8 (blocks of 128)
  const float* bias;     // [N] or null
  float* out;            // [M][N]
};

// Block b's runs of 128 k of the panel rows rp[0..15] -> wt[Q][16], Q = 0 .. 32 * runs - 1:
// lane r = the 4 weights of row r whose x quad is at xq[m][b * B + 4 Q]. Each row is read once,
// the next panel's same bytes are prefetched into L2 (16 rows x K bytes ahead: the weight rows
// of a panel are one contiguous range, read 16 rows side by side).
template <bool INT4>
inline void transpose_block(const uint8_t* const* rp, int64_t ldw, int64_t k0, int64_t runs, int32_t* wt) {
  const __m512i s80 = _mm512_set1_epi8(int8_t(0x80)), m0f = _mm512_set1_epi8(0x0f);
  for (int64_t run = 0; run < runs; ++run) {
    const int64_t k = k0 + 128 * run;
    if constexpr (INT4) {
      // The packed bytes are transposed once and unpacked after (the unpack is bytewise): byte j
      // of a row's 64 holds the weights of xq perm positions j (low nibble) and 64 + j (high),
      // so quad q of the transposed bytes gives wt[q] (low) and wt[16 + q] (high).
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const uint8_t* p = rp[i] + k / 2;
        _mm_prefetch(reinterpret_cast<const char*>(p + 16 * ldw), _MM_HINT_T1);
        r[i] = _mm512_loadu_si512(p);
      }
      transpose16(r);
      for (int q = 0; q < 16; ++q) {
        _mm512_store_si512(wt + (32 * run + q) * 16, _mm512_and_si512(r[q], m0f));
        _mm512_store_si512(wt + (32 * run + 16 + q) * 16, _mm512_and_si512(_mm512_srli_epi16(r[q], 4), m0f));
      }
    } else {
      for (int h = 0; h < 2; ++h) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          const uint8_t* p = rp[i] + k + 64 * h;
          _mm_prefetch(reinterpret_cast<const char*>(p + 16 * ldw), _MM_HINT_T1);
          r[i] = _mm512_xor_si512(_mm512_loadu_si512(p), s80);
        }
        transpose16(r);
        for (int q = 0; q < 16; ++q) _mm512_store_si512(wt + (32 * run + 16 * h + q) * 16, r[q]);
      }
    }
  }
}

// acc + vpdpbusd(u, the 4 bytes at s broadcast to 16 lanes) as inline asm with an embedded {1to16} broadcast
// (session 41): with the intrinsic GCC 12 copied the accumulators to spare registers and back around each
// vpdpbusd of block_rows' row loop (seen in qdot_int4.o's run_panels), as qgemm_amx.cpp's dpbusd notes, and moved
// the rows' addresses between xmm and general registers; a "+v" operand keeps the sums in place. The same sums.
inline __m512i dpbusd_b4(__m512i acc, __m512i u, const int8_t* s) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*reinterpret_cast<const int32_t*>(s)));
  return acc;
}

// MB rows of x (m0..m0+MB-1) against one transposed block: the int32 sums S (lanes = the panel's
// weight rows), then T = S - offset * sx and acc[m][b mod 16] = fma(float(T), mul, ...).
// G < 128 (session 41): the block's quads are [qa, qa + nq) and [q2, q2 + nq) of the transposed run whose
// first k is kx (x's quad Q at xq[m][kx + 4 Q]); else (q2 < 0) [0, nq) from kx = b * B.
template <int MB, bool INT4, bool OFFS, bool ASM = true>
inline void block_rows(const Args& A, int64_t m0, int64_t b, int64_t B, int64_t nq, const int32_t* wt,
                       const float* sT, const float* oT, float* acc, int64_t kx = -1, int64_t qa = 0,
                       int64_t q2 = -1) {
  constexpr int CH = MB == 1 ? 4 : MB == 2 ? 2 : 1;  // independent chains per row (vpdpbusd latency)
  const int64_t nb = A.K / B;
  __m512i a[MB][CH];
  for (int i = 0; i < MB; ++i)
    for (int c = 0; c < CH; ++c) a[i][c] = _mm512_setzero_si512();
  const int8_t* x0 = A.xq + m0 * A.K + (kx < 0 ? b * B : kx);
  auto range = [&](int64_t q0) {
    for (int64_t q = q0; q < q0 + nq; q += CH)
      for (int c = 0; c < CH; ++c) {
        const __m512i w = _mm512_load_si512(wt + (q + c) * 16);
        for (int i = 0; i < MB; ++i) {
          if constexpr (ASM) {
            a[i][c] = dpbusd_b4(a[i][c], w, x0 + i * A.K + 4 * (q + c));
          } else {
            int32_t xv;
            std::memcpy(&xv, x0 + i * A.K + 4 * (q + c), 4);
            a[i][c] = _mm512_dpbusd_epi32(a[i][c], w, _mm512_set1_epi32(xv));
          }
        }
      }
  };
  range(qa);
  if (q2 >= 0) range(q2);
  namespace E = codeshell::q8epi;
  for (int i = 0; i < MB; ++i) {
    const int64_t m = m0 + i;
    __m512i s = a[i][0];
    for (int c = 1; c < CH; ++c) s = _mm512_add_epi32(s, a[i][c]);
    const __m512i T = _mm512_sub_epi32(s, _mm512_set1_epi32(A.sx[m * nb + b] * (INT4 ? 8 : 128)));
    const __m512 d = _mm512_set1_ps(A.dx[m * nb + b]);
    const __m512 mul = INT4 ? E::int4_mul(_mm512_load_ps(sT + b * 16), d) : d;
    float* ac = acc + (m * 16 + (b & 15)) * 16;
    __m512 v = E::epi_step(_mm512_load_ps(ac), T, mul);
    if constexpr (OFFS) v = E::epi_offsets(v, _mm512_load_ps(oT + b * 16), _mm512_set1_ps(A.xs[m * nb + b]));
    _mm512_store_ps(ac, v);
  }
}

// Weight rows [n0, n1) (n0 a multiple of 16 or the call's start), all M rows of x.
template <bool INT4, bool OFFS, bool ASM = true>
void run_panels_t(const Args& A, int64_t n0, int64_t n1) {
  namespace E = codeshell::q8epi;
  const int64_t K = A.K, M = A.M, ldw = INT4 ? K / 2 : K, B = INT4 ? A.G : 128, nb = K / B, runs = B / 128;
  const int64_t nq = 32 * std::max<int64_t>(runs, 1);  // a transposed block, or (B < 128) a run of 128 / B blocks
  std::vector<float> bufv(size_t(M) * 256 + size_t(INT4 ? nb * 16 * (OFFS ? 2 : 1) : 0) + 16);
  float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(bufv.data()) + 63) & ~uintptr_t(63));
  float* sT = acc + M * 256;      // int4: [nb][16] the panel's scales, transposed
  float* oT = sT + nb * 16;       // int4 with offsets: [nb][16]
  std::vector<int32_t> wtv(size_t(nq) * 16 + 16);
  int32_t* wt = reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(wtv.data()) + 63) & ~uintptr_t(63));
  for (int64_t p = n0; p < n1; p += 16) {
    const int64_t rows = std::min<int64_t>(16, n1 - p);
    const uint8_t* rp[16];
    for (int r = 0; r < 16; ++r) rp[r] = A.w + std::min(p + r, n1 - 1) * ldw;  // a short panel repeats its last row
    if constexpr (INT4) {  // one gather per block (a scalar loop here cost ~1/3 of the panel at K = 1536)
      alignas(64) int32_t idx[16];
      for (int r = 0; r < 16; ++r) idx[r] = int32_t((std::min(p + r, n1 - 1) - p) * nb);
      const __m512i vi = _mm512_load_si512(idx);
      for (int64_t b = 0; b < nb; ++b) {
        _mm512_store_ps(sT + b * 16, _mm512_i32gather_ps(vi, A.scale + p * nb + b, 4));
        if constexpr (OFFS) _mm512_store_ps(oT + b * 16, _mm512_i32gather_ps(vi, A.offset + p * nb + b, 4));
      }
    }
    std::memset(acc, 0, size_t(M) * 256 * sizeof(float));  // +0 in every lane L (blocks L, L + 16, ...)
    // one block's rows: B >= 128 its own transposed runs ([0, nq) from b * B); B < 128 (int4 groups of 32 / 64)
    // the block's two quad ranges of the run transposed last (see the top)
    auto rows_of = [&](int64_t b, int64_t n, int64_t kx, int64_t qa, int64_t q2) {
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) block_rows<8, INT4, OFFS, ASM>(A, m, b, B, n, wt, sT, oT, acc, kx, qa, q2);
      switch (M - m) {
        case 7: block_rows<7, INT4, OFFS, ASM>(A, m, b, B, n, wt, sT, oT, acc, kx, qa, q2); break;
        case 6: block_rows<6, INT4, OFFS, ASM>(A, m, b, B, n, wt, sT, oT, acc, kx, qa, q2); break;
        case 5: block_rows<5, INT4, OFFS, ASM>(A, m, b, B, n, wt, sT, oT, acc, kx, qa, q2); break;
        case 4: block_rows<4, INT4, OFFS, ASM>(A, m, b, B, n, wt, sT, oT, acc, kx, qa, q2); break;
        case 3: block_rows<3, INT4, OFFS, ASM>(A, m, b, B, n, wt, sT, oT, acc, kx, qa, q2); break;
        case 2: block_rows<2, INT4, OFFS, ASM>(A, m, b, B, n, wt, sT, oT, acc, kx, qa, q2); break;
        case 1: block_rows<1, INT4, OFFS, ASM>(A, m, b, B, n, wt, sT, oT, acc, kx, qa, q2); break;
        default: break;
      }
    };
    if (INT4 && B < 128) {
      const int64_t per = 128 / B, n = B / 8;  // blocks a run; quads a block in each half
      for (int64_t r = 0; r < K / 128; ++r) {
        transpose_block<INT4>(rp, ldw, r * 128, 1, wt);
        for (int64_t j = 0; j < per; ++j) rows_of(r * per + j, n, r * 128, j * n, 16 + j * n);
      }
    } else {
      for (int64_t b = 0; b < nb; ++b) {
        transpose_block<INT4>(rp, ldw, b * B, runs, wt);
        rows_of(b, nq, -1, 0, -1);
      }
    }
    const __mmask16 cm = rows >= 16 ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
    const __m512 sv = INT4 ? _mm512_set1_ps(1.f) : _mm512_maskz_loadu_ps(cm, A.scale + p);
    const __m512 bv = A.bias ? _mm512_maskz_loadu_ps(cm, A.bias + p) : _mm512_setzero_ps();
    for (int64_t m = 0; m < M; ++m)
      _mm512_mask_storeu_ps(A.out + m * A.N + p, cm, E::finish_vec(E::tree16_v(acc + m * 256, 16), sv, bv));
  }
}

// Weight rows [n0, n1) (n0 a multiple of 16 or the call's start), all M rows of x. CODESHELL_Q8_PANEL_ASM=0 (read
// per call): block_rows' vpdpbusd by the intrinsic, as before session 41.
template <bool INT4, bool OFFS>
void run_panels(const Args& A, int64_t n0, int64_t n1) {
  if (env_flag("CODESHELL_Q8_PANEL_ASM", true)) run_panels_t<INT4, OFFS, true>(A, n0, n1);
  else run_panels_t<INT4, OFFS, false>(A, n0, n1);
}

}  // namespace q8panel
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
