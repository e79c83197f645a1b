// The native decode step's per-layer phases (decode_step.h's DecodeStep): what one step does per block.
//
// What this is: `DecodeStep::blocks` (per layer: LayerNorm, c_attn, RoPE, the new k, v rows into the
// KV cache, attention, c_proj, LayerNorm, c_fc, GELU, mlp.c_proj; then ln_f), `attend` (the
// attention's split over the step's thread team), `post_prefetch` (the batch-1 prefetch side jobs,
// StepPf) and `apply` (step_linear.h: a linear by its kernel, with the int8 block sums and the
// q8_rows_t.h copies its batched calls take). What this is not: a kernel (the entry points of entry.h
// and attention_rows.h do the arithmetic), nor decode's embedding, head and picks (decode_step.cpp).

#include "decode_step.h"

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "attention_rows.h"
#include "entry.h"
#include "isa.h"
#include "parallel.h"
#include "q8_rows_t.h"
#include "q8_wsum.h"
#include "switches.h"

namespace codeshell::step {

namespace {

// Whether this linear's batched call takes q8_rows_t.h's transposed copy (made at its first
// call of 5..8 rows). The copy is a second weight of the same bytes (int8) or twice them (int4's
// byte a weight), so only where the model with all its copies stays in the last-level cache: there
// the kernel is bound by its vpdpbusd issue and the copy pays (codeshell-mini's b8 head 197 -> 129
// us); a DRAM-bound model (the 7B shapes, ~GBs of weights) would double its memory for a kernel that
// waits on the same bytes from DRAM. `name` (CODESHELL_Q8R_TP int8 / _TP4 int4, read per call):
// 0 never, 1 always (tests), unset or anything else: the LLC rule.
bool copy_wanted(const Linear& l, const char* name) {
  const int64_t v = codeshell::env_int(name, -1);
  if (v == 0 || v == 1) return v == 1;
  return l.wsum->copies_fit != nullptr && l.wsum->copies_fit->load(std::memory_order_relaxed);
}

// The int8 q8 path at M > 1 (batch > 1): q8_rows.h's v2 reads the weight's block sums from a
// table made once per weight (q8_wsum.h) instead of computing them per block; the hint is keyed
// by the weight's pointer and shape, so any other kernel the call reaches ignores it.
// CODESHELL_Q8R_WSUM=0 (read per call): neither made nor used, the per-block weight_sums as before.
// The same integers either way: the same bits (tests/kernels/test_q8_wsum.py).
void int8_q8_batched(const Linear& l, const torch::Tensor& xf, torch::Tensor& out) {
  const int8_t* w = l.data.data_ptr<int8_t>();
  const int32_t* sums = nullptr;
  // Only where q8_rows.h can run (CPUs without AMX: amx:q8 takes M >= 2 with q8_panel.h / the AMX
  // tiles, which never read the table; session 23: it was built there too). The switch is read here
  // only: with it off no table is made or handed over (q8rows::run uses the hint it is given).
  // Session 30: and only at the 512-bit VNNI levels (qdot_int8.cpp int8_q8 takes q8_rows.h there
  // only): an AVX2 linear made the table for nothing and then q8_rows_t.h's copy, whose packing is
  // AVX-512 code, and died of SIGILL on an AVX2-only CPU (codeshell-mini int8 at batch 8, AMD Zen 3).
  // Session 37: on AMX CPUs where q8_amx_vrows sends these rows to q8_rows.h too.
  if (l.K % 128 == 0 && l.isa >= codeshell::kAvx512Vnni && (l.isa < codeshell::kAmx || q8_amx_vrows(xf.size(0))) &&
      codeshell::env_flag("CODESHELL_Q8R_WSUM", true)) {
    WeightSums& ws = *l.wsum;
    std::call_once(ws.once, [&] { ws.sums = codeshell::q8rows::block_sums(w, l.N, l.K); });
    sums = ws.sums.data();
  }
  const uint8_t* packed = nullptr;
#if CODESHELL_HAVE_AVX512
  const int64_t M = xf.size(0);
  if (sums != nullptr && M >= 5 && M <= 8 && copy_wanted(l, "CODESHELL_Q8R_TP")) {
    WeightSums& ws = *l.wsum;
    std::call_once(ws.pack_once, [&] { ws.packed = codeshell::q8rt::pack(w, l.N, l.K); });
    packed = ws.packed.data();
  }
#endif
  codeshell::q8rows::SumsHintScope hint(w, l.N, l.K, sums, packed);
  decode_int8_q8_out(xf, l.data, *l.scales, l.bias, l.isa, out);
}

// int4 at 5..8 rows (session 29): q8_rows_t.h's byte-a-weight transposed copy with the scales
// (offsets) beside it, made at the first such call and hinted to q8_rows.h run_q4 (which takes it
// where it runs: groups of 128 / 256 on the CPUs whose int4 takes the epilogue's bits, the Ice
// Lake-class Xeon and Zen 4; made only there). CODESHELL_Q8R_TP4=0 (read per call): neither made nor used.
// The same bits (tests/kernels/test_q8_rows_t.py).
const void* int4_packed(const Linear& l, int64_t M) {
#if CODESHELL_HAVE_AVX512
  // l.isa too (session 30): a linear capped below VNNI (CODESHELL_KERNEL_ISA=avx2) runs the AVX2
  // kernel, which never reads the copy
  // session 37: and AMX CPUs where q8_amx_vrows sends these rows to run_q4
  // session 39: the VNNI levels without AMX wherever int4 takes the epilogue's bits (q4_epi_kind: Zen 4 too, whose
  // level is avx512_bf16; before, the Ice Lake-class Xeon only: CODESHELL_Q4_EPI=0 there gives no copy)
  const bool vnni_cpu = l.isa >= codeshell::kAvx512Vnni && l.isa < codeshell::kAmx && q4_epi_kind();
  const bool amx_rows = l.isa >= codeshell::kAmx && q8_amx_vrows(M);
  if (M < 5 || M > 8 || l.K % 128 != 0 || (l.group != 128 && l.group != 256) || !(vnni_cpu || amx_rows) ||
      !copy_wanted(l, "CODESHELL_Q8R_TP4"))
    return nullptr;
  WeightSums& ws = *l.wsum;
  std::call_once(ws.pack_once, [&] {
    ws.packed4 = codeshell::q8rt::pack_q4(l.data.data_ptr<uint8_t>(), l.scales->data_ptr<float>(),
                                          l.offsets.has_value() ? l.offsets->data_ptr<float>() : nullptr, l.N, l.K, l.group);
  });
  return &ws.packed4;
#else
  (void)l, (void)M;
  return nullptr;
#endif
}

// bf16 [M, K] -> fp32 out [M, K]: exact (what `.to(torch.float32)` gives), without the dispatcher.
void to_f32(const torch::Tensor& x, torch::Tensor& out) {
  const bf16* src = x.data_ptr<bf16>();
  float* dst = out.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; ++i) dst[i] = float(src[i]);
}

// Rows i of k, v (heads H..H+G-1 and H+G..H+2G-1 of qkv bf16 [M, (H + 2G) * D]) into the
// layer's bf16 cache [slots, G, max_len, D] at [slot_i, g, pos_i]: PackedView._store's
// index_put as plain copies.
void store_kv(const bf16* qkv, int64_t M, int64_t H, int64_t G, int64_t D, const int64_t* slots, const int64_t* pos,
              bf16* kc, bf16* vc, int64_t L) {
  const int64_t W = (H + 2 * G) * D;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t at = ((slots[i] * G + g) * L + pos[i]) * D;
      std::memcpy(kc + at, qkv + i * W + (H + g) * D, D * sizeof(bf16));
      std::memcpy(vc + at, qkv + i * W + (H + G + g) * D, D * sizeof(bf16));
    }
}

}  // namespace

