// AVX2 integer GEMM for int8 / int4 weights at prefill (M > ops.DECODE_MAX_M), header-only; kernels.cpp
// binds `prefill_q8_avx2` (ops path "avx2:gemm").
//
// What this is: y[M, N] = xq[M, K] . Wq[N, K]^T in exact int32 block sums, turned into fp32 as decode
// does it: x rounded to int8 in blocks of B along K (per block dx = amax / 127, round half to even:
// the integers of qdot.cpp's quantize_x and packing.quantize_activations; int8 weights B =
// q8_block_int8(K), int4 weights B = the group), weights int8 with a per-row scale or int4 with
// per-group scales [and offsets]. Register blocking: 6 rows of x x 16 weight rows (12 ymm int32
// accumulators, lane = weight row), the weights of a block of NC rows unpacked once per call to
// int16 pairs ("panels": for each k pair, 16 rows x (w[k], w[k+1])), x's integers widened to int16;
// one vpmaddwd gives 8 weight rows x 2 k of one x row (x's pair broadcast), added into int32.
// Why int16 and vpmaddwd, not the vpmaddubsw + vpsignb of decode's tile_q8: maddubs needs one
// unsigned operand, so signed x signed int8 costs a vpsignb per (x row, weight vector) pair and a
// vpmaddwd to widen (3 multiply-pipe ops for 32 products on Zen 3, whose vector multiplies issue
// on 2 of the 4 pipes), where vpmaddwd on int16 is one for 16 and its adds take the other pipes:
// exact (|pair| <= 2 * 127 * 127). int4 runs its own nibble kernel (block_sums_u4: the nibbles are
// unsigned, so vpmaddubsw needs no sign op; 4 x 16 tiles) with the int16 kernel's integers and bits;
// CODESHELL_Q8_GEMM_U4=0 runs int4 on the int16 kernel (nib - 8 in the pack). The lane = weight row layout keeps the epilogue vertical: per
// block, acc_f[x row][16 weight rows] = fma(float(S_b), dx_b (int8) or s_g * dx_b (int4), acc_f),
// then (int4 with offsets) fma(o_g, xs_b, acc_f), in block order; at the end y = acc_f * s + bias
// (int8) or acc_f + bias (int4). Each (row, column) runs the same operations in the same order
// whatever M or its place in the tiles: a row's bits do not depend on the other rows.
// What this is not: decode's kernel (M <= 64 keeps the streaming kernels and their bits: this
// rounds like them but sums in another order), AVX-512 (qgemm_amx.cpp's prefill_q8_vnni), or fp32
// x at full precision (fp32 x goes through the same rounding: the "q8" paths' contract).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "scratch.h"
#include "simd.h"
#include "switches.h"

namespace codeshell {
namespace q8gemm {

constexpr int kMR = 6;   // rows of x per register tile (12 int32 accumulators + 2 weight vectors + x)
constexpr int kNR = 16;  // weight rows per panel (two ymm of 8 rows)

// One row of x [K] -> int16 [K] (the int8 integers), dx[b] = amax / 127, xs[b] = dx[b] * (sum of the
// block's integers) for blocks of B (B % 8 == 0): quantize_x's arithmetic 8 lanes at a time (the same
// fp32 product x * (127 / amax) and round half to even: vcvtps2dq under the default MXCSR).
// o8 (int4's nibble kernel) instead of o where not null (then B % 16 == 0); sx[b] = the integer sum.
inline void quantize_row(const float* x, int64_t K, int64_t B, int16_t* o, float* dx, float* xs,
                         int8_t* o8 = nullptr, int32_t* sx = nullptr) {
  for (int64_t b = 0; b < K / B; ++b) {
    const float* xb = x + b * B;
    const float amax = absmax8(xb, B);  // NaN skipped, as quantize_x skips it
    const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    const __m256 iv = _mm256_set1_ps(id);
    __m256i s = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 16 <= B; k += 16) {
      const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k), iv));
      const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 8), iv));
      s = _mm256_add_epi32(s, _mm256_add_epi32(q0, q1));
      // packs interleaves the 128-bit halves: [q0 lo, q1 lo, q0 hi, q1 hi] -> k order by 0xD8
      const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);  // |q| <= 127
      if (o8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o8 + b * B + k),
                         _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + b * B + k), w);
    }
    for (; k < B; k += 8) {
      const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k), iv));
      s = _mm256_add_epi32(s, q0);
      const __m128i p = _mm_packs_epi32(_mm256_castsi256_si128(q0), _mm256_extracti128_si256(q0, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + b * B + k), p);
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    dx[b] = d;
    xs[b] = d * float(_mm_cvtsi128_si32(s4));
    if (sx) sx[b] = _mm_cvtsi128_si32(s4);
  }
}

