// AVX-512 helpers shared by the kernels (header-only, inlined): one copy of each.
//
// What this is: the bf16 -> fp32 widening on 16 lanes (`load_bf16x16`, `widen_bf16_row`);
// `exp16`, exp8's operations (simd.h) on 16 lanes, the same bits per lane (the
// fused GELU and attention's softmax rely on that to give the same results on either width),
// `gelu16` and the bf16 rounding (`bf16_bits`, `round_bf16`) shared by fused.cpp and the prefill
// GEMM's GELU epilogue,
// and `transpose16`, an in-register transpose of a 16 x 16 matrix of 32-bit elements (the
// int8/int4 kernels: qgemm_amx.cpp's x tiles, q8_panel.h's weight panels).
// What this is not: a dispatcher; only code inside a CODESHELL_BEGIN_AVX512 section calls these.
#pragma once

#include <immintrin.h>

#include "isa.h"
#include "simd.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {

// bf16 -> fp32 on 16 lanes, exact (simd.h's bf16_to_f32 a lane): from a register, from memory,
// from memory under a mask (lanes outside k read nothing and are 0), and a row of n values.
inline __m512 widen_bf16x16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 load_bf16x16(const void* p) { return widen_bf16x16(_mm256_loadu_si256(static_cast<const __m256i*>(p))); }
inline __m512 load_bf16x16(const void* p, __mmask16 k) { return widen_bf16x16(_mm256_maskz_loadu_epi16(k, p)); }
inline void widen_bf16_row(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load_bf16x16(src + i));
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

// exp(x) for 16 lanes: exp8's steps (clamp to [-88, 88], n = round(x log2 e), a degree-6
// polynomial of the remainder, scale by 2^n; 0 below -88).
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-88.f), hi = _mm512_set1_ps(88.f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(__mmask16(~under), _mm512_mul_ps(y, _mm512_castsi512_ps(e)));
}

// fp32 -> bf16 bits in the low half of each lane: round to nearest even, NaN -> 0x7fc0 (torch's
// conversion; fused.cpp's 8-lane store8 rounds the same way).
inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}
inline __m512 round_bf16(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }

// gelu_tanh(v) = v / (1 + e^{-2u}), u = sqrt(2/pi) (v + 0.044715 v^3): fused.cpp's gelu8 lane for
// lane (the same operations, order and rounding; its header gives the numerics). One copy for
// fused_gelu_tanh and the prefill GEMM's GELU epilogue (panel_bf16.cpp), so both give the same bits.
inline __m512 gelu16(__m512 v) {
  const __m512 k0 = _mm512_set1_ps(-2.0f * 0.7978845608028654f), k1 = _mm512_set1_ps(0.044715f);
  __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
  __m512 a = _mm512_mul_ps(k0, _mm512_add_ps(v, _mm512_mul_ps(k1, v3)));
  __m512 g = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(a)));
  return _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask(a, _mm512_set1_ps(88.f), _CMP_GT_OQ), _mm512_mul_ps(v, _mm512_setzero_ps()));
}

