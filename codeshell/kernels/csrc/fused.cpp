// Fused elementwise ops for the model's inference path (codeshell/model.py, no autograd).
//
// What this is: three row-wise passes that each replace a chain of small torch ops at decode,
// where every torch op costs a few microseconds of dispatch and allocation for a row of a
// few thousand values (measured: ~220 small ops per token on the mid model, ~4 ms of a 52 ms
// token at 1 thread, which do not shrink with threads while the weight reads do):
//   * add_layer_norm: h = x + r (rounded to x's dtype, as torch's add), y = LayerNorm(h) --
//     the residual add and the next LayerNorm in one pass, both outputs written;
//   * gelu_tanh: y = gelu_tanh(v [+ bias]) with v the fp32 output of a linear, rounded to
//     bf16 first when the model is bf16 (exactly as the plain path's cast then F.gelu);
//   * rope_ / rope_bf16: rotate-half RoPE on the first `heads` heads of each row of the fused
//     qkv projection (q and k), the same fp32 products and sums as model._rotate (same bits):
//     in place, or from the linear's fp32 output to bf16 (the cast and the rotation in one pass).
// The adds take a linear's fp32 output as r too (rounded to bf16 first for a bf16 model), so in
// a bf16 model no linear's output needs a separate cast.
// All math is fp32; bf16 in/out round to nearest even (torch's conversion). Rows run on
// at::parallel_for only when there are many (prefill); a decode row runs on the calling
// thread (waking the OpenMP team costs more than the row); inside the native decode step's
// thread team a few rows (and GELU row pieces) are split since session 17 (for_rows, for_pieces).
// Switches (read per call; session 28): CODESHELL_LN_ROWS (4; 2; 1 = one row at a time, the
// LayerNorm before), CODESHELL_LN_PF (the LayerNorm's prefetch, blocks ahead: 1; 0 = none),
// CODESHELL_ROPE16 (1; 0 = the 8-lane RoPE), CODESHELL_LN16 (the 16-lane LayerNorm; 0 = 8 lanes).
// What this is not: autograd ops (training keeps the torch ops) and not a matmul.
// The native decode step (decode_step.cpp) calls the entry points below directly (entry.h).
//
// Numerics: RoPE's a * b - c * d is two rounded products and a rounded difference, as torch
// computes it (`rounded` keeps GCC from contracting them into an FMA; the test compares bits). GELU uses gelu_tanh(v) = v * sigmoid(2u) = v / (1 + e^{-2u}),
// u = sqrt(2/pi) (v + 0.044715 v^3), which equals torch's 0.5 v (1 + tanh(u)) in exact
// arithmetic and avoids its cancellation for negative v; with exp8's ~2e-7 relative error the
// fp32 result is within ~1e-6 of torch's, and bf16 results differ only at rounding ties.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "entry.h"
#include "isa.h"
#include "parallel.h"
#include "simd.h"
#include "simd512.h"

namespace {

using bf16 = at::BFloat16;

// 8 values <-> 8 fp32 lanes. bf16 -> fp32 is exact (a shift); fp32 -> bf16 rounds to nearest
// even as c10::BFloat16 does (NaN -> quiet NaN 0x7fc0).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) { return codeshell::load_bf16x8(p); }
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// Round fp32 lanes through bf16 and back (what .to(bfloat16) then .float() does).
inline __m256 round_bf16(__m256 v) {
  alignas(32) bf16 tmp[8];
  store8(tmp, v);
  return load8(tmp);
}

// A tail of n < 8 values goes through an 8-wide buffer, so it runs the same vector code
// (the same bits) as the body.
template <class T>
inline __m256 load_tail(const T* p, int64_t n) {
  alignas(32) T tmp[8] = {};
  std::memcpy(tmp, p, n * sizeof(T));
  return load8(tmp);
}
template <class T>
inline void store_tail(T* p, __m256 v, int64_t n) {
  alignas(32) T tmp[8];
  store8(tmp, v);
  std::memcpy(p, tmp, n * sizeof(T));
}
inline __m256 load8_tail(const float* p, int64_t n) { return load_tail(p, n); }
template <class T>
inline __m256 loadn(const T* p, int64_t n) { return n >= 8 ? load8(p) : load_tail(p, n); }
template <class T>
inline void storen(T* p, __m256 v, int64_t n) {
  if (n >= 8) store8(p, v); else store_tail(p, v, n);
}

// A product the compiler may not fuse into an FMA with the add that follows (GCC contracts
// a * b - c across intrinsics under C++'s default -ffp-contract=fast): an empty asm that
// "changes" the register forces the rounded product to exist.
inline __m256 rounded(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

// Rows per parallel task: at decode (a few rows) the call stays on this thread.
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(width, 1)); }

// A few rows split over the threads inside the native decode step's thread team (session 17):
// at batch 8 the LayerNorms (~0.9 us a 1024-wide row) and the GELU (~0.8 ns a value, 15-25 us
// for 8 x 4096) ran on one thread by row_grain (65536 values a task; session 16: ~4.5% of the
// small shape's int4 batch-8 step). In the team (parallel.h current_team(): its helpers spin,
// so a loop costs a post and a few cache-line transfers) items of kTeamItem values and up go
// to its threads. Outside a team the split stays row_grain's: an OpenMP fork per LayerNorm /
// GELU measured faster in one same-process A/B and 1.8-3x slower in another (a loaded host:
// LayerNorms 382 against 125 us a batch-8 step; docs/kernels-log.md, session 17).
// Which thread runs an item does not change its bits. CODESHELL_SMALL_SPLIT=off: row_grain.
constexpr int64_t kTeamItem = 1024;
inline int64_t split_item() {
  return codeshell::current_team() != nullptr && !codeshell::small_split_off() ? kTeamItem : 0;
}

