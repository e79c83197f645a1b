// The packed verify run on AVX-512F (avx512::attend_run): the queries of one slot share a block of
// its keys and values converted to fp32 once (attention.cpp's "packed attention" comment says why and
// which bits each query gets). What this is not: the one-query decode path (attention.cpp's
// attend_group on attention_prims.h) or the thread split (attention.cpp's run_packed). Included by attention.cpp
// only, after attention_prims.h, whose primitives it uses; definitions in an anonymous namespace.
#pragma once

#include "attention_prims.h"

#include <vector>

namespace {

// the fp32 copy of the block costs more than it saves.

#if CODESHELL_HAVE_AVX512
// A run with 16-lane registers (AVX-512F; chosen by the caller's isa >= kAvx512Vnni), still
// exactly the AVX2 arithmetic per query: a score register holds two keys' 8-lane FMA chains
// side by side (lanes 0-7 and 8-15), reduced by hsum8's tree in each half (hsum8x16); a value
// register holds 16 output lanes, each its own FMA chain over the keys in order; softmax's
// exps are exp8's operations 16 at a time, its sum accumulated 8 lanes at a time in order.
CODESHELL_BEGIN_AVX512
namespace avx512 {

// hsum8 of each 256-bit half of 8 registers (16 sums). Register i holds keys (kA[i], kB[i]) of
// a 16-key group; the result holds keys 0..15 in order.
constexpr int kA[8] = {0, 8, 1, 9, 2, 10, 3, 11};
constexpr int kB[8] = {4, 12, 5, 13, 6, 14, 7, 15};

inline __m512 hsum8x16(const __m512* a) {
  auto half = [](__m512 x, __m512 y) {  // per 8-lane half: lane i + lane i + 4 -> [x.A, x.B, y.A, y.B] x 4 lanes
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  const __m512 s01 = half(a[0], a[1]), s23 = half(a[2], a[3]), s45 = half(a[4], a[5]), s67 = half(a[6], a[7]);
  const __m512 t0 = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 t1 = _mm512_add_ps(_mm512_shuffle_ps(s45, s67, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(s45, s67, _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 1, 3, 1)));
}


// Keys [s0, s1) of a cache block as fp32 in score order: per 16-key group and register i,
// D/8 chunks of 16 floats [key kA[i] chunk c | key kB[i] chunk c] (keys past s1: zeros).
template <class T>
void keys_paired(const T* src, int64_t s0, int64_t s1, int64_t D, float* buf) {
  const int64_t C = D / 8;
  for (int64_t g = s0; g < s1; g += 16)
    for (int i = 0; i < 8; ++i)
      for (int h = 0; h < 2; ++h) {
        const int64_t s = g + (h ? kB[i] : kA[i]);
        float* dst = buf + (((g - s0) / 16 * 8 + i) * C) * 16 + 8 * h;
        if (s < s1) {
          for (int64_t c = 0; c < C; ++c) _mm256_storeu_ps(dst + c * 16, load8(src + s * D + c * 8));
        } else {
          for (int64_t c = 0; c < C; ++c) _mm256_storeu_ps(dst + c * 16, _mm256_setzero_ps());
        }
      }
}

// Values [s0, s1) as fp32 rows [s1 - s0][D].
template <class T>
void values_f32(const T* src, int64_t s0, int64_t s1, int64_t D, float* buf) {
  const int64_t n = (s1 - s0) * D;
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(buf + i, load8(src + s0 * D + i));
}

// ---- the transposed run (session 38; CODESHELL_ATTN_RUN_T, bf16 caches with D % 32 == 0) --------
// A 16-key group's scores as attend_group / scores16 compute them, without hsum8x16's shuffles: the
// keys stored transposed ([D][16 keys] fp32 a group), so that lane l of each score's 8-lane FMA chain
// (dims l, l + 8, l + 16, ... in order) is register a[l] over 16 keys, and hsum8's tree
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) is seven vertical adds. The same products, the
// same FMA chains, the same pairs added: the same bits (fp32 addition and multiplication commute).
// Why: at codeshell-mini's head dim 32 a score was 2 FMAs and ~1.3 shuffles / adds on the same two
// ports, and verify rows cost a plain row's attention each (~43 us a row of ~56, session 38).

// r[16] rows of 16 dwords -> r[c] = column c (rows 0..15): unpack 32 / 64, then a 4 x 4 transpose of
// the 128-bit lanes.
inline void transpose16_epi32(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[4b + j], lane L: rows 4b..4b+3 of column 4L + j
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i u0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), u1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
    const __m512i u2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88), u3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    t[j] = _mm512_shuffle_i32x4(u0, u2, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(u1, u3, 0x88);
    t[8 + j] = _mm512_shuffle_i32x4(u0, u2, 0xdd);
    t[12 + j] = _mm512_shuffle_i32x4(u1, u3, 0xdd);
  }
  for (int c = 0; c < 16; ++c) r[c] = t[c];
}

