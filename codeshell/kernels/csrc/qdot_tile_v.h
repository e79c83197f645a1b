// tile_v / run_v: the 512-bit per-row kernel on the shared epilogue (q8_epilogue.h), for int8 at
// `avx512_vnni:q8` M = 1-2 where tile_r16_q8 does not take the row (qdot_int8.cpp) and for int4 at
// `amx:q8` below the AMX row threshold (qdot_int4.cpp's run_q4v_epi): both families instantiate it
// (INT4 = false / true), hence a header.
// What this is not: the per-lane int4 kernels without AMX (qdot_q4v.h, other bits), the panel
// (q8_panel.h), the batched rows (q8_rows.h, q4_rows.h). Split out of qdot.cpp in session 20 (code
// unchanged).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "isa.h"
#include "q8_epilogue.h"
#include "qdot.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace qdot {

// ---- amx:q8 below its AMX row threshold: the shared epilogue (q8_epilogue.h) ----------------
// The 512-bit kernels sum each block (int8: 128 k; int4: the group) of a (row of x, weight row)
// in int32 lanes with vpdpbusd, keep the lane vectors of 16 blocks in a small buffer, reduce them
// to the 16 exact block sums (q8epi::reduce_lanes) and run the shared epilogue (q8_epilogue.h)
// on them, so that a row gets the bits that the AMX-INT8 tiles give it (qgemm_amx.cpp).
// Weights: int8 is offset to unsigned (u = w ^ 0x80 = w + 128: vpdpbusd wants one unsigned
// operand and AVX-512 has no vpsignb), int4 nibbles are unsigned as stored; the offset is taken
// back from the block sums in integers: T_b = S_b - 128 * sx_b (int8) or S_b - 8 * sx_b (int4),
// sx_b = the block's sum of xq (exact), so T_b is the sum over w * xq (int4: (nib - 8) * xq).
// int4: x permuted in runs of 128 (quantize_x perm = 128) so one 64-byte load of nibbles (128
// weights) meets two 64-byte loads of x; a lane vector holds one group (G >= 128: G / 128 runs
// summed in it) or the 128 / G groups of one run (G = 32 / 64: in runs of 4 / 8 lanes, as
// vpdpbusd lane L sums x bytes 4L..4L+3, i.e. k0 + 32 (L / 4) + 0..15 and + 16..31).

