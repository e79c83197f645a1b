// The native decode step's public calls (decode_step.h's DecodeStep; the step itself is described there).
//
// What this is: building a step (add_linear, add_layer, set_team / set_final / set_head /
// set_embedding / set_rope, the cache checks), its calls from Python: `run` (the blocks and ln_f on
// embedded rows), `decode` and its rows (the embedding and RoPE rows, the blocks, then the output
// head, the greedy picks and the bf16 logits), `decode_greedy` / `decode_greedy_rows` (several tokens
// in one call), and the profile's readers. What this is not: the per-layer phases (step_layers.cpp),
// the binding (step_bind.cpp), or any kernel (entry.h's entry points do the arithmetic).

#include "decode_step.h"

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "entry.h"
#include "panel_rows.h"
#include "parallel.h"
#include "switches.h"

namespace codeshell::step {

// H query heads, G KV groups of D dims; attn_isa: packed_attention's isa (ops.isa_level()).
DecodeStep::DecodeStep(int64_t H, int64_t G, int64_t D, int64_t attn_isa) : H_(H), G_(G), D_(D), attn_isa_(attn_isa) {
  TORCH_CHECK(H > 0 && G > 0 && D > 0 && D % 2 == 0 && H % G == 0, "DecodeStep: bad head shape H=", H, " G=", G,
              " D=", D);
  codeshell::check_isa(attn_isa);
}

// One linear: y = x @ W^T + bias by `kernel` (Kernel) at `isa`; returns its index.
int64_t DecodeStep::add_linear(int64_t kind, int64_t kernel, int64_t isa, const torch::Tensor& data,
                               const c10::optional<torch::Tensor>& scales, const c10::optional<torch::Tensor>& offsets,
                               const c10::optional<torch::Tensor>& bias, int64_t group, int64_t N, int64_t K) {
  TORCH_CHECK(kind >= kBf16 && kind <= kInt4, "DecodeStep: bad weight kind ", kind);
  TORCH_CHECK(kernel >= kAmxBf16 && kernel <= kUnpack, "DecodeStep: bad kernel code ", kernel);
  TORCH_CHECK((kind == kBf16) == (kernel <= kPanelF32), "DecodeStep: kernel ", kernel, " does not take weight kind ",
              kind);
  TORCH_CHECK(kind == kBf16 || scales.has_value(), "DecodeStep: an int8/int4 weight needs its scales");
  TORCH_CHECK(!bias || (bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N),
              "DecodeStep: the bias must be a contiguous fp32 [N] tensor");
  codeshell::check_isa(isa);
  linears_.push_back(Linear{kind, kernel, isa, N, K, group, data, scales, offsets, bias});
  linears_.back().wsum->copies_fit = &copies_fit_;
  linears_.back().wsum->vrows_fit = &vrows_fit_;
  weight_bytes_ += data.nbytes();
  if (kind != kBf16 && K % 128 == 0) copy_bytes_ += N * K;  // q8_rows_t.h's copy: a byte a weight
  static const int64_t l3 = l3_bytes();
  copies_fit_.store(l3 > 0 && weight_bytes_ + copy_bytes_ <= l3 / 4 * 3, std::memory_order_relaxed);
  vrows_fit_.store(weight_bytes_ <= kAmxVrowsMaxBytes, std::memory_order_relaxed);
  return int64_t(linears_.size()) - 1;
}

// One block: ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj (linear indices from add_linear).
void DecodeStep::add_layer(const c10::optional<torch::Tensor>& ln1_w, const c10::optional<torch::Tensor>& ln1_b,
                           double ln1_eps, int64_t attn, int64_t proj, const c10::optional<torch::Tensor>& ln2_w,
                           const c10::optional<torch::Tensor>& ln2_b, double ln2_eps, int64_t fc, int64_t mlp_proj) {
  const int64_t C = H_ * D_, n = int64_t(linears_.size());
  for (int64_t i : {attn, proj, fc, mlp_proj}) TORCH_CHECK(0 <= i && i < n, "DecodeStep: no linear ", i);
  const Linear &a = linears_[attn], &p = linears_[proj], &f = linears_[fc], &m = linears_[mlp_proj];
  TORCH_CHECK(a.K == C && a.N == (H_ + 2 * G_) * D_ && p.K == C && p.N == C && f.K == C && m.K == f.N && m.N == C,
              "DecodeStep: the linears' shapes do not chain (C=", C, ")");
  layers_.push_back(Layer{ln1_w, ln1_b, ln2_w, ln2_b, ln1_eps, ln2_eps, attn, proj, fc, mlp_proj});
  int64_t bytes = 0;
  for (const Linear* l : {&a, &p, &f, &m}) bytes += l->data.nbytes();
  layer_bytes_ = std::max(layer_bytes_, bytes);
  inner_ = f.N;
}

// The thread team for a whole step (parallel.h's Team): 0 off (each kernel forks its own
// loops, as before session 12; this object's default, CODESHELL_DECODE_TEAM=off), 1 on (what
// kernels/step.py sets by default since session 19), 2 auto: on when every layer's weights are
// at most kTeamBytes (codeshell-mini's are 1.4 MiB in bf16), where the ops take microseconds
// and forking the OpenMP team per op costs as much as the op. Never on larger models by
// auto: with the team the attention of one query ran on the calling thread
// (packed_attention's own split over KV groups cannot take the team's threads), which cost
// more at long contexts there than the forks it saved (since session 19 `attend` splits a
// batch-1 query's groups over the team from CODESHELL_TEAM_ATTN_MIN positions on).
void DecodeStep::set_team(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "DecodeStep.set_team: mode must be 0 (off), 1 (on) or 2 (auto), got ", mode);
  team_ = mode;
}

