// fp32 -> bf16 for the prompt GEMMs' bf16 / GELU epilogues (header-only; panel_bf16.cpp's
// store_rows_b16 / store_rows_gelu, qgemm_amx.cpp's store_item): torch's `.to(torch.bfloat16)` bits.
//
// What this is: `bf16_pack(v, hw)` = the 16 lanes of `codeshell::bf16_bits(v)` narrowed to 16 bits,
// by vcvtneps2bf16 (one instruction, two uops) where `hw` (an AVX512-BF16 CPU and
// CODESHELL_B16_CVT, read once a call by `bf16_cvt_hw`) and every lane is a normal number, a zero or
// an infinity: there the instruction's round-to-nearest-even is bf16_bits' (which adds 0x7fff + the
// kept lsb and shifts). A vector with a denormal or a NaN lane takes bf16_bits (the instruction
// flushes denormals to zero and keeps NaN payloads; torch's cast does neither): one vfpclassps and a
// branch that a prompt's activations never take.
// Why: bf16_bits is ~8 vector ops a 16 values (shift, and, two adds, shift, compare, masked move,
// narrowing move); perf on codeshell-mini's c_attn (M 512, N 384, K 256, 1 thread, session 38):
// store_rows_b16 was 27% of the call's kernel time, its samples on those ops.
// What this is not: for CPUs without AVX512-BF16 (`hw` false: bf16_bits, as before).
#pragma once

#include <immintrin.h>

#include "isa.h"
#include "simd512.h"
#include "switches.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {

inline bool bf16_cvt_hw() { return cpu_features().avx512bf16 && env_flag("CODESHELL_B16_CVT", true); }

inline __m256i bf16_pack(__m512 v, bool hw) {
  // 0x01 QNaN, 0x80 SNaN, 0x20 denormal
  if (hw && _mm512_fpclass_ps_mask(v, 0xa1) == 0) return (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_cvtepi32_epi16(bf16_bits(v));
}

}  // namespace codeshell
CODESHELL_END_AVX512
#endif
