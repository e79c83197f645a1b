// int4 weights x int8-rounded x (decode_int4_q8 / decode_int4_q8_out): the int4 half of the
// integer-dot decode kernels (qdot.cpp's opening comment maps which kernel runs which M on which CPU).
// Here: the checks and the dispatch (int4_q8: the panel / tile_v on AMX CPUs, q4_rows.h, tile_q4r,
// run_q4v, the AVX2 level's q4_rows_avx2.h and tiles), the int4 switches, the AVX2 tiles (tile_q4 ...), run_q4v (M = 1's 16-row
// tile of q4_m1.h, tile_q4v12, tile_q4f, tile_q4v_blk, tile_q4v: qdot_q4v.h) and tile_q4r / run_q4r.
// What this is not: int8 weights (qdot_int8.cpp), x's rounding (qdot.cpp), the shared helpers
// (qdot.h), tile_v (qdot_tile_v.h), the batched rows' kernel (q4_rows.h) or AMX (qgemm_amx.cpp).
// Split out of qdot.cpp in session 20 (code unchanged).

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
#include "q4_m1_e.h"
#include "q4_m1_g32.h"
#include "q4_rows_avx2.h"
#include "qdot.h"
#include "qdot_q4v.h"
#include "qdot_tile_v.h"
#include "simd.h"
#include "simd512.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

using namespace codeshell::qdot;

