// int8 x int8-activation batched decode kernel on a pre-transposed weight copy (AVX512-VNNI,
// header-only; session 29 helper B, docs/kernels-log.md): q8_rows.h's M = 5..8 where the weight's
// owner (the native decode step) hands over the copy, e.g. codeshell-mini's int8 head at batch 8.
//
// What this is: y[M, N] = x[M, K] . W^T + bias for M <= 8 with q8_epilogue.h's fp32 order (exact
// int32 block sums T_b over blocks of 128 k, then epi_step / tree16 / finish_vec per output), so a
// row gets the same bits as from q8_rows.h, q8_panel.h and tile_v at every M. The weight copy
// (`pack`): 32 weight rows a group, per quad q (4 k) the 32 rows' quads side by side (128 bytes:
// two zmm, lane i = weight row i of the half), stored unsigned (u = w ^ 0x80 = w + 128), groups
// [ceil(N / 32)][K / 4][32][4] (rows past N zero weights). Per quad: 8 vpbroadcastd of x (the 8
// rows' signed quads, from a [K / 4][8] dword copy of x made per call), two zmm loads of weight,
// 16 vpdpbusd into 16 accumulators (8 rows of x x 2 halves); S = sum u x = T + 128 sx, so T_b = S_b -
// 128 sx_b (Prepared's `so` term: no weight sums). Lanes are weight rows, so each accumulator is
// already whole (no lane combine) and a row of x's 16 outputs are one contiguous store.
// Why: q8_rows.h broadcasts every weight quad run from memory into its own vpdpbusd (about one load
// a vpdpbusd, 8 chains): measured on this Ice Lake-class Xeon (benchmarks/standalone/head_m8.cpp,
// a register-only / memory-operand probe) vpdpbusd with a memory operand a vpdpbusd stops at ~3 /ns
// whatever the chains, the register-only loop at ~5.6 /ns with 16 chains; here 10 loads feed 16
// vpdpbusd and the weight is one sequential stream (the 8 row streams of q8_rows.h need its L1
// prefetches). The step loop is one asm block a block of 128 k: GCC kept the 8 / 16 chains of the
// intrinsic loops with a register copy each per step.
// What this is not: M > 8 or M < 5 (q8_rows.h; a pad row of x costs its full share here), int4
// (run_q4), a layout the M = 1 kernels read (the copy is read only by this kernel).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"
#include "q8_epilogue.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {
namespace q8rt {

constexpr int64_t kRows = 32;  // weight rows a group (two zmm of 16 lanes)

// int8 w [N][K] (K % 128 == 0) -> the group layout above (unsigned; rows >= N: u = 0x80, w = 0).
inline std::vector<uint8_t> pack(const int8_t* w, int64_t N, int64_t K) {
  const int64_t groups = (N + kRows - 1) / kRows, nq = K / 4;
  std::vector<uint8_t> p(size_t(groups * kRows * K + 64), 0x80);
  for (int64_t n = 0; n < N; ++n) {
    uint8_t* g = p.data() + (n / kRows) * kRows * K + (n % kRows) * 4;
    const int8_t* r = w + n * K;
    for (int64_t q = 0; q < nq; ++q)
      for (int t = 0; t < 4; ++t) g[q * kRows * 4 + t] = uint8_t(r[4 * q + t]) ^ 0x80;
  }
  return p;
}

// x rows [M][K] (M <= 8) -> [K / 4][8] dwords (row m's quad q at q * 8 + m; rows >= M zero).
// At M = 8 by 8 x 8 dword transposes (24 shuffles a 256 bytes; K % 32 == 0): the scalar loop took
// ~1 us at K = 1024 on the calling thread before the split, once a linear.
inline void pack_x(const int8_t* xq, int64_t M, int64_t K, int32_t* xp) {
  const int64_t nq = K / 4;
  if (M == 8 && K % 32 == 0) {
    for (int64_t q0 = 0; q0 < nq; q0 += 8) {
      __m256i r[8], a[8], b[8];
      for (int m = 0; m < 8; ++m) r[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + 4 * q0));
      for (int i = 0; i < 4; ++i) {  // a[2i]: dwords 0,1 / 4,5 of rows 2i, 2i+1 interleaved; a[2i+1]: 2,3 / 6,7
        a[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
      }
      for (int h = 0; h < 2; ++h)  // rows 4h..4h+3: b[4h + 0..3] = quads 0/4, 1/5, 2/6, 3/7 (per 128-bit lane)
        for (int u = 0; u < 2; ++u) {
          b[4 * h + 2 * u] = _mm256_unpacklo_epi64(a[4 * h + u], a[4 * h + 2 + u]);
          b[4 * h + 2 * u + 1] = _mm256_unpackhi_epi64(a[4 * h + u], a[4 * h + 2 + u]);
        }
      for (int j = 0; j < 4; ++j) {  // quad j (low lanes) and j + 4 (high lanes) of rows 0-3 (b[j]) and 4-7 (b[4 + j])
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xp + (q0 + j) * 8), _mm256_permute2x128_si256(b[j], b[4 + j], 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xp + (q0 + j + 4) * 8), _mm256_permute2x128_si256(b[j], b[4 + j], 0x31));
      }
    }
    return;
  }
  for (int64_t q = 0; q < nq; ++q)
    for (int64_t m = 0; m < 8; ++m) {
      int32_t v = 0;
      if (m < M) std::memcpy(&v, xq + m * K + 4 * q, 4);
      xp[q * 8 + m] = v;
    }
}