// bf16 keys [s0, s1) as fp32 [group][D][16 keys] (keys past s1: zeros); D % 32 == 0. A 32-dim slice
// of 16 keys is 16 rows of 16 bf16 pairs: transposed as dwords, each pair's low half is dim 2c and
// its high half dim 2c + 1 (bf16 -> fp32 is the bits shifted up 16: exact, as load8).
inline void keys_transposed(const uint16_t* src, int64_t s0, int64_t s1, int64_t D, float* buf) {
  const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int64_t g = s0; g < s1; g += 16) {
    float* dst = buf + (g - s0) * D;
    for (int64_t dp = 0; dp < D; dp += 32) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = g + i < s1 ? _mm512_loadu_si512(src + (g + i) * D + dp) : _mm512_setzero_si512();
      transpose16_epi32(r);
      for (int c = 0; c < 16; ++c) {
        _mm512_storeu_si512(dst + (dp + 2 * c) * 16, _mm512_slli_epi32(r[c], 16));
        _mm512_storeu_si512(dst + (dp + 2 * c + 1) * 16, _mm512_and_si512(r[c], hi));
      }
    }
  }
}

// scores16's p[s] for keys [0, n) of a 16-key group stored by keys_transposed.
inline void scores16_t(const float* q, const float* kt, int64_t D, int n, __m512 scale, float* p) {
  __m512 a[8];
  for (int l = 0; l < 8; ++l) a[l] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 8)
    for (int l = 0; l < 8; ++l) a[l] = _mm512_fmadd_ps(_mm512_set1_ps(q[c + l]), _mm512_loadu_ps(kt + (c + l) * 16), a[l]);
  const __m512 f0 = _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6]));
  const __m512 f1 = _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7]));
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), _mm512_mul_ps(_mm512_add_ps(f0, f1), scale));
}

// scores16_t for two query heads q0, q1 (p0, p1) on one key group: each key vector loaded once for
// both heads' FMAs (one head's FMAs took two loads each, the key and q's broadcast: more than the
// load ports give at two FMAs a cycle). Each head's chains and sums are scores16_t's: the same bits.
inline void scores16_t2(const float* q0, const float* q1, const float* kt, int64_t D, int n, __m512 scale, float* p0,
                        float* p1) {
  __m512 a[8], b[8];
  for (int l = 0; l < 8; ++l) a[l] = b[l] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 8)
    for (int l = 0; l < 8; ++l) {
      const __m512 k = _mm512_loadu_ps(kt + (c + l) * 16);
      a[l] = _mm512_fmadd_ps(_mm512_set1_ps(q0[c + l]), k, a[l]);
      b[l] = _mm512_fmadd_ps(_mm512_set1_ps(q1[c + l]), k, b[l]);
    }
  const __mmask16 m = __mmask16((1u << n) - 1);
  const __m512 f0 = _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6]));
  const __m512 f1 = _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7]));
  _mm512_mask_storeu_ps(p0, m, _mm512_mul_ps(_mm512_add_ps(f0, f1), scale));
  const __m512 g0 = _mm512_add_ps(_mm512_add_ps(b[0], b[4]), _mm512_add_ps(b[2], b[6]));
  const __m512 g1 = _mm512_add_ps(_mm512_add_ps(b[1], b[5]), _mm512_add_ps(b[3], b[7]));
  _mm512_mask_storeu_ps(p1, m, _mm512_mul_ps(_mm512_add_ps(g0, g1), scale));
}

// values_f32 for bf16 rows 16 values a step (one 512-bit store each instead of two 256-bit ones:
// the copy was store-bound); the same values: bf16_to_f32_16 over the block's rows.
inline void values_f32_16(const uint16_t* src, int64_t s0, int64_t s1, int64_t D, float* buf) {
  codeshell::widen_bf16_row(src + s0 * D, buf, (s1 - s0) * D);
}

// p[s] for keys [0, n) of a 16-key group (n <= 16), keys paired as keys_paired stores them.
inline void scores16(const float* q, const float* kp, int64_t D, int n, __m512 scale, float* p) {
  const int64_t C = D / 8;
  __m512 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    const __m512 qv = _mm512_broadcast_f32x8(_mm256_loadu_ps(q + c * 8));
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kp + (i * C + c) * 16), acc[i]);
  }
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), _mm512_mul_ps(hsum8x16(acc), scale));
}

