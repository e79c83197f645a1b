// The AMX tile configuration (palette 1) and its load, shared by every AMX kernel: panel_bf16_amx.h
// (bf16 GEMM and decode, the 1-row M = 1 tiles), qgemm_amx.cpp (AMX-INT8) and attention_prefill.cpp.
// What this is not: a kernel, nor a tile layout: each caller sets its tiles' rows / colsb.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "isa.h"

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace codeshell {

struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// ldtilecfg of `cfg`. Why one function: GCC's _tile_loadconfig is an asm whose memory operand names 8
// bytes, so where it is inlined the stores of colsb / rows before it may be dropped as dead (session 37:
// the AMX prefill attention's copy ran ldtilecfg on a half-written config, a #GP); the compiler barrier on
// the config's address keeps them, for every caller.
inline void amx_load_config(const AmxTileConfig& cfg) {
  __asm__ volatile("" ::"r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

}  // namespace codeshell
CODESHELL_END_AVX512
#endif
