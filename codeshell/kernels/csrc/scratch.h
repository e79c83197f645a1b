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
// Also `cached_output(M, N, options)`: an fp32 [M, N] result tensor whose memory, once the
// tensor is freed, goes back to a small process-wide cache of freed blocks (taken again by a
// result of the same size or up to 1/4 smaller; at most kOutputCacheBytes held, the oldest
// dropped first) instead of to the system: a prefill's outputs are 8-32 MiB
// (7B at M = 512: c_attn 12 MiB, c_fc 32 MiB), so each call's fresh torch::empty took a page
// fault per 4 KiB written (3,000-8,000 per call) and the next layer's call of the same shape
// took them again.
// What this is not: a general allocator; each thread keeps at most kScratchKeepBytes per slot.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

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

constexpr size_t kOutputCacheMinBytes = size_t(1) << 20;  // smaller results: torch::empty (no faults to save)
constexpr size_t kOutputCacheBytes = size_t(128) << 20;   // freed blocks held at most (7B, M = 512: ~60 MiB a layer)

class OutputCache {
 public:
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache;  // never destroyed: deleters may run at exit
    return *cache;
  }
  // The smallest held block of bytes..bytes * 5/4 (prompts of nearby lengths share blocks),
  // else a new one. Returns (block, its size).
  std::pair<void*, size_t> take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].first >= bytes && free_[i].first <= bytes + bytes / 4 &&
            (best == free_.size() || free_[i].first < free_[best].first))
          best = i;
      if (best < free_.size()) {
        const auto hit = free_[best];
        free_.erase(free_.begin() + std::ptrdiff_t(best));
        held_ -= hit.first;
        return {hit.second, hit.first};
      }
    }
    void* p = std::aligned_alloc(64, bytes);
    TORCH_CHECK(p != nullptr, "out of memory (", bytes, " bytes of output)");
    return {p, bytes};
  }
  // Holds a freed block, dropping the oldest held ones when it would pass kOutputCacheBytes.
  void give(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes > kOutputCacheBytes) {
        drop.push_back(p);
      } else {
        while (held_ + bytes > kOutputCacheBytes) {
          drop.push_back(free_.front().second);
          held_ -= free_.front().first;
          free_.erase(free_.begin());
        }
        free_.emplace_back(bytes, p);
        held_ += bytes;
      }
    }
    for (void* q : drop) std::free(q);
  }

 private:
  std::mutex mu_;
  std::vector<std::pair<size_t, void*>> free_;  // (bytes, block), oldest first
  size_t held_ = 0;
};

// fp32 [M, N], uninitialised; from OutputCache when it is at least kOutputCacheMinBytes.
inline torch::Tensor cached_output(int64_t M, int64_t N, const torch::TensorOptions& options) {
  const size_t bytes = (size_t(M) * size_t(N) * sizeof(float) + 63) / 64 * 64;
  const auto opts = options.dtype(torch::kFloat32);
  if (bytes < kOutputCacheMinBytes) return torch::empty({M, N}, opts);
  const auto [p, size] = OutputCache::get().take(bytes);
  return torch::from_blob(p, {M, N}, [size = size](void* q) { OutputCache::get().give(q, size); }, opts);
}

}  // namespace codeshell