// 8 x 8 int32 transpose: r[i] = row i's 8 words in, r[j] = word j of rows 0..7 out.
inline void transpose8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, rows 4-7
    u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
  }
}

// Weight rows as int16, 16 k at a time (k % 16 == 0).
struct RowsI8 {  // int8 [N, K]
  const int8_t* q;
  int64_t K;
  __m256i load16(int64_t n, int64_t k) const {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + n * K + k)));
  }
};
struct RowsI4 {  // uint8 [N, K/2]: each run of 32 weights is 16 bytes, byte i = nib(k0+i) | nib(k0+16+i) << 4
  const uint8_t* q;
  int64_t K;
  __m256i load16(int64_t n, int64_t k) const {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + n * (K / 2) + k / 32 * 16));
    const __m128i nib = _mm_and_si128(k % 32 ? _mm_srli_epi16(v, 4) : v, _mm_set1_epi8(0x0f));
    return _mm256_sub_epi16(_mm256_cvtepu8_epi16(nib), _mm256_set1_epi16(8));  // nib - 8
  }
};

// Panel of weight rows [n, n + 16) (rows >= N are zero) over all K into p: int16 [K/2][16][2].
template <class Rows>
inline void pack_panel(const Rows& w, int64_t N, int64_t K, int64_t n, int16_t* p) {
  for (int64_t k = 0; k < K; k += 16) {
    for (int h = 0; h < 2; ++h) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t row = n + 8 * h + i;
        r[i] = row < N ? w.load16(row, k) : _mm256_setzero_si256();
      }
      transpose8(r);  // r[j] = k pair (k/2 + j) of the 8 rows
      for (int j = 0; j < 8; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + ((k / 2 + j) * kNR + 8 * h) * 2), r[j]);
    }
  }
}

// int4, the nibble kernel (U4): panel of weight rows [n, n + 16) as unsigned nibbles, uint8
// [K/4][16][4] (for each k quad, 16 rows x 4 nibbles; rows >= N zero): 32 k of a row are 16 bytes of
// q (low nibbles k0..15, high k16..31) = 8 quads, transposed 8 rows at a time as pack_panel's pairs.
inline void pack_panel_u4(const uint8_t* q, int64_t N, int64_t K, int64_t n, uint8_t* p) {
  const __m128i m0f = _mm_set1_epi8(0x0f);
  for (int64_t k = 0; k < K; k += 32) {
    for (int h = 0; h < 2; ++h) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t row = n + 8 * h + i;
        if (row >= N) {
          r[i] = _mm256_setzero_si256();
          continue;
        }
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + row * (K / 2) + k / 2));
        r[i] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m0f), _mm_and_si128(v, m0f));
      }
      transpose8(r);  // r[j] = k quad (k/4 + j) of the 8 rows
      for (int j = 0; j < 8; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + ((k / 4 + j) * kNR + 8 * h) * 4), r[j]);
    }
  }
}

