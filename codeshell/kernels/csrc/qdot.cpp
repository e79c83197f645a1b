// Integer-dot decode kernels: int4 / int8 weights times int8-quantised activations (AVX2, and
// AVX512-VNNI in its own section below: isa.h).
//
// What this is: y[M,N] = x[M,K] @ W^T (+ bias) for small M (decode, batched decode) where x is
// first quantised to int8 in blocks along K (one fp32 scale per block, round-half-even, the
// same arithmetic as codeshell.kernels.packing.quantize_activations) and each block's dot
// product with the weight runs in integers: vpmaddubsw multiplies 32 unsigned x signed bytes
// into 16 int16 pair sums per instruction, 4x the multiply-adds of an fp32 FMA.
// Row invariance: x is rounded per row, the block dots are exact integers and the epilogue is
// per row, so a row's bits do not depend on M or on its tile; ops.py runs these kernels for
// every M up to ROW_INVARIANT_MAX_M (64), so batched decode and verify steps match M = 1.
// The 512-bit kernels (K % 128 == 0): int8 runs q8_panel.h (16 weight rows transposed per
// block, exact block sums, the fp32 epilogue of q8_epilogue.h) below the AMX row threshold with
// AMX (`amx:q8`), where qgemm_amx.cpp's AMX-INT8 row tiles take the larger M with the same
// epilogue, and from 17 rows without AMX (`avx512_vnni:q8`), where tile_v (the same epilogue
// after a lane reduction) runs M = 1-2 (the panel's transposes ran int8 M = 1 2.1x slower than
// AVX2 on AMD Zen: panel_min_m) and q8_rows.h (rows of x in the lanes, the same epilogue) M = 3-16. int4 on AMX CPUs runs tile_v at M = 1-2, q8_panel.h (groups of
// 128 / 256) up to the AMX rows, the AMX rows above: the same bits from all three
// (tests/kernels/test_invariance.py). int4 without AMX: tile_q4v / tile_q4v_blk, and q4_rows.h at
// M = 3-16 with groups of 128 / 256 (tile_q4r there with CODESHELL_Q4_ROWS=0; per-lane epilogue, tile_q4v's bits;
// CODESHELL_Q4_ROWS_V2=0: q4_rows.h's session 17 schedule). Without AMX at
// M = 1-2 (session 14): int8 runs tile_r16_q8 (tile_v's bits, 16 weight rows a tile) where a row
// is at most one span of blocks, int4 groups of 128 / 256 tile_q4v12 (tile_q4v's bits) up to 16
// groups (at M = 1 since session 18 q4_m1.h's 16-row tile, the same bits; since session 19 up to
// 32 groups, kQ4M1R16Groups); tile_v / tile_q4v past those. The M = 1 tiles prefetch kM1Prefetch
// (8 KiB) ahead (session 18; M > 1 kPrefetch), int4 also its scale rows (kQ4M1ScalePf, session 19).
// What this is not: the prefill path (M > 64 goes to AMX-INT8 / bf16 / sgemm in ops.py), or
// an exact fp32 weight-only matmul (the activation rounding is part of the definition and
// the Python reference reproduces it).
//
// Why: unpacking int4 into fp32 lanes made the weight-only kernels compute bound at
// ~7 GB/s of packed weight (35% of this machine's read bandwidth); with integer dots the
// same unpacked nibbles feed 32 multiply-adds per instruction and decode is memory bound.
// llama.cpp's Q4_0 x Q8_0 path does the same on this ISA.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "entry.h"
#include "isa.h"
#include "parallel.h"
#include "q8_epilogue.h"
#include "q8_panel.h"
#include "q8_rows.h"
#include "q4_rows.h"
#include "q4_m1.h"
#include "quant_x.h"
#include "scratch.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <optional>
#include <vector>

namespace {

// Software prefetch distance (bytes ahead in the weight stream). Cold weights (each layer's
// are read once per token) streamed at 13-14 GB/s without it, 17-19 GB/s with 2 KiB (measured
// 1, 2 and 4 KiB on 7B int4 layers; cache-warm weights reach 20+ either way).
#ifndef CODESHELL_PREFETCH
#define CODESHELL_PREFETCH 2048
#endif
constexpr int64_t kPrefetch = CODESHELL_PREFETCH;

// A/B switches of the kernels, read per call (csrc/switches.h; the kernels behind them give the same bits).
using codeshell::env_flag;
using codeshell::env_int;
inline bool q4v12() { return env_flag("CODESHELL_Q4V12", true); }
inline bool r16_q8() { return env_flag("CODESHELL_Q8_R16", true); }
// int8 M = 1 without AMX at K > 4096 (the 7B's mlp.c_proj, K = 16384): q8_rows.h (the same bits)
// instead of tile_v with CODESHELL_Q8_M1_ROWS=1 (read per call). Session 16 made q8_rows.h the
// default there (three 8-round A/Bs in busy minutes: mlp.c_proj 35-41 against tile_v's 27-32 GB/s
// with kPrefetch, 2 KiB ahead). Session 18 (docs/kernels.md, helper A): with the M = 1 prefetch at
// kM1Prefetch tile_v reads faster: mlp.c_proj int8 cold, same rounds (probe 38.5 / 44.8), 1 thread
// 33.3 against 24.3 GB/s (1.38x), 2 threads 40.8 against 34.6 (1.18x); the 1.7B model's token
// (bench_decode_phases, probe 44) 1.059x, mlp.c_proj in the step 39.9 against 34.5. So tile_v again.
inline bool m1_rows_q8() { return env_flag("CODESHELL_Q8_M1_ROWS", false); }

// The M = 1 tiles' software prefetch (int8: tile_r16_q8, tile_v; int4: tile_q4v, tile_q4v12, q4_m1.h):
// kM1Prefetch bytes ahead of the weight stream, T0. Why 8 KiB, not kPrefetch's 2 KiB: measured
// cold on the 2-core Zen 5 EPYC, the same weights on huge pages, same process, alternating
// (benchmarks/bench_m1_threads.py; docs/kernels.md session 18 helper A): 1 thread, int8 c_fc
// (16384 x 4096) 32.5 -> 38.4 GB/s and the small head (70144 x 1024) 32.9 -> 35.3 against a
// 1-thread probe of ~40-42 (plain read of the same bytes 42-43); 2 threads in a fast minute
// (probe 75.6) int8 c_fc 60.4 -> 75.9, the head 61.4 -> 68.6, int4 c_fc 57.4 -> 69.2 (probe 76.6);
// slow minutes (probe ~50) unchanged. 2 KiB ahead is inside what the hardware prefetcher already
// fetched; without a software prefetch int8 read 33-35, 4 KiB 36-37, 16 KiB 34-38.
// Switches for A/B timing (read per call): CODESHELL_Q8_M1_PF / CODESHELL_Q4_M1_PF = bytes ahead
// (0: none; 2048 = before session 18), CODESHELL_Q8_M1_PFH / CODESHELL_Q4_M1_PFH = 0 T0 / 1 T1 / 2 T2
// / 3 NTA (T1 measured no better). Prefetches change no bits.
constexpr int64_t kM1Prefetch = 8192;
struct Pf {
  int64_t d = kPrefetch;  // the M > 1 calls' distance (the tiles' default argument)
  int h = 0;
  bool prime = false;
  int64_t sc = 0;  // int4 M = 1: prefetch the scales / offsets of the rows this many 16-row tiles ahead (0: none)
};
inline Pf pf_env(const char* dist, const char* hint) {
  Pf p;
  p.d = env_int(dist, kM1Prefetch);
  p.h = static_cast<int>(env_int(hint, 0));
  p.prime = env_flag("CODESHELL_M1_PRIME", false);
  return p;
}
inline Pf q8_m1_pf() { return pf_env("CODESHELL_Q8_M1_PF", "CODESHELL_Q8_M1_PFH"); }
// int4 M = 1 (run_q4v: the 16-row tile and tile_q4v's rows): prefetch the scale (and offset) rows
// kQ4M1ScalePf tiles of 16 rows ahead, T0. Why: the nibbles sit on huge pages with kM1Prefetch's
// software prefetch, but the fp32 scales / offsets [N, K/G] (quant/linear.py, torch's allocator) are
// two more streams a call (K = 1024, G = 128: 32 + 32 bytes a row against 512 of nibbles) on 4 KiB
// pages, which the hardware prefetcher restarts at every page (every 128 rows at K = 1024): a
// demand miss there stalls the row loop. Measured cold on the 2-core Zen 5 (bench_m1_threads.py,
// 1 thread, same rounds; docs/kernels.md session 19 helper C): the small shape's c_fc (4096 x 1024)
// 25-27 -> 32-35 GB/s, c_attn (1536 x 1024) 22-24 -> 30-31 (+27-35%); tile_q4v's K = 4096 / 16384
// rows +-3%. In a loaded model's decode step the same linears read ~37 GB/s a core either way (their
// scales' pages evidently stream better there): within the noise, kept as it costs nothing measurable.
// CODESHELL_Q4_M1_PFS = tiles ahead (0: none, as before session 19; read per call).
constexpr int64_t kQ4M1ScalePf = 1;
inline int64_t q4_m1_pfs() { return env_int("CODESHELL_Q4_M1_PFS", kQ4M1ScalePf); }
inline Pf q4_m1_pf() {
  Pf p = pf_env("CODESHELL_Q4_M1_PF", "CODESHELL_Q4_M1_PFH");
  p.sc = q4_m1_pfs();
  return p;
}
// EXPERIMENT: CODESHELL_M1_PRIME=1: at the start of a chunk of rows, prefetch its first pf.d bytes
// (the lines the running prefetch never covers: it starts pf.d ahead).
inline bool m1_prime() { return env_flag("CODESHELL_M1_PRIME", false); }
// `bytes` from p into L1, a line at a time (that experiment's prime, and int4 M = 1's scale rows: Pf::sc).
inline void prime(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}
inline void pf_line(const void* p, const Pf& f) {
  const char* c = static_cast<const char*>(p) + f.d;
  switch (f.h) {
    case 1: _mm_prefetch(c, _MM_HINT_T1); break;
    case 2: _mm_prefetch(c, _MM_HINT_T2); break;
    case 3: _mm_prefetch(c, _MM_HINT_NTA); break;
    default: _mm_prefetch(c, _MM_HINT_T0); break;
  }
}

// Rows of x from which tile_v (int4 groups of 32 / 64 on AMX CPUs) takes register tiles of
// several weight rows instead of one weight row per tile of up to 8 rows of x. Up to 8 rows of x
// stay in L1 and the one-row tiles are as fast (per core, mid shapes, M = 8: within +-10%
// either way); from 9 rows x comes from L2 for every weight row.
constexpr int64_t kBlockMinM = 9;

// x fp32 [M, K] -> xq int8 [M, K], dx [M, K/B] (block scale), xs [M, K/B] (dx * sum of xq).
// Block b: amax = max |x|, dx = amax / 127, xq = round_half_even(x * (127 / amax)).
// perm = 64: within each run of 64, store [x0..15 x32..47 | x16..31 x48..63] so that a
// 32-byte load of packed int4 (low nibbles = k0..15 | k32..47) lines up with one x load.
// perm = 128 (the 512-bit kernels): within each run of 128, the 64 x of the low nibbles of a
// 64-byte load (k0+32r+t, r = 0..3, t = 0..15), then the 64 of the high nibbles (k0+32r+16+t).
void quantize_x(const float* x, int64_t M, int64_t K, int64_t B, int perm, int8_t* xq, float* dx,
                float* xs) {
  const int64_t nb = K / B;
  std::vector<int8_t> tmp(perm ? K : 0);
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    int8_t* o = perm ? tmp.data() : xq + m * K;
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.f;
      for (int64_t k = b * B; k < (b + 1) * B; ++k) amax = std::max(amax, std::fabs(r[k]));
      const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      int32_t s = 0;
      for (int64_t k = b * B; k < (b + 1) * B; ++k) {
        const int32_t v = int32_t(std::nearbyint(r[k] * id));  // default rounding: half to even
        o[k] = int8_t(v);
        s += v;
      }
      dx[m * nb + b] = d;
      xs[m * nb + b] = d * float(s);
    }
    if (perm == 128) {
      int8_t* dst = xq + m * K;
      for (int64_t k = 0; k < K; k += 128)
        for (int i = 0; i < 64; ++i) {
          dst[k + i] = o[k + 32 * (i / 16) + i % 16];
          dst[k + 64 + i] = o[k + 32 * (i / 16) + 16 + i % 16];
        }
    } else if (perm == 64) {
      int8_t* dst = xq + m * K;
      for (int64_t k = 0; k < K; k += 64)
        for (int t = 0; t < 16; ++t) {
          dst[k + t] = o[k + t];
          dst[k + 16 + t] = o[k + 32 + t];
          dst[k + 32 + t] = o[k + 16 + t];
          dst[k + 48 + t] = o[k + 48 + t];
        }
    }
  }
}