// bf16 and `q8` paths write into `out` (fp32 [M, N]) and return it; the unpack kernels return
// their own tensor. `xf` (fp32 [M, K]) holds x converted for the paths that take fp32 x.
torch::Tensor apply(const Linear& l, const torch::Tensor& x, torch::Tensor& out, torch::Tensor& xf) {
  switch (l.kernel) {
    case kAmxBf16: prefill_bf16_amx_out(x, l.data, l.N, l.bias, out); return out;
    case kPanelBf16: decode_bf16_out(x, l.data, l.N, l.bias, l.isa, out); return out;
    default: break;
  }
  to_f32(x, xf);  // every other path takes fp32 x (ops._compute's x.to(float32))
  switch (l.kernel) {
    case kPanelF32: decode_bf16_out(xf, l.data, l.N, l.bias, l.isa, out); return out;  // avx2 or avx512_vnni (Avx512Fma)
    case kQ8: {  // into `out` as the bf16 paths (no output allocation a call)
      // session 37: q8_rows.h at 2..16 rows on AMX CPUs for a step whose weights are small (q8_amx_vrows);
      // session 38: the path of 2..16 rows measured on the step's own calls (q8_rows_tune.h; timed to the return)
      const bool fit = l.wsum->vrows_fit != nullptr && l.wsum->vrows_fit->load(std::memory_order_relaxed);
      const RowsTuneCall tune(l.wsum->tune, xf.size(0), rows_tunable(l), fit, l.N, l.K);
      const Q8AmxVrowsScope vrows(tune.code());
      if (l.kind == kInt8 && xf.size(0) > 1) int8_q8_batched(l, xf, out);
      else if (l.kind == kInt8) decode_int8_q8_out(xf, l.data, *l.scales, l.bias, l.isa, out);
      else if (const void* p4 = xf.size(0) >= 5 ? int4_packed(l, xf.size(0)) : nullptr) {
        codeshell::q8rows::SumsHintScope hint(l.data.data_ptr(), l.N, l.K, nullptr, nullptr, p4);
        decode_int4_q8_out(xf, l.data, *l.scales, l.offsets, l.group, l.bias, l.isa, out);
      } else {
        decode_int4_q8_out(xf, l.data, *l.scales, l.offsets, l.group, l.bias, l.isa, out);
      }
      return out;
    }
    case kUnpack:
      if (l.kind == kInt8) return decode_int8(xf, l.data, *l.scales, l.bias);
      return decode_int4(xf, l.data, *l.scales, l.offsets, l.group, l.bias);
    default: break;
  }
  TORCH_CHECK(false, "DecodeStep: unknown kernel code ", l.kernel);
  return {};
}

