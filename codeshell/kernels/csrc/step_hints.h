// Hints from the native decode step (decode_step.cpp) to the kernels it calls (header-only).
//
// What this is: process-wide values a DecodeStep sets for the duration of its call and the
// kernels read, for choices that depend on the whole model rather than on one weight: whether
// the model's weights stay in the last-level cache from one step to the next.
// Why: the bf16 batched rows (panel_bf16.cpp, M >= 4) read their weights at ~16 B a cycle per
// core at the vdpbf16ps peak; an L2 prefetch 1024 k-pairs ahead on each panel's stream cut
// codeshell-mini's batch-8 step 5-13% (its head 100-180 -> 95-122 us; the whole model, 16.6 MB
// of bf16 weights, sits in the 32 MiB L3), and made the small shape's (DRAM-bound, 150 MB)
// 9% slower. The same weight shape occurs in both (an 8 MB c_fc there, the 8 MB head here), so
// the choice is the model's, not the weight's (docs/kernels-log.md, session 18 helper B).
// What this is not: a correctness input. The hints change only prefetches, never a result bit;
// two steps of different models running at once may see each other's hint.
#pragma once

#include <atomic>
#include <cstdint>

namespace codeshell {

// The bf16 batched rows' far prefetch in k-pairs (0: none) while a DecodeStep of a
// cache-resident model runs; CODESHELL_BF16_PF2 overrides it per call (A/B runs).
inline std::atomic<int64_t>& bf16_far_prefetch_hint() {
  static std::atomic<int64_t> v{0};
  return v;
}

}  // namespace codeshell
