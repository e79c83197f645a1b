// Temperature sampling of a row (or the rows of a decode step) of logits by inverse CDF, fused
// into two passes.
//
// What this is: token = the first i with cumsum(softmax(logits / T))[i] > u * total, u in [0, 1):
// the draw `engine/sampling.py` makes with torch ops (softmax, cumsum, searchsorted), done here
// as one max pass and one exp-and-sum pass over the vocabulary, then a scan of the block sums
// that stops at the crossing. Tokens of probability 0 (a -inf logit, or exp underflow) are never
// drawn. What this is not: top-k/top-p/min-p or penalties (those rows take the torch path).
//
// Why: on a 70,144-token vocabulary the torch ops cost 270-350 us a row on this CPU (each pass
// allocates and the cumsum is scalar), about 8% of a batch-16 decode step of a small model;
// this takes ~75 us.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "isa.h"
#include "parallel.h"
#include "simd.h"
#include "switches.h"

namespace {

// How a row's logits are read as fp32: fp32 as they are, bf16 widened (exact: bf16 is the top
// half of an fp32). Every pass reads through these, so a bf16 row gives the fp32 path's results
// on its widened copy bit for bit, without the copy.
struct LoadF32 {
  using T = float;
  static inline __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static inline float load1(const T* p) { return *p; }
};

struct LoadBF16 {
  using T = uint16_t;
  static inline __m256 load8(const T* p) { return codeshell::load_bf16x8(p); }
  static inline float load1(const T* p) { return codeshell::bf16_to_f32(*p); }
};

// Why bf16 rows: the native decode step hands the engine its logits in bf16; widening a 70k row
// with torch (`logits.float()`) forked an OpenMP region between two native steps, whose worker
// then spun through the next step beside the decode team's two threads (docs/kernels-log.md,
// session 20 helper A); reading the bf16 row here needs no torch op at all (session 21 A).
template <class L>
int64_t draw(const typename L::T* l, int64_t V, double temperature, double u) {
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  TORCH_CHECK(u >= 0 && u < 1, "u must be in [0, 1)");
  TORCH_CHECK(V > 0, "empty logits");
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) mv = _mm256_max_ps(mv, L::load8(l + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float mx = -INFINITY;
  for (float v : lanes) mx = std::max(mx, v);
  for (; i < V; ++i) mx = std::max(mx, L::load1(l + i));
  TORCH_CHECK(std::isfinite(mx), "every logit is -inf or NaN: nothing to sample");
  const float inv = float(1.0 / temperature);
  // Block b's 8 values exp((l[i] - max) / T) (0 past V). The total is the block sums added in
  // order, which is exactly what the scan adds up again; the crossing block is recomputed
  // rather than keeping all V values (a 280 KB buffer per call cost more than the exps).
  const __m256 m8 = _mm256_set1_ps(mx), i8 = _mm256_set1_ps(inv);
  auto block = [&](int64_t b, float* out) -> __m256 {
    __m256 ev;
    if (b * 8 + 8 <= V) {
      ev = codeshell::exp8(_mm256_mul_ps(_mm256_sub_ps(L::load8(l + b * 8), m8), i8));
    } else {
      alignas(32) float t8[8];
      for (int t = 0; t < 8; ++t) t8[t] = b * 8 + t < V ? std::exp((L::load1(l + b * 8 + t) - mx) * inv) : 0.f;
      ev = _mm256_load_ps(t8);
    }
    if (out) _mm256_storeu_ps(out, ev);
    return ev;
  };
  const int64_t nb = (V + 7) / 8;
  std::unique_ptr<float[]> bsum(new float[size_t(nb)]);
  double total = 0;
  for (int64_t b = 0; b < nb; ++b) {
    bsum[b] = codeshell::hsum8(block(b, nullptr));
    total += bsum[b];
  }
  const double target = u * total;
  double acc = 0;
  for (int64_t b = 0; b < nb; ++b) {
    if (acc + bsum[b] <= target) {
      acc += bsum[b];
      continue;
    }
    block(b, lanes);
    for (int t = 0; t < 8; ++t)
      if (lanes[t] > 0 && (acc += lanes[t]) > target) return b * 8 + t;
  }
  // rounding left the crossing unmet: the last token of non-zero probability
  for (int64_t b = nb - 1; b >= 0; --b) {
    if (bsum[b] <= 0) continue;
    block(b, lanes);
    for (int t = 7; t >= 0; --t)
      if (lanes[t] > 0) return b * 8 + t;
  }
  return V - 1;
}

}  // namespace

namespace {

bool f32_or_bf16(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16;
}

// One row at p (fp32 or bf16 as `bf16` says).
int64_t draw_row(const void* p, bool bf16, int64_t V, double temperature, double u) {
  return bf16 ? draw<LoadBF16>(static_cast<const uint16_t*>(p), V, temperature, u)
              : draw<LoadF32>(static_cast<const float*>(p), V, temperature, u);
}

}  // namespace

// One row [V], fp32 or bf16 (a bf16 row draws what its fp32 widening draws), on this thread.
int64_t sample_temperature(const torch::Tensor& logits, double temperature, double u) {
  TORCH_CHECK(logits.dim() == 1 && f32_or_bf16(logits) && logits.is_contiguous(),
              "logits must be a contiguous fp32 or bf16 [V] tensor");
  return draw_row(logits.data_ptr(), logits.scalar_type() == torch::kBFloat16, logits.numel(), temperature, u);
}

// Rows [B, V] (fp32 or bf16; rows may be strided, the values of a row contiguous), one
// temperature and one uniform each (fp64 [B]): the rows of a decode step, in parallel over the
// threads (16 rows: ~0.6 ms on 2 threads against ~1.8 ms one call at a time); one row on this
// thread (no OpenMP region for the 1-client server's step).
torch::Tensor sample_temperature_rows(const torch::Tensor& logits, const torch::Tensor& temperatures,
                                      const torch::Tensor& us) {
  TORCH_CHECK(logits.dim() == 2 && f32_or_bf16(logits) && (logits.size(1) <= 1 || logits.stride(1) == 1),
              "logits must be an fp32 or bf16 [B, V] tensor with contiguous rows");
  const int64_t B = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  TORCH_CHECK(temperatures.scalar_type() == torch::kFloat64 && temperatures.is_contiguous() &&
                  temperatures.numel() == B && us.scalar_type() == torch::kFloat64 && us.is_contiguous() &&
                  us.numel() == B,
              "temperatures and us must be contiguous fp64 [B] tensors");
  auto out = torch::empty({B}, logits.options().dtype(torch::kInt64));
  const bool bf16 = logits.scalar_type() == torch::kBFloat16;
  const char* base = static_cast<const char*>(logits.data_ptr());
  const int64_t row_bytes = ld * int64_t(logits.element_size());
  const double* t = temperatures.data_ptr<double>();
  const double* u = us.data_ptr<double>();
  int64_t* o = out.data_ptr<int64_t>();
  auto rows = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) o[b] = draw_row(base + b * row_bytes, bf16, V, t[b], u[b]);
  };
  if (B <= 1) {
    rows(0, B);
    return out;
  }
  // The rows on the process's decode team (parallel.h Team::shared, the team the native decode
  // step just ran on: its helper still spins for ~1 ms after a step, so posting 4-16 rows costs a
  // few cache-line transfers), a row a chunk claimed in turn, when no other call holds the team;
  // otherwise (or CODESHELL_SAMPLE_ROWS_TEAM=off, read per call) an OpenMP region as before.
  // Why: the batched temperature rows ran between two team steps at 4+ clients, forking
  // libgomp's pool there (its worker then spins into, or must be woken for, the next regions:
  // session 20 helper A). Each row's draw is the same function on the same values either way.
  const int threads = at::get_num_threads();
  if (threads > 1 && codeshell::current_team() == nullptr && !at::in_parallel_region() &&
      !codeshell::env_is("CODESHELL_SAMPLE_ROWS_TEAM", "off")) {
    codeshell::Team* team = codeshell::Team::shared(threads);
    if (team->try_own()) {
      team->begin();
      std::exception_ptr err;
      try {
        team->run(B, 1, rows);
      } catch (...) {
        err = std::current_exception();
      }
      team->end();
      team->disown();
      if (err) std::rethrow_exception(err);
      return out;
    }
  }
  at::parallel_for(0, B, 1, rows);
  return out;
}