namespace {

// A/B switches of the kernels, read per call (csrc/switches.h; the kernels behind them give the same bits).
using codeshell::env_flag;
using codeshell::env_int;
inline bool q4v12() { return env_flag("CODESHELL_Q4V12", true); }
// The AVX2 level (isa avx2; also an AVX-512 CPU capped to it), groups of 64 / 128 / 256: q4_rows_avx2.h's
// tiles (8 weight rows in the lanes, x rounded by its round_x) at every M, instead of tile_q4 on
// quantize_rows' scalar rounding. Other bits than tile_q4 (the same for every M: row invariance), within
// the reference tolerance; docs/kernels-log.md, session 31 helper A. CODESHELL_Q4_AVX2_ROWS=0: tile_q4 as
// before (A/B timing and tests; read per call, so set it for a whole process: every M must take one path).
// AVX-512 levels keep tile_q4 where they send K % 128 != 0 to it (their bits unchanged).
inline bool q4_avx2_rows(int64_t isa, int64_t K, int64_t G) {
  return isa < codeshell::kAvx512Vnni && codeshell::q4avx2::takes(K, G) && env_flag("CODESHELL_Q4_AVX2_ROWS", true);
}
// q4_rows_avx2.h's session-32 tiles (tile2: the 8 weight rows' int16 sums reduced a pair of rows at a time in
// registers; fewer vector ops a (weight row, group), the same bits; docs/kernels-log.md, session 32 helper C).
// CODESHELL_Q4_AVX2_V2=0: its session-31 tiles (A/B timing; read per call through the switch cache, the same
// bits either way).
inline bool q4_avx2_v2() { return env_flag("CODESHELL_Q4_AVX2_V2", true); }
// q4_rows_avx2.h's M = 1 prefetch (its kPfSeq / kPfScales bits; docs/kernels-log.md, session 35 helper C: the
// small shape's cold block linears read below the probe with session 32's same-place prefetch, whose address
// order is tile2's: eight lines 512 bytes apart a group). CODESHELL_Q4_AVX2_M1_PFMODE: 3 (default) the tile
// ahead in ascending order plus its scales, 1 the order only, 2 the scales only, 0 session 32's prefetch
// (A/B timing; read per call through the switch cache; prefetches change no bits).
inline int q4_avx2_m1_pfmode() {
  return int(env_int("CODESHELL_Q4_AVX2_M1_PFMODE", codeshell::q4avx2::kPfSeq | codeshell::q4avx2::kPfScales) & 3);
}
// q4_rows_avx2.h's M > 1 prefetch order (session 35 helper C, part 2: its tiles of 4 rows of x also walk a tile of
// 8 weight rows group by group and prefetched each line at its own place, eight lines ldq bytes apart a group).
// CODESHELL_Q4_AVX2_MN_PFMODE: 1 (default) the tile ahead in ascending order (kPfSeq), 0 the session-31 same-place
// prefetch (A/B timing; read per call through the switch cache; prefetches change no bits).
inline int q4_avx2_mn_pfmode() {
  return env_int("CODESHELL_Q4_AVX2_MN_PFMODE", 1) ? codeshell::q4avx2::kPfSeq : 0;
}
// The longest rows (K) q4_rows_avx2.h's tile2 takes at M = 1 (kTile2MaxK, 4096 since session 35 helper C;
// longer rows keep the session-31 tile). CODESHELL_Q4_AVX2_M1_T2K=1024: session 32's limit (A/B timing; read per
// call through the switch cache; the same bits either way).
inline int64_t q4_avx2_m1_t2k() { return env_int("CODESHELL_Q4_AVX2_M1_T2K", codeshell::q4avx2::kTile2MaxK); }
// int4 M = 1 (run_q4v: the 16-row tile and tile_q4v's rows): prefetch the scale (and offset) rows
// kQ4M1ScalePf tiles of 16 rows ahead, T0. Why: the nibbles sit on huge pages with kM1Prefetch's
// software prefetch, but the fp32 scales / offsets [N, K/G] (quant/linear.py, torch's allocator) are
// two more streams a call (K = 1024, G = 128: 32 + 32 bytes a row against 512 of nibbles) on 4 KiB
// pages, which the hardware prefetcher restarts at every page (every 128 rows at K = 1024): a
// demand miss there stalls the row loop. Measured cold on the 2-core Zen 5 (bench_m1_threads.py,
// 1 thread, same rounds; docs/kernels-log.md session 19 helper C): the small shape's c_fc (4096 x 1024)
// 25-27 -> 32-35 GB/s, c_attn (1536 x 1024) 22-24 -> 30-31 (+27-35%); tile_q4v's K = 4096 / 16384
// rows +-3%. In a loaded model's decode step the same linears read ~37 GB/s a core either way (their
// scales' pages evidently stream better there): within the noise, kept as it costs nothing measurable.
// CODESHELL_Q4_M1_PFS = tiles ahead (0: none, as before session 19; read per call).
constexpr int64_t kQ4M1ScalePf = 1;
inline int64_t q4_m1_pfs() { return env_int("CODESHELL_Q4_M1_PFS", kQ4M1ScalePf); }
// The weight stream's prefetch distance at int4 M = 1: kM1Prefetch (8 KiB T0), none on Zen 4 (session 41 helper B,
// as qdot_int8.cpp's q8_m1_pf_default since session 39): its core streams one sequential read fastest with the
// hardware prefetchers alone. The small shape's int4 K = 1024 tile cold on 1 thread (a standalone, 256 MiB on huge
// pages, the thread's CPU time, quiet): 27.6 GB/s without, 21.0 with 2 KiB, 18.4 with 8 KiB; in the step
// (bench_step_bytes.py /tmp/bq-small/int4 --calls, 2 threads, probe ~37 GB/s, 12 rounds) c_fc's call q25 89.1 ->
// 77.6 us, c_attn 32.5 -> 31.0, the step 4.65 -> 4.31 ms. CODESHELL_Q4_M1_PF=8192: as before (prefetches change no bits).
inline int64_t q4_m1_pf_default() {
  static const int64_t d = codeshell::cpu_features().zen4 ? int64_t(0) : kM1Prefetch;
  return d;
}
inline Pf q4_m1_pf() {
  Pf p = pf_env("CODESHELL_Q4_M1_PF", "CODESHELL_Q4_M1_PFH", q4_m1_pf_default());
  p.sc = q4_m1_pfs();
  return p;
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

}  // namespace

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

// int4 M = 1 without AMX, groups of 128 / 256, up to kQ4v12MaxGroups groups a row (K <= 2048 at
// G = 128: the small shape's linears; since session 19 up to kQ4M1R16Groups, below): 16 weight rows a tile (q4_m1.h, tile_q4v's bits) instead
// of tile_q4v12. Cold, 1 / 2 threads, the small shape's 32 linears and int8 head (bench_m1_threads,
// docs/kernels-log.md session 18 helper A): 1.08-1.22x / 1.04-1.13x. Not past 16 groups: at K = 4096
// (the 7B width's c_attn, attn.c_proj, c_fc) tile_q4v with kM1Prefetch read faster (c_fc 37.5
// against 34.3 GB/s on 1 thread, 69.2 against 60.7 on 2; warm the 16-row tile was 1.5x faster, so
// the loss is in how it streams, not found); K = 16384 was mixed (0.94x on 1 thread, 1.06x on 2).
// CODESHELL_Q4_M1_R16=0: tile_q4v12 (A/B timing; read per call).
inline bool q4_m1_r16() { return env_flag("CODESHELL_Q4_M1_R16", true); }
// int4 M = 1 without AMX, groups of 32 / 64 (a Q4_0 GGUF's layers): 16 weight rows a tile
// (q4_m1_g32.h, tile_q4v's bits) up to kG32MaxGroups groups a row, instead of tile_q4v a row at a
// time. CODESHELL_Q4_M1_G32=off: tile_q4v (A/B timing; read per call).
inline bool q4_m1_g32() { return !codeshell::env_is("CODESHELL_Q4_M1_G32", "off"); }

// Switches read per call (A/B timing and tests), both off by default: in the model's linears (the
// extension, bench_kernels --sweep, slow minutes of the host, probe 44-52 GB/s) tile_q4f ran 0.93-0.95x
// tile_q4v (K = 4096 12% slower, K = 16384 +1%) and parallel_owned 0.97-0.98x parallel_chunks,
// although the standalone copy ran both faster (docs/kernels-log.md, session 17 helper B).
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
// fast rounds, probe 72-79 GB/s), docs/kernels-log.md session 18 helper A. At the 7B width (8-32 MiB
// a linear) session 17 measured it 0.97-0.99x, so those keep parallel_chunks.
constexpr int64_t kQ4SplitMaxBytes = 4 << 20;
inline bool q4_m1_split(int64_t bytes) {
  return env_flag("CODESHELL_Q4_M1_SPLIT", bytes < kQ4SplitMaxBytes);
}

// Groups a row up to which tile_q4v12 runs M = 1-2: at K = 4096 (32 groups of 128) tile_q4v
// measured faster (1024x4096, warm, 2 threads: 33-35 against 39-42 us; 1 thread 55 vs 67), its
// table's wait then shared by 32 groups; at K = 256 and 1024 tile_q4v12 (docs/kernels-log.md, session 14).
constexpr int64_t kQ4v12MaxGroups = 16;
// The groups a row up to which int4 M = 1 runs the 16-row tile (q4_m1.h): kQ4M1R16Groups = 32 since
// session 19 (K <= 4096 at G = 128: the small shape's mlp.c_proj 1024 x 4096, the 7B width's c_attn,
// attn.c_proj, c_fc), 16 before (CODESHELL_Q4_M1_R16_G=16; read per call; the same bits either way).
// Why now: session 18 found the tile slower cold than tile_q4v at K = 4096 though 1.5x faster warm;
// here it reads faster cold on 1 thread (with kQ4M1ScalePf): c_fc 16384 x 4096 35.9 -> 40.4 GB/s
// (1.11x), 1024 x 4096 31.7 -> 35.5 (1.12x; alone, without the scale prefetch, 1.11x); 2 threads in
// slow minutes 0.99-1.06x. Whole model: small int4 in a fast minute 1.08x (mlp.c_proj 48.5 -> 66.9 GB/s
// in the step), the 1.7B int4 at 1 thread 1.12x. docs/kernels-log.md session 19 helper C.
constexpr int64_t kQ4M1R16Groups = 32;
inline bool q4_m1_r16e() { return env_flag("CODESHELL_Q4_M1_R16E", true); }
// tile_r16_q4e's per-group scales / offsets (lane = weight row): a span's block of the 16 rows'
// scales (and offsets) loaded row by row and transposed in registers once a span (simd512.h
// transpose16: 64 shuffles), instead of two vgatherdps zmm per group. Why: on the Ice Lake-class Xeon
// a 16-lane gather costs ~9 ns (~30 cycles, a standalone loop, docs/kernels-log.md session 25 helper C),
// two a group (scales, offsets) per 1 KiB of nibbles; the gathers took a quarter of the tile's time.
// CODESHELL_Q4_M1_SCT=0: the gathers (the same values, the same bits; read per call).
inline bool q4_m1_sct() { return env_flag("CODESHELL_Q4_M1_SCT", true); }
// Groups a row up to which tile_r16_q4e runs (spans of 16; past it tile_v): 16 (K <= 2048 at G = 128).
// CODESHELL_Q4_M1_R16E_G overrides (read per call; the same bits either way).
inline int64_t q4_m1_r16e_groups() { return env_int("CODESHELL_Q4_M1_R16E_G", 16); }
// tile_r16_q4e's rows of 1-16 groups (one span) by q4_m1_e.h (K / G fixed at compile time: one chain a
// group, the scales as columns without a transpose at 2 groups, acc in registers; the same bits).
// CODESHELL_Q4_M1E=0: tile_r16_q4e as before session 28 (read per call).
inline bool q4_m1_e() { return env_flag("CODESHELL_Q4_M1E", true); }
inline int64_t q4_m1_r16_groups() { return env_int("CODESHELL_Q4_M1_R16_G", kQ4M1R16Groups); }

template <bool OFFS>
void run_q4v(const int8_t* xq, const float* dx, const float* xs, int64_t M, int64_t K, const uint8_t* q,
             const float* sc, const float* of, int64_t G, float* out, int64_t N, int64_t n0, int64_t n1,
             bool q4v12 = true, bool fused = false, const Pf& pf = Pf(), int64_t r16 = 0, bool g32 = false) {
  const int64_t ng = K / G, ldq = K / 2;
  if (M == 1 && pf.prime) prime(q + n0 * ldq, std::min<int64_t>(pf.d, (n1 - n0) * ldq));
  if (M == 1 && g32 && (G == 32 || G == 64) && ng <= codeshell::q4m1::kG32MaxGroups) {
    // 16-row tiles (q4_m1_g32.h), the rest one row at a time below
    alignas(64) int32_t lg[16];
    for (int L = 0; L < 16; ++L) lg[L] = int32_t((L / 4) * 32 / G);  // tile_q4v's gidx at G < 128
    const __m512i gi = _mm512_loadu_si512(lg);
    for (; n0 + 16 <= n1; n0 += 16) {
      const float* o = OFFS ? of + n0 * ng : nullptr;
      if (pf.sc) {  // the scale (offset) rows pf.sc tiles ahead, as the G >= 128 tile's
        prime(sc + (n0 + 16 * pf.sc) * ng, 16 * ng * int64_t(sizeof(float)));
        if (OFFS) prime(of + (n0 + 16 * pf.sc) * ng, 16 * ng * int64_t(sizeof(float)));
      }
      codeshell::q4m1::tile16_g<OFFS>(xq, K, dx, xs, q + n0 * ldq, sc + n0 * ng, o, G, gi, pf.d, out + n0);
    }
    if (n0 == n1) return;
  }
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

// ---- int4 M = 1 on the shared epilogue (q4_epi_kind CPUs without AMX): 16 weight rows a tile ----
// tile_v's bits (q8_epilogue.h: exact int32 group sums T_g = S_g - 8 sx_g, then per group
// acc = fma(float(T_g), sc_g * d_g, acc) (+ fma(of_g, xs_g, acc)) in slot g % 16, then tree16), by
// tile_r16_q8's loop order: rows [n, n + R) (R <= 16) one after another, each row's groups of a
// span of 16 front to back (the 16 rows' nibbles are one contiguous range: one stream), a group's
// vpdpbusd lane sums of row r stored at lb[c][r]; then per group the 16 rows' lane vectors are
// reduced together (reduce_lanes<16>: lane r = row r's S_g) and the epilogue runs with lane = weight
// row (the rows' scales / offsets of group g gathered, stride ng). Why: tile_v reduces each row's
// 16 group slots on its own (15 combines whatever the number of groups; at K = 1024, G = 128: 8
// groups, 15 combines a row), which made M = 1 with CODESHELL_Q4_EPI=1 ~40% slower than tile_q4v
// on the small shape's K = 1024 linears on the Ice Lake-class Xeon; here one combine serves a
// (row, group) pair at every K. G = 128 * RUNS (128 / 256). CODESHELL_Q4_M1_R16E=0: tile_v (read per call).
// Rows [0, 16) x columns [g0, g0 + cnt) of a row-major [16, ng] fp32 block (rows past R: zero), as
// columns: t[c][r] = v[r * ng + g0 + c] (cnt <= 16): 16 masked row loads and transpose16.
inline void cols16(const float* v, int64_t ng, int64_t g0, int64_t cnt, int64_t R, float (*t)[16]) {
  const __mmask16 kc = cnt >= 16 ? __mmask16(0xffff) : __mmask16((1u << cnt) - 1);
  __m512i r[16];
  for (int i = 0; i < 16; ++i)
    r[i] = i < R ? _mm512_maskz_loadu_epi32(kc, v + i * ng + g0) : _mm512_setzero_si512();
  codeshell::transpose16(r);
  for (int64_t c = 0; c < cnt; ++c) _mm512_store_si512(t[c], r[c]);
}

// RUNS = G / 128 (1, 2) at compile time: the group loop's address steps are constants (with G a
// runtime value it read the small shape's K = 1024 linears warm at 0.9x; docs/kernels-log.md session 25 helper C).
// U: the lane sums reduced by q8_epilogue.h's reduce_lanes16_unpack (CODESHELL_M1_UNPACK, session 41; the same bits).
template <bool OFFS, int RUNS, int SPAN = 16, bool U = true>  // groups a span (lb: SPAN KiB)
inline void tile_r16_q4e(const int8_t* xq, int64_t K, int64_t ng, const float* dx, const int32_t* sx,
                         const float* xs, const uint8_t* w, int64_t R, const float* sc, const float* of,
                         float* out, const Pf& pf, bool sct = true) {
  namespace E = codeshell::q8epi;
  constexpr int64_t G = 128 * RUNS;
  const int64_t ldq = K / 2;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  alignas(64) int32_t lb[SPAN][16][16];  // [group in span][weight row][lane]: 16 KiB a 16-group span
  alignas(64) float acc[16][16];       // [g % 16][weight row]
  for (int L = 0; L < 16; ++L) _mm512_store_ps(acc[L], _mm512_setzero_ps());
  if (R < 16)  // rows past R: zero lane sums (reduced with the others, never stored)
    for (int c = 0; c < SPAN; ++c)
      for (int64_t r = R; r < 16; ++r) _mm512_store_si512(lb[c][r], _mm512_setzero_si512());
  const __mmask16 km = R >= 16 ? __mmask16(0xffff) : __mmask16((1u << R) - 1);
  const __m512i gi = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(int32_t(ng)));
  alignas(64) float st[SPAN][16], ot[OFFS ? SPAN : 1][16];  // [group in span][weight row] (sct)
  for (int64_t g0 = 0; g0 < ng; g0 += SPAN) {
    const int64_t cnt = std::min<int64_t>(SPAN, ng - g0);
    if (sct) {  // before the span's nibbles: the block's lines are not in the weight stream
      cols16(sc, ng, g0, cnt, R, st);
      if constexpr (OFFS) cols16(of, ng, g0, cnt, R, ot);
    }
    for (int64_t r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * ldq + g0 * G / 2;
      const int8_t* xr = xq + g0 * G;
      for (int64_t c = 0; c < cnt; ++c) {
        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
        for (int u = 0; u < RUNS; ++u) {
          const uint8_t* p = wr + c * (G / 2) + 64 * u;
          if (pf.d) pf_line(p, pf);
          const __m512i q = _mm512_loadu_si512(p);
          const int8_t* xi = xr + c * G + 128 * u;
          s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(q, m0f), _mm512_loadu_si512(xi));
          s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(q, 4), m0f), _mm512_loadu_si512(xi + 64));
        }
        _mm512_store_si512(lb[c][r], _mm512_add_epi32(s0, s1));
      }
    }
    for (int64_t c = 0; c < cnt; ++c) {
      const int64_t g = g0 + c;
      const __m512i T = _mm512_sub_epi32(E::reduce16<U>(lb[c]), _mm512_set1_epi32(sx[g] << 3));
      const __m512 scv = sct ? _mm512_load_ps(st[c]) : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), km, gi, sc + g, 4);
      float* a = acc[g % 16];
      __m512 v = E::epi_step(_mm512_load_ps(a), T, E::int4_mul(scv, _mm512_set1_ps(dx[g])));
      if constexpr (OFFS) {
        const __m512 ofv = sct ? _mm512_load_ps(ot[c]) : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), km, gi, of + g, 4);
        v = E::epi_offsets(v, ofv, _mm512_set1_ps(xs[g]));
      }
      _mm512_store_ps(a, v);
    }
  }
  _mm512_mask_storeu_ps(out, km, E::tree16_v(acc[0], 16));
}