// gelu16's function with a shorter dependency chain, for the prefill GEMM's GELU epilogue only
// (panel_bf16.cpp store_rows_gelu; decode and fused_gelu_tanh keep gelu16). Why: measured there
// (codeshell-mini's c_fc, M = 256, N = 1024, K = 256, one thread, CPU time), the epilogue with
// gelu16 cost ~90 us a call over the GEMM alone (~22 cycles per 16 values) at ~45 operations a
// vector: not the FP pipes (~8 cycles of FMA work a vector) but the chain's latency (~90 cycles
// from the load to the store), which keeps the out-of-order window full of waiting operations.
// The divide is not the limit (a reciprocal instead of it alone changed nothing: the same chain
// length); what is shorter here:
//   * exp in base 2: b = log2(e) a from v by two products and an FMA (a's constants folded:
//     v (c0 + c1 v^2)), n = round(b), f = b - n (exact), 2^f by Cephes exp2f's degree-6
//     polynomial in Estrin's order (4 FMA steps deep instead of 6 + 2), the scale by vscalefps
//     (no integer exponent, no clamp: below 2^-126 it gives the denormal or 0 where exp16 gives
//     0 from -88, and 1 + e is 1 either way);
//   * 1 / (1 + e) by vrcp14ps and one Newton step folded into the product with v: g0 = v r0,
//     g = g0 + g0 (1 - d r0) (~2 fp32 ulps of v / d);
//   * the input's rounding to bf16 (round_in) by the integer add and a mask, without the shifts.
// Accuracy: within a few fp32 ulps of gelu16 (relative ~4e-7); rounded to bf16 (the epilogue's
// output) the same value except where gelu16's result sits within those ulps of a bf16 rounding
// boundary, then 1 bf16 ulp apart (tests/kernels/test_prefill_noamx.py checks it against
// F.gelu(approximate="tanh"), as the fused GELU's own test does, and against gelu16). b > 88
// log2(e) (gelu16's a > 88): v * 0, as gelu16.
inline __m512 gelu16_fast(__m512 v) {
  constexpr float k0 = -2.0f * 0.7978845608028654f, k1 = 0.044715f, l2e = 1.44269504088896341f;
  const __m512 c0 = _mm512_set1_ps(k0 * l2e), c1 = _mm512_set1_ps(k0 * k1 * l2e);
  // a log2(e), held >= -150 (2^-150: e = 0, g = v) where v^3 overflows (v >= ~2e13, +inf: b = -inf
  // would make f NaN); a NaN v stays NaN through g (max returns -150, v r0 is NaN)
  const __m512 b = _mm512_max_ps(_mm512_mul_ps(v, _mm512_fmadd_ps(_mm512_mul_ps(v, v), c1, c0)), _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(b, n);  // [-0.5, 0.5], exact
  // 2^f = 1 + f q(f), q of degree 5 (Cephes exp2f): q = (p5 + p4 f) + f^2 ((p3 + p2 f) + f^2 (p1 + p0 f))
  const __m512 f2 = _mm512_mul_ps(f, f);
  const __m512 qa = _mm512_fmadd_ps(f, _mm512_set1_ps(2.402264791363012e-1f), _mm512_set1_ps(6.931472028550421e-1f));
  const __m512 qb = _mm512_fmadd_ps(f, _mm512_set1_ps(9.618437357674640e-3f), _mm512_set1_ps(5.550332471162809e-2f));
  const __m512 qc = _mm512_fmadd_ps(f, _mm512_set1_ps(1.535336188319500e-4f), _mm512_set1_ps(1.339887440266574e-3f));
  const __m512 q = _mm512_fmadd_ps(_mm512_fmadd_ps(qc, f2, qb), f2, qa);
  const __m512 e = _mm512_scalef_ps(_mm512_fmadd_ps(q, f, _mm512_set1_ps(1.0f)), n);
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
  const __m512 r0 = _mm512_rcp14_ps(d);
  const __m512 g0 = _mm512_mul_ps(v, r0);
  const __m512 g = _mm512_fmadd_ps(g0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(1.0f)), g0);
  return _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask(b, _mm512_set1_ps(88.f * l2e), _CMP_GT_OQ),
                            _mm512_mul_ps(v, _mm512_setzero_ps()));
}

// round_bf16 with a shorter chain (the fast GELU epilogue's input rounding): the same value for
// every input, NaN included (0x7fc0 << 16): the rounding add, then the low half masked off.
inline __m512 round_bf16_fast(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))),
                                     _mm512_set1_epi32(int32_t(0xffff0000u)));
  return _mm512_castsi512_ps(
      _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000)));
}

// In-register transpose of a 16 x 16 matrix of 32-bit elements (r[i] = row i in, r[q] = column
// q out): unpack 32 and 64 within 128-bit lanes, then two rounds of lane shuffles (64 shuffles
// for 1 KiB).
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

}  // namespace codeshell
CODESHELL_END_AVX512
#endif