void DecodeStep::set_final(const c10::optional<torch::Tensor>& w, const c10::optional<torch::Tensor>& b, double eps) {
  lnf_w_ = w;
  lnf_b_ = b;
  lnf_eps_ = eps;
}

// h bf16 [M, C]: the step's embedded rows (M <= 64); cos, sin fp32 [M, D/2] (none: no RoPE);
// kc, vc the KV cache [layers, slots, G, max_len, D] (bf16); slots, positions, lens
// int64 [M]: token i is at positions[i] of slot slots[i] and attends keys 0..lens[i]-1.
// Returns ln_f's output bf16 [M, C].
torch::Tensor DecodeStep::run(const torch::Tensor& x, const c10::optional<torch::Tensor>& cos,
                              const c10::optional<torch::Tensor>& sin, const torch::Tensor& kc, const torch::Tensor& vc,
                              const torch::Tensor& slots, const torch::Tensor& positions, const torch::Tensor& lens,
                              double scale) const {
  const int64_t C = H_ * D_;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16 && x.size(1) == C,
              "DecodeStep.run: x must be a contiguous bf16 [M, ", C, "] tensor");
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 64, "DecodeStep.run takes 1..64 rows, got ", M);
  TORCH_CHECK(cos.has_value() == sin.has_value(), "DecodeStep.run: cos and sin come together");
  for (const auto* t : {&slots, &positions, &lens})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->numel() == M,
                "DecodeStep.run: slots, positions and lens must be contiguous int64 [M] tensors");
  torch::Tensor out;
  step([&](Arena& a) {
    a.shape(M, C, (H_ + 2 * G_) * D_, inner_, 0, D_ / 2, H_, D_);
    prof_.start();
    out = blocks(a, x, cos, sin, kc, vc, slots, positions, lens, scale).clone();  // the arena's is reused
  });
  return out;
}

