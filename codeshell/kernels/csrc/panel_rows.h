// One row of a bf16 weight in the panel layout, copied out as a plain row (header-only).
//
// What this is: the layout's one row gather, shared by panel_bf16.cpp's rows_bf16 / gather_bf16 and
// the native decode step's embedding lookup from the tied head's panels (decode_step.cpp `embed`).
// The panel layout (panel_bf16.cpp, packing.py): 16 rows a panel, a panel [Kh, 16, 2] of k-pairs, so
// row n is lane n % 16 of panel n / 16 and its K values are Kh 32-bit k-pairs 64 bytes apart.
// What this is not: a packing or a matmul; exact copies only (the same bits as the rows).
#pragma once

#include <xmmintrin.h>

#include <cstdint>
#include <cstring>

namespace codeshell {

// The first k-pair of row n of panels w with Kh k-pairs a row.
inline const uint16_t* panel_row(const uint16_t* w, int64_t Kh, int64_t n) {
  return w + (n / 16) * Kh * 32 + (n % 16) * 2;
}

// Row `src` (panel_row) into dst [K]; `next` (another row's panel_row, or null): its lines are
// prefetched while this one is copied (a gather of rows from anywhere in a large weight).
inline void copy_panel_row(const uint16_t* src, int64_t K, uint16_t* dst, const char* next = nullptr) {
  int64_t j = 0;
  for (; 2 * j + 1 < K; ++j) {
    if (next != nullptr) _mm_prefetch(next + j * 64, _MM_HINT_T0);
    std::memcpy(dst + 2 * j, src + j * 32, 4);
  }
  if (K & 1) dst[K - 1] = src[j * 32];
}

}  // namespace codeshell