// quantize_x, with the AVX-512 rounding (quant_x.h: the same integers, ~10x faster) where the
// call's ISA level has it; perm 64 (the AVX2 int4 order) stays scalar.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t B, int perm, int64_t isa, int8_t* xq, float* dx,
                   float* xs, int32_t* sx = nullptr) {
#if CODESHELL_HAVE_AVX512
  if (isa >= codeshell::kAvx512Vnni && perm != 64) {
    const int64_t nb = K / B;
    for (int64_t m = 0; m < M; ++m)
      codeshell::quantize_row_avx512(x + m * K, K, B, perm, xq + m * K, dx + m * nb, 1, xs + m * nb,
                                     sx ? sx + m * nb : nullptr);
    return;
  }
#endif
  quantize_x(x, M, K, B, perm, xq, dx, xs);
}

// sum_g c_g * xs_g with c_g = offset_g - 8 * scale_g (or -8 * scale_g when symmetric).
// Not inlined: every tile kernel (M = 1 and the blocked M > 8 tiles) then runs the same machine
// code for it, so no call site's floating-point contraction or vectorisation can differ (row
// invariance: the same row must get the same bits from every tile shape).
template <bool OFFS>
__attribute__((noinline)) float affine_const(const float* sc, const float* of, const float* xs, int64_t ng) {
  __m256 acc = _mm256_setzero_ps();
  const __m256 m8 = _mm256_set1_ps(-8.f);
  int64_t g = 0;
  for (; g + 8 <= ng; g += 8) {
    __m256 c = _mm256_mul_ps(_mm256_loadu_ps(sc + g), m8);
    if (OFFS) c = _mm256_add_ps(c, _mm256_loadu_ps(of + g));
    acc = _mm256_fmadd_ps(c, _mm256_loadu_ps(xs + g), acc);
  }
  float r = codeshell::hsum8(acc);
  for (; g < ng; ++g) r += ((OFFS ? of[g] : 0.f) - 8.f * sc[g]) * xs[g];
  return r;
}

// Calls f(std::integral_constant<int, MB>, m) for the tiles [m, m + MB) of M rows of x: tiles
// of 4, then one of the 1-3 rows left (MB is a template parameter of the tile kernels).
template <class F>
inline void for_x_tiles(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) f(std::integral_constant<int, 4>{}, m);
  switch (M - m) {
    case 3: f(std::integral_constant<int, 3>{}, m); break;
    case 2: f(std::integral_constant<int, 2>{}, m); break;
    case 1: f(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// ---- int4 ---------------------------------------------------------------------------
// Weight layout (codeshell/kernels/packing.py): uint8 [N, K/2]; each run of 32 weights is 16
// bytes, byte i = nib(k0+i) | nib(k0+16+i) << 4; W = (nib - 8) * scale[n,g] + offset[n,g].
// A 32-byte load covers k0..k0+63: (v & 15) = k0..15 | k32..47, (v >> 4 & 15) = k16..31 | k48..63.
// x blocks are the weight groups (B = G), so for G >= 64 the int16 pair sums of a whole group
// add up in registers (|sum| <= G/32 * 2 * 15 * 127 <= 30480 for G <= 256: no saturation) and
// are widened and scaled once per group. For G = 32 the two 128-bit lanes of each 64-run are
// different groups, scaled per run with a [d_g x4 | d_g+1 x4] vector.
template <int MB, int NB, bool OFFS, bool G32>
inline void tile_q4(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q, const float* sc,
                    const float* of, int64_t G, float* out, int64_t ldo) {
  const int64_t ng = K / G, ldq = K / 2;
  const __m256i m0f = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  if (G32) {
    for (int64_t k = 0; k < K; k += 64) {
      const int64_t g = k / 32;
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(q + j * ldq + k / 2) + kPrefetch, _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j * ldq + k / 2));
        const __m256i lo = _mm256_and_si256(v, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
        const __m256 sv = _mm256_set_m128(_mm_set1_ps(sc[j * ng + g + 1]), _mm_set1_ps(sc[j * ng + g]));
        for (int i = 0; i < MB; ++i) {
          const int8_t* xr = xq + i * K + k;
          __m256i p = _mm256_add_epi16(
              _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))),
              _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32))));
          const __m256 dv = _mm256_set_m128(_mm_set1_ps(dx[i * ng + g + 1]), _mm_set1_ps(dx[i * ng + g]));
          acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_mul_ps(sv, dv),
                                      acc[i][j]);
        }
      }
    }
  } else {
    for (int64_t g = 0; g < ng; ++g) {
      __m256i a16[MB][NB];
      for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j) a16[i][j] = _mm256_setzero_si256();
      for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
        for (int j = 0; j < NB; ++j) {
          _mm_prefetch(reinterpret_cast<const char*>(q + j * ldq + k / 2) + kPrefetch, _MM_HINT_T0);
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j * ldq + k / 2));
          const __m256i lo = _mm256_and_si256(v, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
          for (int i = 0; i < MB; ++i) {
            const int8_t* xr = xq + i * K + k;
            a16[i][j] = _mm256_add_epi16(
                a16[i][j],
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))),
                    _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32)))));
          }
        }
      }
      for (int j = 0; j < NB; ++j)
        for (int i = 0; i < MB; ++i)
          acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a16[i][j], ones)),
                                      _mm256_set1_ps(sc[j * ng + g] * dx[i * ng + g]), acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j)
      out[i * ldo + j] = codeshell::hsum8(acc[i][j]) + affine_const<OFFS>(sc + j * ng, OFFS ? of + j * ng : nullptr,
                                                                xs + i * ng, ng);
}

// Rows of x in tiles of MB (the last tile smaller), NB weight rows at a time.
template <int NB, bool OFFS, bool G32>
inline void rows_q4(const int8_t* xq, const float* dx, const float* xs, int64_t M, int64_t K, const uint8_t* q,
                    const float* sc, const float* of, int64_t G, float* out, int64_t ldo) {
  const int64_t ng = K / G;
  for_x_tiles(M, [&](auto mb, int64_t m) {
    tile_q4<decltype(mb)::value, NB, OFFS, G32>(xq + m * K, K, dx + m * ng, xs + m * ng, q, sc, of, G,
                                                out + m * ldo, ldo);
  });
}

template <int NB, bool OFFS, bool G32>
void range_q4(const int8_t* xq, const float* dx, const float* xs, int64_t M, int64_t K, const uint8_t* q,
              const float* sc, const float* of, int64_t G, float* out, int64_t N, int64_t n0, int64_t n1) {
  const int64_t ng = K / G, ldq = K / 2;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB)
    rows_q4<NB, OFFS, G32>(xq, dx, xs, M, K, q + n * ldq, sc + n * ng, OFFS ? of + n * ng : nullptr, G, out + n, N);
  for (; n < n1; ++n)
    rows_q4<1, OFFS, G32>(xq, dx, xs, M, K, q + n * ldq, sc + n * ng, OFFS ? of + n * ng : nullptr, G, out + n, N);
}