// One block (quads = B / 4, even) of MR rows of x (int8, ldx apart) against a U4 panel: S[2 i + h] =
// sum over the block of nib * x (exact: vpmaddubsw's pair sums |.| <= 2 * 15 * 127, two quads' added
// in int16 <= 7620, then vpmaddwd by ones to int32). The caller takes 8 * (x's block sum) back out:
// the same integers as the int16 kernel's sum of (nib - 8) * x, so the same bits. vpmaddubsw takes
// the unsigned nibbles as they are (no vpsignb): 3 multiply-pipe ops per 128 products against 4
// for vpmaddwd on int16 (measured on L1-resident data, one core, same minute: ~60 against ~40
// GMAC/s). 8 accumulators + 4 weight vectors + ones + 2 broadcasts + 1 = 16 ymm.
template <int MR>
__attribute__((noinline)) void block_sums_u4(const int8_t* x, int64_t ldx, const uint8_t* w, int64_t quads,
                                              __m256i* S) {
  __m256i a[MR][2];
  const int8_t* xr[MR];
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    a[i][0] = a[i][1] = _mm256_setzero_si256();
    xr[i] = x + i * ldx;
  }
  for (int64_t s = 0; s < quads; s += 2) {
    const __m256i* wp = reinterpret_cast<const __m256i*>(w + s * 4 * kNR);
    const __m256i w0 = _mm256_loadu_si256(wp), w1 = _mm256_loadu_si256(wp + 1);  // quad s: rows 0-7, 8-15
    const __m256i w2 = _mm256_loadu_si256(wp + 2), w3 = _mm256_loadu_si256(wp + 3);  // quad s + 1
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t qa, qb;
      std::memcpy(&qa, xr[i] + 4 * s, 4);
      std::memcpy(&qb, xr[i] + 4 * s + 4, 4);
      const __m256i xa = _mm256_set1_epi32(qa), xb = _mm256_set1_epi32(qb);
      a[i][0] = _mm256_add_epi32(
          a[i][0], _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(w0, xa), _mm256_maddubs_epi16(w2, xb)), ones));
      a[i][1] = _mm256_add_epi32(
          a[i][1], _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(w1, xa), _mm256_maddubs_epi16(w3, xb)), ones));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_store_si256(S + 2 * i, a[i][0]);
    _mm256_store_si256(S + 2 * i + 1, a[i][1]);
  }
}

// One block of B k (steps = B / 2 pairs) for MR rows of x (rows ldx apart, int16) against a panel
// (w: int16 [steps][16][2] at the block); S[2 i + h] = the exact block sums (int32) of x row i and
// weight rows 8 h .. 8 h + 7. Not inlined, the accumulators local: inlined into the tile with its fp32
// accumulators (24 vectors for 16 registers) or written through S, GCC kept them on the stack (a
// load and a store per vpmaddwd: 60 GOP/s at M = 512 on 2 cores against ~160 a core on its own).
// 12 accumulators + w0, w1 + x's broadcast pair = 15 ymm.
template <int MR>
__attribute__((noinline)) void block_sums(const int16_t* x, int64_t ldx, const int16_t* w, int64_t steps, __m256i* S) {
  __m256i a[MR][2];
  const int16_t* xr[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    a[i][0] = a[i][1] = _mm256_setzero_si256();
    xr[i] = x + i * ldx;
  }
  for (int64_t s = 0; s < steps; ++s) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * 2 * kNR));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * 2 * kNR + 16));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, xr[i] + 2 * s, 4);
      const __m256i xv = _mm256_set1_epi32(pair);
      a[i][0] = _mm256_add_epi32(a[i][0], _mm256_madd_epi16(w0, xv));
      a[i][1] = _mm256_add_epi32(a[i][1], _mm256_madd_epi16(w1, xv));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_store_si256(S + 2 * i, a[i][0]);
    _mm256_store_si256(S + 2 * i + 1, a[i][1]);
  }
}