// row_grain, except that a call of 65536 values and more (a prefill's LayerNorm) splits in at least
// two: codeshell-mini's 256 x 256 prompt LayerNorms were one task of row_grain's 65536 values, on one
// thread (~52 us each, 13 a prompt: 9% of the prompt; session 18, helper C). Smaller calls (decode
// rows) keep row_grain. Which thread runs a row does not change its bits.
// CODESHELL_PREFILL_LN_SPLIT=off: row_grain alone (A/B).
inline int64_t prefill_row_grain(int64_t rows, int64_t width) {
  const int64_t g = row_grain(width);
  if (rows * width < (int64_t(1) << 16) || rows < 2) return g;
  // read each call (~0.1 us against ~50): A/B in one process
  return codeshell::env_is("CODESHELL_PREFILL_LN_SPLIT", "off") ? g : std::min(g, (rows + 1) / 2);
}

// f(r0, r1) over rows [0, rows) of `width` values, in chunks of >= 2 kTeamItem values in a team
// (a LayerNorm row costs ~3 passes: codeshell-mini's 8 x 256 in two chunks measured 38.7
// against 32.4 us a step unsplit, the small shape's 8 x 1024 86 against 126).
template <class F>
void for_rows(int64_t rows, int64_t width, const F& f) {
  const int64_t item = 2 * split_item();
  if (item > 0 && rows > 1 && rows * width >= 2 * item) {
    codeshell::parallel_chunks(rows, 1, std::max<int64_t>(1, item / std::max<int64_t>(width, 1)), f);
    return;
  }
  at::parallel_for(0, rows, prefill_row_grain(rows, width), f);
}

// f(row, c0, c1) over [0, rows) x [0, N) for an elementwise pass: pieces of `item` columns (a
// multiple of 16: a piece runs the same vector code on the same lanes as the whole row, and
// the elements are independent), so a batch-1 row of 4096 splits too; else rows by row_grain.
template <class F>
void for_pieces(int64_t rows, int64_t N, const F& f) {
  const int64_t item = split_item();
  if (item > 0 && rows * N >= 2 * item) {
    const int64_t per = (N + item - 1) / item;  // pieces per row
    codeshell::parallel_chunks(rows * per, 1, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = i / per, c0 = (i % per) * item;
        f(r, c0, std::min(N, c0 + item));
      }
    });
    return;
  }
  at::parallel_for(0, rows, row_grain(N), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(r, int64_t(0), N);
  });
}

// ---- residual add + LayerNorm ----------------------------------------------------------------

// One row: h = x + r (r may be null), y = (h - mean) * rstd * w + b. h is rounded to T before
// the statistics (torch normalises the stored residual). An fp32 r with bf16 x (a linear's fp32
// kernel output) is rounded to bf16 first, as the plain path's cast before its add. Two passes
// over the row for the mean and the variance (the row is in L1), 2 x 8 fp32 accumulators each.
template <class T, class W, class R>
void add_ln_row(const T* x, const R* r, T* h, T* y, const W* w, const W* b, int64_t C, float eps, float* buf) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c < C; c += 8) {
    int64_t n = std::min<int64_t>(8, C - c);
    __m256 v = loadn(x + c, n);
    if (r != nullptr) {
      __m256 rv = loadn(r + c, n);  // tails load zeros past C: the padded lanes stay 0
      if constexpr (std::is_same<T, bf16>::value && std::is_same<R, float>::value) rv = round_bf16(rv);
      v = _mm256_add_ps(v, rv);
      storen(h + c, v, n);
      if constexpr (std::is_same<T, bf16>::value) v = round_bf16(v);
    }
    _mm256_storeu_ps(buf + c, v);
    if ((c / 8) & 1) s1 = _mm256_add_ps(s1, v); else s0 = _mm256_add_ps(s0, v);
  }
  const float mean = codeshell::hsum8(_mm256_add_ps(s0, s1)) / float(C);
  const __m256 vm = _mm256_set1_ps(mean);
  s0 = _mm256_setzero_ps();
  s1 = _mm256_setzero_ps();
  for (c = 0; c < C; c += 8) {
    __m256 d = _mm256_sub_ps(_mm256_loadu_ps(buf + c), vm);
    if (C - c < 8) d = _mm256_blendv_ps(_mm256_setzero_ps(), d, _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(int(C - c)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
    if ((c / 8) & 1) s1 = _mm256_fmadd_ps(d, d, s1); else s0 = _mm256_fmadd_ps(d, d, s0);
  }
  const float var = codeshell::hsum8(_mm256_add_ps(s0, s1)) / float(C);
  const __m256 rstd = _mm256_set1_ps(1.0f / std::sqrt(var + eps));
  for (c = 0; c < C; c += 8) {
    int64_t n = std::min<int64_t>(8, C - c);
    __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(buf + c), vm), rstd);
    __m256 o = d;
    if (w != nullptr) o = _mm256_mul_ps(o, loadn(w + c, n));
    if (b != nullptr) o = _mm256_add_ps(o, loadn(b + c, n));
    storen(y + c, o, n);
  }
}

}  // namespace

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

// add_ln_row in 16 lanes, the same bits: the 8-lane loop's two accumulators (s0 over the even
// 8-value chunks of the row, s1 over the odd ones) are this register's low and high halves, so
// each lane adds the same values in the same order; the sums end as hsum8(s0 + s1) there too,
// and the third pass is elementwise (the same operations per value, the same contraction).
// Tails: the lanes past C load as zeros, and a last chunk of <= 8 values adds into the low half
// only (the 8-lane loop has no odd chunk there). Why: at decode a LayerNorm row is short (256 at
// codeshell-mini) and the 8-lane loop's instruction count was the cost: 13 LayerNorms of 8 rows
// ~27 us of a ~430 us batch-8 step (docs/kernels-log.md, session 18 helper B).
namespace ln16 {
inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }
inline __m512 ld(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 ld(const bf16* p, __mmask16 k) { return codeshell::load_bf16x16(p, k); }
inline void st(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
inline void st(bf16* p, __m512 v, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(codeshell::bf16_bits(v)));
}
// A product GCC may not contract into an FMA with the add after it: the 8-lane loop's products
// stay rounded there (measured: its w * d + b is not fused), and in this section GCC fused them.
inline __m512 rounded(__m512 v) {
  asm("" : "+v"(v));
  return v;
}
inline float halves(__m512 s) {  // hsum8(s0 + s1)
  return codeshell::hsum8(_mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1)));
}
}  // namespace ln16