template <bool OFFS, bool G32>
void run_q4(const int8_t* xq, const float* dx, const float* xs, int64_t M, int64_t K, const uint8_t* q,
            const float* sc, const float* of, int64_t G, float* out, int64_t N, int64_t n0, int64_t n1) {
  // One weight row at a time, for every M (measured, c_fc 16384x4096, 2 threads): at M = 1
  // 1.9 ms (20 GB/s, the read bandwidth) vs 2.4 ms for 4 rows per tile (4 read streams);
  // at M = 2..16 tiles of 4 x rows by 1 weight row beat 2 weight rows (M = 8: 6.7 vs 8.3 ms).
  range_q4<1, OFFS, G32>(xq, dx, xs, M, K, q, sc, of, G, out, N, n0, n1);
}

void add_bias(const float* bias, float* out, int64_t M, int64_t N, int64_t n0, int64_t n1) {
  if (!bias) return;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = n0; j < n1; ++j) out[m * N + j] += bias[j];
}

const float* bias_ptr(const c10::optional<torch::Tensor>& b, int64_t N) {
  if (!b.has_value()) return nullptr;
  TORCH_CHECK(b->scalar_type() == torch::kFloat32 && b->is_contiguous() && b->numel() == N,
              "bias must be a contiguous fp32 tensor with ", N, " elements");
  return b->data_ptr<float>();
}

// ---- int8 ---------------------------------------------------------------------------
// W = q[n, k] * scale[n]. vpmaddubsw wants one unsigned operand: |q| times x with q's sign
// (vpsignb), |pair sums| <= 2 * 127 * 127 = 32258, widened to int32 at once (two would overflow).
template <int MB, int NB>
inline void tile_q8(const int8_t* xq, int64_t K, const float* dx, const int8_t* w, int64_t B, float* out,
                    int64_t ldo) {
  const int64_t nb = K / B;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i a32[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) a32[i][j] = _mm256_setzero_si256();
    for (int64_t k = b * B; k < (b + 1) * B; k += 32) {
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k) + kPrefetch, _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + k));
        const __m256i av = _mm256_sign_epi8(v, v);
        for (int i = 0; i < MB; ++i) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + k));
          a32[i][j] = _mm256_add_epi32(
              a32[i][j], _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(xv, v)), ones));
        }
      }
    }
    for (int i = 0; i < MB; ++i) {
      const __m256 d = _mm256_set1_ps(dx[i * nb + b]);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a32[i][j]), d, acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out[i * ldo + j] = codeshell::hsum8(acc[i][j]);
}

template <int NB>
void range_q8(const int8_t* xq, const float* dx, int64_t M, int64_t K, int64_t B, const int8_t* w, float* out,
              int64_t N, int64_t n0, int64_t n1) {
  const int64_t nb = K / B;
  auto rows = [&](auto nb_tag, int64_t n) {
    constexpr int R = decltype(nb_tag)::value;
    for_x_tiles(M, [&](auto mb, int64_t m) {
      tile_q8<decltype(mb)::value, R>(xq + m * K, K, dx + m * nb, w + n * K, B, out + m * N + n, N);
    });
  };
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) rows(std::integral_constant<int, NB>{}, n);
  for (; n < n1; ++n) rows(std::integral_constant<int, 1>{}, n);
}

}  // namespace

// ---- AVX512-VNNI (512-bit vpdpbusd): the same integer dots, 4 bytes per int32 lane ------------
// vpdpbusd multiplies 64 unsigned x signed byte pairs and adds each 4 into an int32 lane: no
// int16 stage (so no saturation bound), one instruction where AVX2 needs maddubs + madd + add.
// Needs K % 128 == 0 (ops.plan checks): a 64-byte int4 load covers 128 weights.
#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

// affine_const for the 512-bit kernels: 16 groups per step, the last step masked (the 1536-wide
// mid shape has 12 groups of 128: one step instead of an 8-wide step, its sum and 4 scalar
// terms, ~3x fewer instructions per output; at M = 8 int4 this ran once per 24 vpdpbusd).
// Not inlined, for the reason affine_const is not.
template <bool OFFS>
__attribute__((noinline)) float affine_const_v(const float* sc, const float* of, const float* xs, int64_t ng) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 m8 = _mm512_set1_ps(-8.f);
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 k = ng - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ng - g)) - 1);
    __m512 c = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sc + g), m8);
    if (OFFS) c = _mm512_add_ps(c, _mm512_maskz_loadu_ps(k, of + g));
    acc = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(k, xs + g), acc);  // masked lanes add 0
  }
  return _mm512_reduce_add_ps(acc);
}

// sd[g] = sc[g] * dx[g] for g < ng, 16 at a time (the last step masked): the same fp32 products
// as the scalar sc[g] * dx[g] the kernels use when the table does not fit.
inline void scale_products(const float* sc, const float* dx, int64_t ng, float* sd) {
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 k = ng - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ng - g)) - 1);
    _mm512_mask_storeu_ps(sd + g, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sc + g), _mm512_maskz_loadu_ps(k, dx + g)));
  }
}

// int4 without AMX (`avx512_vnni:q8`; main's per-lane epilogue, its own bits: with AMX these
// rows run tile_v / q8_panel.h / the AMX tiles on the shared epilogue).
// x permuted in runs of 128 (quantize_x perm = 128). G >= 128: int32 sums of a whole group
// stay in registers and are scaled once; G = 32 / 64: each 128-run holds 4 / 2 groups, lane L of
// the int32 sums belongs to run L / 4, scaled per run by a lane vector (gidx maps lane -> group).
// The integer dots of group g (G >= 128 k) of one int4 weight row (q: its packed bytes) with MB
// rows of x, 128 k a step: a[i][0] += lo nibbles . x, a[i][CH - 1] += hi nibbles . x (at CH = 1
// one chain takes both, lo first). tile_q4v's and tile_q4v12's shared inner loop.
template <int MB, int CH>
inline void group_dots(const int8_t* xq, int64_t K, const uint8_t* q, int64_t g, int64_t G, __m512i m0f,
                       __m512i (&a)[MB][CH], const Pf& pf = Pf()) {
  for (int i = 0; i < MB; ++i)
    for (int h = 0; h < CH; ++h) a[i][h] = _mm512_setzero_si512();
  for (int64_t k = g * G; k < (g + 1) * G; k += 128) {
    if (pf.d) pf_line(q + k / 2, pf);
    const __m512i v = _mm512_loadu_si512(q + k / 2);
    const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
    for (int i = 0; i < MB; ++i) {
      const int8_t* xr = xq + i * K + k;
      a[i][0] = _mm512_dpbusd_epi32(a[i][0], lo, _mm512_loadu_si512(xr));
      a[i][CH - 1] = _mm512_dpbusd_epi32(a[i][CH - 1], hi, _mm512_loadu_si512(xr + 64));
    }
  }
}

template <int MB, bool OFFS>
inline void tile_q4v(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                     const float* sc, const float* of, int64_t G, __m512i gidx, float* out, int64_t ldo,
                     const Pf& pf = Pf()) {
  const int64_t ng = K / G;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  if (G >= 128) {
    // sd[i][g] = scale_g * d_ig, a vector product per row up front (ng <= 256 here), so the
    // group epilogue is cvt + one fmadd with a broadcast operand from memory.
    alignas(64) float sd[MB][128];
    const bool tab = ng <= 128;
    if (tab)
      for (int i = 0; i < MB; ++i) scale_products(sc, dx + i * ng, ng, sd[i]);
    // Two chains (lo, hi nibbles) per row at MB <= 2; at MB >= 3 the rows are enough chains.
    constexpr int CH = MB <= 2 ? 2 : 1;
    for (int64_t g = 0; g < ng; ++g) {
      __m512i a[MB][CH];
      group_dots<MB, CH>(xq, K, q, g, G, m0f, a, pf);
      for (int i = 0; i < MB; ++i) {
        __m512i s32 = a[i][0];
        if constexpr (CH == 2) s32 = _mm512_add_epi32(s32, a[i][1]);
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), _mm512_set1_ps(tab ? sd[i][g] : sc[g] * dx[i * ng + g]),
                                 acc[i]);
      }
    }
  } else {
    const __mmask8 gm = __mmask8((1u << (128 / G)) - 1);  // groups per 128-run
    for (int64_t k = 0; k < K; k += 128) {
      const int64_t g = k / G;
      _mm_prefetch(reinterpret_cast<const char*>(q + k / 2) + kPrefetch, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(q + k / 2);
      const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
      const __m128 sw = _mm_maskz_loadu_ps(gm, sc + g);
      for (int i = 0; i < MB; ++i) {
        const int8_t* xr = xq + i * K + k;
        const __m512i a = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xr)), hi, _mm512_loadu_si512(xr + 64));
        const __m128 sd = _mm_mul_ps(sw, _mm_maskz_loadu_ps(gm, dx + i * ng + g));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_permutexvar_ps(gidx, _mm512_castps128_ps512(sd)), acc[i]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    out[i * ldo] = _mm512_reduce_add_ps(acc[i]) + affine_const_v<OFFS>(sc, OFFS ? of : nullptr, xs + i * ng, ng);
}