// Posts the side job for linear l: `bytes` from the front of each thread's share of its rows at
// M = 1 (qdot_int8.cpp / qdot_int4.cpp: one share a thread (parallel_owned) for int8 weights of at
// most 8 MiB and int4 under 4 MiB, else parallel_chunks, whose first chunks the threads take first).
// The rows a share starts at are multiples of 16; a row's bytes are data's bytes / N (int8 [N, K],
// int4 nibbles [N, K/2], bf16 panels of 16 rows). Only where the prefetch lands depends on this.
void DecodeStep::post_prefetch(codeshell::Team& t, const Linear& l, int64_t bytes, const StepPf& pf) const {
  const int64_t T = std::min<int64_t>(t.threads(), codeshell::Team::kSideRanges), N = l.N;
  const int64_t total = l.data.nbytes(), row = total / std::max<int64_t>(N, 1);
  if (bytes <= 0 || T < 2 || row <= 0) return;
  const bool owned = (l.kind == kInt8 && total <= (int64_t(8) << 20)) || (l.kind == kInt4 && total < (int64_t(4) << 20));
  int64_t grain = std::max<int64_t>(64, (N + 8 * T - 1) / (8 * T));
  grain = (grain + 15) / 16 * 16;
  codeshell::Team::Range r[codeshell::Team::kSideRanges];
  int n = 0;
  const char* base = static_cast<const char*>(l.data.data_ptr());
  for (int64_t i = pf.own ? 1 : 0; i < T; ++i) {
    const int64_t r0 = owned ? std::min(N, (N * i / T + 15) / 16 * 16) : std::min(N, i * grain);
    const int64_t r1 = owned ? (i + 1 == T ? N : std::min(N, (N * (i + 1) / T + 15) / 16 * 16)) : std::min(N, r0 + grain * 4);
    if (r1 > r0) r[n++] = {base + r0 * row, std::min(bytes, (r1 - r0) * row)};
  }
  t.prefetch_async(r, n, pf.hint);
}