void run_q4v_epi(const int8_t* xq, const float* dx, const int32_t* sx, const float* xs, int64_t M, int64_t K,
             const uint8_t* q, const float* sc, const float* of, int64_t G, float* out, int64_t N, int64_t n0,
             int64_t n1, bool r16e = false) {
  const int64_t ng = K / G;
  // one span of up to 16 groups a row (K <= 2048 at G = 128): at K = 4096 (two spans, or one of 32
  // groups, a 32 KiB lb) it ran the small shape's mlp.c_proj in 1.05 / 0.99 ms against tile_v's 0.81
  // (b1 step profile, 5 rounds, quiet minute), as tile_r16_q8's two spans did for int8
  if (r16e && M == 1 && (G == 128 || G == 256) && ng <= q4_m1_r16e_groups()) {  // raw tree16 results, 16 rows a tile (n0 % 16 == 0)
    const Pf pf = q4_m1_pf();
    const bool sct = q4_m1_sct();
    if (sct && q4_m1_e() &&
        (of ? codeshell::q4m1e::run<true>(xq, dx, sx, xs, K, G, q, sc, of, out, n0, n1, pf, m1_unpack())
            : codeshell::q4m1e::run<false>(xq, dx, sx, xs, K, G, q, sc, nullptr, out, n0, n1, pf, m1_unpack())))
      return;
    auto go = [&](auto u) {
      constexpr bool U = decltype(u)::value;
      for (int64_t n = n0; n < n1; n += 16) {
        const int64_t R = std::min<int64_t>(16, n1 - n);
        const uint8_t* qn = q + n * (K / 2);
        const float* sn = sc + n * ng;
        const float* on = of ? of + n * ng : nullptr;
        if (of && G == 128) tile_r16_q4e<true, 1, 16, U>(xq, K, ng, dx, sx, xs, qn, R, sn, on, out + n, pf, sct);
        else if (of) tile_r16_q4e<true, 2, 16, U>(xq, K, ng, dx, sx, xs, qn, R, sn, on, out + n, pf, sct);
        else if (G == 128) tile_r16_q4e<false, 1, 16, U>(xq, K, ng, dx, sx, xs, qn, R, sn, nullptr, out + n, pf, sct);
        else tile_r16_q4e<false, 2, 16, U>(xq, K, ng, dx, sx, xs, qn, R, sn, nullptr, out + n, pf, sct);
      }
    };
    if (m1_unpack()) go(std::true_type{});
    else go(std::false_type{});
    return;
  }
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

}  // namespace
CODESHELL_END_AVX512
#endif

