// The standalones' weight and probe buffers: `bytes` rounded up to 2 MiB, 2 MiB-aligned, advised onto
// transparent huge pages (as codeshell/kernels/hugepages.py places the extension's packed weights, so a
// cold read here crosses the same page size the decode step's does), and touched (memset to `fill`) so
// no timed pass pays the first-touch faults. One copy for the standalones that had their own
// (q4m1_stream.cpp's huge_alloc, q4avx2_m1_cold.cpp's and q8m1_stream.cpp's huge). Torch-free, header-only.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>

static inline void* huge_buffer(size_t bytes, int fill) {
  constexpr size_t kHuge = size_t(2) << 20;
  bytes = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, bytes);
  madvise(p, bytes, MADV_HUGEPAGE);
  std::memset(p, fill, bytes);
  return p;
}
