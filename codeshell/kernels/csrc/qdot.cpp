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
// AVX2 on AMD Zen: panel_min_m) and q8_rows.h (rows of x in the lanes, the same epilogue) M = 3-16. int4 on AMX CPUs runs tile_v at M = 2 (M = 1: tile_r16_q4e / q4_m1_e.h as without AMX, session 37; int8 M = 1 likewise tile_r16_q8 / q8_m1_e.h, not q8_panel.h; CODESHELL_AMX_Q8_M1=0: before), q8_panel.h (groups of
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

// Files (split in session 20; the code moved unchanged): qdot.cpp (this map, and x's rounding:
// quantize_x / quantize_rows), qdot.h (shared helpers: prefetch settings, x-row tilings, RoundedX,
// dispatch predicates), qdot_int4.cpp (int4: dispatch, switches, AVX2 tiles, run_q4v, tile_q4r),
// qdot_q4v.h (the per-lane int4 tiles), qdot_int8.cpp (int8: dispatch, switches, AVX2 tiles,
// tile_r16_q8), qdot_tile_v.h (tile_v / run_v on the shared epilogue); the batched rows and M = 1
// tiles in q8_rows.h, q4_rows.h, q4_m1.h, q8_panel.h, q8_epilogue.h as before.

#include <torch/extension.h>
#include <immintrin.h>

#include "isa.h"
#include "qdot.h"
#include "quant_x.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace codeshell {
namespace qdot {

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
                   float* xs, int32_t* sx) {
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

}  // namespace qdot
}  // namespace codeshell