// One block (32 quads) of one group: s[h * 8 + m] = u(half h) . x(row m) over the block, in one asm
// block: the 16 accumulators are zmm0-15 (zeroed, then stored to s: more than 30 asm operands
// otherwise), x's broadcasts zmm24-31, the weight's two halves zmm22-23.
#define Q8RT_D(H, M, A) "vpdpbusd %%zmm" #M ", %%zmm" #H ", %%zmm" #A "\n\t"
#define Q8RT_Q(Q)                                                                                           \
  "vpbroadcastd " #Q "*32+0(%[x]), %%zmm24\n\t"                                                             \
  "vpbroadcastd " #Q "*32+4(%[x]), %%zmm25\n\t"                                                             \
  "vpbroadcastd " #Q "*32+8(%[x]), %%zmm26\n\t"                                                             \
  "vpbroadcastd " #Q "*32+12(%[x]), %%zmm27\n\t"                                                            \
  "vpbroadcastd " #Q "*32+16(%[x]), %%zmm28\n\t"                                                            \
  "vpbroadcastd " #Q "*32+20(%[x]), %%zmm29\n\t"                                                            \
  "vpbroadcastd " #Q "*32+24(%[x]), %%zmm30\n\t"                                                            \
  "vpbroadcastd " #Q "*32+28(%[x]), %%zmm31\n\t"                                                            \
  "vmovdqu64 " #Q "*128(%[w]), %%zmm22\n\t"                                                                 \
  "vmovdqu64 " #Q "*128+64(%[w]), %%zmm23\n\t"                                                              \
  Q8RT_D(22, 24, 0) Q8RT_D(22, 25, 1) Q8RT_D(22, 26, 2) Q8RT_D(22, 27, 3) Q8RT_D(22, 28, 4) Q8RT_D(22, 29, 5)  \
  Q8RT_D(22, 30, 6) Q8RT_D(22, 31, 7) Q8RT_D(23, 24, 8) Q8RT_D(23, 25, 9) Q8RT_D(23, 26, 10)                 \
  Q8RT_D(23, 27, 11) Q8RT_D(23, 28, 12) Q8RT_D(23, 29, 13) Q8RT_D(23, 30, 14) Q8RT_D(23, 31, 15)
#define Q8RT_Z(A) "vpxord %%xmm" #A ", %%xmm" #A ", %%xmm" #A "\n\t"
#define Q8RT_S(A) "vmovdqa64 %%zmm" #A ", " #A "*64(%[s])\n\t"

