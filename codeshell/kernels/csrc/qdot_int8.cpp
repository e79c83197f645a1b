// int8 weights x int8-rounded x (decode_int8_q8 / decode_int8_q8_out, q8_block_int8): the int8 half
// of the integer-dot decode kernels (qdot.cpp's opening comment maps which kernel runs which M on
// which CPU). Here: the checks and the dispatch (int8_q8: q8_rows.h at M = 3..16 without AMX,
// tile_r16_q8 / tile_v at M = 1-2, q8_panel.h, the AVX2 tiles), the int8 switches, the AVX2 tiles
// (tile_q8, range_q8; at M = 1 q8_m1_avx2.h and at M = 2..64 with K <= 2048 q8_rows_avx2.h, tile_q8's bits;
// q8_lanes_avx2.h, other bits, behind CODESHELL_Q8_AVX2_LANES=1) and tile_r16_q8 /
// run_r16_q8 (M = 1-2, 16 weight rows a tile).
// What this is not: int4 weights (qdot_int4.cpp), x's rounding (qdot.cpp), the shared helpers
// (qdot.h), tile_v (qdot_tile_v.h), the batched rows' kernel (q8_rows.h) or AMX (qgemm_amx.cpp).
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
#include "q8_lanes_avx2.h"
#include "q8_m1_avx2.h"
#include "q8_rows_avx2.h"
#include "q8_m1_e.h"
#include "qdot.h"
#include "qdot_tile_v.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

using namespace codeshell::qdot;