// ---- greedy picks ------------------------------------------------------------------------------
// The first maximal index of each row of logits [N, V], fp32 or bf16 (compared widened to fp32,
// which is exact): one vectorised max pass, then a compare pass that stops at the first lane
// equal to the maximum. Why: torch 2.13's CPU `max(-1)` reads ~6 GB/s (49 us for one 70k fp32
// row, 2.7 ms for 64 bf16 rows, slower on bf16 than fp32); a verify step of prompt lookup picks
// a token for each of up to 64 rows. NaN logits never win (a row of NaN gives index 0).

namespace {

// fp32 logits read as the bf16 values they round to (fused.cpp store8's rounding: nearest even,
// NaN -> 0x7fc0), widened back: the maxima and first maximal index of the bf16 logits that the
// native decode step would have written, without writing them (argmax_rows_rounded below).
struct LoadF32AsBF16 {
  using T = float;
  static inline __m256 load8(const T* p) {
    const __m256 v = _mm256_loadu_ps(p);
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))),
                                 _mm256_set1_epi32(int32_t(0xffff0000u)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc00000), nan);
    return _mm256_castsi256_ps(r);
  }
  static inline float load1(const T* p) {
    const float v = *p;
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u = v != v ? 0x7fc00000u : (u + ((u >> 16) & 1u) + 0x7fffu) & 0xffff0000u;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

template <class L>
int64_t row_argmax(const typename L::T* p, int64_t V) {
  // pass 1: the maximum (4 independent max chains)
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 32 <= V; i += 32) {
    m0 = _mm256_max_ps(m0, L::load8(p + i));
    m1 = _mm256_max_ps(m1, L::load8(p + i + 8));
    m2 = _mm256_max_ps(m2, L::load8(p + i + 16));
    m3 = _mm256_max_ps(m3, L::load8(p + i + 24));
  }
  for (; i + 8 <= V; i += 8) m0 = _mm256_max_ps(m0, L::load8(p + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  float mx = -INFINITY;
  for (float v : lanes) mx = v > mx ? v : mx;
  for (; i < V; ++i) {
    const float v = L::load1(p + i);
    mx = v > mx ? v : mx;
  }
  // pass 2: the first index holding it
  const __m256 mv = _mm256_set1_ps(mx);
  for (i = 0; i + 8 <= V; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(L::load8(p + i), mv, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; i < V; ++i)
    if (L::load1(p + i) == mx) return i;
  return 0;  // every logit NaN
}

// Segment [i0, i1) of a row (i0 a multiple of 8; i1 a multiple of 8 or V): its maximum over
// the non-NaN values and the first index in the segment holding it (-1: none), and whether it
// holds a NaN. The maximum is exact in any order for NaN-free values (-0 and +0 compare equal
// in the index pass, as in row_argmax), so the first segment whose maximum is the row's gives
// row_argmax's index. (m = max(v, m): vmaxps returns its second operand when either is NaN, so
// a NaN v leaves m; the NaN is flagged, and a row with a NaN takes row_argmax itself, whose max
// chains NaN resets differently.)
template <class L>
void seg_argmax(const typename L::T* p, int64_t i0, int64_t i1, float& mx_out, int64_t& idx, bool& nan) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, bad = _mm256_setzero_ps();
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    const __m256 a = L::load8(p + i), b = L::load8(p + i + 8);
    m0 = _mm256_max_ps(a, m0);
    m1 = _mm256_max_ps(b, m1);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
  }
  for (; i + 8 <= i1; i += 8) {
    const __m256 a = L::load8(p + i);
    m0 = _mm256_max_ps(a, m0);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
  float mx = -INFINITY;
  for (float v : lanes) mx = v > mx ? v : mx;
  nan = _mm256_movemask_ps(bad) != 0;
  for (; i < i1; ++i) {
    const float v = L::load1(p + i);
    nan |= v != v;
    mx = v > mx ? v : mx;
  }
  mx_out = mx;
  idx = -1;
  const __m256 mv = _mm256_set1_ps(mx);
  for (i = i0; i + 8 <= i1; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(L::load8(p + i), mv, _CMP_EQ_OQ));
    if (hit) {
      idx = i + __builtin_ctz(hit);
      return;
    }
  }
  for (; i < i1; ++i)
    if (L::load1(p + i) == mx) {
      idx = i;
      return;
    }
}

#if CODESHELL_HAVE_AVX512
// row_argmax<LoadF32AsBF16>'s index without rounding every value (session 28, helper B).
// Rounding to bf16 is monotone (non-decreasing in float order) for non-NaN values, so the
// maximum of the rounded row is R = round(max of the raw row), and the first index whose rounded
// value equals R (float equality: -0 == +0) is the first index with raw value >= lo, where lo is
// the smallest float that rounds to >= R (round(v) >= R and R maximal means round(v) == R).
// Pass 1 is one vmaxps a 16 floats (4 chains) with NaN flags; pass 2 one compare a 16 floats:
// against ~9 integer / blend ops a 8 floats a pass in the LoadF32AsBF16 loops (codeshell-mini's
// batch-8 argmax: 8 x 16384 fp32 logits, 17-25 us a step). A row holding a NaN returns -1: the
// caller runs row_argmax (whose NaN handling differs: its max chains reset on a NaN).
CODESHELL_BEGIN_AVX512
inline uint32_t f32_key(float f) {  // total order of non-NaN floats as unsigned ints (-0 just below +0)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float key_f32(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// The smallest float v with round_bf16(v) >= R, for R a bf16 value (not NaN): for R > 0 the
// first fp32 pattern that rounds up to R's (ties to even: R's bits - 0x8000, + 1 where R's last
// bit is odd), for R < 0 minus the largest magnitude that rounds to |R| (+ 0x8000 where even,
// + 0x7fff where odd), for +-0 minus the largest magnitude rounding to -0 (0x8000), and -inf itself.
inline float round_lo(float R) {
  uint32_t u;
  std::memcpy(&u, &R, 4);
  const uint32_t r16 = u >> 16;
  uint32_t lo;
  if (R == 0.f) lo = 0x80008000u;
  else if (!(u & 0x80000000u)) lo = (r16 << 16) - 0x8000u + (r16 & 1u);
  else if (R == -INFINITY) lo = u;
  else lo = 0x80000000u | (((r16 & 0x7fffu) << 16) + ((r16 & 1u) ? 0x7fffu : 0x8000u));
  float f;
  std::memcpy(&f, &lo, 4);
  return f;
}

// Values [i0, i1) of a row (i0 a multiple of 16): R = the bf16 rounding of their maximum, `idx` the
// first index in the range whose rounding is R, `nan` whether the range holds a NaN (then R and idx
// are not set).
inline void seg_rounded512(const float* p, int64_t i0, int64_t i1, float& R, int64_t& idx, bool& nan) {
  __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  __mmask16 bad = 0;
  int64_t i = i0;
  for (; i + 64 <= i1; i += 64) {
    const __m512 a = _mm512_loadu_ps(p + i), b = _mm512_loadu_ps(p + i + 16);
    const __m512 c = _mm512_loadu_ps(p + i + 32), d = _mm512_loadu_ps(p + i + 48);
    m0 = _mm512_max_ps(a, m0);
    m1 = _mm512_max_ps(b, m1);
    m2 = _mm512_max_ps(c, m2);
    m3 = _mm512_max_ps(d, m3);
    bad |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(c, d, _CMP_UNORD_Q);
  }
  for (; i < i1; i += 16) {
    const __mmask16 k = i1 - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (i1 - i)) - 1);
    const __m512 a = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, p + i);
    m0 = _mm512_max_ps(a, m0);
    bad |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
  }
  nan = bad != 0;
  if (nan) return;
  const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  R = LoadF32AsBF16::load1(&mx);
  const float lo = round_lo(R);
  const __m512 lv = _mm512_set1_ps(lo);
  for (i = i0; i + 16 <= i1; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + i), lv, _CMP_GE_OQ);
    if (hit) {
      idx = i + __builtin_ctz(hit);
      return;
    }
  }
  for (; i < i1; ++i)
    if (p[i] >= lo) {
      idx = i;
      return;
    }
  idx = i0;  // not reached: the maximum itself passes
}