#define Q8RT_L(A) "vmovdqa64 " #A "*64(%[s]), %%zmm" #A "\n\t"
#define Q8RT_BODY Q8RT_Q(0) Q8RT_Q(1) Q8RT_Q(2) Q8RT_Q(3) Q8RT_Q(4) Q8RT_Q(5) Q8RT_Q(6) Q8RT_Q(7) Q8RT_Q(8) Q8RT_Q(9) Q8RT_Q(10) Q8RT_Q(11) Q8RT_Q(12) Q8RT_Q(13) Q8RT_Q(14) Q8RT_Q(15) \
  Q8RT_Q(16) Q8RT_Q(17) Q8RT_Q(18) Q8RT_Q(19) Q8RT_Q(20) Q8RT_Q(21) Q8RT_Q(22) Q8RT_Q(23) Q8RT_Q(24) Q8RT_Q(25) Q8RT_Q(26) Q8RT_Q(27) Q8RT_Q(28) Q8RT_Q(29) Q8RT_Q(30) Q8RT_Q(31) \
  Q8RT_S(0) Q8RT_S(1) Q8RT_S(2) Q8RT_S(3) Q8RT_S(4) Q8RT_S(5) Q8RT_S(6) Q8RT_S(7) Q8RT_S(8) Q8RT_S(9) Q8RT_S(10) Q8RT_S(11) Q8RT_S(12) Q8RT_S(13) Q8RT_S(14) Q8RT_S(15)
#define Q8RT_OPS                                                                                                 \
  : [w] "r"(w), [x] "r"(x), [s] "r"(s)                                                                           \
  : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", \
    "xmm14", "xmm15", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", "memory"

// ADD: the accumulators start from s (the second block of an int4 group of 256) instead of 0.
template <bool ADD = false>
inline void block(__m512i* s, const uint8_t* w, const int32_t* x) {
  if constexpr (ADD)
    asm volatile(Q8RT_L(0) Q8RT_L(1) Q8RT_L(2) Q8RT_L(3) Q8RT_L(4) Q8RT_L(5) Q8RT_L(6) Q8RT_L(7) Q8RT_L(8) Q8RT_L(9) Q8RT_L(10) Q8RT_L(11) Q8RT_L(12) Q8RT_L(13) Q8RT_L(14) Q8RT_L(15) Q8RT_BODY : Q8RT_OPS);
  else
    asm volatile(Q8RT_Z(0) Q8RT_Z(1) Q8RT_Z(2) Q8RT_Z(3) Q8RT_Z(4) Q8RT_Z(5) Q8RT_Z(6) Q8RT_Z(7) Q8RT_Z(8) Q8RT_Z(9) Q8RT_Z(10) Q8RT_Z(11) Q8RT_Z(12) Q8RT_Z(13) Q8RT_Z(14) Q8RT_Z(15) Q8RT_BODY : Q8RT_OPS);
}
#undef Q8RT_OPS
#undef Q8RT_BODY
#undef Q8RT_L
#undef Q8RT_S
#undef Q8RT_Z
#undef Q8RT_Q
#undef Q8RT_D

struct Args {
  int64_t M, K, N, nb;
  const int32_t* xp;     // pack_x's [K / 4][8]
  const int32_t* so;     // [M][nb]: 128 * sx[m][b]
  const float* dx;       // [M][nb]
  const uint8_t* wp;     // pack's groups
  const float* scale;    // [N]
  const float* bias;     // [N] or null
  float* out;            // [M][N]
  int64_t pf = 0;        // T0 prefetch of the weight stream this many blocks (4 KiB) ahead (0: none, the
                         // default: the hardware's stream prefetch; 1 / 2 blocks ran 1.33x / 1.15x slower)
};