// M > 8 (kBlockMinM), G >= 128: register tiles of MB rows of x by NR weight rows, so each x
// load feeds NR vpdpbusd and each unpacked weight load MB. Why: with one weight row per tile
// (tile_q4v) every weight row re-reads all M rows of x from L2 (M x K bytes: 96 KiB at M = 64,
// K = 1536), which made M = 17..64 2-3x slower than the AMX prefill it replaced.
// Row invariance: per (row of x, weight row) the same arithmetic as tile_q4v: exact int32 group
// sums (integer adds: any order gives the same lanes; lane L holds the same k in both), then
// acc = fma(cvt(sum), scale_g * d_g, acc) per group in k order, reduce_add, + affine_const.
template <int MB, int NR, bool OFFS>
inline void tile_q4v_blk(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                         const float* sc, const float* of, int64_t G, float* out, int64_t ldo) {
  const int64_t ng = K / G, ldq = K / 2;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  // sd[i][j][g] = scale_jg * d_ig (the same fp32 product as tile_q4v's), 16 at a time up front:
  // the group epilogue is then cvt + fmadd with a broadcast memory operand.
  constexpr int64_t kMaxG = 64;  // K <= 8192 at G = 128; longer rows take the product per group
  alignas(64) float sd[MB][NR][kMaxG];
  const bool tab = ng <= kMaxG;
  if (tab)
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NR; ++j) scale_products(sc + j * ng, dx + i * ng, ng, sd[i][j]);
  __m512 acc[MB][NR];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512i a[MB][NR];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NR; ++j) a[i][j] = _mm512_setzero_si512();
    for (int64_t k = g * G; k < (g + 1) * G; k += 128) {
      __m512i lo[NR], hi[NR];
      for (int j = 0; j < NR; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(q + j * ldq + k / 2) + kPrefetch, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(q + j * ldq + k / 2);
        lo[j] = _mm512_and_si512(v, m0f);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
      }
      for (int i = 0; i < MB; ++i) {
        const __m512i x0 = _mm512_loadu_si512(xq + i * K + k), x1 = _mm512_loadu_si512(xq + i * K + k + 64);
        for (int j = 0; j < NR; ++j) a[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[i][j], lo[j], x0), hi[j], x1);
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[i][j]),
                                    _mm512_set1_ps(tab ? sd[i][j][g] : sc[j * ng + g] * dx[i * ng + g]), acc[i][j]);
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NR; ++j)
      out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]) +
                         affine_const_v<OFFS>(sc + j * ng, OFFS ? of + j * ng : nullptr, xs + i * ng, ng);
}

// Rows of x in tiles of 4 (then the 1-3 left), for NR weight rows at q.
template <int NR, bool OFFS>
inline void rows_q4v_blk(const int8_t* xq, const float* dx, const float* xs, int64_t M, int64_t K, const uint8_t* q,
                         const float* sc, const float* of, int64_t G, float* out, int64_t N) {
  const int64_t ng = K / G;
  for_x_tiles(M, [&](auto mb, int64_t m) {
    tile_q4v_blk<decltype(mb)::value, NR, OFFS>(xq + m * K, K, dx + m * ng, xs + m * ng, q, sc, of, G, out + m * N, N);
  });
}

// for_x_tiles with tiles of up to 8 rows (32 zmm registers hold 8 rows' accumulators): the
// weight row is loaded and unpacked once per 8 rows of x instead of once per 4.
template <class F>
inline void for_x_tiles8(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) f(std::integral_constant<int, 8>{}, m);
  switch (M - m) {
    case 7: f(std::integral_constant<int, 7>{}, m); break;
    case 6: f(std::integral_constant<int, 6>{}, m); break;
    case 5: f(std::integral_constant<int, 5>{}, m); break;
    default: for_x_tiles(M - m, [&](auto mb, int64_t r) { f(mb, m + r); });
  }
}

// tile_q4v for M = 1-2 rows of x and groups of 128 / 256: the same arithmetic (its bits: the
// group sums in two chains, acc = fma(float(sum), scale_g * d_g, acc) per group in order,
// reduce_add, + affine_const_v), with scale_g * d_g taken as a scalar product per group instead
// of from the table tile_q4v writes first (the same fp32 product either way).
// Why: tile_q4v ran ~70 cycles a row for ~60 instructions at K = 256 (codeshell-mini; its int4
// decode was slower than bf16), the rows one after another; tile_q4v12 runs the same shapes in
// about half the time (docs/kernels.md, session 14). The likely cause (inferred, not profiled):
// the table is written with a masked 512-bit store and read back at once with 4-byte loads, which
// a masked store does not forward to, so each row waited for the store to retire.
template <int MB, bool OFFS>
inline void tile_q4v12(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                       const float* sc, const float* of, int64_t G, float* out, int64_t ldo, const Pf& pf = Pf()) {
  const int64_t ng = K / G;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512i a[MB][2];
    group_dots<MB, 2>(xq, K, q, g, G, m0f, a, pf);
    for (int i = 0; i < MB; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a[i][0], a[i][1])),
                               _mm512_set1_ps(sc[g] * dx[i * ng + g]), acc[i]);
  }
  for (int i = 0; i < MB; ++i)
    out[i * ldo] = _mm512_reduce_add_ps(acc[i]) + affine_const_v<OFFS>(sc, OFFS ? of : nullptr, xs + i * ng, ng);
}

// int4 M = 1 without AMX, groups of 128 / 256, up to kQ4v12MaxGroups groups a row (K <= 2048 at
// G = 128: the small shape's linears; since session 19 up to kQ4M1R16Groups, below): 16 weight rows a tile (q4_m1.h, tile_q4v's bits) instead
// of tile_q4v12. Cold, 1 / 2 threads, the small shape's 32 linears and int8 head (bench_m1_threads,
// docs/kernels.md session 18 helper A): 1.08-1.22x / 1.04-1.13x. Not past 16 groups: at K = 4096
// (the 7B width's c_attn, attn.c_proj, c_fc) tile_q4v with kM1Prefetch read faster (c_fc 37.5
// against 34.3 GB/s on 1 thread, 69.2 against 60.7 on 2; warm the 16-row tile was 1.5x faster, so
// the loss is in how it streams, not found); K = 16384 was mixed (0.94x on 1 thread, 1.06x on 2).
// CODESHELL_Q4_M1_R16=0: tile_q4v12 (A/B timing; read per call).
inline bool q4_m1_r16() { return env_flag("CODESHELL_Q4_M1_R16", true); }

// tile_q4v at M = 1 for groups of 128 / 256 with the row's scale products and its affine constant
// taken per block of 16 groups beside that block's dots, so the row's scales and offsets are read
// in step with its nibbles (the K = 4096 / 16384 rows of the 7B width, past kQ4v12MaxGroups).
// The same bits as tile_q4v: per group the exact int32 sum (integer adds in any order), then
// acc = fma(float(sum), sc_g * dx_g, acc) in group order (the product a vector mul of 16 groups,
// as scale_products), reduce_add(acc); plus affine_const_v's sum, whose steps of 16 groups run
// here in its order with its operations (c = sc * -8 (+ of), aff = fma(c, xs, aff), masked the
// same way past ng, then reduce_add): sc * -8 is exact, so fma(sc, -8, of) (the contraction GCC
// applies to affine_const_v) and mul + add give the same c. tests/kernels/test_q4_m1_fused.py.
// Why try it: tile_q4v reads a row's offsets in affine_const_v after the row's last group (2 lines
// at K = 4096, 8 at K = 16384: a burst of the offset stream per row) and its scale table before the
// first. A standalone copy of the loops, cold (the four 7B shapes, 3 layers, 283 MB; 1 thread: a
// per-core streaming test; docs/kernels.md, session 17 helper B): 35.1 against 32.7 GB/s (probe
// 41), mlp.c_proj (K = 16384) 34.6 against 28.9; tile_q4v without reading the offsets at all ran
// 35.1. In the extension it did not win (q4_m1_fused below), so it is off by default.
template <bool OFFS>
inline void tile_q4f(const int8_t* xq, int64_t K, const float* dx, const float* xs, const uint8_t* q,
                     const float* sc, const float* of, int64_t G, float* out) {
  const int64_t ng = K / G;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512 m8 = _mm512_set1_ps(-8.f);
  __m512 acc = _mm512_setzero_ps(), aff = _mm512_setzero_ps();
  alignas(64) float sd[16];  // sc_g * dx_g of the block's groups (one full store, then 4-byte loads)
  // The int32 sum of one run of 128 k (64 bytes of nibbles) against x; a group of 256 adds two.
  auto run = [&](int64_t r) {
    const uint8_t* p = q + r * 64;
    // a volatile asm, so GCC keeps one prefetch beside each run (with _mm_prefetch it hoisted the 16
    // of a block to its start)
    __asm__ __volatile__("prefetcht0 %0" : : "m"(*(reinterpret_cast<const char*>(p) + kPrefetch)));
    const __m512i v = _mm512_loadu_si512(p);
    const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
    const int8_t* xr = xq + r * 128;
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xr)), hi,
                               _mm512_loadu_si512(xr + 64));
  };
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 k = ng - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ng - g)) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(k, sc + g);
    _mm512_store_ps(sd, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, dx + g)));
    // Read back from memory (a broadcast load a group): without this GCC kept sd in a register and
    // took each lane by vpbroadcastd + vpermd (the form session 14 measured slower); the sweep A/B
    // put both forms below tile_q4v at K = 4096 (docs/kernels.md, session 17 helper B).
    __asm__ __volatile__("" ::: "memory");
    __m512 c = _mm512_mul_ps(s, m8);
    if (OFFS) c = _mm512_add_ps(c, _mm512_maskz_loadu_ps(k, of + g));
    aff = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(k, xs + g), aff);  // masked lanes add 0, as there
    if (k == 0xffff && G == 128) {
#pragma GCC unroll 16
      for (int u = 0; u < 16; ++u)
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(run(g + u)), _mm512_set1_ps(sd[u]), acc);
    } else {
      const int64_t rpg = G / 128;
      for (int64_t u = 0; u < std::min<int64_t>(16, ng - g); ++u) {
        __m512i t = run((g + u) * rpg);
        for (int64_t r = 1; r < rpg; ++r) t = _mm512_add_epi32(t, run((g + u) * rpg + r));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(sd[u]), acc);
      }
    }
  }
  out[0] = _mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(aff);
}