// MB rows of x by NR weight rows; GPV blocks per lane vector (int4 G < 128: 128 / G, else 1).
// Per lane vector (one block, or one run of 128 holding GPV blocks): RPV runs of 128 k summed
// in CH chains per output (two at MB * NR <= 2, the latency of one chain of vpdpbusd would
// show; the integer sums are the same either way); every 16 blocks (or at the end) the stored
// lane vectors are reduced and folded into acc (one zmm per output, lane = block mod 16).
template <int MB, int NR, bool INT4, bool OFFS, int GPV>
inline void tile_v(const int8_t* xq, int64_t K, int64_t nbx, const float* dx, const int32_t* sx, const float* xs,
                   const uint8_t* w, int64_t ldw, const float* sc, const float* of, int64_t G, float* out, int64_t ldo,
                   const Pf& pf = Pf()) {
  namespace E = codeshell::q8epi;
  constexpr int VPC = 16 / GPV;  // lane vectors per 16 blocks
  constexpr int CH = MB * NR <= 2 ? 2 : 1;
  const int64_t rpv = INT4 && G > 128 ? G / 128 : 1, nvec = K / 128 / rpv, ng = INT4 ? K / G : 0;
  const __m512i m0f = _mm512_set1_epi8(0x0f), s80 = _mm512_set1_epi8(int8_t(0x80));
  alignas(64) int32_t lb[MB][NR][VPC][16];
  __m512 acc[MB][NR];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t v = 0; v < nvec; ++v) {
    __m512i a[MB][NR][CH];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NR; ++j)
        for (int h = 0; h < CH; ++h) a[i][j][h] = _mm512_setzero_si512();
    for (int64_t r = 0; r < rpv; ++r) {
      const int64_t k = (v * rpv + r) * 128;
      __m512i w0[NR], w1[NR];
      for (int j = 0; j < NR; ++j) {
        const uint8_t* p = w + j * ldw + (INT4 ? k / 2 : k);
        if (pf.d) pf_line(p, pf);
        if constexpr (INT4) {
          const __m512i q = _mm512_loadu_si512(p);
          w0[j] = _mm512_and_si512(q, m0f);
          w1[j] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m0f);
        } else {
          if (pf.d) pf_line(p + 64, pf);
          w0[j] = _mm512_xor_si512(_mm512_loadu_si512(p), s80);
          w1[j] = _mm512_xor_si512(_mm512_loadu_si512(p + 64), s80);
        }
      }
      for (int i = 0; i < MB; ++i) {
        const __m512i x0 = _mm512_loadu_si512(xq + i * K + k), x1 = _mm512_loadu_si512(xq + i * K + k + 64);
        for (int j = 0; j < NR; ++j) {
          a[i][j][0] = _mm512_dpbusd_epi32(a[i][j][0], w0[j], x0);
          a[i][j][CH - 1] = _mm512_dpbusd_epi32(a[i][j][CH - 1], w1[j], x1);
        }
      }
    }
    const int vl = int(v % VPC);
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NR; ++j) {
        __m512i s = a[i][j][0];
        if constexpr (CH == 2) s = _mm512_add_epi32(s, a[i][j][1]);
        _mm512_store_si512(lb[i][j][vl], s);
      }
    if (vl == VPC - 1 || v == nvec - 1) {
      const int64_t b0 = (v - vl) * GPV, cnt = int64_t(vl + 1) * GPV;  // blocks [b0, b0 + cnt)
      const __mmask16 km = cnt >= 16 ? __mmask16(0xffff) : __mmask16((1u << cnt) - 1);
      for (int i = 0; i < MB; ++i) {
        const __m512i so = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(km, sx + i * nbx + b0), INT4 ? 3 : 7);
        const __m512 d = _mm512_maskz_loadu_ps(km, dx + i * nbx + b0);
        const __m512 xv = OFFS ? _mm512_maskz_loadu_ps(km, xs + i * nbx + b0) : _mm512_setzero_ps();
        for (int j = 0; j < NR; ++j) {
          for (int u = vl + 1; u < VPC; ++u) _mm512_store_si512(lb[i][j][u], _mm512_setzero_si512());
          const __m512i T = _mm512_sub_epi32(E::reduce_lanes<VPC>(lb[i][j]), so);
          const __m512 mul = INT4 ? E::int4_mul(_mm512_maskz_loadu_ps(km, sc + j * ng + b0), d) : d;
          acc[i][j] = E::epi_step(acc[i][j], T, mul);
          if constexpr (OFFS) acc[i][j] = E::epi_offsets(acc[i][j], _mm512_maskz_loadu_ps(km, of + j * ng + b0), xv);
        }
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NR; ++j) out[i * ldo + j] = E::tree16_h(acc[i][j]);
}

// Raw tree16 results of rows [n0, n1) for all M rows of x (finish_cols applies scale and bias).
// Up to 8 rows of x: one weight row per tile (the weight read once per 8 rows, x from L1);
// from kBlockMinM rows register tiles of 4 rows of x by NR weight rows (int8 3, int4 2), so each
// x load feeds NR vpdpbusd and x is re-read from L2 once per NR weight rows instead of once
// per row (one weight row per tile made M = 17..64 2-3x slower than the AMX prefill).
template <bool INT4, bool OFFS, int GPV>
void run_v(const int8_t* xq, const float* dx, const int32_t* sx, const float* xs, int64_t M, int64_t K, int64_t nbx,
           const uint8_t* w, const float* sc, const float* of, int64_t G, float* out, int64_t N, int64_t n0,
           int64_t n1, const Pf& pf = Pf()) {
  const int64_t ldw = INT4 ? K / 2 : K, ng = INT4 ? K / G : 0;
  if (pf.prime) prime(w + n0 * ldw, std::min<int64_t>(pf.d, (n1 - n0) * ldw));
  auto tiles = [&](auto nr, int64_t n) {
    constexpr int NR = decltype(nr)::value;
    const float* s = INT4 ? sc + n * ng : nullptr;
    const float* o = OFFS ? of + n * ng : nullptr;
    auto one = [&](auto mb, int64_t m) {
      tile_v<decltype(mb)::value, NR, INT4, OFFS, GPV>(xq + m * K, K, nbx, dx + m * nbx, sx + m * nbx, xs + m * nbx,
                                                       w + n * ldw, ldw, s, o, G, out + m * N + n, N, pf);
    };
    if (NR == 1 && M < kBlockMinM) for_x_tiles8(M, one);
    else for_x_tiles(M, one);
  };
  if (M < kBlockMinM) {
    for (int64_t n = n0; n < n1; ++n) tiles(std::integral_constant<int, 1>{}, n);
    return;
  }
  constexpr int NR = INT4 ? 2 : 3;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tiles(std::integral_constant<int, NR>{}, n);
  if (n1 - n == 2) tiles(std::integral_constant<int, 2>{}, n);
  else if (n1 - n == 1) tiles(std::integral_constant<int, 1>{}, n);
}

}  // namespace qdot
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