// The whole packed step from token ids (the engine's decode / verify step, CodeShellForCausalLM
// with RoPE): the embedding rows (set_embedding), RoPE's cos / sin rows computed as
// CodeShellModel._rope_rows computes them (set_rope), run's blocks and ln_f, then the output
// head (set_head) and its cast to bf16 (what FastLinear's call returns), and the first maximal
// index of each logits row (sampling's argmax_rows). Token i is `tokens[i]` at
// `positions[i]` of slot `slots[i]` (it attends keys 0..positions[i]). Returns (logits bf16
// [M, V], the greedy picks [M]). With want_logits false the logits are not made (None): the
// picks come from the head's fp32 rows as the bf16 values they round to, the same picks (see
// below).
std::tuple<torch::Tensor, std::vector<int64_t>> DecodeStep::decode(const std::vector<int64_t>& tokens,
                                                                   const std::vector<int64_t>& positions,
                                                                   const std::vector<int64_t>& slots,
                                                                   const torch::Tensor& kc, const torch::Tensor& vc,
                                                                   double scale, bool want_logits) const {
  if (prof_.on) prof_.cur.entry = Profile::now_ns();
  const int64_t M = int64_t(tokens.size()), C = H_ * D_, half = D_ / 2;
  TORCH_CHECK(M >= 1 && M <= 64, "DecodeStep.decode takes 1..64 tokens, got ", M);
  TORCH_CHECK(int64_t(positions.size()) == M && int64_t(slots.size()) == M,
              "DecodeStep.decode: tokens, positions and slots must have one entry per token");
  TORCH_CHECK(head_ >= 0 && emb_.defined() && inv_freq_.defined(),
              "DecodeStep.decode needs set_head, set_embedding and set_rope first");
  torch::Tensor logits;
  std::vector<int64_t> picks(M);
  const auto table = rope_table(positions);  // before the team is taken (see rope_table)
  step([&](Arena& a) { decode_rows(a, tokens, positions, slots, kc, vc, scale, want_logits, table, logits, picks); });
  prof_.finish();
  return {logits, picks};
}

// decode's work for its rows, in the step's arena (inside `step`): the embedding and RoPE rows, the
// blocks, the head, the picks and (want_logits) the bf16 logits; `table` is rope_table's.
void DecodeStep::decode_rows(Arena& a, const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                             const std::vector<int64_t>& slots, const torch::Tensor& kc, const torch::Tensor& vc,
                             double scale, bool want_logits, const std::pair<torch::Tensor, torch::Tensor>& table,
                             torch::Tensor& logits, std::vector<int64_t>& picks, bool end_job) const {
  const int64_t M = int64_t(tokens.size()), C = H_ * D_, half = D_ / 2;
  const Linear& head = linears_[head_];
  a.shape(M, C, (H_ + 2 * G_) * D_, inner_, head.N, half, H_, D_);
  prof_.start();
  if (prof_.on && prof_.cur.body == 0) prof_.cur.body = Profile::now_ns();
  embed(tokens, a.x);
  if (table.first.defined()) {  // RoPE rows: copies of the table's rows
    const float* tc = table.first.data_ptr<float>();
    const float* ts = table.second.data_ptr<float>();
    float* cp = a.cos.data_ptr<float>();
    float* sp = a.sin.data_ptr<float>();
    for (int64_t i = 0; i < M; ++i) {
      std::memcpy(cp + i * half, tc + positions[i] * half, half * sizeof(float));
      std::memcpy(sp + i * half, ts + positions[i] * half, half * sizeof(float));
    }
  } else {
    // RoPE rows: freqs [M, D/2] (rope_freqs), then torch's own cos and sin on the same [M, D/2]
    // shape (same bits)
    rope_freqs(M, [&](int64_t i) { return positions[i]; }, a.freqs.data_ptr<float>());
    at::cos_out(a.cos, a.freqs);
    at::sin_out(a.sin, a.freqs);
  }
  std::vector<int64_t> lens(M);
  for (int64_t i = 0; i < M; ++i) lens[i] = positions[i] + 1;
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  auto as_tensor = [&](const std::vector<int64_t>& v) {
    return torch::from_blob(const_cast<int64_t*>(v.data()), {M}, i64);
  };
  prof_.mark(kEmbed);
  const StepPf pf = StepPf::read(llc_resident());
  torch::Tensor h = blocks(a, a.x, a.cos, a.sin, kc, vc, as_tensor(slots), as_tensor(positions), as_tensor(lens),
                           scale, &head, pf);
  const torch::Tensor y = apply(head, h, a.head, a.xf(C, C));  // fp32 [M, V]
  prof_.mark(kHead);
  const float* yp = y.data_ptr<float>();
  // The greedy picks: each row's first maximal index among the bf16 values its fp32 logits
  // round to, read from the fp32 rows (argmax_rows_rounded: what argmax_rows gives on the
  // bf16 logits below, ties included), so a step whose rows are all plain greedy (the
  // engine's common case) skips the bf16 [M, V] copy and its re-read.
  argmax_rows_rounded(yp, M, head.N, picks.data());
  prof_.mark(kPick);
  if (want_logits) {
    // the cast to bf16 (FastLinear's `.to(bfloat16)`: the same rounding), split over the team
    logits = torch::empty({M, head.N}, h.options());
    bf16* lp = logits.data_ptr<bf16>();
    codeshell::parallel_chunks(M * head.N, 1024, 8192,
                               [&](int64_t i0, int64_t i1) { f32_to_bf16(yp + i0, lp + i0, i1 - i0); });
    prof_.mark(kCast);
  }
  // the next token's first c_attn, over the engine's Python between the steps (the job outlives
  // the step; the next step's first team loop stops it); not between decode_greedy's tokens
  // (end_job false), where the next token's first loop would stop it at once
  if (end_job && M == 1) end_prefetch(pf);
  if (prof_.on) prof_.cur.body_end = Profile::now_ns();
}