// Switches read per call (A/B timing and tests), both off by default: in the model's linears (the
// extension, bench_kernels --sweep, slow minutes of the host, probe 44-52 GB/s) tile_q4f ran 0.93-0.95x
// tile_q4v (K = 4096 12% slower, K = 16384 +1%) and parallel_owned 0.97-0.98x parallel_chunks,
// although the standalone copy ran both faster (docs/kernels.md, session 17 helper B).
// int4 M = 1 without AMX past kQ4v12MaxGroups: tile_q4f with CODESHELL_Q4_M1_FUSED=1, else tile_q4v
// (the same bits).
inline bool q4_m1_fused() { return env_flag("CODESHELL_Q4_M1_FUSED", false); }
// int4 M = 1 without AMX: rows split by parallel_owned (one contiguous share a thread) where the
// weight is under kQ4SplitMaxBytes, else parallel_chunks (the same bits). CODESHELL_Q4_M1_SPLIT=1 /
// =0: parallel_owned at every size / never (read per call).
// Why by size: a sub-MiB linear (the small shape's c_attn / attn.c_proj) restarts each thread's
// stream cold at every one of parallel_chunks' ~8 chunks a thread, and barely gained from the
// second thread (small_attn int4, 1536 x 1024: 31.2 GB/s at 2 threads against 28.6 at 1); one
// share a thread measured 1.23x there, the small shape's 32 linears + head 1.12x (1.17-1.18x in the
// fast rounds, probe 72-79 GB/s), docs/kernels.md session 18 helper A. At the 7B width (8-32 MiB
// a linear) session 17 measured it 0.97-0.99x, so those keep parallel_chunks.
constexpr int64_t kQ4SplitMaxBytes = 4 << 20;
inline bool q4_m1_split(int64_t bytes) {
  return env_flag("CODESHELL_Q4_M1_SPLIT", bytes < kQ4SplitMaxBytes);
}

// Groups a row up to which tile_q4v12 runs M = 1-2: at K = 4096 (32 groups of 128) tile_q4v
// measured faster (1024x4096, warm, 2 threads: 33-35 against 39-42 us; 1 thread 55 vs 67), its
// table's wait then shared by 32 groups; at K = 256 and 1024 tile_q4v12 (docs/kernels.md, session 14).
constexpr int64_t kQ4v12MaxGroups = 16;
// The groups a row up to which int4 M = 1 runs the 16-row tile (q4_m1.h): kQ4M1R16Groups = 32 since
// session 19 (K <= 4096 at G = 128: the small shape's mlp.c_proj 1024 x 4096, the 7B width's c_attn,
// attn.c_proj, c_fc), 16 before (CODESHELL_Q4_M1_R16_G=16; read per call; the same bits either way).
// Why now: session 18 found the tile slower cold than tile_q4v at K = 4096 though 1.5x faster warm;
// here it reads faster cold on 1 thread (with kQ4M1ScalePf): c_fc 16384 x 4096 35.9 -> 40.4 GB/s
// (1.11x), 1024 x 4096 31.7 -> 35.5 (1.12x; alone, without the scale prefetch, 1.11x); 2 threads in
// slow minutes 0.99-1.06x. Whole model: small int4 in a fast minute 1.08x (mlp.c_proj 48.5 -> 66.9 GB/s
// in the step), the 1.7B int4 at 1 thread 1.12x. docs/kernels.md session 19 helper C.
constexpr int64_t kQ4M1R16Groups = 32;
inline int64_t q4_m1_r16_groups() { return env_int("CODESHELL_Q4_M1_R16_G", kQ4M1R16Groups); }

template <bool OFFS>
void run_q4v(const int8_t* xq, const float* dx, const float* xs, int64_t M, int64_t K, const uint8_t* q,
             const float* sc, const float* of, int64_t G, float* out, int64_t N, int64_t n0, int64_t n1,
             bool q4v12 = true, bool fused = false, const Pf& pf = Pf(), int64_t r16 = 0) {
  const int64_t ng = K / G, ldq = K / 2;
  if (M == 1 && pf.prime) prime(q + n0 * ldq, std::min<int64_t>(pf.d, (n1 - n0) * ldq));
  if (M == 1 && (G == 128 || G == 256) && ng <= r16) {  // 16-row tiles up to r16 groups, the rest one row at a time
    for (; n0 + 16 <= n1; n0 += 16) {
      const float* o = OFFS ? of + n0 * ng : nullptr;
      if (pf.sc) {  // the scale (offset) rows pf.sc tiles ahead (prefetches past the end do not fault)
        prime(sc + (n0 + 16 * pf.sc) * ng, 16 * ng * int64_t(sizeof(float)));
        if (OFFS) prime(of + (n0 + 16 * pf.sc) * ng, 16 * ng * int64_t(sizeof(float)));
      }
      if (G == 128) codeshell::q4m1::tile16<1, OFFS>(xq, K, dx, xs, q + n0 * ldq, sc + n0 * ng, o, pf.d, out + n0);
      else codeshell::q4m1::tile16<2, OFFS>(xq, K, dx, xs, q + n0 * ldq, sc + n0 * ng, o, pf.d, out + n0);
    }
    if (n0 == n1) return;
  }
  if (M == 1 && (G == 128 || G == 256) && ng > kQ4v12MaxGroups && fused) {
    for (int64_t n = n0; n < n1; ++n)
      tile_q4f<OFFS>(xq, K, dx, xs, q + n * ldq, sc + n * ng, OFFS ? of + n * ng : nullptr, G, out + n);
    return;
  }
  if (M <= 2 && G >= 128 && ng <= kQ4v12MaxGroups && q4v12) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* o = OFFS ? of + n * ng : nullptr;
      if (M == 1) tile_q4v12<1, OFFS>(xq, K, dx, xs, q + n * ldq, sc + n * ng, o, G, out + n, N, pf);
      else tile_q4v12<2, OFFS>(xq, K, dx, xs, q + n * ldq, sc + n * ng, o, G, out + n, N, pf);
    }
    return;
  }
  alignas(64) int32_t lane_group[16];
  for (int L = 0; L < 16; ++L) lane_group[L] = int32_t((L / 4) * 32 / std::min<int64_t>(G, 128));
  const __m512i gidx = _mm512_loadu_si512(lane_group);
  if (M >= kBlockMinM && G >= 128) {
    constexpr int NR = 2;  // 4 x 2 tiles: 8 int32 + 8 fp32 sums + 4 unpacked weight vectors in zmm
    int64_t n = n0;
    for (; n + NR <= n1; n += NR)
      rows_q4v_blk<NR, OFFS>(xq, dx, xs, M, K, q + n * ldq, sc + n * ng, OFFS ? of + n * ng : nullptr, G, out + n, N);
    for (; n < n1; ++n)
      rows_q4v_blk<1, OFFS>(xq, dx, xs, M, K, q + n * ldq, sc + n * ng, OFFS ? of + n * ng : nullptr, G, out + n, N);
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {  // one weight row per tile (as the AVX2 kernel: measured best)
    if (M == 1 && pf.sc) {
      prime(sc + (n + 16 * pf.sc) * ng, ng * int64_t(sizeof(float)));
      if (OFFS) prime(of + (n + 16 * pf.sc) * ng, ng * int64_t(sizeof(float)));
    }
    for_x_tiles8(M, [&](auto mb, int64_t m) {
      tile_q4v<decltype(mb)::value, OFFS>(xq + m * K, K, dx + m * ng, xs + m * ng, q + n * ldq, sc + n * ng,
                                          OFFS ? of + n * ng : nullptr, G, gidx, out + m * N + n, N, pf);
    });
  }
}

// ---- int4 without AMX, M = 5..16, groups of 128 / 256: two weight rows per x load (tile_q4v's bits)
// tile_q4v (above) takes one weight row at a time against up to 8 rows of x, so at M = 8 every
// weight row re-reads 8 x 128 bytes of x per 64 bytes of packed weight (x is 32-128 KiB at the
// 7B shapes: L1 / L2), ~2 loads per vpdpbusd. tile_q4r holds MB (<= 8) rows of x by NR = 2
// weight rows: each x load feeds 2 weight rows, each unpacked weight vector MB rows.
// Row invariance: per (row of x, weight row) exactly tile_q4v's arithmetic, so tile_q4v's bits
// at every M (tests/kernels/test_q8_no_amx.py compares every row of every M with M = 1): per
// group the int32 lane sums over its runs (integers: the same lanes in any order), then
// acc = fma(cvt(sum), sc_g * d_g, acc) per group in k order (the same fp32 product, here a vector
// mul of the rows' d_g by the broadcast sc_g), then reduce_add + affine_const_v.
// Measured (2 threads, the four 7B linears, g128, A/B against run_q4v in one process): M = 8
// 5.6 vs 6.7 ms, M = 16 10.5 vs 12.9; M = 3 / 4 3.5 / 4.0 vs 3.2 / 3.7 (slower: M >= 5 only).
// Groups of 32 (GGUF Q4_0) ran slower this way at M = 3..8 (the scale spread per run and row:
// M = 8 10.3 vs 8.2 ms) and stay on tile_q4v.
template <int MB, int NR, int RUNS, bool OFFS>
inline void tile_q4r(const int8_t* xq, int64_t K, const float* dxT, const float* xs, const uint8_t* q,
                     const float* sc, const float* of, int64_t G, int64_t pf, float* out, int64_t ldo) {
  const int64_t ng = K / G, ldq = K / 2;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512 acc[MB][NR];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  {  // G = 128 * RUNS: one fp32 step per group
    alignas(64) float sdb[NR][16];
    for (int64_t g = 0; g < ng; ++g) {
      __m512i lo[RUNS][NR], hi[RUNS][NR];
      for (int r = 0; r < RUNS; ++r)
        for (int j = 0; j < NR; ++j) {
          const uint8_t* p = q + j * ldq + (g * G + 128 * r) / 2;
          if (pf) _mm_prefetch(reinterpret_cast<const char*>(p) + pf, _MM_HINT_T1);
          else _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
          const __m512i v = _mm512_loadu_si512(p);
          lo[r][j] = _mm512_and_si512(v, m0f);
          hi[r][j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
        }
      const __m512 dg = _mm512_loadu_ps(dxT + g * 16);  // lane i = d of row i of the tile, group g
      for (int j = 0; j < NR; ++j) _mm512_store_ps(sdb[j], _mm512_mul_ps(_mm512_set1_ps(sc[j * ng + g]), dg));
      for (int i = 0; i < MB; ++i) {
        __m512i a[NR];
        for (int j = 0; j < NR; ++j) a[j] = _mm512_setzero_si512();
        for (int r = 0; r < RUNS; ++r) {
          const int8_t* xr = xq + i * K + g * G + 128 * r;
          const __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 64);
          for (int j = 0; j < NR; ++j) a[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[j], lo[r][j], x0), hi[r][j], x1);
        }
        for (int j = 0; j < NR; ++j)
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[j]), _mm512_set1_ps(sdb[j][i]), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NR; ++j)
      out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]) +
                         affine_const_v<OFFS>(sc + j * ng, OFFS ? of + j * ng : nullptr, xs + i * ng, ng);
}