// int4 without AMX on the shared epilogue's bits (q8_epilogue.h: tile_v at M = 1-2, q8_panel.h from
// panel_min_m, as amx:q8 below its AMX rows) instead of tile_q4v's per-lane bits (qdot_q4v.h, q4_rows.h).
// Why by CPU kind: the per-lane family spends a cvt + fma per (row of x, weight row, group) beside its
// 2 vpdpbusd; on a core with one 512-bit vector port those issue on the same port as vpdpbusd. On the
// Ice Lake-class Xeon (AVX512-VNNI without AVX512-BF16: isa max = avx512_vnni) a register-only loop
// ran vpdpbusd zmm at 1.2 /ns and fma zmm at 0.8-1.4 /ns a core, 2 vpdpbusd + cvt + fma at 0.7
// vpdpbusd/ns (one port), and the small int4 checkpoint's batch-8 step took 2.9x its batch-1 time
// (block linears 4.6x). The epilogue family reduces the lane sums in integers first (one fp32 step
// per 16 outputs), docs/kernels-log.md "Session 23, helper B". Zen 5 (2 vpdpbusd zmm a cycle, AVX512-BF16)
// measured the other way (qdot.h's panel_kernel comment): it keeps tile_q4v's bits. Zen 4 (AMD family 0x19
// with AVX-512: AVX512-BF16, no AMX) issues 512-bit ops as two 256-bit halves (one vpdpbusd zmm a cycle, as
// Ice Lake; benchmarks/standalone/vnni_ports.cpp: a vpdpbusd + fma zmm mix 1.00 a cycle in all): since session 39
// (helper B) it takes the epilogue's family too. codeshell-mini int4 in the decode step (2 threads, loaded host, least
// of rounds): the block linears at batch 8 1.24-1.65x faster, at batch 1 up to 10% slower (q4_m1_e.h); the b8 aggregate
// 1.21-1.32x (docs/kernels-log.md, session 39 helper B).
// CODESHELL_Q4_EPI=1 / =0 forces either family (read per call: A/B runs and tests); every M of one
// process must take one family (row invariance), so set it for a whole process.
bool q4_epi_kind() {
  static const bool kind = [] {
    const codeshell::CpuFeatures& f = codeshell::cpu_features();
    return f.max_isa == codeshell::kAvx512Vnni ||
           (f.zen4 && f.max_isa >= codeshell::kAvx512Vnni && f.max_isa < codeshell::kAmx);
  }();
  return env_flag("CODESHELL_Q4_EPI", kind);
}