// The batch-1 end-of-step prefetch job (the next token's first c_attn; see decode_rows), inside `step`.
void DecodeStep::end_prefetch(const StepPf& pf) const {
  codeshell::Team* t = codeshell::current_team();
  if (pf.on && t != nullptr && layers() > 0) post_prefetch(*t, linears_[layers_[0].attn], pf.end_bytes, pf);
}

// Up to n greedy tokens of one sequence in one call (session 27, helper C; the engine's batch-1
// plain-greedy steps in LLM.generate, Engine._decode_many): token at `position` of slot `slot`,
// then each pick fed back at the next position, as n decode([token], [position], [slot],
// want_logits=False) calls in a row give them (the same rows, the same bits); stops after a pick
// in `stop`. Returns the picks. Why: between two batch-1 tokens of the small shape the engine's
// Python, pybind's conversions and the team's hand-over took ~0.29 ms (of ~8.4), ~0.22 of it
// cache misses, the weight stream having evicted the interpreter's data (the L3-resident
// codeshell-mini: 0.07 ms; bench_decode_phases.py --trace); here those run once per call.
// budget_ns > 0 also caps the call by time (session 28, helper C): it stops after the first token
// that ends budget_ns or more after the call's entry (at least one token; each token's bits are
// unchanged), so that a caller's Ctrl-C or a new request waits at most ~one budget plus one token
// (8 tokens of a 7B on CPU are seconds). The clock is read once a token (~20 ns).
std::vector<int64_t> DecodeStep::decode_greedy(int64_t token, int64_t position, int64_t slot, int64_t n,
                                               const std::vector<int64_t>& stop, const torch::Tensor& kc,
                                               const torch::Tensor& vc, double scale, int64_t budget_ns) const {
  const int64_t t_entry = Profile::now_ns();
  if (prof_.on) prof_.cur.entry = t_entry;
  TORCH_CHECK(n >= 1 && n <= 4096, "DecodeStep.decode_greedy takes 1..4096 tokens, got ", n);
  TORCH_CHECK(head_ >= 0 && emb_.defined() && inv_freq_.defined(),
              "DecodeStep.decode_greedy needs set_head, set_embedding and set_rope first");
  std::vector<int64_t> out;
  out.reserve(n);
  const auto table = rope_table({position + n - 1});  // every position's row (before the team is taken)
  step([&](Arena& a) {
    std::vector<int64_t> tok{token}, pos{position}, sl{slot}, pick(1);
    torch::Tensor none;
    for (int64_t i = 0; i < n; ++i) {
      decode_rows(a, tok, pos, sl, kc, vc, scale, false, table, none, pick, i + 1 == n);
      out.push_back(pick[0]);
      if (std::find(stop.begin(), stop.end(), pick[0]) != stop.end()) break;
      if (budget_ns > 0 && i + 1 < n && Profile::now_ns() - t_entry >= budget_ns) {
        // the budget is spent: the end-of-call prefetch job this token skipped (end_job false)
        // is posted now, as after a call's last token
        end_prefetch(StepPf::read(llc_resident()));
        break;
      }
      tok[0] = pick[0];
      ++pos[0];
    }
  });
  prof_.finish();
  return out;
}