// Rows of x in tiles of up to 8 (M = 9..16: 8, then the rest), NR weight rows at q (the second
// tile reads them again from L2).
template <int NR, int RUNS, bool OFFS>
inline void rows_q4r(const int8_t* xq, const float* dxT, const float* xs, int64_t M, int64_t K, const uint8_t* q,
                     const float* sc, const float* of, int64_t G, int64_t pf, float* out, int64_t N) {
  const int64_t ng = K / G;
  for_x_tiles8(M, [&](auto mb, int64_t m) {
    tile_q4r<decltype(mb)::value, NR, RUNS, OFFS>(xq + m * K, K, dxT + m, xs + m * ng, q, sc, of, G, pf, out + m * N,
                                                  N);
  });
}

// Weight rows [n0, n1) for M = 5..16 rows of x, groups of 128 / 256 (q4r_takes): pairs of weight
// rows, an odd last alone.
template <bool OFFS>
void run_q4r(const int8_t* xq, const float* dx, const float* xs, int64_t M, int64_t K, const uint8_t* q,
             const float* sc, const float* of, int64_t G, float* out, int64_t N, int64_t n0, int64_t n1) {
  const int64_t ng = K / G, ldq = K / 2;
  // dxT[g][i] = d of row i, group g (16 lanes; a tile of rows m.. reads 16 from lane m).
  const codeshell::q4rows::XT xt(dx, M, ng);
  const float* dxT = xt.dxT;
  // Prefetch: 16 weight rows ahead (the same bytes of the 8th next pair; 32 KiB at K = 4096) into
  // L2, as q8_rows.h's next group; CODESHELL_Q4_ROWS_PF overrides the distance in bytes (0: 2 KiB
  // ahead in each row into L1, tile_q4v's, which at K <= 4096 is only the next row or two).
  const int64_t pf = std::max<int64_t>(0, env_int("CODESHELL_Q4_ROWS_PF", 16 * ldq));
  auto go = [&](auto runs) {
    constexpr int RUNS = decltype(runs)::value;
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2)
      rows_q4r<2, RUNS, OFFS>(xq, dxT, xs, M, K, q + n * ldq, sc + n * ng, OFFS ? of + n * ng : nullptr, G, pf,
                              out + n, N);
    if (n < n1)
      rows_q4r<1, RUNS, OFFS>(xq, dxT, xs, M, K, q + n * ldq, sc + n * ng, OFFS ? of + n * ng : nullptr, G, pf,
                              out + n, N);
  };
  if (G == 128) go(std::integral_constant<int, 1>{});
  else go(std::integral_constant<int, 2>{});
}

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

void run_q4v_epi(const int8_t* xq, const float* dx, const int32_t* sx, const float* xs, int64_t M, int64_t K,
             const uint8_t* q, const float* sc, const float* of, int64_t G, float* out, int64_t N, int64_t n0,
             int64_t n1) {
  const int64_t ng = K / G;
  if (of) {
    if (G == 32) run_v<true, true, 4>(xq, dx, sx, xs, M, K, ng, q, sc, of, G, out, N, n0, n1);
    else if (G == 64) run_v<true, true, 2>(xq, dx, sx, xs, M, K, ng, q, sc, of, G, out, N, n0, n1);
    else run_v<true, true, 1>(xq, dx, sx, xs, M, K, ng, q, sc, of, G, out, N, n0, n1);
  } else {
    if (G == 32) run_v<true, false, 4>(xq, dx, sx, xs, M, K, ng, q, sc, nullptr, G, out, N, n0, n1);
    else if (G == 64) run_v<true, false, 2>(xq, dx, sx, xs, M, K, ng, q, sc, nullptr, G, out, N, n0, n1);
    else run_v<true, false, 1>(xq, dx, sx, xs, M, K, ng, q, sc, nullptr, G, out, N, n0, n1);
  }
}

// ---- int8 without AMX, M = 1-2: 16 weight rows per tile, block sums reduced across rows -------
// The bits of q8_epilogue.h (amx:q8's, q8_panel.h's, tile_v's), by another loop order: rows
// [n, n + R) (R <= 16) of the weight are read one after another, each row's K bytes front to
// back (the 16 rows are one contiguous range, so the tile is one sequential stream), a block's
// (128 k) vpdpbusd lane sums of row r stored at lb[i][block][r]; then per block the 16 rows'
// lane vectors are reduced together (q8epi::reduce_lanes<16>: lane r = row r's exact block sum
// S_b) and the epilogue runs on 16 weight rows at once (lane = weight row, as in q8_panel.h):
// acc[i][b % 16] = fma(float(S_b - 128 sx_b), d_b, acc[i][b % 16]) in block order, then tree16_v.
// Why: tile_v reduces each weight row's lane vectors of 16 blocks on its own (15 two-permute
// combines whatever the number of blocks, the missing ones zero-filled), so at K = 256 (2 blocks)
// a row cost ~70 instructions for 4 vpdpbusd: codeshell-mini's int8 linears ran slower than its
// bf16 ones. Here a combine serves 16 (row, block) pairs' sums: one per block and weight row at
// every K. Blocks are taken in spans of 16 / M (lb: 16 KiB), rows within a span.
template <int MB>
inline void tile_r16_q8(const int8_t* xq, int64_t K, int64_t nbx, const float* dx, const int32_t* sx,
                        const uint8_t* w, int64_t R, float* out, int64_t ldo, const Pf& pf = Pf()) {
  namespace E = codeshell::q8epi;
  const int64_t nb = K / 128;
  const __m512i s80 = _mm512_set1_epi8(int8_t(0x80));
  constexpr int64_t SPAN = 16 / MB;          // blocks per span: lb is 16 KiB
  alignas(64) int32_t lb[MB][SPAN][16][16];  // [row of x][block in span][weight row][lane]
  alignas(64) float acc[MB][16][16];       // [row of x][L = block % 16][weight row]
  for (int i = 0; i < MB; ++i)
    for (int L = 0; L < 16; ++L) _mm512_store_ps(acc[i][L], _mm512_setzero_ps());
  if (R < 16)  // rows past R: zero lane sums (reduced with the others, never stored)
    for (int i = 0; i < MB; ++i)
      for (int c = 0; c < SPAN; ++c)
        for (int64_t r = R; r < 16; ++r) _mm512_store_si512(lb[i][c][r], _mm512_setzero_si512());
  for (int64_t b0 = 0; b0 < nb; b0 += SPAN) {
    const int64_t cnt = std::min<int64_t>(SPAN, nb - b0);
    for (int64_t r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * K + b0 * 128;
      const int8_t* xr = xq + b0 * 128;
      for (int64_t c = 0; c < cnt; ++c) {
        const uint8_t* p = wr + c * 128;
        if (pf.d) {
          pf_line(p, pf);
          pf_line(p + 64, pf);
        }
        const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(p), s80);
        const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(p + 64), s80);
        for (int i = 0; i < MB; ++i) {
          const int8_t* xi = xr + i * K + c * 128;
          const __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xi));
          const __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512(xi + 64));
          _mm512_store_si512(lb[i][c][r], _mm512_add_epi32(s0, s1));
        }
      }
    }
    for (int64_t c = 0; c < cnt; ++c) {
      const int64_t b = b0 + c;
      for (int i = 0; i < MB; ++i) {
        const __m512i T = _mm512_sub_epi32(E::reduce_lanes<16>(lb[i][c]), _mm512_set1_epi32(sx[i * nbx + b] << 7));
        float* a = acc[i][b % 16];
        _mm512_store_ps(a, E::epi_step(_mm512_load_ps(a), T, _mm512_set1_ps(dx[i * nbx + b])));
      }
    }
  }
  const __mmask16 km = R >= 16 ? __mmask16(0xffff) : __mmask16((1u << R) - 1);
  for (int i = 0; i < MB; ++i) _mm512_mask_storeu_ps(out + i * ldo, km, E::tree16_v(acc[i][0], 16));
}

// Raw tree16 results of weight rows [n0, n1) for M = 1-2 rows of x (finish_cols applies scale
// and bias), 16 rows per tile (n0 is a multiple of 16: parallel_chunks' alignment).
void run_r16_q8(const int8_t* xq, const float* dx, const int32_t* sx, int64_t M, int64_t K, int64_t nbx,
                const uint8_t* w, float* out, int64_t N, int64_t n0, int64_t n1, const Pf& pf = Pf()) {
  if (pf.prime) prime(w + n0 * K, std::min<int64_t>(pf.d, (n1 - n0) * K));
  for (int64_t n = n0; n < n1; n += 16) {
    const int64_t R = std::min<int64_t>(16, n1 - n);
    if (M == 1) tile_r16_q8<1>(xq, K, nbx, dx, sx, w + n * K, R, out + n, N, pf);
    else tile_r16_q8<2>(xq, K, nbx, dx, sx, w + n * K, R, out + n, N);
  }
}

}  // namespace
CODESHELL_END_AVX512
#endif