namespace {
// int4 without AMX: rows of x (from 5) up to which run_q4r (two weight rows per x load, tile_q4v's
// bits) takes groups of 128 / 256 instead of run_q4v; CODESHELL_Q4_ROWS_MAX_M overrides the 16
// (0: run_q4v at every M; read per call, for benchmarks and tests).
bool q4r_takes(int64_t M, int64_t G) {
  const int64_t hi = std::min<int64_t>(16, std::max<int64_t>(0, env_int("CODESHELL_Q4_ROWS_MAX_M", 16)));
  return M >= 5 && M <= hi && (G == 128 || G == 256);
}

// int4 without AMX on the epilogue's family (q4_epi_kind), groups of 32 / 64 (a GGUF Q4_0's), K % 128 == 0: rows of
// x from which q8_panel.h takes them (its transposed runs of 128 k hold 128 / G blocks; session 41, helper C) instead
// of tile_v, whose lane reduction every 16 blocks (512 k at G = 32) outweighed the 8 vpdpbusd a (row, weight row)
// it feeds: the 1.7B q4_0 model's 16-row step spent 249 ms, its c_fc at ~21% of vpdpbusd's rate. The same bits
// (q8_epilogue.h). CODESHELL_Q4_PANEL_G32_MIN_M (read per call; default 8; 0: tile_v at every M, as before).
bool q4_panel_g32(int64_t isa, int64_t M, int64_t K, int64_t G) {
  if (isa >= codeshell::kAmx || (G != 32 && G != 64) || K % 128 != 0) return false;
  const int64_t m0 = env_int("CODESHELL_Q4_PANEL_G32_MIN_M", 8);
  return m0 > 0 && M >= m0;
}

// int4 without AMX, groups of 128 / 256: rows of x (3..16) that q4_rows.h takes (tile_q4v's bits,
// docs/kernels-log.md session 17 helper A) before run_q4r / run_q4v. M = 2 stays on tile_q4v12 /
// tile_q4v: q4_rows.h (2 x 8 tiles) ran it 6% slower in the small shape's cold sweep. CODESHELL_Q4_ROWS=0
// turns it off (the earlier kernels; read per call, for A/B and tests); CODESHELL_Q4_ROWS_MIN_M
// overrides the 3 (at least 2).
bool q4rows_takes(int64_t M, int64_t G) {
  if (!env_flag("CODESHELL_Q4_ROWS", true)) return false;
  const int64_t m0 = std::max<int64_t>(1, env_int("CODESHELL_Q4_ROWS_MIN_M", 3));
  return M >= m0 && M <= 16 && (G == 128 || G == 256);
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
  const bool epi = vnni && (isa >= codeshell::kAmx || q4_epi_kind());
  // session 37 helper A: M = 1 on AMX CPUs as on the epilogue family's VNNI CPUs (tile_r16_q4e / q4_m1_e.h up
  // to 16 groups a row, tile_v past them; parallel_owned under kQ4SplitMaxBytes) instead of tile_v on
  // parallel_chunks: the same bits (tests/kernels/test_amx_m1.py). CODESHELL_AMX_Q8_M1=0 (read per call, as
  // int8's in qdot_int8.cpp): as before.
  const bool amx_m1 = M == 1 && vnni && isa >= codeshell::kAmx && env_flag("CODESHELL_AMX_Q8_M1", true);
  const bool avx2rows = !vnni && q4_avx2_rows(isa, K, G);
  if (avx2rows) codeshell::q4avx2::round_x(x.data_ptr<float>(), M, K, G, xqp, dx, xs, sx);  // quantize_x's values
  else quantize_rows(x.data_ptr<float>(), M, K, G, /*perm=*/vnni ? 128 : 64, isa, xqp, dx, xs, sx);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* ofp = offset.has_value() ? offset->data_ptr<float>() : nullptr;
  // run_q4v's switches (the per-lane family: read only where it runs, !epi; session 28 helper C: ~8 getenv
  // of ~50 ns each a call on the epilogue family's CPUs, ~25 calls a codeshell-mini token)
  const bool lane = !epi;
  const bool v12 = lane && q4v12(), fused = lane && M == 1 && q4_m1_fused();
  const Pf pf = lane && M == 1 ? q4_m1_pf() : Pf();
  const int64_t pf1 = avx2rows && M == 1 ? env_int("CODESHELL_Q4_M1_PF", kM1Prefetch) : 0;  // q4_rows_avx2.h's M = 1
  const bool v2 = avx2rows && q4_avx2_v2();
  const int pfmode = !avx2rows ? 0 : M == 1 ? q4_avx2_m1_pfmode() : q4_avx2_mn_pfmode();
  const int64_t t2k = avx2rows && M == 1 ? q4_avx2_m1_t2k() : 0;
  const int64_t r16 = lane && M == 1 && q4_m1_r16() ? q4_m1_r16_groups() : 0;  // run_q4v's 16-row tile: up to r16 groups
  const bool g32 = lane && M == 1 && (G == 32 || G == 64) && q4_m1_g32();  // run_q4v's 16-row tile at G < 128
#if CODESHELL_HAVE_AVX512
  // q4_rows.h's x side (dx transposed to [ng][16]), once a call rather than once a chunk
  namespace R = codeshell::q4rows;
  const bool rows4 = vnni && !epi && q4rows_takes(M, G);
  // q4_rows.h's session 19 schedule (the same bits; CODESHELL_Q4_ROWS_V2=0: session 17's, for A/B)
  const bool rows4_v2 = rows4 && env_flag("CODESHELL_Q4_ROWS_V2", true);
  std::optional<R::XT> xt;
  if (rows4) xt.emplace(dx, M, K / G);
  // M = 2..16 on the epilogue's bits (this CPU kind): q8_rows.h's rows-in-lanes scheme, the same
  // bits as q8_panel.h (CODESHELL_Q8R_INT4=0, read per call: q8_panel.h)
  if (vnni && epi && panel_kernel(G) && M <= 16 &&
      (isa < codeshell::kAmx ? M >= std::max<int64_t>(2, panel_min_m()) : q8_amx_vrows(M)) &&
      env_flag("CODESHELL_Q8R_INT4", true)) {
    codeshell::q8rows::run_q4(xqp, dx, sx, xs, M, K, N, G, qp, sp, ofp, b, op);
    return;
  }
#endif
  auto body = [&](int64_t n0, int64_t n1) {
#if CODESHELL_HAVE_AVX512
    if (vnni && epi && ((panel_kernel(G) && M >= panel_min_m()) || q4_panel_g32(isa, M, K, G))) {  // the AMX rows' bits (q8_panel.h)
      const codeshell::q8panel::Args A{xqp, dx, sx, xs, M, K, N, qp, sp, ofp, G, b, op};
      if (ofp) codeshell::q8panel::run_panels<true, true>(A, n0, n1);
      else codeshell::q8panel::run_panels<true, false>(A, n0, n1);
      return;
    }
    if (vnni && epi) {  // amx:q8 below the AMX row threshold: the AMX rows' bits
      // M = 1: tile_r16_q4e on the CPUs that take the epilogue for its speed (q4_epi_kind) and, since
      // session 37, on AMX CPUs (amx_m1 above; before, tile_v)
      run_q4v_epi(xqp, dx, sx, xs, M, K, qp, sp, ofp, G, op, N, n0, n1, (isa < codeshell::kAmx || amx_m1) && q4_m1_r16e());
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
      if (ofp) run_q4v<true>(xqp, dx, xs, M, K, qp, sp, ofp, G, op, N, n0, n1, v12, fused, pf, r16, g32);
      else run_q4v<false>(xqp, dx, xs, M, K, qp, sp, nullptr, G, op, N, n0, n1, v12, fused, pf, r16, g32);
      add_bias(b, op, M, N, n0, n1);
      return;
    }
#endif
    if (avx2rows) {  // the AVX2 level, G = 64 / 128 / 256: q4_rows_avx2.h at every M
      codeshell::q4avx2::run(xqp, dx, xs, sx, M, K, G, qp, sp, ofp, op, N, n0, n1, pf1, kPrefetch, v2, pfmode, t2k);
      add_bias(b, op, M, N, n0, n1);
      return;
    }
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
  // rows a thread (parallel.h parallel_owned; q4_m1_split). The split changes no bits. On the AVX2 level
  // (q4_rows_avx2.h) too since session 34 helper A (the small shape's step 1.05x in one run; CODESHELL_Q4_M1_SPLIT=0:
  // parallel_chunks as before).
  if (M == 1 && ((vnni && (isa < codeshell::kAmx || amx_m1)) || avx2rows) && q4_m1_split(N * K / 2))
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
    rows_q8_amx_out(x, q, scale, offset, G, bias, out);  // session 38: into out, no copy
    return;
  }
  int4_q8(x, q, scale, offset, G, bias, isa, out.data_ptr<float>());
}
