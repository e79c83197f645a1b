// Decode attention over the engine's KV cache: one new query per row, grouped-query heads.
//
// What this is: out[b, h] = softmax(scale * q[b, h] . K[slot_b, g]^T over keys 0..len_b-1) V[slot_b, g]
// with g = h / (H / G), read straight from the cache layer [slots, G, max_len, D] (bfloat16 or
// float32) through each row's slot index: no gather of the cache, no mask tensor. Math in fp32.
// What this is not: prefill attention (T > 1: attention_prefill.cpp on AVX512-BF16, else PyTorch SDPA)
// or a training kernel.
//
// Why: on this AVX2 CPU torch's SDPA for one query spends 3.7 ms per layer at 600 cached
// tokens in bf16 (26 ms at batch 8), several times the cost of reading K and V; the cache is
// also gathered when a batch's slots are not consecutive. Here each K/V row is read once per
// KV group and used for up to 4 query heads at a time, with independent FMA chains (two keys
// at a time for the scores, 16-wide value strips held in registers) and a vectorised exp.
//
// Files: the per-query arithmetic in attention_prims.h, the AVX-512 verify run in attention_run512.h;
// here the paths' drivers (attend_group, run, run_packed), their switches and the entry points.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "attention_rows.h"
#include "isa.h"
#include "simd.h"
#include "simd512.h"
#include "switches.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "attention_prims.h"

namespace {

// wide (the caller's isa has AVX-512F; the same bits at every level): 1 the values in 16-lane
// registers (values16), 2 the softmax too (softmax_rows16).
template <class T, int RB>
void attend_block(const float* q, int64_t D, const T* k, const T* v, int64_t S, float scale, float* p, float* o,
                  int wide = 0) {
  scores<T, RB>(q, D, k, S, scale, p);
#if CODESHELL_HAVE_AVX512
  if (wide >= 2) softmax_rows16(p, RB, S);
  else softmax_rows(p, RB, S);
#else
  softmax_rows(p, RB, S);
#endif
#if CODESHELL_HAVE_AVX512
  if (wide) {
    weighted_values16<T, RB>(p, S, v, D, o);
    return;
  }
#endif
  weighted_values<T, RB>(p, S, v, D, o);
}

// One (row, KV group): R query heads q [R][D] (fp32) against S keys; writes o [R][D] (fp32).
// Heads go in blocks of up to 4 (K and V are re-read from cache, not memory, per block).
template <class T>
void attend_group(const float* q, int R, int64_t D, const T* k, const T* v, int64_t S, float scale, float* p,
                  float* o, int wide = 0) {
  if (D % 16 == 0) {
    int r = 0;
    for (; r + 4 <= R; r += 4) attend_block<T, 4>(q + r * D, D, k, v, S, scale, p, o + r * D, wide);
    switch (R - r) {
      case 3: attend_block<T, 3>(q + r * D, D, k, v, S, scale, p, o + r * D, wide); break;
      case 2: attend_block<T, 2>(q + r * D, D, k, v, S, scale, p, o + r * D, wide); break;
      case 1: attend_block<T, 1>(q + r * D, D, k, v, S, scale, p, o + r * D, wide); break;
      default: break;
    }
    return;
  }
  for (int64_t s = 0; s < S; ++s) {  // any D: scalar scores, each key row read once for all R heads
    const T* kr = k + s * D;
    for (int r = 0; r < R; ++r) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += q[r * D + d] * to_f(kr[d]);
      p[r * S + s] = dot * scale;
    }
  }
  softmax_rows(p, R, S);
  std::fill(o, o + R * D, 0.f);
  for (int64_t s = 0; s < S; ++s) {
    const T* vr = v + s * D;
    for (int r = 0; r < R; ++r) {
      const float w = p[r * S + s];
      for (int64_t d = 0; d < D; ++d) o[r * D + d] += w * to_f(vr[d]);
    }
  }
}

template <class T>
void run(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const int64_t* slots,
         const int64_t* lens, double scale, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = kc.size(1), L = kc.size(2);
  const int R = int(H / G);
  const T* kp = reinterpret_cast<const T*>(kc.data_ptr());
  const T* vp = reinterpret_cast<const T*>(vc.data_ptr());
  const bool q32 = q.scalar_type() == torch::kFloat32;
  const float* q_f = q32 ? q.data_ptr<float>() : nullptr;
  const uint16_t* q_h = q32 ? nullptr : reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  float* o_f = q32 ? out.data_ptr<float>() : nullptr;
  uint16_t* o_h = q32 ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, B * G, 1, [&](int64_t a, int64_t e) {
    std::vector<float> qf(size_t(R) * D), o(size_t(R) * D), p;
    for (int64_t i = a; i < e; ++i) {
      const int64_t b = i / G, g = i % G, S = lens[b];
      p.resize(size_t(R) * S);
      for (int64_t j = 0; j < R * D; ++j) {
        const int64_t idx = (b * H + g * R) * D + j;
        qf[j] = q32 ? q_f[idx] : to_f(q_h[idx]);
      }
      const int64_t base = (slots[b] * G + g) * L * D;
      attend_group<T>(qf.data(), R, D, kp + base, vp + base, S, float(scale), p.data(), o.data());
      for (int64_t j = 0; j < R * D; ++j) {
        const int64_t idx = (b * H + g * R) * D + j;
        if (q32) o_f[idx] = o[j];
        else o_h[idx] = to_bf16(o[j]);
      }
    }
  });
}


