// 64-byte aligned scratch buffers for the AMX prefill kernels (panel_bf16.cpp, qgemm_amx.cpp).
//
// What this is: `Scratch<T>(keep, n)`, n T (uninitialised) at a 64-byte boundary, taken from
// `keep` -- a buffer the calling thread keeps between calls (`static thread_local
// ThreadScratch`), grown when a call needs more -- or, past kScratchKeepBytes, allocated for
// this call only. Why both:
//   * alignment: AMX tile rows are 64 bytes; a row that straddles two cache lines costs two L1
//     accesses. std::vector's storage is only 16-byte aligned (a large one comes from mmap at
//     a page + 16), and with A and B rows both off by 16 bytes a standalone copy of the 2x2-tile
//     block ran at ~1/3 of its rate on L1-resident tiles (1 core: 1.1 against 3.0 TFLOP/s);
//   * reuse: a prefill's A tiles are M x K bf16 (4 MiB at M = 512, K = 4096; 16 MiB at K =
//     16384), above glibc's mmap threshold, so each call mapped fresh pages and took a page
//     fault per 4 KiB (1,000-4,000 per call, measured with getrusage) before its first TMUL.
// What this is not: a general allocator; each thread keeps at most kScratchKeepBytes per slot.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>

namespace codeshell {

constexpr size_t kScratchKeepBytes = size_t(32) << 20;

struct ThreadScratch {  // one kept buffer of a thread (use as `static thread_local`)
  char* p = nullptr;
  size_t cap = 0;
  ThreadScratch() = default;
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;
  ~ThreadScratch() { std::free(p); }
};

template <class T>
class Scratch {
 public:
  Scratch(ThreadScratch& keep, size_t n) {
    const size_t bytes = std::max<size_t>(64, (n * sizeof(T) + 63) / 64 * 64);
    if (bytes <= kScratchKeepBytes) {
      if (keep.cap < bytes) {
        std::free(keep.p);
        keep.cap = 0;
        keep.p = static_cast<char*>(std::aligned_alloc(64, bytes));
        TORCH_CHECK(keep.p != nullptr, "out of memory (", bytes, " bytes of scratch)");
        keep.cap = bytes;
      }
      p_ = reinterpret_cast<T*>(keep.p);
    } else {
      own_ = static_cast<char*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(own_ != nullptr, "out of memory (", bytes, " bytes of scratch)");
      p_ = reinterpret_cast<T*>(own_);
    }
  }
  ~Scratch() { std::free(own_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p_; }

 private:
  T* p_ = nullptr;
  char* own_ = nullptr;
};

}  // namespace codeshell