template <class T, class W, class R>
void add_ln_row16(const T* x, const R* r, T* h, T* y, const W* w, const W* b, int64_t C, float eps, float* buf) {
  using namespace ln16;
  __m512 s = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const int64_t n = std::min<int64_t>(16, C - c);
    const __mmask16 k = lanes(n);
    __m512 v = ld(x + c, k);
    if (r != nullptr) {
      __m512 rv = ld(r + c, k);
      if constexpr (std::is_same<T, bf16>::value && std::is_same<R, float>::value) rv = codeshell::round_bf16(rv);
      v = _mm512_add_ps(v, rv);
      st(h + c, v, k);
      if constexpr (std::is_same<T, bf16>::value) v = codeshell::round_bf16(v);
    }
    _mm512_storeu_ps(buf + c, v);
    s = _mm512_mask_add_ps(s, n > 8 ? __mmask16(0xffff) : __mmask16(0x00ff), s, v);
  }
  const float mean = halves(s) / float(C);
  const __m512 vm = _mm512_set1_ps(mean);
  s = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const int64_t n = std::min<int64_t>(16, C - c);
    const __m512 d = _mm512_maskz_sub_ps(lanes(n), _mm512_loadu_ps(buf + c), vm);
    s = _mm512_mask3_fmadd_ps(d, d, s, n > 8 ? __mmask16(0xffff) : __mmask16(0x00ff));
  }
  const float var = halves(s) / float(C);
  const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(var + eps));
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = lanes(C - c);
    __m512 o = rounded(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf + c), vm), rstd));
    if (w != nullptr) o = rounded(_mm512_mul_ps(o, ld(w + c, k)));
    if (b != nullptr) o = _mm512_add_ps(o, ld(b + c, k));
    st(y + c, o, k);
  }
}

// add_ln_row16 on NR rows at once, the same bits (session 28). Why: at 16 lanes the row's
// three passes cost ~24 port-0/5 cycles a vector (a 512 x 1024 prompt LayerNorm ~0.33 ms on one
// thread): pass 2 is one FMA chain a row (4 cycles a vector of latency for 2 uops), the bf16
// weight and bias were widened again every row (4 ops a vector), and each bf16 store was a
// 2-uop vpmovdw after a shift. Here:
//  * NR rows' chains interleave (each lane of each row still adds its values in the row's order);
//  * w and b arrive widened to fp32 once per call's chunk of rows (wf, bf: exact, a shift);
//  * the bf16 roundings are ln16::rnd (the same values as round_bf16: the rounding add, then the
//    low half masked off, NaN lanes 0x7fc00000 in the same masked and) and two rounded vectors of a row leave as one 64-byte store
//    of their high halves (vpermt2w), where bf16_bits + vpmovdw took 3 uops a vector;
//  * the tail (C % 32) runs add_ln_row16's code for its last one or two chunks.
// The sums (mean and variance) run over the same values in the same lanes and order, the third
// pass is elementwise with the same operations: the bits of add_ln_row16 (and so of add_ln_row).
// CODESHELL_LN_ROWS=1 (read per call): add_ln_row16 row by row, the kernel before.
namespace ln16 {
// 32 bf16 from two rounded fp32 vectors (low 16 bits zero): the odd 16-bit words of a, then of b.
inline __m512i pack_hi(__m512 a, __m512 b) {
  const __m512i idx = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                       31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_permutex2var_epi16(_mm512_castps_si512(a), idx, _mm512_castps_si512(b));
}
// round_bf16_fast's value in 6 ops instead of 7: the low-half mask and the NaN's 0x7fc00000 in
// one masked and (the lanes that compare unordered keep the NaN constant).
inline __m512 rnd(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i t = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_mask_and_epi32(_mm512_set1_epi32(0x7fc00000), _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), t,
                                                   _mm512_set1_epi32(int32_t(0xffff0000u))));
}
inline void st2(bf16* p, __m512 a, __m512 b) {  // a, b not yet rounded
  _mm512_storeu_si512(p, pack_hi(rnd(a), rnd(b)));
}
inline void st2(float* p, __m512 a, __m512 b) {
  _mm512_storeu_ps(p, a);
  _mm512_storeu_ps(p + 16, b);
}
inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const bf16* p) { return codeshell::load_bf16x16(p); }
}  // namespace ln16

// Pass 1 of one full chunk of 16 values of a row: v = x + r as add_ln_row16 computes it (unrounded
// when T is bf16: the caller rounds), the value buf and the sums take.
template <class T, class R>
inline __m512 ln_sum_in(const T* x, const R* r) {
  __m512 v = ln16::ld16(x);
  if (r != nullptr) {
    __m512 rv = ln16::ld16(r);
    if constexpr (std::is_same<T, bf16>::value && std::is_same<R, float>::value) rv = ln16::rnd(rv);
    v = _mm512_add_ps(v, rv);
  }
  return v;
}