int64_t row_argmax_rounded512(const float* p, int64_t V) {
  float R;
  int64_t idx;
  bool nan;
  seg_rounded512(p, 0, V, R, idx, nan);
  return nan ? -1 : idx;
}
CODESHELL_END_AVX512
#endif

// CODESHELL_ARGMAX_RAW=0 (read per call; A/B runs): argmax_rows_rounded rounds every value in both
// passes (LoadF32AsBF16), as before session 28. Default: row_argmax_rounded512 where the CPU has
// AVX-512 (the same index).
inline bool argmax_raw_on() {
#if CODESHELL_HAVE_AVX512
  static const bool cpu = codeshell::cpu_features().max_isa >= codeshell::kAvx512Vnni;
  return cpu && codeshell::env_flag("CODESHELL_ARGMAX_RAW", true);
#else
  return false;
#endif
}

// out[r] = row_argmax<L>(rows + r * V, V) for r < N. With fewer rows than threads inside the
// native decode step's thread team (a batch-1 step's 70k-logit row: ~10 us on one thread),
// each row is cut into segments of >= 8192 values that the team's threads take (seg_argmax),
// then combined in order: the same index. Outside a team a row a chunk, as before: an OpenMP
// fork for the two halves of a 70k row measured 12.2 against 11.1 us unsplit (session 17).
// CODESHELL_SMALL_SPLIT=off: a row a chunk in the team too.
template <class L>
void argmax_rows_of(const typename L::T* rows, int64_t N, int64_t V, int64_t* out) {
  const codeshell::Team* team = codeshell::current_team();
  const int64_t threads = team ? team->threads() : 1;
  const int64_t S = N < threads && !codeshell::small_split_off() ? std::min<int64_t>(V / 8192, 4 * threads / N) : 1;
  if (S <= 1) {
    codeshell::parallel_chunks(N, 1, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) out[r] = row_argmax<L>(rows + r * V, V);
    });
    return;
  }
  const int64_t seg = (V / S + 7) / 8 * 8;  // multiples of 8: the last segment holds the tail
  const int64_t per = (V + seg - 1) / seg;
  std::vector<float> mx(size_t(N * per));
  std::vector<int64_t> idx(size_t(N * per));
  std::unique_ptr<bool[]> nan(new bool[size_t(N * per)]);
  codeshell::parallel_chunks(N * per, 1, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r = k / per, i0 = (k % per) * seg;
      seg_argmax<L>(rows + r * V, i0, std::min(V, i0 + seg), mx[k], idx[k], nan[k]);
    }
  });
  for (int64_t r = 0; r < N; ++r) {
    const int64_t k0 = r * per;
    bool any_nan = false;
    float m = -INFINITY;
    for (int64_t k = k0; k < k0 + per; ++k) {
      any_nan |= nan[k];
      m = mx[k] > m ? mx[k] : m;
    }
    if (any_nan) {
      out[r] = row_argmax<L>(rows + r * V, V);
      continue;
    }
    out[r] = 0;
    for (int64_t k = k0; k < k0 + per; ++k)
      if (mx[k] == m && idx[k] >= 0) {
        out[r] = idx[k];
        break;
      }
  }
}

}  // namespace