// packed_attention of the M queries q bf16 [M, H, D] into att (the arena's [M, H, D]). In a
// team with M > 1 the queries are split into one contiguous share per thread, each share one
// packed_attention call (each query's result does not depend on the others in the call:
// attention.cpp), since packed_attention's own loop cannot take the team's threads.
// In a team at M = 1 (batch-1 decode) with a context of at least CODESHELL_TEAM_ATTN_MIN positions
// (default kTeamAttnMin; read per call; <= 0: never) the query's KV groups are split instead, one
// packed_attention call per group on that group's [1, 1, L, D] slice of the slot's cache (contiguous:
// the cache is [slots, G, L, D]) and the group's R = H / G query heads: packed_attention's own item is
// one (query, group), computed by the same code on the same inputs, so the bits are the same.
// Why: with the team on, packed_attention's own split over the groups runs serially on the master
// (its OpenMP count is 1 in a step), so a batch-1 token's attention used one core of two; at the
// 7B width (G = 8, D = 128) a 2048-position context is 8 MiB of K and V a layer. Below the threshold
// the per-call cost (an output tensor and scratch vectors a group, ~ microseconds) outweighs the
// split (session 17 measured (query, group) items on the team slower at codeshell-mini / the small
// shape's short contexts).
torch::Tensor DecodeStep::attend(const torch::Tensor& q, const torch::Tensor& kl, const torch::Tensor& vl,
                                 const torch::Tensor& slots, const torch::Tensor& lens, double scale,
                                 torch::Tensor& att) const {
  const int64_t M = q.size(0);
  codeshell::Team* team = codeshell::current_team();
  const int64_t m1 = team != nullptr && M == 1 ? codeshell::env_int("CODESHELL_ATTN_M1", kAttnM1) : 0;
  if (m1 > 0) {
    // Batch 1 without packed_attention's tensors (its output, per-group views and outputs, an
    // OpenMP region, the switches' getenvs per call): the checks and switches once, then the
    // query's KV groups on the master (short contexts) or split over the team (`m1` 2: always; 1:
    // from CODESHELL_TEAM_ATTN_MIN positions on, as the path below). The same items, the same bits.
    packed_attention_check(q, kl, vl, slots, lens, attn_isa_, att);
    const PackedAttentionSwitches sw = packed_attention_switches();
    const int64_t G = kl.size(1), len = lens.data_ptr<int64_t>()[0];
    const int64_t min_len = m1 >= 2 ? 0 : codeshell::env_int("CODESHELL_TEAM_ATTN_MIN", kTeamAttnMin);
    if (G >= 2 && (m1 >= 2 || (min_len > 0 && len >= min_len))) {
      team->run(G, 1, [&](int64_t g0, int64_t g1) {
        packed_attention_groups(q, kl, vl, slots, lens, scale, attn_isa_, sw, g0, g1, att);
      });
    } else {
      packed_attention_rows(q, kl, vl, slots, lens, scale, attn_isa_, sw, 0, 1, att);
    }
    return att;
  }
  if (team != nullptr && M == 1) {
    const int64_t G = kl.size(1), H = q.size(1), D = q.size(2), min_len = codeshell::env_int("CODESHELL_TEAM_ATTN_MIN", kTeamAttnMin);
    const int64_t slot = slots.data_ptr<int64_t>()[0], len = lens.data_ptr<int64_t>()[0];
    if (G < 2 || min_len <= 0 || len < min_len || !q.is_contiguous() || !kl.is_contiguous() || !vl.is_contiguous() ||
        slot < 0 || slot >= kl.size(0))
      return packed_attention(q, kl, vl, slots, lens, scale, attn_isa_);
    const int64_t R = H / G;
    const torch::Tensor zero = torch::zeros({1}, slots.options());
    bf16* out = att.data_ptr<bf16>();
    team->run(G, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const torch::Tensor o = packed_attention(q.narrow(1, g * R, R), kl.narrow(0, slot, 1).narrow(1, g, 1),
                                                 vl.narrow(0, slot, 1).narrow(1, g, 1), zero, lens, scale, attn_isa_);
        std::memcpy(out + g * R * D, o.data_ptr<bf16>(), R * D * sizeof(bf16));
      }
    });
    return att;
  }
  if (team == nullptr) return packed_attention(q, kl, vl, slots, lens, scale, attn_isa_);
  const int64_t share = (M + team->threads() - 1) / team->threads(), row = q.size(1) * q.size(2);
  // CODESHELL_ATTN_ROWS=0 (read per call; A/B runs): each share through packed_attention on
  // narrowed tensors and a copy, as before session 21; default: packed_attention_rows into att
  // (attention_rows.h: no tensors made, the checks and switches once a call). The same bits.
  if (codeshell::env_flag("CODESHELL_ATTN_ROWS", true)) {
    packed_attention_check(q, kl, vl, slots, lens, attn_isa_, att);
    const PackedAttentionSwitches sw = packed_attention_switches();
    team->run(M, share, [&](int64_t i0, int64_t i1) {
      packed_attention_rows(q, kl, vl, slots, lens, scale, attn_isa_, sw, i0, i1, att);
    });
    return att;
  }
  bf16* out = att.data_ptr<bf16>();
  team->run(M, share, [&](int64_t i0, int64_t i1) {
    const int64_t n = i1 - i0;
    const torch::Tensor o = packed_attention(q.narrow(0, i0, n), kl, vl, slots.narrow(0, i0, n),
                                             lens.narrow(0, i0, n), scale, attn_isa_);
    std::memcpy(out + i0 * row, o.data_ptr<bf16>(), n * row * sizeof(bf16));
  });
  return att;
}