// pf: the rows pf blocks ahead (x, r, h, y at the same offsets pf * NR rows on; 0: none) are prefetched
// during this block's third pass: one line of x (and of r, two for fp32 r) per 32 values and row,
// and the lines of h and y it will write (prefetchw). Why: in the model a prompt LayerNorm's rows
// come from DRAM (the layer's 21 MiB of weights passed through the caches since they were written):
// one thread's LayerNorm took ~0.57 ms a call (512 x 1024) against ~0.23 ms with its rows in L3.
template <int NR, class T, class R>
void add_ln_rows16(const T* x, const R* r, T* h, T* y, const float* wf, const float* bf, int64_t C, float eps,
                   float* buf, int pf) {
  using namespace ln16;
  constexpr bool tb = std::is_same<T, bf16>::value;
  const int64_t C32 = C / 32 * 32, Cp = (C + 15) / 16 * 16;
  __m512 s[NR];
  for (int j = 0; j < NR; ++j) s[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C32; c += 32)
    for (int j = 0; j < NR; ++j) {
      const T* xj = x + j * C + c;
      const R* rj = r != nullptr ? r + j * C + c : nullptr;
      __m512 v0 = ln_sum_in<T, R>(xj, rj), v1 = ln_sum_in<T, R>(xj + 16, rj != nullptr ? rj + 16 : nullptr);
      if (r != nullptr) {
        if constexpr (tb) {
          v0 = rnd(v0);
          v1 = rnd(v1);
          _mm512_storeu_si512(h + j * C + c, pack_hi(v0, v1));
        } else {
          st2(h + j * C + c, v0, v1);
        }
      }
      _mm512_storeu_ps(buf + j * Cp + c, v0);
      _mm512_storeu_ps(buf + j * Cp + c + 16, v1);
      s[j] = _mm512_add_ps(_mm512_add_ps(s[j], v0), v1);
    }
  for (int64_t c = C32; c < C; c += 16)  // add_ln_row16's pass 1 on the tail
    for (int j = 0; j < NR; ++j) {
      const int64_t n = std::min<int64_t>(16, C - c);
      const __mmask16 k = lanes(n);
      __m512 v = ld(x + j * C + c, k);
      if (r != nullptr) {
        __m512 rv = ld(r + j * C + c, k);
        if constexpr (tb && std::is_same<R, float>::value) rv = codeshell::round_bf16(rv);
        v = _mm512_add_ps(v, rv);
        st(h + j * C + c, v, k);
        if constexpr (tb) v = codeshell::round_bf16(v);
      }
      _mm512_storeu_ps(buf + j * Cp + c, v);
      s[j] = _mm512_mask_add_ps(s[j], n > 8 ? __mmask16(0xffff) : __mmask16(0x00ff), s[j], v);
    }
  __m512 vm[NR], rstd[NR];
  for (int j = 0; j < NR; ++j) {
    vm[j] = _mm512_set1_ps(halves(s[j]) / float(C));
    s[j] = _mm512_setzero_ps();
  }
  const int64_t C16 = C / 16 * 16;
  for (int64_t c = 0; c < C16; c += 16)
    for (int j = 0; j < NR; ++j) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(buf + j * Cp + c), vm[j]);
      s[j] = _mm512_fmadd_ps(d, d, s[j]);
    }
  if (C16 < C) {
    const int64_t n = C - C16;
    for (int j = 0; j < NR; ++j) {
      const __m512 d = _mm512_maskz_sub_ps(lanes(n), _mm512_loadu_ps(buf + j * Cp + C16), vm[j]);
      s[j] = _mm512_mask3_fmadd_ps(d, d, s[j], n > 8 ? __mmask16(0xffff) : __mmask16(0x00ff));
    }
  }
  for (int j = 0; j < NR; ++j) rstd[j] = _mm512_set1_ps(1.0f / std::sqrt(halves(s[j]) / float(C) + eps));
  auto out = [&](int j, int64_t c) {
    __m512 o = rounded(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf + j * Cp + c), vm[j]), rstd[j]));
    if (wf != nullptr) o = rounded(_mm512_mul_ps(o, _mm512_loadu_ps(wf + c)));
    if (bf != nullptr) o = _mm512_add_ps(o, _mm512_loadu_ps(bf + c));
    return o;
  };
  for (int64_t c = 0; c < C32; c += 32)
    for (int j = 0; j < NR; ++j) {
      if (pf) {
        const int64_t o = (pf * NR + j) * C + c;
        _mm_prefetch(reinterpret_cast<const char*>(x + o), _MM_HINT_T0);
        if (r != nullptr) {
          _mm_prefetch(reinterpret_cast<const char*>(r + o), _MM_HINT_T0);
          if constexpr (sizeof(R) == 4) _mm_prefetch(reinterpret_cast<const char*>(r + o + 16), _MM_HINT_T0);
          _m_prefetchw(h + o);
        }
        _m_prefetchw(y + o);
        if constexpr (sizeof(T) == 4) {
          _mm_prefetch(reinterpret_cast<const char*>(x + o + 16), _MM_HINT_T0);
          if (r != nullptr) _m_prefetchw(h + o + 16);
          _m_prefetchw(y + o + 16);
        }
      }
      st2(y + j * C + c, out(j, c), out(j, c + 16));
    }
  for (int64_t c = C32; c < C; c += 16)
    for (int j = 0; j < NR; ++j) st(y + j * C + c, out(j, c), lanes(C - c));
}

}  // namespace
CODESHELL_END_AVX512
#endif

