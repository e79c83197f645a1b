// The fp32 epilogue of the int8-activation kernels at the AVX-512 levels, shared by the 512-bit
// vpdpbusd kernels (q8_panel.h: int8 at `avx512_vnni:q8` and `amx:q8`, int4 at `amx:q8`;
// qdot.cpp's tile_v: int4 at `amx:q8`, int8 at `avx512_vnni:q8` M = 1-2) and qgemm_amx.cpp's AMX-INT8 tiles
// (`amx:q8`, M <= 64), so that all give every row the same bits (header-only, inlined).
//
// What this is: the arithmetic that turns exact int32 block sums into a row's fp32 outputs.
// Per output y[m, n] (row m of x, weight row n), with T_b the exact int32 sum over block b of
// w[n, k] * xq[m, k] (int8: w as stored, blocks of 128 k; int4: nib - 8, blocks = groups):
//   mul_b  = d[m, b] (int8) or scale[n, b] * d[m, b] (int4: one fp32 product, `int4_mul`)
//   acc[L] = +0 for L = 0..15; for b = L, L + 16, L + 32, ... in that order:
//            acc[L] = fma(float(T_b), mul_b, acc[L])                       (`epi_step`)
//            int4 with offsets: acc[L] = fma(off[n, b], xs[m, b], acc[L])  (`epi_offsets`)
//   r      = tree16(acc): a_i = acc_i + acc_(i+8), b_i = a_i + a_(i+4), c_i = b_i + b_(i+2),
//            r = c_0 + c_1                                                  (`tree16_h`, `tree16_v`)
//   y      = fma(r, s, bias[n]) with s = scale[n] (int8) or 1 (int4), bias 0 without one (`finish_vec`)
// T_b is an integer, so it does not matter which instruction summed it (vpdpbusd lanes reduced
// by `reduce_lanes`, or a tdpbssd tile) nor in which order; float(T_b) is exact (|T_b| < 2^24).
// tile_v holds acc as one zmm per output (lane L) and steps 16 blocks at a time; q8_panel.h and
// the AMX tiles hold 16 zmm per row of x (one per L, lanes = 16 weight rows) and step one
// block at a time. Elementwise both run the same fma on the same operands in the same order per
// lane; tree16_h (one zmm, horizontally) and tree16_v (16 zmm, lane by lane) pair the same
// terms, and fp32 addition is commutative, so the results are bitwise equal
// (tests/kernels/test_invariance.py compares the two paths row for row).
// Lanes with no block (nb < 16, masked tails) hold +0 in both (a fma(0, 0, acc) leaves acc:
// acc is never -0, as it starts at +0 and x + y is -0 only if both are).
// Why this and not the earlier per-lane epilogue (each block's 16 lane sums converted and
// scaled separately): tdpbssd only gives whole block sums, so a shared definition has to start
// from those; q8_panel.h gets them without a lane reduction (its lanes are weight rows),
// tile_v with ~2 lane shuffles per block (port 5, beside vpdpbusd's port 0).
// What this is not: the AVX2 kernels' epilogue (`avx2:q8` keeps its own, per-lane one), nor
// int4's without AMX (`avx512_vnni:q8` int4 keeps qdot.cpp's per-lane tile_q4v).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "isa.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace q8epi {

inline __m512 epi_step(__m512 acc, __m512i T, __m512 mul) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(T), mul, acc); }
inline __m512 epi_offsets(__m512 acc, __m512 off, __m512 xs) { return _mm512_fmadd_ps(off, xs, acc); }
inline __m512 int4_mul(__m512 scale, __m512 d) { return _mm512_mul_ps(scale, d); }
inline __m512 finish_vec(__m512 r, __m512 s, __m512 b) { return _mm512_fmadd_ps(r, s, b); }

// tree16 of one zmm's lanes.
inline float tree16_h(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));  // i + (i+8)
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));           // i + (i+4)
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));                                           // i + (i+2)
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));                                       // 0 + 1
}

// tree16 lane by lane over 16 zmm at v, v + stride, ... (stride in floats): lane j of the
// result is tree16 of lane j of the 16.
inline __m512 tree16_v(const float* v, int64_t stride) {
  __m512 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm512_add_ps(_mm512_loadu_ps(v + i * stride), _mm512_loadu_ps(v + (i + 8) * stride));
  for (int i = 0; i < 4; ++i) a[i] = _mm512_add_ps(a[i], a[i + 4]);
  for (int i = 0; i < 2; ++i) a[i] = _mm512_add_ps(a[i], a[i + 2]);
  return _mm512_add_ps(a[0], a[1]);
}

// tree16_v over the 16 slots v[0], v[stride], ... (64-byte aligned) of which only slots < nb were
// written (the rest hold +0): the same sum without the adds of +0. Exact: a slot's accumulator is
// never -0 (it starts at +0), so x + (+0) = x, and the tree's remaining pairs are the same.
// q8_rows.h (stride 16) and q8_rows_t.h (its slot stride) end their blocks with it.
inline __m512 tree16_v_prefix(const float* v, int64_t stride, int64_t nb) {
  auto ld = [&](int i) { return _mm512_load_ps(v + stride * i); };
  if (nb >= 9) return tree16_v(v, stride);
  if (nb <= 1) return ld(0);
  if (nb <= 2) return _mm512_add_ps(ld(0), ld(1));
  __m512 a[4];
  if (nb <= 4) {
    for (int i = 0; i < 4; ++i) a[i] = i < nb ? ld(i) : _mm512_setzero_ps();
  } else {
    for (int i = 0; i < 4; ++i) a[i] = i + 4 < nb ? _mm512_add_ps(ld(i), ld(i + 4)) : ld(i);
  }
  // levels i + 2 and i + 1 as tree16_v (a slot past nb: +0, added as tree16_v adds it)
  return _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
}

