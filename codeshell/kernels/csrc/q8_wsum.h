// The int8 weights' block sums for q8_rows.h's v2 schedule, computed once per weight by its owner
// (header-only; session 22 helper C, docs/kernels-log.md).
//
// What this is: for an int8 weight [N, K] (K % 128 == 0), 128 * sum of each row's bytes over each
// block of 128 k, laid out [ceil(N / 8)][K / 128][8] (rows past N repeat row N - 1), and a
// thread-local hint by which the native decode step (decode_step.cpp) hands such a table to the
// int8 rows kernel for the one weight it is about to call (keyed by the weight's data pointer and
// shape; the step sets it on the calling thread around its call and clears it after).
// Why: v2 (x + 128 as vpdpbusd's unsigned operand) needs T_b = S'_b - 128 sum_b(w); run_rows
// computed the 8 weight rows' block sums per block with 16 vpdpbusd, 16 loads and 8 two-shuffle
// combines (weight_sums), about 12% of the kernel's instructions at M = 8: measured on one thread
// with the weights in L1 (a copy of the kernel without them: 4.1 -> 4.6 vpdpbusd/ns). The sums
// depend on the weight alone, so the step computes them when it adds the linear (3% of the
// weight's bytes) and the kernel reads 32 bytes per block of 8 rows instead.
// What this is not: a cache keyed by address alone (a freed weight's address can be reused by
// another weight: only the owner of the tensor, which keeps it alive and unchanged, may hint),
// nor a change of any result bit (the same exact integers as weight_sums).
#pragma once

#include <cstdint>
#include <vector>

namespace codeshell {
namespace q8rows {

// 128 * sum_b(w[n]) in [n / 8][b][n % 8]; rows n >= N repeat row N - 1.
inline std::vector<int32_t> block_sums(const int8_t* w, int64_t N, int64_t K) {
  const int64_t nb = K / 128, groups = (N + 7) / 8;
  std::vector<int32_t> s(size_t(groups * nb * 8));
  for (int64_t n = 0; n < groups * 8; ++n) {
    const int8_t* r = w + (n < N ? n : N - 1) * K;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t t = 0;
      for (int k = 0; k < 128; ++k) t += r[b * 128 + k];
      s[size_t(((n / 8) * nb + b) * 8 + n % 8)] = 128 * t;
    }
  }
  return s;
}

// The hint for the next q8rows::run on this thread: the table of weight `w` [N, K] (null: none).
struct SumsHint {
  const void* w = nullptr;
  int64_t N = 0, K = 0;
  const int32_t* sums = nullptr;
  const uint8_t* packed = nullptr;  // q8_rows_t.h's copy of w (q8rt::pack; null: none), for M = 5..8
  const void* packed4 = nullptr;    // int4: q8_rows_t.h's q8rt::Pack4 of w (null: none), for M = 5..8
};

inline SumsHint& sums_hint() {
  thread_local SumsHint h;
  return h;
}

// Sets the hint for one call's duration (restores the previous hint after).
struct SumsHintScope {
  SumsHint saved;
  SumsHintScope(const void* w, int64_t N, int64_t K, const int32_t* sums, const uint8_t* packed = nullptr,
                const void* packed4 = nullptr)
      : saved(sums_hint()) {
    sums_hint() = SumsHint{w, N, K, sums, packed, packed4};
  }
  ~SumsHintScope() { sums_hint() = saved; }
  SumsHintScope(const SumsHintScope&) = delete;
  SumsHintScope& operator=(const SumsHintScope&) = delete;
};

}  // namespace q8rows
}  // namespace codeshell