// The call's constants: x's rounding and the weight's scales as the tiles read them.
struct Job {
  const int16_t* xq;  // [M, K] (the int16 kernel)
  const int8_t* xq8;  // [M, K] (the U4 kernel)
  const int32_t* sx;  // [M, nb] x's block sums (the U4 kernel)
  const float *dx, *xs;  // [M, nb]
  int64_t M, K, N, B, nb;
  const float* scale;  // int8: [N]; int4: [N, nb] (groups = blocks)
  const float* offset;  // int4 with offsets: [N, nb]; else null
  const float* bias;  // [N] or null
  bool int4;
  float* y;  // [M, N]
};

// MR rows of x [m, m + MR) x panel [n, n + 16): all K, then the finish into y (columns < N).
// sc / of: int4's scales / offsets of the panel's 16 rows per block, [nb][16] (of null without).
template <int MR, bool U4>
inline void tile(const Job& J, int64_t m, int64_t n, const void* p, const float* sc, const float* of) {
  alignas(32) float acc[MR][kNR] = {};  // fp32 accumulators in L1 (the registers hold the int32 sums)
  alignas(32) __m256i S[MR * 2];
  const int64_t steps = J.B / 2;
  const int16_t* x = U4 ? nullptr : J.xq + m * J.K;
  for (int64_t b = 0; b < J.nb; ++b) {
    if constexpr (U4) {
      block_sums_u4<MR>(J.xq8 + m * J.K + b * J.B, J.K, static_cast<const uint8_t*>(p) + b * J.B * kNR, J.B / 4, S);
      for (int i = 0; i < MR; ++i) {  // sum (nib - 8) x = sum nib x - 8 sum x
        const __m256i o = _mm256_set1_epi32(J.sx[(m + i) * J.nb + b] * 8);
        S[2 * i] = _mm256_sub_epi32(S[2 * i], o);
        S[2 * i + 1] = _mm256_sub_epi32(S[2 * i + 1], o);
      }
    } else {
      block_sums<MR>(x + b * J.B, J.K, static_cast<const int16_t*>(p) + b * steps * 2 * kNR, steps, S);
    }
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, o0 = s0, o1 = s0;
    if (J.int4) s0 = _mm256_loadu_ps(sc + b * kNR), s1 = _mm256_loadu_ps(sc + b * kNR + 8);
    if (of) o0 = _mm256_loadu_ps(of + b * kNR), o1 = _mm256_loadu_ps(of + b * kNR + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 d = _mm256_set1_ps(J.dx[(m + i) * J.nb + b]);
      __m256 a0 = _mm256_load_ps(acc[i]), a1 = _mm256_load_ps(acc[i] + 8);
      if (!J.int4) {  // int8: sum_b float(S_b) * dx_b, the row scale at the end
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S[2 * i]), d, a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S[2 * i + 1]), d, a1);
      } else {  // int4: sum_b float(S_b) * (s_g * dx_b) [+ o_g * xs_b]
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S[2 * i]), _mm256_mul_ps(s0, d), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S[2 * i + 1]), _mm256_mul_ps(s1, d), a1);
        if (of) {
          const __m256 t = _mm256_set1_ps(J.xs[(m + i) * J.nb + b]);
          a0 = _mm256_fmadd_ps(o0, t, a0);
          a1 = _mm256_fmadd_ps(o1, t, a1);
        }
      }
      _mm256_store_ps(acc[i], a0);
      _mm256_store_ps(acc[i] + 8, a1);
    }
  }
  // finish: int8 acc * scale (+ bias), int4 acc (+ bias); a partial panel through a buffer
  alignas(32) float sv[kNR], bv[kNR];
  const int64_t cols = std::min<int64_t>(kNR, J.N - n);
  for (int64_t j = 0; j < kNR; ++j) {
    sv[j] = J.int4 ? 1.f : (j < cols ? J.scale[n + j] : 0.f);
    bv[j] = J.bias && j < cols ? J.bias[n + j] : 0.f;
  }
  for (int i = 0; i < MR; ++i) {
    alignas(32) float r[kNR];
    for (int h = 0; h < 2; ++h) {
      __m256 v = _mm256_load_ps(acc[i] + 8 * h);
      if (!J.int4) v = _mm256_mul_ps(v, _mm256_load_ps(sv + 8 * h));
      if (J.bias) v = _mm256_add_ps(v, _mm256_load_ps(bv + 8 * h));
      if (cols == kNR) _mm256_storeu_ps(J.y + (m + i) * J.N + n + 8 * h, v);
      else _mm256_store_ps(r + 8 * h, v);
    }
    if (cols < kNR) std::memcpy(J.y + (m + i) * J.N + n, r, size_t(cols) * sizeof(float));
  }
}