// out[m, n] = finish_vec(out[m, n], s_n, bias_n) for rows m < M and columns [n0, n1): the raw
// tree16 results written by a VNNI kernel; scale null: s = 1 (int4).
inline void finish_cols(float* out, int64_t M, int64_t ldo, int64_t n0, int64_t n1, const float* scale,
                        const float* bias) {
  for (int64_t n = n0; n < n1; n += 16) {
    const __mmask16 k = n1 - n >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n1 - n)) - 1);
    const __m512 s = scale ? _mm512_maskz_loadu_ps(k, scale + n) : _mm512_set1_ps(1.f);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(k, bias + n) : _mm512_setzero_ps();
    for (int64_t m = 0; m < M; ++m)
      _mm512_mask_storeu_ps(out + m * ldo + n, k, finish_vec(_mm512_maskz_loadu_ps(k, out + m * ldo + n), s, b));
  }
}

// Lane sums -> block sums (integers: exact in any order). combine(a, b): lanes 0..7 = a's
// adjacent lane pairs summed, 8..15 = b's. reduce_lanes<NV> over NV vectors (lb[v][16], each
// holding 16 / NV blocks in equal runs of lanes, in order) gives lane i = the sum of block i.
inline __m512i combine(__m512i a, __m512i b) {
  const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_add_epi32(_mm512_permutex2var_epi32(a, ev, b), _mm512_permutex2var_epi32(a, od, b));
}

template <int NV>
inline __m512i reduce_lanes(const int32_t (*lb)[16]) {
  __m512i v[NV];
  for (int i = 0; i < NV; ++i) v[i] = _mm512_load_si512(lb[i]);
  for (int n = NV; n > 1; n /= 2)
    for (int i = 0; i < n / 2; ++i) v[i] = combine(v[2 * i], v[2 * i + 1]);
  return v[0];
}

// reduce_lanes<16> (lane r = the sum of lb[r]'s 16 lanes) by in-lane unpacks and 128-bit lane shuffles
// instead of vpermt2d: the same integers (exact sums in any order), so the same bits downstream.
// Why (session 41 helper B): on Zen 4 a vpermt2d zmm takes vpdpbusd's issue slot (a 1:1 mix of the two ran
// 1.06 ops a cycle in all), while vpunpckldq zmm issues beside it (1.73 a cycle with vpdpbusd) and
// vshufi32x4 half beside it (1.47); the M = 1 tiles (q4_m1_e.h, q8_m1_e.h) spend one reduce_lanes<16> a
// (16 rows, group): 30 vpermt2d against 2 x 16 vpdpbusd (int4, G = 128). Here 24 unpacks, 6 vshufi32x4 and
// the same 15 adds. Steps (rows a, b, c, d, ... ; per 128-bit lane k, elements e0..e3):
//   1. rows (2i, 2i+1): unpacklo_epi32 + unpackhi_epi32 = [a0+a2, b0+b2, a1+a3, b1+b3];
//   2. pairs of those: unpacklo_epi64 + unpackhi_epi64 = [A, B, C, D], rows 4j..4j+3, lane k's part;
//   3. w0, w1 (rows 0-7): shuffle_i32x4 0x88 + 0xdd = [w0 (k0+k1), w0 (k2+k3), w1 (k0+k1), w1 (k2+k3)];
//   4. the two of step 3 the same way: [w0, w1, w2, w3] summed over k: lane r = row r.
inline __m512i reduce_lanes16_unpack(const int32_t (*lb)[16]) {
  __m512i u[8], w[4], x[2];
  for (int i = 0; i < 8; ++i) {
    const __m512i a = _mm512_load_si512(lb[2 * i]), b = _mm512_load_si512(lb[2 * i + 1]);
    u[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  }
  for (int j = 0; j < 4; ++j)
    w[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(u[2 * j], u[2 * j + 1]),
                            _mm512_unpackhi_epi64(u[2 * j], u[2 * j + 1]));
  for (int j = 0; j < 2; ++j)
    x[j] = _mm512_add_epi32(_mm512_shuffle_i32x4(w[2 * j], w[2 * j + 1], 0x88),
                            _mm512_shuffle_i32x4(w[2 * j], w[2 * j + 1], 0xdd));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(x[0], x[1], 0x88), _mm512_shuffle_i32x4(x[0], x[1], 0xdd));
}

// reduce_lanes<16> by either tree (U: reduce_lanes16_unpack): the same integers.
template <bool U>
inline __m512i reduce16(const int32_t (*lb)[16]) {
  if constexpr (U) return reduce_lanes16_unpack(lb);
  else return reduce_lanes<16>(lb);
}

}  // namespace q8epi
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