// ---- packed attention: the queries of one slot share their keys ------------------------------
//
// A speculative verify step packs a sequence's last token and its drafts as consecutive
// queries of one slot (positions p .. p + d: query j sees keys 0..p + j). Each query must get
// exactly the bits `run` above gives it alone (plain decoding's kernel: the greedy text must
// not depend on whether a token was verified or plainly decoded), so the arithmetic per
// (query, head, key) stays attend_block's: each score an FMA chain over d in 8-lane steps from
// zero, summed by hsum8's tree and scaled; softmax_rows on the query's own length; each
// output lane an FMA chain over keys 0..S-1 in order from zero. What a run of n >= 2 queries
// shares (avx512::attend_run): a block of the slot's keys and values converted to fp32 once
// for all its queries and heads (it stays in L1), and 16-lane registers that do two keys'
// 8-lane chains side by side. A single query, or a CPU without AVX-512, runs decode's own
// code (attend_group) per query: on AVX2 registers sharing the loads measured no faster
// (the FMAs, hsum8 and exps are per query and dominate at head_dim 32), and for one query
}  // namespace

#include "attention_run512.h"

namespace {


// CODESHELL_ATTN_RUN1=1 (read per call; off by default): a single query of its slot (every query
// of a plain batched decode step) on attend_run too, not attend_group. The same bits either way
// (attend_run is attend_group's arithmetic per query, see above); what differs is the cost per
// (key, head): attend_group reduces each score's 8-lane chain by its own hsum8, attend_run 16
// keys' chains in one transposing tree, after converting a block of keys to fp32 once for the
// group's R heads. Measured slower at codeshell-mini's short contexts (docs/kernels-log.md, session 18
// helper B), so it stays an A/B switch.
// CODESHELL_ATTN_V16=0 (read per call; A/B runs): the packed path's values in 8-lane registers.
bool values_wide() {
  return codeshell::env_flag("CODESHELL_ATTN_V16", true);
}

bool single_queries_run() {
  return codeshell::env_flag("CODESHELL_ATTN_RUN1", false);
}

// CODESHELL_ATTN_LEAN=0 (read per call; A/B runs): a single query's item as before session 28
// (scalar q / output copies, softmax_rows in 8-lane registers). Default on AVX-512: the copies
// 16 lanes at a time and softmax_rows16 (the same bits).
bool lean_items() {
  return codeshell::env_flag("CODESHELL_ATTN_LEAN", true);
}

// The packed path's switches (attention_rows.h), read once a call.
// CODESHELL_ATTN_RUN_T=0 (read per call; A/B runs): a verify run's keys in keys_paired's layout and
// its scores reduced by hsum8x16, as before session 38 (default: keys_transposed / scores16_t for bf16
// caches at D % 32 == 0). The same bits either way.
PackedAttentionSwitches read_switches() {
  return PackedAttentionSwitches{single_queries_run(), values_wide(), lean_items(),
                                 codeshell::env_flag("CODESHELL_ATTN_RUN_T", true)};
}

// Queries [i0, i1) of q (out's rows [i0, i1)); `serial`: on the calling thread (a decode step's
// team chunk), else split over (run, group) items by at::parallel_for. `sw`: the switches, read
// by the caller (read_switches). `g0, g1` (serial only; default all): only KV groups [g0, g1) of
// each run (packed_attention_groups: a batch-1 query's groups split over the team).
template <class T>
void run_packed(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const int64_t* slots,
                const int64_t* lens, double scale, bool wide, torch::Tensor& out, const PackedAttentionSwitches& sw, int64_t i0,
                int64_t i1, bool serial, int64_t g0 = 0, int64_t g1 = -1) {
  const int64_t H = q.size(1), D = q.size(2), G = kc.size(1), L = kc.size(2);
  const int R = int(H / G);
  const bool single_run = wide && sw.run1, vwide = wide && sw.v16, lean = wide && sw.lean;
  const int vmode = vwide ? (lean ? 2 : 1) : 0;  // attend_group's `wide`
  std::vector<int64_t> start{i0};  // runs: maximal stretches of consecutive queries of one slot
  for (int64_t i = i0 + 1; i <= i1; ++i)
    if (i == i1 || slots[i] != slots[i - 1]) start.push_back(i);
  const int64_t U = int64_t(start.size()) - 1;
  const T* kp = reinterpret_cast<const T*>(kc.data_ptr());
  const T* vp = reinterpret_cast<const T*>(vc.data_ptr());
  const bool q32 = q.scalar_type() == torch::kFloat32;
  const float* q_f = q32 ? q.data_ptr<float>() : nullptr;
  const uint16_t* q_h = q32 ? nullptr : reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  float* o_f = q32 ? out.data_ptr<float>() : nullptr;
  uint16_t* o_h = q32 ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  auto items = [&](int64_t a, int64_t e) {
    // per-thread scratch kept between calls (resized per item: the sizes do not change the bits)
    thread_local std::vector<float> qf, o, p, kb;
    for (int64_t u_g = a; u_g < e; ++u_g) {
      const int64_t u = u_g / G, g = u_g % G, i0 = start[u];
      const int n = int(start[u + 1] - i0);
      qf.resize(size_t(n) * R * D);
      o.resize(size_t(n) * R * D);
      for (int j = 0; j < n; ++j) {
#if CODESHELL_HAVE_AVX512
        if (lean && !q32) {
          codeshell::widen_bf16_row(q_h + ((i0 + j) * H + g * R) * D, qf.data() + size_t(j) * R * D, R * D);
          continue;
        }
#endif
        for (int64_t x = 0; x < R * D; ++x) {
          const int64_t idx = ((i0 + j) * H + g * R) * D + x;
          qf[size_t(j) * R * D + x] = q32 ? q_f[idx] : to_f(q_h[idx]);
        }
      }
      const int64_t base = (slots[i0] * G + g) * L * D;
      bool done = false;
#if CODESHELL_HAVE_AVX512
      if (wide && (n >= 2 || single_run) && D % 16 == 0) {
        avx512::attend_run<T>(qf.data(), n, R, D, kp + base, vp + base, lens + i0, float(scale), p, kb, o.data(), sw.run_t);
        done = true;
      }
#endif
      for (int j = 0; j < n && !done; ++j) {  // decode's code, one query at a time
        p.resize(size_t(R) * lens[i0 + j]);
        attend_group<T>(qf.data() + size_t(j) * R * D, R, D, kp + base, vp + base, lens[i0 + j], float(scale),
                        p.data(), o.data() + size_t(j) * R * D, vmode);
      }
      for (int j = 0; j < n; ++j) {
#if CODESHELL_HAVE_AVX512
        if (lean && !q32) {
          f32_to_bf16_16(o.data() + size_t(j) * R * D, o_h + ((i0 + j) * H + g * R) * D, R * D);
          continue;
        }
#endif
        for (int64_t x = 0; x < R * D; ++x) {
          const int64_t idx = ((i0 + j) * H + g * R) * D + x;
          if (q32) o_f[idx] = o[size_t(j) * R * D + x];
          else o_h[idx] = to_bf16(o[size_t(j) * R * D + x]);
        }
      }
    }
  };
  if (serial && (g0 > 0 || (g1 >= 0 && g1 < G))) {
    for (int64_t u = 0; u < U; ++u) items(u * G + g0, u * G + std::min(g1, G));  // the same items, fewer of them
  } else if (serial) {
    items(0, U * G);
  } else {
    at::parallel_for(0, U * G, 1, items);
  }
}

}  // namespace