// Weight rows [n0, n1) (n0 % 32 == 0), all M rows of x.
inline void run_cols(const Args& A, int64_t n0, int64_t n1) {
  namespace E_ = codeshell::q8epi;
  const int64_t K = A.K, nb = A.nb, M = A.M, slots = std::min<int64_t>(nb, 16);
  constexpr int64_t S = 16 * 16;  // floats a slot: [2 halves][8 rows][16]
  alignas(64) float acc[16 * S];
  // slots no block reaches (nb < L < 16) hold +0 for tree16_v (nb >= 9), as in q8_rows.h
  if (nb < 16) std::memset(acc + nb * S, 0, size_t((16 - nb) * S) * sizeof(float));
  for (int64_t n = n0; n < n1; n += kRows) {
    const uint8_t* wg = A.wp + (n / kRows) * kRows * K;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = wg + b * 32 * 128;
      if (A.pf > 0)  // the stream's 4 KiB pf blocks ahead (past the group's end: the next group's)
        for (int l = 0; l < 64; ++l) _mm_prefetch(reinterpret_cast<const char*>(wb + A.pf * 4096 + 64 * l), _MM_HINT_T0);
      alignas(64) __m512i s[16];
      block(s, wb, A.xp + b * 32 * 8);
      float* ac = acc + (b & 15) * S;
      for (int64_t m = 0; m < M; ++m) {
        const __m512i so = _mm512_set1_epi32(A.so[m * nb + b]);
        const __m512 d = _mm512_set1_ps(A.dx[m * nb + b]);
        for (int h = 0; h < 2; ++h) {
          float* a = ac + (h * 8 + m) * 16;
          _mm512_store_ps(a, E_::epi_step(b < 16 ? _mm512_setzero_ps() : _mm512_load_ps(a), _mm512_sub_epi32(s[h * 8 + m], so), d));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t c0 = n + 16 * h, left = std::min<int64_t>(16, n1 - c0);
      if (left <= 0) break;
      const __mmask16 k = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      const __m512 sc = _mm512_maskz_loadu_ps(k, A.scale + c0);
      const __m512 bb = A.bias ? _mm512_maskz_loadu_ps(k, A.bias + c0) : _mm512_setzero_ps();
      for (int64_t m = 0; m < M; ++m)
        _mm512_mask_storeu_ps(A.out + m * A.N + c0, k, E_::finish_vec(codeshell::q8epi::tree16_v_prefix(acc + (h * 8 + m) * 16, S, slots), sc, bb));
    }
  }
}

// ---- int4 (groups of 128 / 256, nibbles [N][K / 2]) on the same layout ----
// The copy holds each nibble as a byte (0..15: vpdpbusd's unsigned operand as it is) in xq's perm-128
// order (a 128-k run: the 64 packed bytes' low nibbles, then their high ones: q8_rows.h run_q4's
// unpack), so the step loop is `block`'s and S_g = T_g + 8 sx_g (Prepared's so with soff 8). The 32
// rows' scales (offsets) of group g sit beside it, [ceil(N / 32)][K / G][32] (q8_epilogue.h: mul =
// scale[n, g] * d[m, g], then the offsets' fma; rows past N: 0). Twice the packed bytes are read
// (a byte a weight), against run_q4's per-call unpack and 8 broadcast streams.
struct Pack4 {
  std::vector<uint8_t> w;
  std::vector<float> sc, of;  // of empty: no offsets
};

inline Pack4 pack_q4(const uint8_t* q, const float* scale, const float* offset, int64_t N, int64_t K, int64_t G) {
  const int64_t groups = (N + kRows - 1) / kRows, nq = K / 4, ng = K / G;
  Pack4 P;
  P.w.assign(size_t(groups * kRows * K + 64), 0);
  P.sc.assign(size_t(groups * ng * kRows), 0.f);
  if (offset) P.of.assign(size_t(groups * ng * kRows), 0.f);
  std::vector<uint8_t> row(static_cast<size_t>(K));
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* r = q + n * (K / 2);
    for (int64_t k0 = 0; k0 < K; k0 += 128)
      for (int j = 0; j < 64; ++j) {
        row[size_t(k0 + j)] = r[k0 / 2 + j] & 0x0f;
        row[size_t(k0 + 64 + j)] = r[k0 / 2 + j] >> 4;
      }
    uint8_t* g = P.w.data() + (n / kRows) * kRows * K + (n % kRows) * 4;
    for (int64_t qd = 0; qd < nq; ++qd) std::memcpy(g + qd * kRows * 4, row.data() + 4 * qd, 4);
    for (int64_t gg = 0; gg < ng; ++gg) {
      P.sc[size_t(((n / kRows) * ng + gg) * kRows + n % kRows)] = scale[n * ng + gg];
      if (offset) P.of[size_t(((n / kRows) * ng + gg) * kRows + n % kRows)] = offset[n * ng + gg];
    }
  }
  return P;
}