torch::Tensor argmax_rows(const torch::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0 &&
                  (logits.scalar_type() == torch::kFloat32 || logits.scalar_type() == torch::kBFloat16),
              "logits must be a contiguous fp32 or bf16 [N, V] tensor with V > 0");
  const int64_t N = logits.size(0), V = logits.size(1);
  auto out = torch::empty({N}, logits.options().dtype(torch::kInt64));
  int64_t* o = out.data_ptr<int64_t>();
  const bool bf16 = logits.scalar_type() == torch::kBFloat16;
  const void* base = logits.data_ptr();
  // rows in parallel; a row (~10 us) is split only inside the native decode step's team, with
  // fewer rows than threads (argmax_rows_of)
  if (bf16) argmax_rows_of<LoadBF16>(static_cast<const uint16_t*>(base), N, V, o);
  else argmax_rows_of<LoadF32>(static_cast<const float*>(base), N, V, o);
  return out;
}

// The first maximal index of each row of the bf16 rounding of fp32 logits [N, V] (row stride
// V) into out[N]: argmax_rows of `logits.to(bfloat16)`, bit for bit (the same passes on the same
// widened values, ties to the first index), without the [N, V] bf16 copy.
// Why: the native decode step's greedy rows need only the picks; writing the bf16 logits
// (N x 32 KiB at codeshell-mini's 16k vocabulary, 137 KiB at 70k) and reading them back cost
// ~2-5 us a row on the Zen 4 machine of session 13 (in-process alternation, about the noise;
// docs/kernels-log.md), where a verify step runs up to 64 rows.
void argmax_rows_rounded(const float* logits, int64_t N, int64_t V, int64_t* out) {
  TORCH_CHECK(V > 0, "argmax_rows_rounded: empty rows");
#if CODESHELL_HAVE_AVX512
  const codeshell::Team* team = codeshell::current_team();
  const int64_t threads = team ? team->threads() : 1;
  // A row a chunk (argmax_rows_of's split of a row into segments stays for fewer rows than threads).
  // Tried and dropped (session 28): in the team, each thread its parallel_owned share of every row's
  // columns (the int8 head's split, hoping its logits were still in that core's L2), the pieces
  // combined in column order: 32 against 18 us a b8 step's 8 x 16384 (bench_b8_nonlinear.py --only
  // team): the logits have left L2 under the head's weight stream, and 128 pieces cost more.
  if (N >= threads && argmax_raw_on()) {
    codeshell::parallel_chunks(N, 1, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t k = row_argmax_rounded512(logits + r * V, V);
        out[r] = k >= 0 ? k : row_argmax<LoadF32AsBF16>(logits + r * V, V);
      }
    });
    return;
  }
#endif
  argmax_rows_of<LoadF32AsBF16>(logits, N, V, out);
}