// o [RB][D] += p [RB] (stride ps) @ v [n][D], 16 * NV lanes at a time.
template <int RB, int NV>
void values_block(const float* p, int64_t ps, const float* v, int64_t n, int64_t D, float* o) {
  for (int64_t d = 0; d < D; d += 16 * NV) {
    __m512 acc[RB][NV];
    for (int r = 0; r < RB; ++r)
      for (int h = 0; h < NV; ++h) acc[r][h] = _mm512_loadu_ps(o + r * D + d + 16 * h);
    for (int64_t s = 0; s < n; ++s) {
      __m512 x[NV];
      for (int h = 0; h < NV; ++h) x[h] = _mm512_loadu_ps(v + s * D + d + 16 * h);
      for (int r = 0; r < RB; ++r) {
        const __m512 w = _mm512_set1_ps(p[r * ps + s]);
        for (int h = 0; h < NV; ++h) acc[r][h] = _mm512_fmadd_ps(w, x[h], acc[r][h]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int h = 0; h < NV; ++h) _mm512_storeu_ps(o + r * D + d + 16 * h, acc[r][h]);
  }
}

template <int NV>
void values_heads(const float* p, int64_t ps, const float* v, int64_t n, int64_t D, int R, float* o) {
  int r = 0;
  for (; r + 4 <= R; r += 4) values_block<4, NV>(p + r * ps, ps, v, n, D, o + r * D);
  switch (R - r) {
    case 3: values_block<3, NV>(p + r * ps, ps, v, n, D, o + r * D); break;
    case 2: values_block<2, NV>(p + r * ps, ps, v, n, D, o + r * D); break;
    case 1: values_block<1, NV>(p + r * ps, ps, v, n, D, o + r * D); break;
    default: break;
  }
}

// attend_run with 16-lane registers; D % 16 == 0.
template <class T>
void attend_run(const float* q, int n, int R, int64_t D, const T* k, const T* v, const int64_t* lens, float scale,
                std::vector<float>& p, std::vector<float>& kb, float* o, bool transposed) {
  // the transposed keys (keys_transposed / scores16_t) for bf16 caches at D % 32 == 0
  constexpr bool b16 = std::is_same_v<T, uint16_t>;
  const bool tr = b16 && transposed && D % 32 == 0;
  // CODESHELL_ATTN_RUN_T2=0 (read per call; A/B runs): the transposed scores one head at a time
  const bool pair = codeshell::env_flag("CODESHELL_ATTN_RUN_T2", true);
  int64_t smax = 0;
  for (int j = 0; j < n; ++j) smax = std::max(smax, lens[j]);
  const int64_t KB = std::max<int64_t>(16, (4096 / D) / 16 * 16);  // keys per fp32 block: 16 KiB
  p.resize(size_t(n) * R * smax + 16);  // + 16: a 16-key group's masked store stays inside
  kb.resize(size_t(KB) * D);
  const __m512 sc = _mm512_set1_ps(scale);
  float* pp = p.data();
  for (int64_t s0 = 0; s0 < smax; s0 += KB) {
    const int64_t s1 = std::min(smax, s0 + KB);
    if constexpr (b16) {
      if (tr) keys_transposed(k, s0, s1, D, kb.data());
      else keys_paired(k, s0, s1, D, kb.data());
    } else {
      keys_paired(k, s0, s1, D, kb.data());
    }
    for (int j = 0; j < n; ++j) {
      const int64_t e = std::min(s1, lens[j]);
      for (int r = 0; r < R; ++r) {
        const float* qr = q + (int64_t(j) * R + r) * D;
        float* pr = pp + (int64_t(j) * R + r) * smax;
        if (tr && pair && r + 1 < R) {  // heads r and r + 1 together (scores16_t2)
          for (int64_t s = s0; s < e; s += 16)
            scores16_t2(qr, qr + D, kb.data() + (s - s0) * D, D, int(std::min<int64_t>(16, e - s)), sc, pr + s,
                        pr + smax + s);
          ++r;
        } else if (tr) {
          for (int64_t s = s0; s < e; s += 16)
            scores16_t(qr, kb.data() + (s - s0) * D, D, int(std::min<int64_t>(16, e - s)), sc, pr + s);
        } else {
          for (int64_t s = s0; s < e; s += 16)
            scores16(qr, kb.data() + (s - s0) * D, D, int(std::min<int64_t>(16, e - s)), sc, pr + s);
        }
      }
    }
  }
  for (int j = 0; j < n; ++j)
    for (int r = 0; r < R; ++r) softmax_row16(pp + (int64_t(j) * R + r) * smax, lens[j]);
  std::fill(o, o + int64_t(n) * R * D, 0.f);
  for (int64_t s0 = 0; s0 < smax; s0 += KB) {
    const int64_t s1 = std::min(smax, s0 + KB);
    if constexpr (b16) {
      if (tr) values_f32_16(v, s0, s1, D, kb.data());
      else values_f32(v, s0, s1, D, kb.data());
    } else {
      values_f32(v, s0, s1, D, kb.data());
    }
    for (int j = 0; j < n; ++j) {
      const int64_t e = std::min(s1, lens[j]);
      if (e <= s0) continue;
      if (D % 32 == 0) values_heads<2>(pp + int64_t(j) * R * smax + s0, smax, kb.data(), e - s0, D, R, o + int64_t(j) * R * D);
      else values_heads<1>(pp + int64_t(j) * R * smax + s0, smax, kb.data(), e - s0, D, R, o + int64_t(j) * R * D);
    }
  }
}

template void attend_run<uint16_t>(const float*, int, int, int64_t, const uint16_t*, const uint16_t*, const int64_t*,
                                   float, std::vector<float>&, std::vector<float>&, float*, bool);
template void attend_run<float>(const float*, int, int, int64_t, const float*, const float*, const int64_t*, float,
                                std::vector<float>&, std::vector<float>&, float*, bool);
}  // namespace avx512
CODESHELL_END_AVX512
#endif
}  // namespace