namespace {

// Rows add_ln_rows16 takes at once (CODESHELL_LN_ROWS, read per call: 4 by default, 2, or 1 =
// add_ln_row16 row by row). One thread, 512 x 1024 bf16: 1 / 2 / 4 rows 0.275 / 0.242 / 0.232 ms.
int ln_rows() {
  const int64_t n = codeshell::env_int("CODESHELL_LN_ROWS", 4);  // switches.h: cached while environ is unchanged
  return n == 1 || n == 2 ? int(n) : 4;
}

// The 16-lane LayerNorm where the CPU has AVX-512 and CODESHELL_KERNEL_ISA does not cap the
// kernels at avx2 (as the GELU's gelu_wide), unless CODESHELL_LN16=0 (read per call; A/B runs).
bool ln_wide() {
#if CODESHELL_HAVE_AVX512
  static const bool cpu = codeshell::cpu_features().max_isa >= codeshell::kAvx512Vnni;
  return cpu && !codeshell::env_is("CODESHELL_KERNEL_ISA", "avx2") && codeshell::env_flag("CODESHELL_LN16", true);
#else
  return false;
#endif
}

template <class T, class W, class R>
void add_ln(const torch::Tensor& x, const c10::optional<torch::Tensor>& r, torch::Tensor& h, torch::Tensor& y,
            const c10::optional<torch::Tensor>& w, const c10::optional<torch::Tensor>& b, double eps) {
  const int64_t C = x.size(1), rows = x.size(0);
  const T* xp = x.data_ptr<T>();
  const R* rp = r ? r->data_ptr<R>() : nullptr;
  T* hp = r ? h.data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const W* wp = w ? w->data_ptr<W>() : nullptr;
  const W* bp = b ? b->data_ptr<W>() : nullptr;
  const int64_t Cp = (C + 15) / 16 * 16;
  const bool wide = ln_wide();
  const int nr = wide ? ln_rows() : 1;
  // add_ln_rows16's prefetch: the rows CODESHELL_LN_PF blocks ahead (default 1; 0 = none)
  const int pf = int(std::max<int64_t>(0, std::min<int64_t>(4, codeshell::env_int("CODESHELL_LN_PF", 1))));
  for_rows(rows, C, [&](int64_t r0, int64_t r1) {
#if CODESHELL_HAVE_AVX512
    if (nr > 1 && r1 - r0 >= 2) {  // add_ln_rows16: w and b widened once for the chunk's rows
      std::vector<float> buf(Cp * (nr + 2), 0.0f);  // nr rows of h in fp32, then w and b in fp32
      float* wf = wp != nullptr ? buf.data() + Cp * nr : nullptr;
      float* bf = bp != nullptr ? buf.data() + Cp * (nr + 1) : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        if (wf != nullptr) wf[c] = float(wp[c]);
        if (bf != nullptr) bf[c] = float(bp[c]);
      }
      int64_t i = r0;
      const auto rows_at = [&](auto tag, int64_t i) {
        constexpr int N = decltype(tag)::value;
        add_ln_rows16<N, T, R>(xp + i * C, rp ? rp + i * C : nullptr, hp ? hp + i * C : nullptr, yp + i * C, wf, bf,
                               C, float(eps), buf.data(), i + (pf + 1) * N <= r1 ? pf : 0);
      };
      if (nr == 4)
        for (; i + 4 <= r1; i += 4) rows_at(std::integral_constant<int, 4>(), i);
      for (; i + 2 <= r1; i += 2) rows_at(std::integral_constant<int, 2>(), i);
      if (i < r1) rows_at(std::integral_constant<int, 1>(), i);
      return;
    }
#endif
    std::vector<float> buf(Cp);  // the row in fp32 (h as rounded), reread by the two later passes
    for (int64_t i = r0; i < r1; ++i) {
#if CODESHELL_HAVE_AVX512
      if (wide) {
        add_ln_row16<T, W, R>(xp + i * C, rp ? rp + i * C : nullptr, hp ? hp + i * C : nullptr, yp + i * C, wp, bp,
                              C, float(eps), buf.data());
        continue;
      }
#endif
      add_ln_row<T, W, R>(xp + i * C, rp ? rp + i * C : nullptr, hp ? hp + i * C : nullptr, yp + i * C, wp, bp, C,
                       float(eps), buf.data());
    }
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous CPU [rows, C] tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, " must be float32 or bfloat16");
}

void check_vec(const c10::optional<torch::Tensor>& t, int64_t C, at::ScalarType dt, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->numel() == C, name, " must be a contiguous CPU [", C, "] tensor");
  TORCH_CHECK(t->scalar_type() == dt, name, " must have the same dtype as the other affine parameter");
}

// ---- GELU (tanh approximation) ---------------------------------------------------------------

inline __m256 gelu8(__m256 v) {
  const __m256 k0 = _mm256_set1_ps(-2.0f * 0.7978845608028654f), k1 = _mm256_set1_ps(0.044715f);
  // -2u = -2 sqrt(2/pi) (v + 0.044715 v^3)
  __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
  __m256 a = _mm256_mul_ps(k0, _mm256_add_ps(v, _mm256_mul_ps(k1, v3)));
  __m256 g = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), codeshell::exp8(a)));
  // exp8 clamps its argument at 88: past it (v < ~-5.4) the sigmoid is 0 in fp32, and torch's
  // 0.5 v (1 + tanh u) gives v * 0 = -0; v / (1 + e^88) would leave a tiny non-zero
  return _mm256_blendv_ps(g, _mm256_mul_ps(v, _mm256_setzero_ps()), _mm256_cmp_ps(a, _mm256_set1_ps(88.f), _CMP_GT_OQ));
}

}  // namespace

#if CODESHELL_HAVE_AVX512
CODESHELL_BEGIN_AVX512
namespace {

// The GELU in 16 lanes: lane for lane the same operations, in the same order and rounding, as
// gelu8 with exp8 and the 8-wide bf16 conversions above, so a value's result does not depend on
// the width (tests/kernels/test_fused.py compares the two paths bit for bit). Why: the GELU is
// compute-bound (~25 instructions a vector with a divide; ~1.1 ns a value on 8 lanes here),
// 10-17% of a 512-token prefill and ~8 us of each verify row of codeshell-mini.
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const bf16* p, __mmask16 k) { return codeshell::load_bf16x16(p, k); }
inline void store16(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
inline void store16(bf16* p, __m512 v, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(codeshell::bf16_bits(v)));
}
using codeshell::gelu16;      // simd512.h: shared with the prefill GEMM's GELU epilogue (panel_bf16.cpp)
using codeshell::round_bf16;  // the 16-lane overload beside the 8-lane one above