namespace {
// The arguments of both entry points: q [B, H, D]; caches [slots, G, max_len, D]; slots, lens int64 [B].
void check_args(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const torch::Tensor& slots,
                const torch::Tensor& lens) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [B, H, D] tensor");
  TORCH_CHECK(kc.dim() == 4 && kc.is_contiguous() && vc.sizes() == kc.sizes() && vc.is_contiguous(),
              "k and v caches must be contiguous [slots, G, max_len, D] tensors of one shape");
  TORCH_CHECK(kc.scalar_type() == vc.scalar_type() &&
                  (kc.scalar_type() == torch::kBFloat16 || kc.scalar_type() == torch::kFloat32),
              "the KV cache must be bfloat16 or float32");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kFloat32, "q must be bf16 or fp32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = kc.size(1);
  TORCH_CHECK(kc.size(3) == D && G > 0 && H % G == 0, "head dims or group count do not match the cache");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && lens.scalar_type() == torch::kInt64 && slots.numel() == B &&
                  lens.numel() == B && slots.is_contiguous() && lens.is_contiguous(),
              "slots and lens must be contiguous int64 [B] tensors");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= sp[b] && sp[b] < kc.size(0), "slot ", sp[b], " is outside the cache");
    TORCH_CHECK(0 < lp[b] && lp[b] <= kc.size(2), "length ", lp[b], " is outside the cache");
  }
}
}  // namespace

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                               const torch::Tensor& slots, const torch::Tensor& lens, double scale) {
  check_args(q, kc, vc, slots, lens);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  auto out = torch::empty_like(q);
  read_tree_switch();
  if (kc.scalar_type() == torch::kBFloat16) run<uint16_t>(q, kc, vc, sp, lp, scale, out);
  else run<float>(q, kc, vc, sp, lp, scale, out);
  return out;
}