// decode_greedy for several sequences at once (session 28, lead): row r's token at positions[r] of
// slots[r], each pick fed back at the next position, up to ns[r] picks, stopping after a pick in
// stops[r]; a row that stops leaves the batch and the others go on (M shrinks between steps). Each
// row's picks are bit for bit what one `decode` call a step gives: the rows are those calls' rows
// (each row's result does not depend on the others' for M <= ops.ROW_INVARIANT_MAX_M). Why: an
// engine step of 8 codeshell-mini rows spent ~160 us outside the ~710 us native call (Python and
// the cache misses after it); here once per call. budget_ns as decode_greedy's.
std::vector<std::vector<int64_t>> DecodeStep::decode_greedy_rows(std::vector<int64_t> tokens,
                                                                 std::vector<int64_t> positions,
                                                                 const std::vector<int64_t>& slots,
                                                                 const std::vector<int64_t>& ns,
                                                                 const std::vector<std::vector<int64_t>>& stops,
                                                                 const torch::Tensor& kc, const torch::Tensor& vc,
                                                                 double scale, int64_t budget_ns) const {
  const int64_t t_entry = Profile::now_ns();
  if (prof_.on) prof_.cur.entry = t_entry;
  const int64_t M = int64_t(tokens.size());
  TORCH_CHECK(M >= 1 && M <= 64 && int64_t(positions.size()) == M && int64_t(slots.size()) == M &&
                  int64_t(ns.size()) == M && int64_t(stops.size()) == M,
              "DecodeStep.decode_greedy_rows takes 1..64 rows, each with a token, position, slot, n and stop ids");
  TORCH_CHECK(head_ >= 0 && emb_.defined() && inv_freq_.defined(),
              "DecodeStep.decode_greedy_rows needs set_head, set_embedding and set_rope first");
  int64_t last_pos = 0;
  for (int64_t r = 0; r < M; ++r) {
    TORCH_CHECK(ns[r] >= 1 && ns[r] <= 4096, "DecodeStep.decode_greedy_rows takes 1..4096 tokens a row, got ", ns[r]);
    last_pos = std::max(last_pos, positions[r] + ns[r] - 1);
  }
  std::vector<std::vector<int64_t>> out(M);
  const auto table = rope_table({last_pos});  // every position's row (before the team is taken)
  step([&](Arena& a) {
    std::vector<int64_t> active(M), tok, pos, sl, pick;
    for (int64_t r = 0; r < M; ++r) active[r] = r;
    torch::Tensor none;
    while (!active.empty()) {
      tok.clear(), pos.clear(), sl.clear();
      int64_t left = 0;  // steps the longest active row has left, this one included
      for (int64_t r : active) {
        tok.push_back(tokens[r]), pos.push_back(positions[r]), sl.push_back(slots[r]);
        left = std::max(left, ns[r] - int64_t(out[r].size()));
      }
      pick.assign(active.size(), 0);
      decode_rows(a, tok, pos, sl, kc, vc, scale, false, table, none, pick, left == 1);
      std::vector<int64_t> next;
      for (size_t j = 0; j < active.size(); ++j) {
        const int64_t r = active[j];
        out[r].push_back(pick[j]);
        const auto& st = stops[r];
        if (int64_t(out[r].size()) == ns[r] || std::find(st.begin(), st.end(), pick[j]) != st.end()) continue;
        tokens[r] = pick[j];
        ++positions[r];
        next.push_back(r);
      }
      if (!next.empty() && left > 1 && budget_ns > 0 && Profile::now_ns() - t_entry >= budget_ns) {
        // as decode_greedy's budget stop (decode_rows posts the batch-1 job only for one row)
        if (active.size() == 1) end_prefetch(StepPf::read(llc_resident()));
        break;
      }
      active.swap(next);
    }
  });
  prof_.finish();
  return out;
}

// The bytes of q8_rows_t.h's transposed copies made so far (tests: whether copy_wanted's rule made them).
int64_t DecodeStep::copy_bytes_made() const {
  int64_t b = 0;
  for (const Linear& l : linears_) {
    b += int64_t(l.wsum->packed.size());
#if CODESHELL_HAVE_AVX512
    b += int64_t(l.wsum->packed4.w.size() + 4 * (l.wsum->packed4.sc.size() + l.wsum->packed4.of.size()));
#endif
  }
  return b;
}

// The output head: linear `index` (add_linear; K = C). Its logits are decode's.
void DecodeStep::set_head(int64_t index) {
  TORCH_CHECK(0 <= index && index < int64_t(linears_.size()) && linears_[index].K == H_ * D_,
              "DecodeStep.set_head: no linear ", index, " of width ", H_ * D_);
  head_ = index;
}