// Two vectors a step where the row has them: each vector's ~45 operations are one dependent
// chain (exp16's polynomial, the divide), so two side by side keep more of the FP pipes busy
// (the same operations per lane: the same bits). CODESHELL_GELU_X2=0 (read per call) runs the
// one-vector loop alone, for A/B runs.
bool gelu_x2() {
  return codeshell::env_flag("CODESHELL_GELU_X2", true);
}

template <class TI, class TO>
void gelu_row16(const TI* x, const float* bias, TO* o, int64_t N, bool round_in, bool x2) {
  int64_t c = 0;
  if (x2)
    for (; c + 32 <= N; c += 32) {
      __m512 v0 = load16(x + c, __mmask16(0xffff)), v1 = load16(x + c + 16, __mmask16(0xffff));
      if (bias != nullptr) {
        v0 = _mm512_add_ps(v0, load16(bias + c, __mmask16(0xffff)));
        v1 = _mm512_add_ps(v1, load16(bias + c + 16, __mmask16(0xffff)));
      }
      if (round_in) v0 = round_bf16(v0), v1 = round_bf16(v1);
      const __m512 g0 = gelu16(v0), g1 = gelu16(v1);
      store16(o + c, g0, __mmask16(0xffff));
      store16(o + c + 16, g1, __mmask16(0xffff));
    }
  for (; c < N; c += 16) {
    const __mmask16 k = N - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (N - c)) - 1);
    __m512 v = load16(x + c, k);
    if (bias != nullptr) v = _mm512_add_ps(v, load16(bias + c, k));
    if (round_in) v = round_bf16(v);
    store16(o + c, gelu16(v), k);
  }
}

// rope_rows (below) in 16 lanes, the same bits: per value the same loads, the same rounding of
// an fp32 input to bf16 (round_bf16, 16 lanes), the same rounded products and the rounded sum,
// the same bf16 store rounding (bf16_bits is store8's); a half of D % 16 ends in a masked
// vector. Why: the 8-lane loop's bf16 loads and stores (a widen, a shift, a 4-op rounding and a
// pack per 8 values) made the small shape's prompt RoPE ~1.7 ms (8 layers, 512 x 10 heads of
// 128); session 28. CODESHELL_ROPE16=0 (read per call): the 8-lane loop.
namespace rope16 {
inline __m512 rnd(__m512 v) {
  asm("" : "+v"(v));
  return v;
}
}  // namespace rope16

template <class TI, class TO>
void rope_row16(const TI* in, TO* out, const float* c, const float* s, int64_t C, int64_t heads, int64_t D,
                bool copy) {
  using rope16::rnd;
  constexpr bool round_in = std::is_same<TI, float>::value && std::is_same<TO, bf16>::value;
  const int64_t half = D / 2;
  for (int64_t hd = 0; hd < heads; ++hd) {
    const TI* xi = in + hd * D;
    TO* x = out + hd * D;
    for (int64_t j = 0; j < half; j += 16) {
      const __mmask16 k = half - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (half - j)) - 1);
      __m512 x1 = load16(xi + j, k), x2 = load16(xi + half + j, k);
      if constexpr (round_in) {
        x1 = round_bf16(x1);
        x2 = round_bf16(x2);
      }
      const __m512 cv = _mm512_maskz_loadu_ps(k, c + j), sv = _mm512_maskz_loadu_ps(k, s + j);
      const __m512 o1 = _mm512_sub_ps(rnd(_mm512_mul_ps(x1, cv)), rnd(_mm512_mul_ps(x2, sv)));
      const __m512 o2 = _mm512_add_ps(rnd(_mm512_mul_ps(x2, cv)), rnd(_mm512_mul_ps(x1, sv)));
      store16(x + j, o1, k);
      store16(x + half + j, o2, k);
    }
  }
  if (copy)
    for (int64_t c0 = heads * D; c0 < C; c0 += 16) {
      const __mmask16 k = C - c0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (C - c0)) - 1);
      store16(out + c0, load16(in + c0, k), k);
    }
}

}  // namespace
CODESHELL_END_AVX512
#endif

namespace {

// The 16-lane RoPE (rope_row16) where the GELU runs 16 lanes, unless CODESHELL_ROPE16=0.
bool rope_wide() {
#if CODESHELL_HAVE_AVX512
  static const bool cpu = codeshell::cpu_features().max_isa >= codeshell::kAvx512Vnni;
  return cpu && !codeshell::env_is("CODESHELL_KERNEL_ISA", "avx2") && codeshell::env_flag("CODESHELL_ROPE16", true);
#else
  return false;
#endif
}

// The 16-lane GELU where the CPU has AVX-512 and CODESHELL_KERNEL_ISA does not cap the kernels
// at avx2 (the cap ops.py applies to the matmuls; read here per call so a test can set it).
// The two widths give the same bits, so this chooses speed only.
bool gelu_wide() {
#if CODESHELL_HAVE_AVX512
  static const bool cpu = codeshell::cpu_features().max_isa >= codeshell::kAvx512Vnni;
  return cpu && !codeshell::env_is("CODESHELL_KERNEL_ISA", "avx2");
#else
  return false;
#endif
}

template <class TI, class TO>
void gelu_rows(const TI* in, const float* bias, TO* out, int64_t rows, int64_t N, bool round_in) {
#if CODESHELL_HAVE_AVX512
  if (gelu_wide()) {
    const bool x2 = gelu_x2();
    for_pieces(rows, N, [&](int64_t i, int64_t c0, int64_t c1) {
      gelu_row16(in + i * N + c0, bias ? bias + c0 : nullptr, out + i * N + c0, c1 - c0, round_in, x2);
    });
    return;
  }
#endif
  for_pieces(rows, N, [&](int64_t i, int64_t c0, int64_t c1) {
    const TI* x = in + i * N;
    TO* o = out + i * N;
    for (int64_t c = c0; c < c1; c += 8) {
      int64_t n = std::min<int64_t>(8, c1 - c);
      __m256 v = loadn(x + c, n);
      if (bias != nullptr) v = _mm256_add_ps(v, loadn(bias + c, n));
      if (round_in) v = round_bf16(v);
      storen(o + c, gelu8(v), n);
    }
  });
}

// ---- RoPE (rotate-half) in place ---------------------------------------------------------------

// in -> out (the same buffer for the in-place op); an fp32 `in` with bf16 `out` is rounded to
// bf16 first (the plain path's cast of the linear's output), and the columns past the rotated
// heads (v) are copied (rounded) when in is not out.
template <class TI, class TO>
void rope_rows(const TI* in, TO* out, const float* cs, const float* sn, int64_t cw, int64_t rows, int64_t C,
               int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  const bool copy = static_cast<const void*>(in) != static_cast<const void*>(out);
  constexpr bool round_in = std::is_same<TI, float>::value && std::is_same<TO, bf16>::value;
#if CODESHELL_HAVE_AVX512
  if (rope_wide()) {
    at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) rope_row16<TI, TO>(in + i * C, out + i * C, cs + i * cw, sn + i * cw, C, heads, D, copy);
    });
    return;
  }