// Packed attention for single queries of any slots (decode, or a verify step's last tokens and
// drafts): the same result as decode_attention, bit for bit, per query; consecutive queries of
// one slot (a run) share their key and value loads (attend_run).
torch::Tensor packed_attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                               const torch::Tensor& slots, const torch::Tensor& lens, double scale, int64_t isa) {
  check_args(q, kc, vc, slots, lens);
  codeshell::check_isa(isa);
  // 16-lane registers from the AVX-512 levels on (AVX-512F; the same bits as the AVX2 path)
  const bool wide = CODESHELL_HAVE_AVX512 && isa >= codeshell::kAvx512Vnni;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  auto out = torch::empty_like(q);
  read_tree_switch();
  const PackedAttentionSwitches sw = read_switches();
  const int64_t M = q.size(0);
  if (kc.scalar_type() == torch::kBFloat16) run_packed<uint16_t>(q, kc, vc, sp, lp, scale, wide, out, sw, 0, M, false);
  else run_packed<float>(q, kc, vc, sp, lp, scale, wide, out, sw, 0, M, false);
  return out;
}

// packed_attention's queries [i0, i1) into rows [i0, i1) of the caller's `out` (q's shape and
// dtype, contiguous), on the calling thread: the native decode step's share of a step's queries
// (step_layers.cpp `attend`), each row the bits packed_attention gives it (the same run_packed
// items; a query's result does not depend on the others in the call). What it saves against a
// packed_attention call on narrowed tensors: the output tensor, three views, the OpenMP region and
// two getenv scans a call (at batch 8 each of the 8 layers' attention ran as two such calls; after
// a step's weights have streamed through the caches that code and the environment are cold).
// The caller checks the arguments once (packed_attention_check) and reads the switches once
// (packed_attention_switches) for all its chunks.
void packed_attention_check(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                            const torch::Tensor& slots, const torch::Tensor& lens, int64_t isa,
                            const torch::Tensor& out) {
  check_args(q, kc, vc, slots, lens);
  codeshell::check_isa(isa);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "packed_attention_rows: out must be contiguous, of q's shape and dtype");
}

PackedAttentionSwitches packed_attention_switches() {
  read_tree_switch();
  return read_switches();
}

void packed_attention_rows(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                           const torch::Tensor& slots, const torch::Tensor& lens, double scale, int64_t isa,
                           const PackedAttentionSwitches& sw, int64_t i0, int64_t i1, torch::Tensor& out) {
  const bool wide = CODESHELL_HAVE_AVX512 && isa >= codeshell::kAvx512Vnni;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  if (i1 <= i0) return;
  if (kc.scalar_type() == torch::kBFloat16) run_packed<uint16_t>(q, kc, vc, sp, lp, scale, wide, out, sw, i0, i1, true);
  else run_packed<float>(q, kc, vc, sp, lp, scale, wide, out, sw, i0, i1, true);
}

// KV groups [g0, g1) of every query of q [M, H, D] (heads [g0 R, g1 R)) into those heads of out,
// on the calling thread: the decode step's batch-1 query split over its team by groups
// (step_layers.cpp `attend`), each (query, group) item the run_packed item packed_attention
// computes for it (an item reads only its group's heads of q and writes only its heads of out), so
// the bits are packed_attention's. Checks and switches as packed_attention_rows.
void packed_attention_groups(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                             const torch::Tensor& slots, const torch::Tensor& lens, double scale, int64_t isa,
                             const PackedAttentionSwitches& sw, int64_t g0, int64_t g1, torch::Tensor& out) {
  const bool wide = CODESHELL_HAVE_AVX512 && isa >= codeshell::kAvx512Vnni;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t M = q.size(0);
  if (g1 <= g0 || M == 0) return;
  if (kc.scalar_type() == torch::kBFloat16) run_packed<uint16_t>(q, kc, vc, sp, lp, scale, wide, out, sw, 0, M, true, g0, g1);
  else run_packed<float>(q, kc, vc, sp, lp, scale, wide, out, sw, 0, M, true, g0, g1);
}
