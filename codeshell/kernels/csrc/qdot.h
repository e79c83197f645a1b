// Shared helpers of the int8-activation decode kernels (qdot.cpp, qdot_int4.cpp, qdot_int8.cpp and
// the headers qdot_q4v.h / qdot_tile_v.h; the map of which kernel runs where is qdot.cpp's opening
// comment): the software-prefetch settings (Pf, kPrefetch, kM1Prefetch), the x-row tilings
// (for_x_tiles / for_x_tiles8), x's rounding buffer (RoundedX) and its declaration of quantize_rows,
// bias and output checks, and the dispatch predicates both families ask (use_vnni, panel_min_m,
// use_amx_rows).
// What this is not: a kernel, or anything one family alone asks (the int4 switches are in
// qdot_int4.cpp, the int8 ones in qdot_int8.cpp). Split out of qdot.cpp in session 20 (no code
// changed; only `inline` added where a definition moved into this header).
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "isa.h"
#include "scratch.h"
#include "switches.h"

int q8_amx_forced(int64_t M);  // entry.h (session 38): the decode step's measured choice for M = 2..16

namespace codeshell {
namespace qdot {

using codeshell::env_flag;
using codeshell::env_int;


// Software prefetch distance (bytes ahead in the weight stream). Cold weights (each layer's
// are read once per token) streamed at 13-14 GB/s without it, 17-19 GB/s with 2 KiB (measured
// 1, 2 and 4 KiB on 7B int4 layers; cache-warm weights reach 20+ either way).
#ifndef CODESHELL_PREFETCH
#define CODESHELL_PREFETCH 2048
#endif
constexpr int64_t kPrefetch = CODESHELL_PREFETCH;

// The M = 1 tiles' software prefetch (int8: tile_r16_q8, tile_v; int4: tile_q4v, tile_q4v12, q4_m1.h):
// kM1Prefetch bytes ahead of the weight stream, T0. Why 8 KiB, not kPrefetch's 2 KiB: measured
// cold on the 2-core Zen 5 EPYC, the same weights on huge pages, same process, alternating
// (benchmarks/bench_m1_threads.py; docs/kernels-log.md session 18 helper A): 1 thread, int8 c_fc
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
inline Pf pf_env(const char* dist, const char* hint, int64_t dflt = kM1Prefetch) {
  Pf p;
  p.d = env_int(dist, dflt);
  p.h = static_cast<int>(env_int(hint, 0));
  p.prime = env_flag("CODESHELL_M1_PRIME", false);
  return p;
}
// The M = 1 epilogue tiles' lane-sum reduction (q4_m1_e.h, q8_m1_e.h: q8_epilogue.h reduce16<U>): the unpack
// tree (default) or vpermt2d's (CODESHELL_M1_UNPACK=0, as before session 41; read per call; the same bits).
// Why: on Zen 4 vpermt2d zmm takes vpdpbusd's issue slot, unpacks issue beside it; warm (L2, 1 thread) the
// small shape's int4 K = 1024 tile 29.5 -> 32.6 GB/s, the int8 head's 54.8 -> 59.6 (docs/kernels-log.md,
// session 41 helper B).
inline bool m1_unpack() { return env_flag("CODESHELL_M1_UNPACK", true); }
// EXPERIMENT: CODESHELL_M1_PRIME=1: at the start of a chunk of rows, prefetch its first pf.d bytes
// (the lines the running prefetch never covers: it starts pf.d ahead).
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

// x's rounding for a call (defined in qdot.cpp beside quantize_x, its scalar form: xq, dx, xs; sx, the
// blocks' integer sums of xq, where not null, from the AVX-512 rounding).
// quantize_x, with the AVX-512 rounding (quant_x.h: the same integers, ~10x faster) where the
// call's ISA level has it; perm 64 (the AVX2 int4 order) stays scalar.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t B, int perm, int64_t isa, int8_t* xq, float* dx,
                   float* xs, int32_t* sx = nullptr);

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

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
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
CODESHELL_END_AVX512
#endif

inline void add_bias(const float* bias, float* out, int64_t M, int64_t N, int64_t n0, int64_t n1) {
  if (!bias) return;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = n0; j < n1; ++j) out[m * N + j] += bias[j];
}

inline const float* bias_ptr(const c10::optional<torch::Tensor>& b, int64_t N) {
  if (!b.has_value()) return nullptr;
  TORCH_CHECK(b->scalar_type() == torch::kFloat32 && b->is_contiguous() && b->numel() == N,
              "bias must be a contiguous fp32 tensor with ", N, " elements");
  return b->data_ptr<float>();
}

inline bool use_vnni(int64_t isa, int64_t K) { return CODESHELL_HAVE_AVX512 && isa >= codeshell::kAvx512Vnni && K % 128 == 0; }

// Rows of x from which `amx:q8` (isa = kAmx, M <= ops.ROW_INVARIANT_MAX_M) runs the AMX-INT8
// tiles (qgemm_amx.cpp) instead of the vpdpbusd kernels: the same bits either way (both end in
// q8_epilogue.h), so this is a speed choice only. Measured per core, cold, 7B and mid shapes
// (docs/kernels-log.md, "session 12"): the tiles cost about the same whatever M up to 16 (x padded
// to 16 rows), the transposed-panel kernel (q8_panel.h) grows with M from its M = 1 memory
// bound: at M = 9 the panel kernel won on most shapes, at M = 16 the tiles (int8 and int4), so
// the tiles run from 12; int4 groups of 32 / 64 (tile_v, session 11, below) from 8: at 2
// threads on the 4096-wide shapes (the GGUF Q4_0 files' groups of 32) the tiles cost ~9-10 ms
// a step of the four linears at any M <= 12, tile_v 5.3-5.7 at M = 4 and 8.7-9.0 at M = 8
// (a threshold of 4 cost the 4-client server a quarter of its tokens/s).
// CODESHELL_Q8_AMX_MIN_M overrides it (read per call, ~0.1 us against a call's >= 1 us:
// benchmarks time either kernel, tests check both at every M).
inline int64_t amx_rows_min_m(bool panel) {
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
inline bool panel_kernel(int64_t G) { return G % 128 == 0; }
inline int64_t panel_min_m() {
  return std::max<int64_t>(1, env_int("CODESHELL_Q8_PANEL_MIN_M", 3));
}

inline bool use_amx_rows(int64_t isa, int64_t K, int64_t M, int64_t G) {
  if (!use_vnni(isa, K) || isa < codeshell::kAmx) return false;
  const int forced = ::q8_amx_forced(M);  // 2 tiles, 3 q8_panel.h, 4 q8_rows.h (entry.h Q8Path), 0: the rule
  if (forced != 0) return forced == 2;
  return M >= amx_rows_min_m(panel_kernel(G));
}

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
inline void check_out(const torch::Tensor& out, int64_t M, int64_t N) {
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() >= M * N,
              "out must be a contiguous fp32 tensor with at least ", M * N, " values");
}

}  // namespace qdot
}  // namespace codeshell