template <int MR, bool U4>
inline void tile_rows(const Job& J, int64_t m, int64_t n, const void* p, const float* sc, const float* of,
                      int64_t mr) {
  if constexpr (MR > 1) {
    if (mr < MR) return tile_rows<MR - 1, U4>(J, m, n, p, sc, of, mr);
  }
  tile<MR, U4>(J, m, n, p, sc, of);
}

// int4 by the nibble kernel (4 x 16 tiles) unless CODESHELL_Q8_GEMM_U4=0 (read per call): then the
// int16 kernel as int8 (6 x 16); the same bits either way.
inline bool use_u4() { return env_flag("CODESHELL_Q8_GEMM_U4", true); }

// Rows of weights a thread packs at once (a multiple of 16): the pack (NC x K int16) stays in L2
// and every 6-row tile of x reads it. CODESHELL_Q8_GEMM_NC overrides (read per call, for tuning).
inline int64_t block_rows(int64_t K) {
  const int64_t e = env_int("CODESHELL_Q8_GEMM_NC", 0);
  if (e > 0) return std::max<int64_t>(kNR, e / kNR * kNR);
  return std::clamp<int64_t>((int64_t(192) << 10) / (2 * K) / kNR * kNR, kNR, 64);
}

template <bool U4, class Rows>
inline void run(const Job& J, const Rows& w) {
  constexpr int MR = U4 ? 4 : kMR;
  const int64_t NC = block_rows(J.K), steps = J.K / 2, nb = J.nb;
  parallel_chunks(J.N, NC, NC, [&](int64_t n0, int64_t n1) {
    static thread_local ThreadScratch keep;
    Scratch<char> buf(keep, size_t(NC) * J.K * 2 + 2 * size_t(NC / kNR) * nb * kNR * 4 + 64);
    int16_t* pack = reinterpret_cast<int16_t*>(buf.data());
    float* scp = reinterpret_cast<float*>(buf.data() + size_t(NC) * J.K * 2);
    float* ofp = scp + (NC / kNR) * nb * kNR;
    for (int64_t nc = n0; nc < n1; nc += NC) {
      const int64_t panels = (std::min(n1, nc + NC) - nc + kNR - 1) / kNR;
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t n = nc + q * kNR;
        if constexpr (U4) pack_panel_u4(w.q, J.N, J.K, n, reinterpret_cast<uint8_t*>(pack) + q * J.K * kNR);
        else pack_panel(w, J.N, J.K, n, pack + q * steps * 2 * kNR);
        if (J.int4)
          for (int64_t b = 0; b < nb; ++b)
            for (int64_t j = 0; j < kNR; ++j) {
              const bool in = n + j < J.N;
              scp[(q * nb + b) * kNR + j] = in ? J.scale[(n + j) * nb + b] : 0.f;
              ofp[(q * nb + b) * kNR + j] = in && J.offset ? J.offset[(n + j) * nb + b] : 0.f;
            }
      }
      for (int64_t m = 0; m < J.M; m += MR)
        for (int64_t q = 0; q < panels; ++q) {
          const void* pq = U4 ? static_cast<const void*>(reinterpret_cast<const uint8_t*>(pack) + q * J.K * kNR)
                              : static_cast<const void*>(pack + q * steps * 2 * kNR);
          tile_rows<MR, U4>(J, m, nc + q * kNR, pq, scp + q * nb * kNR, J.offset ? ofp + q * nb * kNR : nullptr,
                            std::min<int64_t>(MR, J.M - m));
        }
    }
  });
}