#endif
  at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* c = cs + i * cw;  // cos/sin rows of width cw = D or D/2: only the first half is read
      const float* s = sn + i * cw;
      for (int64_t hd = 0; hd < heads; ++hd) {
        const TI* xi = in + i * C + hd * D;
        TO* x = out + i * C + hd * D;
        for (int64_t j = 0; j < half; j += 8) {
          int64_t n = std::min<int64_t>(8, half - j);
          __m256 x1 = loadn(xi + j, n), x2 = loadn(xi + half + j, n);
          if constexpr (round_in) {
            x1 = round_bf16(x1);
            x2 = round_bf16(x2);
          }
          __m256 cv = loadn(c + j, n), sv = loadn(s + j, n);
          // o1 = x1 c - x2 s, o2 = x2 c + x1 s: rounded products, then the rounded sum
          __m256 o1 = _mm256_sub_ps(rounded(_mm256_mul_ps(x1, cv)), rounded(_mm256_mul_ps(x2, sv)));
          __m256 o2 = _mm256_add_ps(rounded(_mm256_mul_ps(x2, cv)), rounded(_mm256_mul_ps(x1, sv)));
          storen(x + j, o1, n);
          storen(x + half + j, o2, n);
        }
      }
      if (copy)
        for (int64_t c0 = heads * D; c0 < C; c0 += 8) {
          int64_t n = std::min<int64_t>(8, C - c0);
          storen(out + i * C + c0, loadn(in + i * C + c0, n), n);
        }
    }
  });
}

}  // namespace

// x, r [rows, C] (x bf16 or fp32; r optional, x's dtype or fp32: an fp32 r with bf16 x is
// rounded to bf16 first); weight, bias [C] (bf16 or fp32, both the same, optional). Returns (h, y): h = x + r in x's dtype (x itself when r is None) and
// y = LayerNorm(h) * weight + bias in x's dtype.
std::vector<torch::Tensor> fused_add_layer_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& r,
                                                const c10::optional<torch::Tensor>& weight,
                                                const c10::optional<torch::Tensor>& bias, double eps) {
  check_rows(x, "x");
  torch::Tensor h = r ? torch::empty_like(x) : x;
  torch::Tensor y = torch::empty_like(x);
  fused_add_layer_norm_out(x, r, weight, bias, eps, h, y);
  return {h, y};
}

// fused_add_layer_norm into the caller's h and y (contiguous, x's shape and dtype; h is only
// written when r is given). The native decode step's per-step buffers (decode_step.cpp).
void fused_add_layer_norm_out(const torch::Tensor& x, const c10::optional<torch::Tensor>& r,
                              const c10::optional<torch::Tensor>& weight, const c10::optional<torch::Tensor>& bias,
                              double eps, torch::Tensor& h, torch::Tensor& y) {
  check_rows(x, "x");
  for (const torch::Tensor* t : {&h, &y})
    TORCH_CHECK(t->is_contiguous() && t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type(),
                "h and y must be contiguous tensors of x's shape and dtype");
  const int64_t C = x.size(1);
  TORCH_CHECK(C > 0, "x must have at least one column");
  if (r) {
    check_rows(*r, "r");
    TORCH_CHECK(r->sizes() == x.sizes(), "r must match x's shape");
    TORCH_CHECK(r->scalar_type() == x.scalar_type() || r->scalar_type() == at::kFloat,
                "r must have x's dtype or be float32");
  }
  const auto wdt = weight ? weight->scalar_type() : bias ? bias->scalar_type() : at::kFloat;
  TORCH_CHECK(wdt == at::kFloat || wdt == at::kBFloat16, "weight and bias must be float32 or bfloat16");
  check_vec(weight, C, wdt, "weight");
  check_vec(bias, C, wdt, "bias");
  const bool xb = x.scalar_type() == at::kBFloat16, wb = wdt == at::kBFloat16;
  const bool rf = r && r->scalar_type() == at::kFloat;
  if (xb && wb) {
    if (rf) add_ln<bf16, bf16, float>(x, r, h, y, weight, bias, eps);
    else add_ln<bf16, bf16, bf16>(x, r, h, y, weight, bias, eps);
  } else if (xb) {
    if (rf) add_ln<bf16, float, float>(x, r, h, y, weight, bias, eps);
    else add_ln<bf16, float, bf16>(x, r, h, y, weight, bias, eps);
  } else if (wb) {
    add_ln<float, bf16, float>(x, r, h, y, weight, bias, eps);
  } else {
    add_ln<float, float, float>(x, r, h, y, weight, bias, eps);
  }
}