namespace {
bool use_vnni(int64_t isa, int64_t K) { return CODESHELL_HAVE_AVX512 && isa >= codeshell::kAvx512Vnni && K % 128 == 0; }

// Rows of x from which `amx:q8` (isa = kAmx, M <= ops.ROW_INVARIANT_MAX_M) runs the AMX-INT8
// tiles (qgemm_amx.cpp) instead of the vpdpbusd kernels: the same bits either way (both end in
// q8_epilogue.h), so this is a speed choice only. Measured per core, cold, 7B and mid shapes
// (docs/kernels.md, "session 12"): the tiles cost about the same whatever M up to 16 (x padded
// to 16 rows), the transposed-panel kernel (q8_panel.h) grows with M from its M = 1 memory
// bound: at M = 9 the panel kernel won on most shapes, at M = 16 the tiles (int8 and int4), so
// the tiles run from 12; int4 groups of 32 / 64 (tile_v, session 11, below) from 8: at 2
// threads on the 4096-wide shapes (the GGUF Q4_0 files' groups of 32) the tiles cost ~9-10 ms
// a step of the four linears at any M <= 12, tile_v 5.3-5.7 at M = 4 and 8.7-9.0 at M = 8
// (a threshold of 4 cost the 4-client server a quarter of its tokens/s).
// CODESHELL_Q8_AMX_MIN_M overrides it (read per call, ~0.1 us against a call's >= 1 us:
// benchmarks time either kernel, tests check both at every M).
int64_t amx_rows_min_m(bool panel) {
  return std::max<int64_t>(1, env_int("CODESHELL_Q8_AMX_MIN_M", panel ? 12 : 8));
}

// The transposed-panel vpdpbusd kernel (q8_panel.h) takes int8 at every M below the AMX rows on
// AMX CPUs (unchanged since session 12) and from 3 rows without AMX (where q8_rows.h takes
// M = 3..rows_max_m first: session 14), and on AMX CPUs int4 with
// groups of 128 / 256 from 3 rows: its transposes cost the same per weight byte at any M, so at
// M = 1-2 int4 (twice the weights per byte of int8) ran 15-25% slower than the per-row kernels
// on Sapphire Rapids (per core, caches flushed, mid and 7B shapes), and tile_v (the shared
// epilogue after a lane reduction: the same bits) runs those rows. On the AMD EPYC without AMX
// (Zen, 1 thread, CPU time, the four 7B linears, 3 alternating rounds, medians) the panel ran
// int8 M = 1 in 12.0 ms against 7.5 for AVX2 and 7.9 for tile_v (M = 2 10.9 vs 8.7), so
// int8 takes tile_v at M = 1-2 there too (the same bits: amx:q8's). Without AMX int4 keeps main's
// per-lane tile_q4v at every M: tile_v / the panel ran int4 g128 M = 1 2x slower there (7.2 vs
// 3.4 ms), faster only from 8 rows (M = 8 11.6 vs 12.7, M = 16 17.5 vs 25.6), and one family
// has to serve every M (row invariance). CODESHELL_Q8_PANEL_MIN_M overrides the 3 (read per call).
bool panel_kernel(int64_t G) { return G % 128 == 0; }
int64_t panel_min_m() {
  return std::max<int64_t>(1, env_int("CODESHELL_Q8_PANEL_MIN_M", 3));
}

// int4 without AMX: rows of x (from 5) up to which run_q4r (two weight rows per x load, tile_q4v's
// bits) takes groups of 128 / 256 instead of run_q4v; CODESHELL_Q4_ROWS_MAX_M overrides the 16
// (0: run_q4v at every M; read per call, for benchmarks and tests).
bool q4r_takes(int64_t M, int64_t G) {
  const int64_t hi = std::min<int64_t>(16, std::max<int64_t>(0, env_int("CODESHELL_Q4_ROWS_MAX_M", 16)));
  return M >= 5 && M <= hi && (G == 128 || G == 256);
}

// int4 without AMX, groups of 128 / 256: rows of x (3..16) that q4_rows.h takes (tile_q4v's bits,
// docs/kernels.md session 17 helper A) before run_q4r / run_q4v. M = 2 stays on tile_q4v12 /
// tile_q4v: q4_rows.h (2 x 8 tiles) ran it 6% slower in the small shape's cold sweep. CODESHELL_Q4_ROWS=0
// turns it off (the earlier kernels; read per call, for A/B and tests); CODESHELL_Q4_ROWS_MIN_M
// overrides the 3 (at least 2).
bool q4rows_takes(int64_t M, int64_t G) {
  if (!env_flag("CODESHELL_Q4_ROWS", true)) return false;
  const int64_t m0 = std::max<int64_t>(1, env_int("CODESHELL_Q4_ROWS_MIN_M", 3));
  return M >= m0 && M <= 16 && (G == 128 || G == 256);
}

// Rows of x up to which int8 without AMX runs q8_rows.h (from panel_min_m: the rows of x in the
// lanes, weight quads broadcast; the same bits as q8_panel.h, which keeps M above).
// CODESHELL_Q8_ROWS_MAX_M overrides the 16 (0: q8_panel.h at every M from panel_min_m; read per
// call, for benchmarks and tests).
int64_t rows_max_m() {
  return std::min<int64_t>(16, std::max<int64_t>(0, env_int("CODESHELL_Q8_ROWS_MAX_M", 16)));
}

bool use_amx_rows(int64_t isa, int64_t K, int64_t M, int64_t G) {
  return use_vnni(isa, K) && isa >= codeshell::kAmx && M >= amx_rows_min_m(panel_kernel(G));
}
}  // namespace

// Block size along K for the activation quantisation of int8 weights: 128 when it divides K.
int64_t q8_block_int8(int64_t K) {
  for (int64_t b : {128, 64, 32})
    if (K % b == 0) return b;
  return 0;
}

namespace {
// x's rounding for one call: xq int8 [M, K], then dx, xs fp32 and sx int32 [M, nb] each, in a
// buffer the calling thread keeps between calls (scratch.h; the team's or OpenMP's threads only
// read it inside the call). Why: three torch::empty a call (xq, the scales, the output) cost
// ~1-2 us each at codeshell-mini's 25 linears a token, where a K = 256 linear's kernel takes a few.
struct RoundedX {
  codeshell::Scratch<char> buf;
  int8_t* xq;
  float *dx, *xs;
  int32_t* sx;
  RoundedX(int64_t M, int64_t K, int64_t nb) : buf(keep(), size_t(M) * ((K + 63) / 64 * 64) + 3 * size_t(M * nb) * 4) {
    xq = reinterpret_cast<int8_t*>(buf.data());
    dx = reinterpret_cast<float*>(buf.data() + M * ((K + 63) / 64 * 64));
    xs = dx + M * nb;
    sx = reinterpret_cast<int32_t*>(xs + M * nb);
  }
  static codeshell::ThreadScratch& keep() {
    static thread_local codeshell::ThreadScratch k;
    return k;
  }
};

// out: a contiguous fp32 tensor of at least M * N values (the `_out` entry points' buffer).
void check_out(const torch::Tensor& out, int64_t M, int64_t N) {
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() >= M * N,
              "out must be a contiguous fp32 tensor with at least ", M * N, " values");
}

void check_int4_q8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                   const c10::optional<torch::Tensor>& offset, int64_t G, int64_t isa) {
  codeshell::check_isa(isa);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous fp32 [M, K] tensor");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8 && q.is_contiguous() && q.size(1) * 2 == K,
              "int4 weight must be a contiguous uint8 [N, K/2] tensor with K=", K);
  TORCH_CHECK(K % 64 == 0 && G % 32 == 0 && G <= 256 && K % G == 0,
              "int8-activation int4 kernel needs K % 64 == 0 and a group size in 32..256 dividing K; got K=", K,
              ", group ", G);
  const int64_t ng = K / G;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N * ng,
              "int4 scales must be a contiguous fp32 [N, K/group] tensor");
  if (offset.has_value())
    TORCH_CHECK(offset->scalar_type() == torch::kFloat32 && offset->is_contiguous() && offset->numel() == N * ng,
                "int4 offsets must be a contiguous fp32 [N, K/group] tensor");
}

// decode_int4_q8's work below the AMX rows (checked by the caller), into op [M, N].
void int4_q8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
             const c10::optional<torch::Tensor>& offset, int64_t G, const c10::optional<torch::Tensor>& bias,
             int64_t isa, float* op) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), ng = K / G;
  const float* b = bias_ptr(bias, N);
  RoundedX r(M, K, ng);
  int8_t* xqp = r.xq;
  float *dx = r.dx, *xs = r.xs;
  int32_t* sx = r.sx;  // the 512-bit kernels' integer block sums of xq
  const bool vnni = use_vnni(isa, K);
  const bool epi = vnni && isa >= codeshell::kAmx;
  quantize_rows(x.data_ptr<float>(), M, K, G, /*perm=*/vnni ? 128 : 64, isa, xqp, dx, xs, sx);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* ofp = offset.has_value() ? offset->data_ptr<float>() : nullptr;
  const bool v12 = q4v12(), fused = M == 1 && q4_m1_fused();
  const Pf pf = M == 1 ? q4_m1_pf() : Pf();
  const int64_t r16 = M == 1 && q4_m1_r16() ? q4_m1_r16_groups() : 0;  // run_q4v's 16-row tile: up to r16 groups
#if CODESHELL_HAVE_AVX512
  // q4_rows.h's x side (dx transposed to [ng][16]), once a call rather than once a chunk
  namespace R = codeshell::q4rows;
  const bool rows4 = vnni && !epi && q4rows_takes(M, G);
  // q4_rows.h's session 19 schedule (the same bits; CODESHELL_Q4_ROWS_V2=0: session 17's, for A/B)
  const bool rows4_v2 = rows4 && env_flag("CODESHELL_Q4_ROWS_V2", true);
  std::optional<R::XT> xt;
  if (rows4) xt.emplace(dx, M, K / G);
