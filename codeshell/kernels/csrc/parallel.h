// Work splitting shared by the kernels (header-only).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace codeshell {

// Runs f(i0, i1) over [0, n) in chunks of a multiple of `align` items that the threads claim
// one after another (about 8 per thread, none below `min_items`), instead of at::parallel_for's
// one fixed share per thread.
// Why: on a machine whose cores are shared (the server's event loop and its clients, other
// processes), a fixed split makes every call wait for its slowest thread; claimed chunks let a
// thread that was descheduled do less. The chunks stay long enough to stream sequentially.
template <class F>
inline void parallel_chunks(int64_t n, int64_t align, int64_t min_items, const F& f) {
  const int64_t threads = at::get_num_threads();
  int64_t grain = std::max(min_items, (n + 8 * threads - 1) / (8 * threads));
  grain = (grain + align - 1) / align * align;
  const int64_t chunks = (n + grain - 1) / grain;
  if (threads == 1 || chunks == 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;)
      f(c * grain, std::min(n, (c + 1) * grain));
  });
}

}  // namespace codeshell