struct Args4 {
  int64_t M, K, N, ng, G;
  const int32_t* xp;     // pack_x's [K / 4][8] of the perm-128 xq
  const int32_t* so;     // [M][ng]: 8 * sx[m][g]
  const float* dx;       // [M][ng]
  const float* xs;       // [M][ng] (offsets) or null
  const uint8_t* wp;     // pack_q4's bytes
  const float* sc;       // pack_q4's scales [groups][ng][32]
  const float* of;       // pack_q4's offsets or null
  const float* bias;     // [N] or null
  float* out;            // [M][N]
};

template <bool OFFS>
inline void run_cols_q4(const Args4& A, int64_t n0, int64_t n1) {
  namespace E_ = codeshell::q8epi;
  const int64_t K = A.K, ng = A.ng, M = A.M, slots = std::min<int64_t>(ng, 16), runs = A.G / 128;
  constexpr int64_t S = 16 * 16;
  alignas(64) float acc[16 * S];
  if (ng < 16) std::memset(acc + ng * S, 0, size_t((16 - ng) * S) * sizeof(float));
  for (int64_t n = n0; n < n1; n += kRows) {
    const int64_t grp = n / kRows;
    const uint8_t* wg = A.wp + grp * kRows * K;
    for (int64_t g = 0; g < ng; ++g) {
      alignas(64) __m512i s[16];
      block<false>(s, wg + g * runs * 4096, A.xp + g * runs * 256);
      if (runs == 2) block<true>(s, wg + (g * 2 + 1) * 4096, A.xp + (g * 2 + 1) * 256);
      float* ac = acc + (g & 15) * S;
      const float* scg = A.sc + (grp * ng + g) * kRows;
      const float* ofg = OFFS ? A.of + (grp * ng + g) * kRows : nullptr;
      for (int64_t m = 0; m < M; ++m) {
        const __m512i so = _mm512_set1_epi32(A.so[m * ng + g]);
        const __m512 d = _mm512_set1_ps(A.dx[m * ng + g]);
        for (int h = 0; h < 2; ++h) {
          float* a = ac + (h * 8 + m) * 16;
          const __m512 mul = E_::int4_mul(_mm512_loadu_ps(scg + 16 * h), d);
          __m512 v = E_::epi_step(g < 16 ? _mm512_setzero_ps() : _mm512_load_ps(a), _mm512_sub_epi32(s[h * 8 + m], so), mul);
          if constexpr (OFFS) v = E_::epi_offsets(v, _mm512_loadu_ps(ofg + 16 * h), _mm512_set1_ps(A.xs[m * ng + g]));
          _mm512_store_ps(a, v);
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t c0 = n + 16 * h, left = std::min<int64_t>(16, n1 - c0);
      if (left <= 0) break;
      const __mmask16 k = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      const __m512 bb = A.bias ? _mm512_maskz_loadu_ps(k, A.bias + c0) : _mm512_setzero_ps();
      for (int64_t m = 0; m < M; ++m)
        _mm512_mask_storeu_ps(A.out + m * A.N + c0, k,
                              E_::finish_vec(codeshell::q8epi::tree16_v_prefix(acc + (h * 8 + m) * 16, S, slots), _mm512_set1_ps(1.f), bb));
    }
  }
}

}  // namespace q8rt
}  // namespace codeshell
CODESHELL_END_AVX512
#endif