// x fp32 [M, K] (rounded to int8 in decode's blocks) @ W^T for int8 q [N, K] with scale [N] (G = 0) or
// int4 q uint8 [N, K/2] with scale [N, K/G] and optional offset [N, K/G] (G = the block) -> fp32 [M, N]
// (kernels.cpp's prefill_q8_avx2).
inline torch::Tensor prefill(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& offset, int64_t G,
                             const c10::optional<torch::Tensor>& bias) {
  namespace Q = codeshell::q8gemm;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "prefill_q8_avx2: x must be a contiguous fp32 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  const bool int4 = G != 0;
  int64_t B;
  if (int4) {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8 && q.is_contiguous() && q.size(1) * 2 == K,
                "prefill_q8_avx2: int4 weight must be a contiguous uint8 [N, K/2] tensor with K=", K);
    TORCH_CHECK(G > 0 && G % 32 == 0 && K % G == 0, "prefill_q8_avx2: int4 group ", G,
                " must be a positive multiple of 32 dividing K=", K);
    B = G;
  } else {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.size(1) == K,
                "prefill_q8_avx2: int8 weight must be a contiguous int8 [N, K] tensor with K=", K);
    B = K % 128 == 0 ? 128 : K % 64 == 0 ? 64 : K % 32 == 0 ? 32 : 0;  // q8_block_int8
    TORCH_CHECK(B > 0, "prefill_q8_avx2: int8 needs K % 32 == 0, got K=", K);
  }
  const int64_t nb = K / B;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N * (int4 ? nb : 1),
              "prefill_q8_avx2: scales must be a contiguous fp32 tensor of ", N * (int4 ? nb : 1), " values");
  const float* of = nullptr;
  if (offset.has_value()) {
    TORCH_CHECK(int4, "prefill_q8_avx2: offsets are for int4 weights only");
    TORCH_CHECK(offset->scalar_type() == torch::kFloat32 && offset->is_contiguous() && offset->numel() == N * nb,
                "prefill_q8_avx2: offsets must be a contiguous fp32 tensor of ", N * nb, " values");
    of = offset->data_ptr<float>();
  }
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                "prefill_q8_avx2: bias must be a contiguous fp32 tensor with ", N, " elements");
    bp = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const bool u4 = int4 && Q::use_u4();
  // x's integers: int16 [M, K] for the int16 kernel, int8 [M, K] and their block sums for U4
  auto xq = torch::empty({M, K}, x.options().dtype(u4 ? torch::kInt8 : torch::kInt16));
  auto dx = torch::empty({M, 3 * nb}, x.options());  // dx, xs, sx (int32 bits)
  int16_t* xqp = u4 ? nullptr : xq.data_ptr<int16_t>();
  int8_t* xq8 = u4 ? xq.data_ptr<int8_t>() : nullptr;
  float* dxp = dx.data_ptr<float>();
  int32_t* sxp = reinterpret_cast<int32_t*>(dxp + 2 * M * nb);
  const float* xp = x.data_ptr<float>();
  codeshell::parallel_chunks(M, 1, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      Q::quantize_row(xp + m * K, K, B, u4 ? nullptr : xqp + m * K, dxp + m * nb, dxp + M * nb + m * nb,
                      u4 ? xq8 + m * K : nullptr, sxp + m * nb);
  });
  Q::Job J{xqp, xq8, sxp, dxp, dxp + M * nb, M, K, N, B, nb, scale.data_ptr<float>(), of, bp, int4, y.data_ptr<float>()};
  if (u4) Q::run<true>(J, Q::RowsI4{q.data_ptr<uint8_t>(), K});
  else if (int4) Q::run<false>(J, Q::RowsI4{q.data_ptr<uint8_t>(), K});
  else Q::run<false>(J, Q::RowsI8{q.data_ptr<int8_t>(), K});
  return y;
}

}  // namespace q8gemm
}  // namespace codeshell