#endif
  auto body = [&](int64_t n0, int64_t n1) {
#if CODESHELL_HAVE_AVX512
    if (vnni && epi && panel_kernel(G) && M >= panel_min_m()) {  // the AMX rows' bits (q8_panel.h)
      const codeshell::q8panel::Args A{xqp, dx, sx, xs, M, K, N, qp, sp, ofp, G, b, op};
      if (ofp) codeshell::q8panel::run_panels<true, true>(A, n0, n1);
      else codeshell::q8panel::run_panels<true, false>(A, n0, n1);
      return;
    }
    if (vnni && epi) {  // amx:q8 below the AMX row threshold: the AMX rows' bits
      run_q4v_epi(xqp, dx, sx, xs, M, K, qp, sp, ofp, G, op, N, n0, n1);
      codeshell::q8epi::finish_cols(op, M, N, n0, n1, nullptr, b);
      return;
    }
    if (rows4) {  // M = 3..16, G >= 128: q4_rows.h, tile_q4v's bits
      const int64_t pf = 16 * (K / 2);  // 16 weight rows ahead into L2, as run_q4r
      auto go = [&](auto v2) {
        constexpr bool V2 = decltype(v2)::value;
        if (G == 128) ofp ? R::run_rows<1, true, V2>(xqp, xt->dxT, xs, M, K, qp, sp, ofp, pf, op, N, n0, n1)
                          : R::run_rows<1, false, V2>(xqp, xt->dxT, xs, M, K, qp, sp, nullptr, pf, op, N, n0, n1);
        else ofp ? R::run_rows<2, true, V2>(xqp, xt->dxT, xs, M, K, qp, sp, ofp, pf, op, N, n0, n1)
                 : R::run_rows<2, false, V2>(xqp, xt->dxT, xs, M, K, qp, sp, nullptr, pf, op, N, n0, n1);
      };
      if (rows4_v2) go(std::true_type{});
      else go(std::false_type{});
      add_bias(b, op, M, N, n0, n1);
      return;
    }
    if (vnni && q4r_takes(M, G)) {  // M = 5..16, G >= 128: two weight rows per x load, tile_q4v's bits
      if (ofp) run_q4r<true>(xqp, dx, xs, M, K, qp, sp, ofp, G, op, N, n0, n1);
      else run_q4r<false>(xqp, dx, xs, M, K, qp, sp, nullptr, G, op, N, n0, n1);
      add_bias(b, op, M, N, n0, n1);
      return;
    }
    if (vnni) {
      if (ofp) run_q4v<true>(xqp, dx, xs, M, K, qp, sp, ofp, G, op, N, n0, n1, v12, fused, pf, r16);
      else run_q4v<false>(xqp, dx, xs, M, K, qp, sp, nullptr, G, op, N, n0, n1, v12, fused, pf, r16);
      add_bias(b, op, M, N, n0, n1);
      return;
    }
#endif
    if (G == 32) {
      if (ofp) run_q4<true, true>(xqp, dx, xs, M, K, qp, sp, ofp, G, op, N, n0, n1);
      else run_q4<false, true>(xqp, dx, xs, M, K, qp, sp, nullptr, G, op, N, n0, n1);
    } else {
      if (ofp) run_q4<true, false>(xqp, dx, xs, M, K, qp, sp, ofp, G, op, N, n0, n1);
      else run_q4<false, false>(xqp, dx, xs, M, K, qp, sp, nullptr, G, op, N, n0, n1);
    }
    add_bias(b, op, M, N, n0, n1);
  };
  // M = 1 without AMX, a weight under 4 MiB (or CODESHELL_Q4_M1_SPLIT=1): one contiguous share of the
  // rows a thread (parallel.h parallel_owned; q4_m1_split). The split changes no bits.
  if (M == 1 && vnni && !epi && q4_m1_split(N * K / 2)) codeshell::parallel_owned(N, 16, 64, body);
  else codeshell::parallel_chunks(N, 16, 64, body);
}

void check_int8_q8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale, int64_t isa) {
  codeshell::check_isa(isa);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous fp32 [M, K] tensor");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.size(1) == K,
              "int8 weight must be a contiguous int8 [N, K] tensor with K=", K);
  TORCH_CHECK(q8_block_int8(K) > 0, "int8-activation int8 kernel needs K % 32 == 0, got K=", K);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N,
              "int8 scales must be a contiguous fp32 [N] tensor");
}

// decode_int8_q8's work below the AMX rows (checked by the caller), into op [M, N].
void int8_q8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
             const c10::optional<torch::Tensor>& bias, int64_t isa, float* op) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), B = q8_block_int8(K), nb = K / B;
  const float* b = bias_ptr(bias, N);
  RoundedX r(M, K, nb);
  int8_t* xqp = r.xq;
  float* dx = r.dx;
  int32_t* sx = r.sx;
  quantize_rows(x.data_ptr<float>(), M, K, B, /*perm=*/0, isa, xqp, dx, r.xs, sx);
  const int8_t* wp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const bool vnni = use_vnni(isa, K);  // then B == 128
  // tile_r16_q8 where a row's blocks are one span (K <= 2048 at M = 1, 1024 at M = 2): at K = 4096
  // its two spans measured slower than tile_v (1024x4096, warm: 45 against 38-40 us at 2 threads)
  const bool r16 = M <= 2 && nb <= 16 / M && r16_q8();
  const Pf pf = M == 1 ? q8_m1_pf() : Pf();
#if CODESHELL_HAVE_AVX512
  const bool m1_rows = M == 1 && K > 4096 && m1_rows_q8();  // q8_rows.h at M = 1, K > 4096 only if switched on (m1_rows_q8)
  if (vnni && isa < codeshell::kAmx && ((M >= panel_min_m() && M <= rows_max_m()) || m1_rows)) {  // amx:q8's bits
    codeshell::q8rows::run(xqp, dx, sx, M, K, N, wp, sp, b, op);
    return;
  }
#endif
  auto body = [&](int64_t n0, int64_t n1) {
#if CODESHELL_HAVE_AVX512
    if (vnni && isa < codeshell::kAmx && M < panel_min_m() && r16) {  // no AMX, M = 1-2: the panel's bits
      run_r16_q8(xqp, dx, sx, M, K, nb, reinterpret_cast<const uint8_t*>(wp), op, N, n0, n1, pf);
      codeshell::q8epi::finish_cols(op, M, N, n0, n1, sp, b);
      return;
    }
    if (vnni && isa < codeshell::kAmx && M < panel_min_m()) {  // no AMX, M = 1-2: tile_v, the panel's bits
      run_v<false, false, 1>(xqp, dx, sx, nullptr, M, K, nb, reinterpret_cast<const uint8_t*>(wp), nullptr, nullptr,
                             0, op, N, n0, n1, pf);
      codeshell::q8epi::finish_cols(op, M, N, n0, n1, sp, b);
      return;
    }
    if (vnni) {  // the AMX rows' bits (q8_panel.h): below the AMX rows, or from 3 rows without AMX
      const codeshell::q8panel::Args A{xqp, dx, sx, nullptr, M, K, N, reinterpret_cast<const uint8_t*>(wp), sp,
                                       nullptr, 0, b, op};
      codeshell::q8panel::run_panels<false, false>(A, n0, n1);
      return;
    }
#endif
    {
      // One weight row per tile at every M: measured best (c_fc, M = 4: 5.1 ms vs 5.8 with 2
      // rows, 6.4 with 4; M = 8: 8.8 vs 9.2 / 10.7).
      range_q8<1>(xqp, dx, M, K, B, wp, op, N, n0, n1);
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = n0; j < n1; ++j) op[m * N + j] = op[m * N + j] * sp[j] + (b ? b[j] : 0.f);
  };
  // M = 1 without AMX, CODESHELL_Q8_M1_SPLIT=1: one contiguous share of the rows a thread
  // (parallel.h parallel_owned; read per call, for A/B timing). The split changes no bits.
  if (M == 1 && vnni && isa < codeshell::kAmx && env_flag("CODESHELL_Q8_M1_SPLIT", false))
    codeshell::parallel_owned(N, 16, 64, body);
  else codeshell::parallel_chunks(N, 16, 64, body);
}
}  // namespace

torch::Tensor decode_int4_q8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& offset, int64_t G,
                             const c10::optional<torch::Tensor>& bias, int64_t isa) {
  check_int4_q8(x, q, scale, offset, G, isa);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  if (use_amx_rows(isa, K, M, G)) return prefill_q8_amx(x, q, scale, offset, G, bias);  // M <= 64: the same bits
  auto out = torch::empty({M, N}, x.options());
  int4_q8(x, q, scale, offset, G, bias, isa, out.data_ptr<float>());
  return out;
}

void decode_int4_q8_out(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                        const c10::optional<torch::Tensor>& offset, int64_t G,
                        const c10::optional<torch::Tensor>& bias, int64_t isa, torch::Tensor& out) {
  check_int4_q8(x, q, scale, offset, G, isa);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  check_out(out, M, N);
  if (use_amx_rows(isa, K, M, G)) {
    const auto y = prefill_q8_amx(x, q, scale, offset, G, bias);
    std::memcpy(out.data_ptr<float>(), y.data_ptr<float>(), size_t(M * N) * sizeof(float));
    return;
  }
  int4_q8(x, q, scale, offset, G, bias, isa, out.data_ptr<float>());
}

torch::Tensor decode_int8_q8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& bias, int64_t isa) {
  check_int8_q8(x, q, scale, isa);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  if (use_amx_rows(isa, K, M, 0)) return prefill_q8_amx(x, q, scale, c10::nullopt, 0, bias);  // M <= 64: the same bits
  auto out = torch::empty({M, N}, x.options());
  int8_q8(x, q, scale, bias, isa, out.data_ptr<float>());
  return out;
}

void decode_int8_q8_out(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                        const c10::optional<torch::Tensor>& bias, int64_t isa, torch::Tensor& out) {
  check_int8_q8(x, q, scale, isa);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  check_out(out, M, N);
  if (use_amx_rows(isa, K, M, 0)) {
    const auto y = prefill_q8_amx(x, q, scale, c10::nullopt, 0, bias);
    std::memcpy(out.data_ptr<float>(), y.data_ptr<float>(), size_t(M * N) * sizeof(float));
    return;
  }
  int8_q8(x, q, scale, bias, isa, out.data_ptr<float>());
}