namespace {

// A/B switches of the kernels, read per call (csrc/switches.h; the kernels behind them give the same bits).
using codeshell::env_flag;
using codeshell::env_int;
inline bool r16_q8() { return env_flag("CODESHELL_Q8_R16", true); }
// int8 M = 1 without AMX at K > 4096 (the 7B's mlp.c_proj, K = 16384): q8_rows.h (the same bits)
// instead of tile_v with CODESHELL_Q8_M1_ROWS=1 (read per call). Session 16 made q8_rows.h the
// default there (three 8-round A/Bs in busy minutes: mlp.c_proj 35-41 against tile_v's 27-32 GB/s
// with kPrefetch, 2 KiB ahead). Session 18 (docs/kernels-log.md, helper A): with the M = 1 prefetch at
// kM1Prefetch tile_v reads faster: mlp.c_proj int8 cold, same rounds (probe 38.5 / 44.8), 1 thread
// 33.3 against 24.3 GB/s (1.38x), 2 threads 40.8 against 34.6 (1.18x); the 1.7B model's token
// (bench_decode_phases, probe 44) 1.059x, mlp.c_proj in the step 39.9 against 34.5. So tile_v again.
inline bool m1_rows_q8() { return env_flag("CODESHELL_Q8_M1_ROWS", false); }
// int8 at M = avx2_rows_min_m()..64 on the AVX2 level: q8_rows_avx2.h (x widened to int16 once a call,
// vpmaddwd only: tile_q8's bits with 2 multiply-class instructions a (row of x, 32 weights) instead of
// 3) in place of tile_q8. CODESHELL_Q8_AVX2_ROWS=0: tile_q8 at every M (A/B timing and tests; read per
// call); CODESHELL_Q8_AVX2_ROWS_MIN_M overrides the 2 (the same bits at every M either way).
// Up to K = 2048 only: at K = 4096 (the small shape's mlp.c_proj) it ran 0.87-0.98x tile_q8 at M = 4-16
// (1 thread, standalone copies of both, warm weights), against 1.1-1.3x at K = 256 / 1024. A tile's 4 rows
// of widened x are 4 * K * 2 bytes (32 KiB at K = 4096: all of L1d), but running K in spans of 2048 (the
// accumulators carried between spans) measured the same 0.85-0.87x at M = 8: the cause is not found.
constexpr int64_t kAvx2RowsMaxK = 2048;
inline int64_t avx2_rows_min_m() {
  if (!env_flag("CODESHELL_Q8_AVX2_ROWS", true)) return INT64_MAX;
  return std::max<int64_t>(1, env_int("CODESHELL_Q8_AVX2_ROWS_MIN_M", 2));
}
// The distance's default: kM1Prefetch (8 KiB, tuned on the Zen 5 EPYC), but 2 KiB on a CPU with
// AVX512-VNNI and neither AVX512-BF16 nor AMX (the Ice Lake-class Xeon of sessions 23-29; the read probe
// prefetches 2 KiB ahead too). Session 29 helper C, bench_m1_threads.py --sets small_head:int8 --threads 2
// (70144 x 1024, 72 MB, cold), quiet minutes, paired medians: 2 KiB 1.048x (6 rounds, 92% of the probe
// against 88%) and 1.025x (4 rounds; 1 KiB 1.022x, 4 KiB 1.008x). Prefetches change no bits.
// On Zen 4 (session 39 helper C) none: its core reads one sequential stream fastest with the hardware
// prefetchers alone (a plain read 34.6 GB/s without, 32.1 with 2 KiB T0; 1 thread, 512 MiB, the thread's CPU
// time); the small shape's int8 step linears (bench_m1_threads.py --sets small:int8 --threads 1 --clock thread,
// 5 rounds) 1.165x the 8 KiB default without it (23.4 against 20.2 GB/s), 2 KiB 0.93x, T1 0.96x; the int4
// checkpoint's int8 head the same way 1.136x.
inline int64_t q8_m1_pf_default() {
  static const int64_t d = [] {
    const codeshell::CpuFeatures& f = codeshell::cpu_features();
    if (f.zen4) return int64_t(0);
    return f.avx512vnni && !f.avx512bf16 && !f.amx_int8 ? int64_t(2048) : kM1Prefetch;
  }();
  return d;
}
inline Pf q8_m1_pf() { return pf_env("CODESHELL_Q8_M1_PF", "CODESHELL_Q8_M1_PFH", q8_m1_pf_default()); }
// int8 at M = 1 on the AVX2 level (isa == kAvx2): q8_m1_avx2.h (tile_q8's bits, 8 weight rows a step with the
// horizontal sums and the scale / bias as vectors; docs/kernels-log.md session 33 helper A).
// CODESHELL_Q8_AVX2_M1=0 (read per call through the switch cache): tile_q8 as before (the same bits), for A/B.
inline bool q8_avx2_m1() { return env_flag("CODESHELL_Q8_AVX2_M1", true); }
constexpr int64_t kQ8M1Avx2MaxBytes = int64_t(32) << 20;
// CODESHELL_Q8_AVX2_M1_MAX_MB (MiB, read per call through the switch cache): overrides kQ8M1Avx2MaxBytes (A/B;
// session 34 helper A: with 100 the small head on q8_m1_avx2.h read 2543-2564 us a token against tile_q8's
// 2521, 94-114% of the same round's probe either way: no side, so tile_q8 stays there).
// CODESHELL_Q8_M1_PFH (0 T0, 1 T1, 2 T2, 3 NTA) picks q8_m1_avx2.h's prefetch hint (T0 by default).
inline int64_t q8_avx2_m1_max_bytes() {
  const int64_t mb = env_int("CODESHELL_Q8_AVX2_M1_MAX_MB", -1);
  return mb >= 0 ? mb << 20 : kQ8M1Avx2MaxBytes;
}
// Off by default (session 33 helper A, measured): CODESHELL_Q8_AVX2_LANES=1 (read per call through the switch
// cache; set it for a whole process: it changes the bits, for every M together) runs int8 at every M on the
// AVX2 level (isa == kAvx2; M > 64 too: the prompt's avx2:q8 candidate) on q8_lanes_avx2.h: 8 weight rows in
// the lanes, exact block sums, the bits of the prompt GEMM (avx2:gemm). Its M = 1 ran 1.06-1.56x tile_q8 but
// its M = 8 0.87-0.99x q8_rows_avx2.h / tile_q8 (1 thread): not the default.
inline bool q8_avx2_lanes() { return env_flag("CODESHELL_Q8_AVX2_LANES", false); }
// int8 M = 1 without AMX: parallel_owned (one contiguous share of the rows a thread, the other's
// steps stolen from the back) for a weight of at most kQ8SplitMaxBytes, else parallel_chunks (~8
// chunks a thread); the same bits. CODESHELL_Q8_M1_SPLIT=1 / =0: parallel_owned at every size / never;
// CODESHELL_Q8_M1_SPLIT_MAX_MB overrides the size (MiB; both read per call, for A/B runs).
// Why by size (session 21 helper C, docs/kernels-log.md): the small shape's block linears (1-4 MiB at
// int8) restart each thread's stream at every chunk; in its native step (team, fast minutes, probe
// 82-85 GB/s, five runs) one share a thread read c_attn at 60-67 against 49-57 GB/s, attn.c_proj 56-62
// against 46-49, mlp.c_proj 71-84 against 56-69, the token 1.05-1.08x faster (in a slow minute, probe
// ~48, 0.97-1.04x); the small head (68.5 MiB) showed no clear side, and at the 1.7B / 7B width (16-64
// MiB linears, a 274 MiB head) the split measured 0.99x (as int4's, session 17): those keep parallel_chunks.
// On the AVX2 level (q8_m1_avx2.h's M = 1) too since session 34 helper A: the small shape's step 1.045-1.06x in
// two runs (its 1-4 MiB layers cold, read at 96-115% of the round's read probe), the 72 MB head unchanged.
// int8 M = 1 on AMX CPUs (session 37, helper A): the VNNI CPUs' M = 1 (run_r16_q8: q8_m1_e.h / tile_r16_q8
// where a row is one span of blocks, K <= 2048; parallel_owned up to kQ8SplitMaxBytes) instead of
// q8_panel.h's 16-row transposes at M = 1 (written for the AMX rows' M >= 3): the same bits (q8_epilogue.h,
// tests/kernels/test_amx_m1.py). CODESHELL_AMX_Q8_M1=0 (read per call; A/B runs and tests): q8_panel.h as
// before. The int4 side reads the same switch (qdot_int4.cpp).
inline bool amx_q8_m1() { return env_flag("CODESHELL_AMX_Q8_M1", true); }
// On AMX CPUs (session 37 helper A, amx_q8_m1 below) up to kQ8SplitMaxBytesAmx: codeshell-mini's int8 head
// (4 MiB) read faster on parallel_chunks there (native step, 21 alternating rounds: 84.0 / 74.7 us against
// 92.0 / 85.2 owned, int8 / int4 checkpoints), its 0.25-0.5 MiB layers on parallel_owned (c_fc 44.8 against 55.8).
constexpr int64_t kQ8SplitMaxBytes = int64_t(8) << 20;
constexpr int64_t kQ8SplitMaxBytesAmx = int64_t(1) << 20;
inline bool q8_m1_split(int64_t bytes, bool amx = false) {
  const int64_t max = env_int("CODESHELL_Q8_M1_SPLIT_MAX_MB", -1);
  return env_flag("CODESHELL_Q8_M1_SPLIT", bytes <= (max >= 0 ? max << 20 : amx ? kQ8SplitMaxBytesAmx : kQ8SplitMaxBytes));
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

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

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
// CODESHELL_Q8_M1E=0 (read per call): M = 1 by tile_r16_q8 as before session 28, not q8_m1_e.h (the same bits).
void run_r16_q8(const int8_t* xq, const float* dx, const int32_t* sx, int64_t M, int64_t K, int64_t nbx,
                const uint8_t* w, float* out, int64_t N, int64_t n0, int64_t n1, const Pf& pf = Pf()) {
  if (pf.prime) prime(w + n0 * K, std::min<int64_t>(pf.d, (n1 - n0) * K));
  if (M == 1 && nbx == K / 128 && codeshell::env_flag("CODESHELL_Q8_M1E", true) &&
      codeshell::q8m1e::run(xq, dx, sx, K, w, out, n0, n1, pf, m1_unpack()))
    return;
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

// Rows of x up to which int8 without AMX runs q8_rows.h (from panel_min_m: the rows of x in the
// lanes, weight quads broadcast; the same bits as q8_panel.h, which keeps M above).
// CODESHELL_Q8_ROWS_MAX_M overrides the 16 (0: q8_panel.h at every M from panel_min_m; read per
// call, for benchmarks and tests).
int64_t rows_max_m() {
  return std::min<int64_t>(16, std::max<int64_t>(0, env_int("CODESHELL_Q8_ROWS_MAX_M", 16)));
}
}  // namespace

// AMX CPUs, 2 <= M <= 16 below the AMX rows (session 37, helper B): q8_rows.h (int8 with the decode
// step's block-sum table and, at 5..8 rows, q8_rows_t.h's transposed copy; int4 groups of 128 / 256 its
// run_q4) instead of q8_panel.h, as the AVX512-VNNI CPUs without AMX run them since sessions 14-29. The
// same bits (both end in q8_epilogue.h). CODESHELL_Q8_AMX_VROWS=0 / 1 (read per call): either.
// Unset, the calling thread's Q8AmxVrowsScope decides (the decode step sets it for the linears of a step
// whose weights are small: step_linear.h kAmxVrowsMaxBytes), else no.
// Session 38: the scope holds a code (entry.h Q8Path): the decode step's measured choice (q8_rows_tune.h)
// forces one of q8_panel.h, q8_rows.h, the tiles at 2..16 rows; kQ8PathVrowsRule is session 37's rule.
namespace {
int& amx_vrows_default() {
  static thread_local int code = kQ8PathRules;
  return code;
}
}  // namespace
bool q8_amx_vrows(int64_t M) {
  const int c = amx_vrows_default();
  return M >= 2 && M <= 16 && env_flag("CODESHELL_Q8_AMX_VROWS", c == kQ8PathVrowsRule || c == kQ8PathRows);
}
int q8_amx_forced(int64_t M) {
  const int c = amx_vrows_default();
  return M >= 2 && M <= 16 && c >= kQ8PathTiles ? c : kQ8PathRules;
}
Q8AmxVrowsScope::Q8AmxVrowsScope(int code) : prev(amx_vrows_default()) { amx_vrows_default() = code; }
Q8AmxVrowsScope::~Q8AmxVrowsScope() { amx_vrows_default() = prev; }

// Block size along K for the activation quantisation of int8 weights: 128 when it divides K.
int64_t q8_block_int8(int64_t K) {
  for (int64_t b : {128, 64, 32})
    if (K % b == 0) return b;
  return 0;
}

namespace {
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
  if (isa == codeshell::kAvx2 && q8_avx2_lanes()) {  // q8_lanes_avx2.h: its own rounding of x
    static thread_local codeshell::ThreadScratch lanes_keep;
    // x16 [M, K] int16 (M > 1, E / O order), x8 [M, K] int8, then dx and xs [M, nb]
    codeshell::Scratch<char> buf(lanes_keep, size_t(M * K) * 3 + 2 * size_t(M * nb) * 4 + 64);
    int16_t* x16 = reinterpret_cast<int16_t*>(buf.data());
    int8_t* x8 = reinterpret_cast<int8_t*>(buf.data() + size_t(M * K) * 2);
    float* dx = reinterpret_cast<float*>(buf.data() + size_t(M * K) * 3);
    if (M > 1) codeshell::q8lanes::round_x_eo(x.data_ptr<float>(), M, K, B, x8, x16, dx, dx + M * nb);
    else codeshell::q8lanes::round_x1(x.data_ptr<float>(), K, B, x8, dx, dx + nb);
    const int8_t* wp = q.data_ptr<int8_t>();
    const float* sp = scale.data_ptr<float>();
    const int64_t pf1 = M == 1 ? q8_m1_pf().d : 0;
    codeshell::parallel_chunks(N, 16, 64, [&](int64_t n0, int64_t n1) {
      codeshell::q8lanes::run(x8, x16, dx, M, K, B, wp, sp, b, op, N, n0, n1, pf1, true);
    });
    return;
  }
  // q8_m1_avx2.h (tile_q8's bits) up to kQ8M1Avx2MaxBytes of weight: the small shape's 72 MB head (cold, read
  // from DRAM each token) ran 0.90-0.97x tile_q8 on it in three runs (the kernel alone at 1 and 2 threads, the
  // decode step), where the 1-4 MB layers (cold too in that step) and codeshell-mini's ran 1.03-1.7x
  if (isa == codeshell::kAvx2 && M == 1 && N * K <= q8_avx2_m1_max_bytes() && q8_avx2_m1()) {
    static thread_local codeshell::ThreadScratch m1_keep;
    codeshell::Scratch<char> buf(m1_keep, size_t(K) + 2 * size_t(nb) * 4 + 64);
    int8_t* x8 = reinterpret_cast<int8_t*>(buf.data());
    float* dx = reinterpret_cast<float*>(buf.data() + (K + 31) / 32 * 32);
    codeshell::q8gemm::quantize_row(x.data_ptr<float>(), K, B, nullptr, dx, dx + nb, x8, nullptr);
    const int8_t* wp = q.data_ptr<int8_t>();
    const float* sp = scale.data_ptr<float>();
    // tile_q8's distance (kPrefetch, 2 KiB) unless CODESHELL_Q8_M1_PF is set: the small shape's cold 72 MB head
    // at 2 threads read 0.96x tile_q8 with 8 KiB (q8_m1_pf's default), 1.0x with 2 KiB (session 33 helper A)
    const Pf pfm = pf_env("CODESHELL_Q8_M1_PF", "CODESHELL_Q8_M1_PFH", kPrefetch);
    auto body1 = [&](int64_t n0, int64_t n1) { codeshell::q8m1avx2::run(x8, dx, K, B, wp, sp, b, op, n0, n1, pfm.d, pfm.h); };
    // one contiguous share of the rows a thread up to kQ8SplitMaxBytes (q8_m1_split, as the VNNI CPUs' int8 M = 1
    // since session 21): the small shape's 1-4 MiB layers, cold in the step, restarted each thread's stream at
    // every one of parallel_chunks' ~8 chunks; the step 1.045-1.06x (docs/kernels-log.md, session 34 helper A).
    // CODESHELL_Q8_M1_SPLIT=0: parallel_chunks as before (A/B; the same bits).
    if (q8_m1_split(N * K)) codeshell::parallel_owned(N, 16, 64, body1);
    else codeshell::parallel_chunks(N, 16, 64, body1);
    return;
  }
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
  const bool amx_m1 = M == 1 && isa >= codeshell::kAmx && r16 && amx_q8_m1();  // run_r16_q8 at M = 1 with AMX
  const Pf pf = M == 1 ? q8_m1_pf() : Pf();
#if CODESHELL_HAVE_AVX512
  const bool m1_rows = M == 1 && K > 4096 && m1_rows_q8();  // q8_rows.h at M = 1, K > 4096 only if switched on (m1_rows_q8)
  const bool amx_rows = vnni && isa >= codeshell::kAmx && M <= rows_max_m() && q8_amx_vrows(M);
  if (vnni && ((isa < codeshell::kAmx && M >= panel_min_m() && M <= rows_max_m()) || m1_rows || amx_rows)) {  // amx:q8's bits
    codeshell::q8rows::run(xqp, dx, sx, M, K, N, wp, sp, b, op);
    return;
  }
#endif
  // q8_rows_avx2.h's x (int16, M * K): widened once a call, before the threads share it
  static thread_local codeshell::ThreadScratch x16_keep;
  // batched decode only (M <= 64, ops.ROW_INVARIANT_MAX_M): the prefill's avx2:q8 candidate (ops.prefill_candidates
  // times it against sgemm at M = 512) keeps tile_q8; at M = 512 one thread measured 0.75x / 1.55x of it on
  // c_attn / c_fc in the same rounds (a contended host: not settled either way)
  const bool rows16 = !vnni && K <= kAvx2RowsMaxK && M <= 64 && M >= avx2_rows_min_m();
  codeshell::Scratch<int16_t> x16(x16_keep, rows16 ? size_t(M * K) : 1);
  if (rows16) codeshell::q8avx2::widen_x(xqp, M, K, x16.data());
  auto body = [&](int64_t n0, int64_t n1) {
#if CODESHELL_HAVE_AVX512
    if (vnni && (isa < codeshell::kAmx || amx_m1) && M < panel_min_m() && r16) {  // no AMX, M = 1-2 (AMX: M = 1): the panel's bits
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
    if (rows16) {
      codeshell::q8avx2::range(x16.data(), dx, M, K, B, wp, op, N, n0, n1);
    } else {
      // One weight row per tile at every M: measured best (c_fc, M = 4: 5.1 ms vs 5.8 with 2
      // rows, 6.4 with 4; M = 8: 8.8 vs 9.2 / 10.7).
      range_q8<1>(xqp, dx, M, K, B, wp, op, N, n0, n1);
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = n0; j < n1; ++j) op[m * N + j] = op[m * N + j] * sp[j] + (b ? b[j] : 0.f);
  };
  // M = 1 without AMX, a weight of at most kQ8SplitMaxBytes (or CODESHELL_Q8_M1_SPLIT=1): one contiguous
  // share of the rows a thread (parallel.h parallel_owned; q8_m1_split). The split changes no bits.
  if (M == 1 && vnni && (isa < codeshell::kAmx || amx_m1) && q8_m1_split(N * K, amx_m1)) codeshell::parallel_owned(N, 16, 64, body);
  else codeshell::parallel_chunks(N, 16, 64, body);
}
}  // namespace

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
    rows_q8_amx_out(x, q, scale, c10::nullopt, 0, bias, out);  // session 38: into out, no copy
    return;
  }
  int8_q8(x, q, scale, bias, isa, out.data_ptr<float>());
}