// The token embedding: kind 0 the head's bf16 panels [ceil(V/16), Kp/2, 32] (PackedEmbedding),
// kind 1 a bf16 [V, C] table (nn.Embedding).
void DecodeStep::set_embedding(int64_t kind, const torch::Tensor& table, int64_t V) {
  const int64_t C = H_ * D_;
  TORCH_CHECK(table.scalar_type() == torch::kBFloat16 && table.is_contiguous() && V > 0,
              "DecodeStep.set_embedding: the table must be contiguous bf16");
  if (kind == kEmbRows) {
    TORCH_CHECK(table.dim() == 2 && table.size(0) == V && table.size(1) == C,
                "DecodeStep.set_embedding: a row table must be [V, ", C, "]");
  } else {
    TORCH_CHECK(kind == kEmbPanels && table.dim() == 3 && table.size(0) == (V + 15) / 16 &&
                    table.size(1) * 2 >= C && table.size(2) == 32,
                "DecodeStep.set_embedding: panels must be [ceil(V/16), Kp/2, 32] with Kp >= ", C);
  }
  emb_kind_ = kind;
  emb_ = table;
  vocab_ = V;
}

// RoPE's inverse frequencies fp32 [D/2] (model.rope_inv_freq; no position scaling).
void DecodeStep::set_rope(const torch::Tensor& inv_freq) {
  TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat32 && inv_freq.is_contiguous() && inv_freq.dim() == 1 &&
                  inv_freq.numel() == D_ / 2,
              "DecodeStep.set_rope: inv_freq must be a contiguous fp32 [", D_ / 2, "] tensor");
  inv_freq_ = inv_freq;
  std::lock_guard<std::mutex> lock(rope_mu_);
  rope_cos_ = torch::empty({0}), rope_sin_ = torch::Tensor();  // rope_table's rows were of the old frequencies
}

// The phase profile (Profile): on / off (turning it on clears it), and (calls, {phase: seconds}).
void DecodeStep::set_profile(bool on) {
  prof_ = Profile{};
  prof_.on = on;
}

// Profile::trace as (entry, body, body end, exit, 1 if the call woke a sleeping helper) per call.
std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> DecodeStep::trace_times() const {
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> out;
  for (const auto& c : prof_.trace) out.emplace_back(c.entry, c.body, c.body_end, c.exit, c.woke);
  return out;
}

std::tuple<int64_t, std::vector<std::tuple<std::string, double>>> DecodeStep::profile_times() const {
  std::vector<std::tuple<std::string, double>> out;
  for (int p = 0; p < kPhases; ++p) out.emplace_back(kPhaseNames[p], prof_.ns[p] * 1e-9);
  return {prof_.calls, out};
}

// Profile::marks: every phase mark since the profile was set on, as (phase name, nanoseconds).
std::vector<std::tuple<std::string, int64_t>> DecodeStep::profile_marks() const {
  std::vector<std::tuple<std::string, int64_t>> out;
  out.reserve(prof_.marks.size());
  for (const auto& m : prof_.marks) out.emplace_back(kPhaseNames[m[0]], m[1]);
  return out;
}

// The KV cache's checks (decode's and run's), and each token's slot and position inside it.
void DecodeStep::check_cache(const torch::Tensor& kc, const torch::Tensor& vc, int64_t M, const int64_t* sp,
                             const int64_t* pp) const {
  // a bf16 model's cache is bf16 (the engine's); PackedView's index_put takes no other
  TORCH_CHECK(kc.dim() == 5 && kc.is_contiguous() && vc.is_contiguous() && kc.sizes() == vc.sizes() &&
                  kc.scalar_type() == torch::kBFloat16 && vc.scalar_type() == torch::kBFloat16 &&
                  kc.size(0) == layers() && kc.size(2) == G_ && kc.size(4) == D_,
              "DecodeStep: the KV cache must be two contiguous bf16 [", layers(), ", slots, ", G_, ", max_len, ",
              D_, "] tensors");
  const int64_t S = kc.size(1), L = kc.size(3);
  for (int64_t i = 0; i < M; ++i)
    TORCH_CHECK(0 <= sp[i] && sp[i] < S && 0 <= pp[i] && pp[i] < L, "DecodeStep: token ", i, " at slot ", sp[i],
                " position ", pp[i], " is outside the cache [", S, " slots, ", L, " positions]");
}