// v [rows, N] (fp32 or bf16), bias fp32 [N] optional; out_bf16: the result in bf16 (v, plus
// bias, rounded to bf16 before the GELU, as the plain path's cast then F.gelu), else fp32 (v
// must then be fp32).
torch::Tensor fused_gelu_tanh(const torch::Tensor& v, const c10::optional<torch::Tensor>& bias, bool out_bf16) {
  check_rows(v, "v");
  torch::Tensor out = torch::empty({v.size(0), v.size(1)}, v.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  fused_gelu_tanh_out(v, bias, out_bf16, out);  // checks the rest
  return out;
}

// fused_gelu_tanh into the caller's contiguous `out` of v's shape (bf16 when out_bf16, else fp32).
void fused_gelu_tanh_out(const torch::Tensor& v, const c10::optional<torch::Tensor>& bias, bool out_bf16,
                         torch::Tensor& out) {
  check_rows(v, "v");
  const int64_t rows = v.size(0), N = v.size(1);
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat, "bias must be float32");
    check_vec(bias, N, at::kFloat, "bias");
  }
  const bool vb = v.scalar_type() == at::kBFloat16;
  TORCH_CHECK(out_bf16 || !vb, "a bfloat16 v gives a bfloat16 result (out_bf16=True)");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == v.sizes() &&
                  out.scalar_type() == (out_bf16 ? at::kBFloat16 : at::kFloat),
              "out must be a contiguous tensor of v's shape in the result's dtype");
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  if (vb) gelu_rows<bf16, bf16>(v.data_ptr<bf16>(), bp, out.data_ptr<bf16>(), rows, N, bp != nullptr);
  else if (out_bf16) gelu_rows<float, bf16>(v.data_ptr<float>(), bp, out.data_ptr<bf16>(), rows, N, true);
  else gelu_rows<float, float>(v.data_ptr<float>(), bp, out.data_ptr<float>(), rows, N, false);
}

void check_rope(int64_t rows, int64_t C, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads, int64_t D) {
  TORCH_CHECK(D > 0 && D % 2 == 0 && heads >= 0 && heads * D <= C, "heads * D must fit in a row of qkv and D be even");
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == rows && (t->size(1) == D || t->size(1) == D / 2) && t->size(1) == cos.size(1),
                "cos and sin must be contiguous float32 [rows, D] or [rows, D/2]");
}

// qkv [rows, C] (bf16 or fp32, contiguous), rotated in place for heads 0..heads-1 of width D
// (columns [0, heads * D)); cos, sin fp32 [rows, D] as model.rope_cos_sin builds them (the
// halves repeat) or [rows, D/2], the first half alone.
void fused_rope_(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads, int64_t D) {
  check_rows(qkv, "qkv");
  const int64_t rows = qkv.size(0), C = qkv.size(1);
  check_rope(rows, C, cos, sin, heads, D);
  const int64_t cw = cos.size(1);
  if (qkv.scalar_type() == at::kBFloat16)
    rope_rows<bf16, bf16>(qkv.data_ptr<bf16>(), qkv.data_ptr<bf16>(), cos.data_ptr<float>(), sin.data_ptr<float>(), cw,
                          rows, C, heads, D);
  else
    rope_rows<float, float>(qkv.data_ptr<float>(), qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                            cw, rows, C, heads, D);
}

// y fp32 [rows, C] (a linear's fp32 output) -> bf16 [rows, C]: rounded to bf16 (the plain
// path's cast), then the first `heads` heads rotated as fused_rope_ rotates them: cast + RoPE
// in one pass over the qkv row.
torch::Tensor fused_rope_bf16(const torch::Tensor& y, const torch::Tensor& cos, const torch::Tensor& sin,
                              int64_t heads, int64_t D) {
  check_rows(y, "y");
  TORCH_CHECK(y.scalar_type() == at::kFloat, "y must be float32");
  const int64_t rows = y.size(0), C = y.size(1);
  check_rope(rows, C, cos, sin, heads, D);
  torch::Tensor out = torch::empty({rows, C}, y.options().dtype(at::kBFloat16));
  fused_rope_bf16_out(y, cos, sin, heads, D, out);
  return out;
}

// fused_rope_bf16 into the caller's contiguous bf16 `out` of y's shape.
void fused_rope_bf16_out(const torch::Tensor& y, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads,
                         int64_t D, torch::Tensor& out) {
  check_rows(y, "y");
  TORCH_CHECK(y.scalar_type() == at::kFloat, "y must be float32");
  const int64_t rows = y.size(0), C = y.size(1);
  check_rope(rows, C, cos, sin, heads, D);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == y.sizes() && out.scalar_type() == at::kBFloat16,
              "out must be a contiguous bf16 tensor of y's shape");
  rope_rows<float, bf16>(y.data_ptr<float>(), out.data_ptr<bf16>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                         cos.size(1), rows, C, heads, D);
}

// n fp32 values -> bf16, rounded to nearest even with NaN -> 0x7fc0: the bits of torch's
// `.to(torch.bfloat16)` (c10::BFloat16's conversion), for the decode step's logits.
void f32_to_bf16(const float* src, at::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(dst + i, load8(src + i));
  if (i < n) store_tail(dst + i, load8_tail(src + i, n - i), n - i);
}

void register_fused(pybind11::module& m) {
  // These keep the GIL: a decode row takes a few microseconds, less than a release and
  // reacquire can cost against a busy event loop (see kernels.cpp).
  m.def("fused_add_layer_norm", &fused_add_layer_norm, "(h, y): h = x + r, y = LayerNorm(h) (rows of [rows, C])");
  m.def("fused_gelu_tanh", &fused_gelu_tanh, "gelu_tanh(v + bias), rounded through bf16 when out_bf16");
  m.def("fused_rope_", &fused_rope_, "rotate-half RoPE in place on the first heads of each row of qkv");
  m.def("fused_rope_bf16", &fused_rope_bf16, "fp32 qkv rows -> bf16, the first heads rotated (cast + RoPE)");
}