// run's work: every block and ln_f on rows x bf16 [M, C] (checked by the caller), in the
// arena `a` (shaped for M). Returns ln_f's output: the arena's y.
torch::Tensor DecodeStep::blocks(Arena& a, const torch::Tensor& x, const c10::optional<torch::Tensor>& cos,
                                 const c10::optional<torch::Tensor>& sin, const torch::Tensor& kc,
                                 const torch::Tensor& vc, const torch::Tensor& slots, const torch::Tensor& positions,
                                 const torch::Tensor& lens, double scale, const Linear* after,
                                 const StepPf& pf) const {
  const int64_t H = H_, G = G_, D = D_, C = H * D, M = x.size(0);
  // the prefetch side jobs (StepPf): batch 1 in a team only
  codeshell::Team* pteam = pf.on && M == 1 ? codeshell::current_team() : nullptr;
  auto prefetch = [&](const Linear* l) {
    if (pteam != nullptr && l != nullptr) post_prefetch(*pteam, *l, pf.bytes, pf);
  };
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  check_cache(kc, vc, M, sp, pp);
  const int64_t L = kc.size(3);
  torch::Tensor h = x;
  c10::optional<torch::Tensor> pending;  // the last block's output rows (fp32), added before the next LayerNorm
  int64_t flip = 0;                       // h's buffer: the adds write h0 and h1 in turn (never their input)
  auto add_ln = [&](const c10::optional<torch::Tensor>& r, const c10::optional<torch::Tensor>& w,
                    const c10::optional<torch::Tensor>& b, double eps) {
    torch::Tensor& hn = (flip++ & 1) ? a.h1 : a.h0;
    fused_add_layer_norm_out(h, r, w, b, eps, hn, a.y);
    if (r) h = hn;
  };
  for (int64_t layer = 0; layer < layers(); ++layer) {
    const Layer& ly = layers_[layer];
    add_ln(pending, ly.ln1_w, ly.ln1_b, ly.ln1_eps);
    prof_.mark(kNorm);
    const Linear& la = linears_[ly.attn];
    torch::Tensor y = apply(la, a.y, a.fqkv, a.xf(la.K, C));  // fp32 [M, (H + 2G) D]
    prefetch(&linears_[ly.proj]);  // over RoPE + KV store + attention
    prof_.mark(kQkv);
    torch::Tensor qkv;
    if (cos) {
      fused_rope_bf16_out(y, *cos, *sin, H + G, D, a.qkv);
      qkv = a.qkv;
    } else {
      qkv = y.to(torch::kBFloat16);
    }
    const bf16* qp = qkv.data_ptr<bf16>();
    torch::Tensor kl = kc.select(0, layer), vl = vc.select(0, layer);  // [slots, G, max_len, D]
    store_kv(qp, M, H, G, D, sp, pp, kl.data_ptr<bf16>(), vl.data_ptr<bf16>(), L);
    // q rows [M, H, D]: the first H heads of each qkv row, made contiguous (as PackedView.attend)
    bf16* q = a.q.data_ptr<bf16>();
    for (int64_t i = 0; i < M; ++i) std::memcpy(q + i * C, qp + i * (H + 2 * G) * D, C * sizeof(bf16));
    prof_.mark(kRopeStore);
    const torch::Tensor att = attend(a.q, kl, vl, slots, lens, scale, a.att);  // bf16 [M, H, D]
    prof_.mark(kAttention);
    const Linear& lp = linears_[ly.proj];
    y = apply(lp, att.view({M, C}), a.fc, a.xf(lp.K, C));
    prefetch(&linears_[ly.fc]);  // over ln_2
    prof_.mark(kProj);
    add_ln(y, ly.ln2_w, ly.ln2_b, ly.ln2_eps);
    prof_.mark(kNorm);
    const Linear& lf = linears_[ly.fc];
    y = apply(lf, a.y, a.ffc, a.xf(lf.K, C));
    prof_.mark(kFc);
    fused_gelu_tanh_out(y, c10::nullopt, /*out_bf16=*/true, a.g);
    prof_.mark(kGelu);
    const Linear& lm = linears_[ly.mlp_proj];
    pending = apply(lm, a.g, a.fpend, a.xf(lm.K, C));
    prefetch(layer + 1 < layers() ? &linears_[layers_[layer + 1].attn] : after);  // over the next LayerNorm
    prof_.mark(kMlpProj);
  }
  add_ln(pending, lnf_w_, lnf_b_, lnf_eps_);
  prof_.mark(kNorm);
  return a.y;
}

}  // namespace codeshell::step