// The L3 one core sees (sysfs index3; in K), 0 if unknown. Not sysconf(_SC_LEVEL3_CACHE_SIZE):
// on the EPYC VM it gave 384 MiB, the whole package's, where a core's CCD has 32 MiB.
int64_t DecodeStep::l3_bytes() {
  std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
  if (f == nullptr) return 0;
  long kb = 0;
  char unit = 0;
  const int got = std::fscanf(f, "%ld%c", &kb, &unit);
  std::fclose(f);
  if (got < 1 || kb <= 0) return 0;
  return int64_t(kb) * (got == 2 && (unit == 'M' || unit == 'm') ? 1 << 20 : 1 << 10);
}

// RoPE's cos and sin rows of positions [0, P) (fp32 [P, D/2] each), computed as decode's rows were:
// freqs = float(position) * inv_freq, then torch's cos and sin. Returns them when every position
// is in [0, kRopeTableMax) (grown to cover the largest: P a power of two >= 256), else undefined
// tensors (decode then computes its rows as before). CODESHELL_ROPE_TABLE=0 (read per call; A/B
// runs): never (torch's cos and sin on the step's [M, D/2] rows, as before session 21).
// Why: torch's float cos / sin go through MKL's VML, which threads a call from ~100 values on
// (mkl_get_max_threads(): torch's thread count, not the calling thread's OpenMP count): inside a
// step with the team on, batch 8's [8, 64] rows forked an OpenMP region whose second thread had to
// get the core the team's helper spins on, ~4-8 ms (the scheduler's slice) in many steps: the
// small shape's b8 "embed+rope rows" phase measured 0.14-4.0 ms a call against 12 us at batch 1
// ([1, 64]: serial) (docs/kernels-log.md, session 21 helper D). VML's cos / sin are elementwise: a
// row's values do not depend on the call's length or threads (measured: [64, 64] rows one by one
// and the whole, 1 and 2 threads, the same bits; test_decode_step compares the step with the
// Python path), so the table's rows are the bits decode computed. The table is made here, before
// the step takes its team, where a fork finds its threads.
std::pair<torch::Tensor, torch::Tensor> DecodeStep::rope_table(const std::vector<int64_t>& positions) const {
  int64_t lo = 0, need = 0;
  for (int64_t p : positions) lo = std::min(lo, p), need = std::max(need, p + 1);
  if (lo < 0 || need > kRopeTableMax || !codeshell::env_flag("CODESHELL_ROPE_TABLE", true)) return {};
  std::lock_guard<std::mutex> lock(rope_mu_);
  if (rope_cos_.size(0) < need) {
    int64_t P = 256;
    while (P < need) P *= 2;
    const int64_t half = D_ / 2;
    c10::InferenceMode normal(false);  // plain tensors, as the arena's
    torch::Tensor freqs = torch::empty({P, half}, torch::TensorOptions().dtype(torch::kFloat32));
    rope_freqs(P, [](int64_t i) { return i; }, freqs.data_ptr<float>());
    rope_cos_ = at::cos(freqs);
    rope_sin_ = at::sin(freqs);
  }
  return {rope_cos_, rope_sin_};
}

// The embedding rows of `tokens` into x bf16 [M, C] (exact copies, as the model's lookup).
void DecodeStep::embed(const std::vector<int64_t>& tokens, torch::Tensor& x) const {
  const int64_t M = int64_t(tokens.size()), C = H_ * D_;
  auto* xp = reinterpret_cast<uint16_t*>(x.data_ptr<bf16>());
  const auto* ep = reinterpret_cast<const uint16_t*>(emb_.data_ptr<bf16>());
  for (int64_t i = 0; i < M; ++i) {
    const int64_t r = tokens[i];
    TORCH_CHECK_INDEX(0 <= r && r < vocab_, "token id ", r, " is out of range for an embedding of ", vocab_, " rows");
    uint16_t* dst = xp + i * C;
    if (emb_kind_ == kEmbRows) {
      std::memcpy(dst, ep + r * C, C * sizeof(uint16_t));
    } else {  // the head's panels: row r is lane r % 16 of panel r / 16, k-pairs 64 bytes apart
      codeshell::copy_panel_row(codeshell::panel_row(ep, emb_.size(1), r), C, dst);
    }
  }
}

}  // namespace codeshell::step
