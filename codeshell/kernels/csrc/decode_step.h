// The native decode step: a decode or prompt-lookup verify step's transformer blocks in one call (the class).
//
// What this is: `DecodeStep`, built once per model (per ISA cap and weights, by
// codeshell/kernels/step.py), holding per layer the LayerNorm parameters and, per linear, the
// packed weight's tensors, its fp32 bias and the kernel `ops.plan` names for it at M <= 64
// (fixed per weight there: row invariance). `run` takes the M packed token rows of a step (the
// engine's PackedView: any slots, one position each) and runs every block and the final
// LayerNorm: the same entry points, in the same order, on the same inputs (x converted for
// each linear exactly as ops._compute converts it) as the model's fused Python path
// (CodeShellModel._forward_inference with PackedView.attend), so the result is bit for bit
// that path's. Per layer: fused_add_layer_norm, c_attn, fused_rope_bf16, the new k, v rows
// stored into the KV cache, packed_attention, c_proj, fused_add_layer_norm, c_fc,
// fused_gelu_tanh, mlp.c_proj; then ln_f. `decode` (the engine's packed steps, via
// kernels/step.py `decode`) starts from the token ids and ends with the logits and their greedy
// picks: the embedding rows and RoPE's cos / sin rows first, the output head, its cast to bf16
// and argmax_rows after, so a codeshell-mini step has no Python between the token ids and the
// sampled token (the Python around them was ~0.45 ms of a ~1.7 ms step at 1 thread).
// What this is not: a prefill path (more than 64 rows, masks, padded batches stay in Python),
// an fp32-model path, or a new kernel: it only removes the Python between the kernels.
//
// Why: at decode on small models the kernels take a few microseconds each and the Python
// around them (module calls, FastLinear, ops._compute, PackedView's index_put stores,
// reshapes) ~250-400 us per layer: codeshell-mini ran at 0.3x llama.cpp's step rate.
//
// The step's fixed cost (session 12): with the Python gone, a codeshell-mini token was still
// ~60 parallel loops of a few microseconds (each kernel's at::parallel_for forking and joining
// the OpenMP team) and ~50 output allocations. So a step (1) writes the ops' outputs into
// per-step buffers (`Arena`: allocated for the largest M seen, views remade only when M
// changes) through the entry points' `_out` variants: codeshell-mini's native call at 2 threads
// 0.60 -> 0.49-0.53 ms (p10, batch 1); and (2) can hold one thread team for the whole call
// (parallel.h's Team: the calling thread runs the step, the team's helper threads spin and take
// chunks of each kernel's loop; `team` mode, off in session 12 (on the shared 2-core machine it
// measured no steadier gain, and some processes ran 1.5x slower with it), on by default since
// session 19 through kernels/step.py: with any other runnable process on the machine every OpenMP
// fork of the off path waited for its second thread to get a core; docs/kernels-log.md, sessions 12,
// 17, 18 and 19). Neither changes any op's arithmetic: every output element is computed by the
// same code on the same inputs, whichever thread runs its chunk.
//
// The files (session 35 split them out of one decode_step.cpp; the same code): this header, the class
// and its thread-team wrapper `step`; step_linear.h (Linear, Layer, `apply`), step_state.h (Arena,
// StepPf, Profile); decode_step.cpp (building the step, the public calls: run, decode and its head
// and picks, decode_greedy / _rows, the embedding and RoPE rows); step_layers.cpp (the per-layer
// phases: `blocks`, attention, the prefetch side jobs, `apply`); step_bind.cpp (the Python binding
// and the test hooks).
#pragma once

#include <torch/extension.h>

#include <omp.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "parallel.h"
#include "step_hints.h"
#include "step_linear.h"
#include "step_state.h"
#include "switches.h"

namespace codeshell::step {

class DecodeStep {
 public:
  // H query heads, G KV groups of D dims; attn_isa: packed_attention's isa (ops.isa_level()).
  DecodeStep(int64_t H, int64_t G, int64_t D, int64_t attn_isa);

  // Building the step (decode_step.cpp): linears, blocks, ln_f, the head, the embedding, RoPE.
  int64_t add_linear(int64_t kind, int64_t kernel, int64_t isa, const torch::Tensor& data,
                     const c10::optional<torch::Tensor>& scales, const c10::optional<torch::Tensor>& offsets,
                     const c10::optional<torch::Tensor>& bias, int64_t group, int64_t N, int64_t K);
  void add_layer(const c10::optional<torch::Tensor>& ln1_w, const c10::optional<torch::Tensor>& ln1_b, double ln1_eps,
                 int64_t attn, int64_t proj, const c10::optional<torch::Tensor>& ln2_w,
                 const c10::optional<torch::Tensor>& ln2_b, double ln2_eps, int64_t fc, int64_t mlp_proj);
  void set_final(const c10::optional<torch::Tensor>& w, const c10::optional<torch::Tensor>& b, double eps);
  void set_head(int64_t index);
  void set_embedding(int64_t kind, const torch::Tensor& table, int64_t V);
  void set_rope(const torch::Tensor& inv_freq);

  // The thread team for a whole step: 0 off, 1 on, 2 auto (decode_step.cpp set_team).
  void set_team(int64_t mode);
  int64_t team() const { return team_; }
  bool use_team() const { return team_ == 1 || (team_ == 2 && layer_bytes_ <= kTeamBytes); }

  int64_t layers() const { return int64_t(layers_.size()); }
  int64_t far_prefetch_kpairs() const { return far_prefetch(); }

  // The calls (decode_step.cpp): the blocks and ln_f on embedded rows; the whole step from token
  // ids to the logits and greedy picks; n greedy tokens of one sequence; of several.
  torch::Tensor run(const torch::Tensor& x, const c10::optional<torch::Tensor>& cos,
                    const c10::optional<torch::Tensor>& sin, const torch::Tensor& kc, const torch::Tensor& vc,
                    const torch::Tensor& slots, const torch::Tensor& positions, const torch::Tensor& lens,
                    double scale) const;
  std::tuple<torch::Tensor, std::vector<int64_t>> decode(const std::vector<int64_t>& tokens,
                                                         const std::vector<int64_t>& positions,
                                                         const std::vector<int64_t>& slots, const torch::Tensor& kc,
                                                         const torch::Tensor& vc, double scale,
                                                         bool want_logits) const;
  std::vector<int64_t> decode_greedy(int64_t token, int64_t position, int64_t slot, int64_t n,
                                     const std::vector<int64_t>& stop, const torch::Tensor& kc,
                                     const torch::Tensor& vc, double scale, int64_t budget_ns = 0) const;
  std::vector<std::vector<int64_t>> decode_greedy_rows(std::vector<int64_t> tokens, std::vector<int64_t> positions,
                                                       const std::vector<int64_t>& slots, const std::vector<int64_t>& ns,
                                                       const std::vector<std::vector<int64_t>>& stops,
                                                       const torch::Tensor& kc, const torch::Tensor& vc, double scale,
                                                       int64_t budget_ns = 0) const;

  // For the tests and benchmarks: q8_rows_t.h's copies, the phase profile, decode's call trace.
  int64_t copy_bytes_made() const;
  bool copies_fit() const { return copies_fit_.load(std::memory_order_relaxed); }
  void set_profile(bool on);
  bool profile() const { return prof_.on; }
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> trace_times() const;
  std::tuple<int64_t, std::vector<std::tuple<std::string, double>>> profile_times() const;
  std::vector<std::tuple<std::string, int64_t>> profile_marks() const;

 private:
  enum : int64_t { kEmbPanels = 0, kEmbRows = 1 };

  // decode's rows in the step's arena (decode_step.cpp): embedding, RoPE rows, blocks, head, picks.
  void decode_rows(Arena& a, const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                   const std::vector<int64_t>& slots, const torch::Tensor& kc, const torch::Tensor& vc, double scale,
                   bool want_logits, const std::pair<torch::Tensor, torch::Tensor>& table, torch::Tensor& logits,
                   std::vector<int64_t>& picks, bool end_job = true) const;
  void end_prefetch(const StepPf& pf) const;
  void check_cache(const torch::Tensor& kc, const torch::Tensor& vc, int64_t M, const int64_t* sp,
                   const int64_t* pp) const;
  void embed(const std::vector<int64_t>& tokens, torch::Tensor& x) const;
  std::pair<torch::Tensor, torch::Tensor> rope_table(const std::vector<int64_t>& positions) const;

  // The per-layer phases (step_layers.cpp): every block and ln_f, the attention, the side jobs.
  torch::Tensor blocks(Arena& a, const torch::Tensor& x, const c10::optional<torch::Tensor>& cos,
                       const c10::optional<torch::Tensor>& sin, const torch::Tensor& kc, const torch::Tensor& vc,
                       const torch::Tensor& slots, const torch::Tensor& positions, const torch::Tensor& lens,
                       double scale, const Linear* after = nullptr, const StepPf& pf = StepPf()) const;
  torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& kl, const torch::Tensor& vl,
                       const torch::Tensor& slots, const torch::Tensor& lens, double scale, torch::Tensor& att) const;
  void post_prefetch(codeshell::Team& t, const Linear& l, int64_t bytes, const StepPf& pf) const;

  static constexpr int64_t kTeamBytes = int64_t(4) << 20;

  // The bf16 batched rows' far L2 prefetch (step_hints.h) in k-pairs, for a model whose weights
  // (all linears, the head included) take at most 3/4 of the last-level cache: they are read
  // from it, not from memory, at every step. 0 otherwise, and when the cache size is unknown.
  static constexpr int64_t kFarPrefetch = 1024;
  int64_t far_prefetch() const { return llc_resident() ? kFarPrefetch : 0; }
  // The weights (all linears, the head included) take at most 3/4 of the last-level cache (false
  // when its size is unknown): far_prefetch, and the batch-1 prefetch side jobs' default (StepPf).
  bool llc_resident() const {
    static const int64_t l3 = l3_bytes();
    return l3 > 0 && weight_bytes_ <= l3 / 4 * 3;
  }
  static int64_t l3_bytes();  // the L3 one core sees (decode_step.cpp), 0 if unknown

  // Runs body(arena) with the step's arena (a fresh one when another thread holds it) and, when
  // use_team() and more than one thread, as the master of the process's Team (parallel.h): the
  // kernels' parallel_chunks loops go to its helpers, and torch's own loops on this thread
  // (packed_attention's, torch ops) run serially for the call (this thread's OpenMP count 1),
  // as they would inside a parallel region. Exceptions reach the caller.
  template <class Body>
  void step(const Body& body) const {
    // The switches this call reads (here, in decode_rows and in every kernel it calls on this thread)
    // trust one check of the environment's fingerprint (switches.h, session 29 helper C)
    const codeshell::EnvScope env_scope;
    std::unique_lock<std::mutex> lock(arena_mu_, std::try_to_lock);
    Arena fresh;
    Arena& a = lock.owns_lock() ? arena_ : fresh;
    codeshell::small_split_off() = codeshell::env_is("CODESHELL_SMALL_SPLIT", "off");  // A/B only (parallel.h)
    struct Hint {  // the step's hint for the kernels it calls, cleared when the call ends
      explicit Hint(int64_t v) { codeshell::bf16_far_prefetch_hint().store(v, std::memory_order_relaxed); }
      ~Hint() { codeshell::bf16_far_prefetch_hint().store(0, std::memory_order_relaxed); }
    } hint(far_prefetch());
    const int threads = at::get_num_threads();
    codeshell::Team* team = nullptr;
    if (use_team() && threads > 1 && !at::in_parallel_region() && codeshell::current_team() == nullptr) {
      team = codeshell::Team::shared(threads);
      if (!team->try_own()) team = nullptr;  // another thread's step holds it: run without
    }
    if (team == nullptr) {
      body(a);
      return;
    }
    omp_set_num_threads(1);
    // CODESHELL_TEAM_IDLE_US (read each call, as the switches above): the helpers' spin after the call
    // before they sleep, in microseconds (default 1000; -1: 16384 pauses, as before session 27)
    const int64_t idle_us = codeshell::env_int("CODESHELL_TEAM_IDLE_US", 1000);
    team->set_idle_ns(idle_us < 0 ? -1 : idle_us * 1000);
    const uint64_t wakes0 = team->wakes();
    team->begin();
    if (prof_.on) prof_.cur.woke = int64_t(team->wakes() - wakes0);  // Profile::trace
    codeshell::current_team() = team;
    std::exception_ptr err;
    try {
      body(a);
    } catch (...) {
      err = std::current_exception();
    }
    codeshell::current_team() = nullptr;
    team->end();
    team->disown();
    omp_set_num_threads(threads);
    if (err) std::rethrow_exception(err);
  }

  // RoPE's angles of n positions into fp [n, D/2]: float(pos(i)) * inv_freq (single fp32 products, as
  // torch's broadcast multiply): decode's rows and rope_table's, one computation so they are the same bits.
  template <class Pos>
  void rope_freqs(int64_t n, Pos pos, float* fp) const {
    const int64_t half = D_ / 2;
    const float* inv = inv_freq_.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < half; ++j) fp[i * half + j] = float(pos(i)) * inv[j];
  }

  static constexpr int64_t kRopeTableMax = int64_t(1) << 16;

  static constexpr int64_t kTeamAttnMin = 512;
  // CODESHELL_ATTN_M1 (read per call in a team at M = 1): 0 the packed_attention calls below (before
  // session 22), 1 packed_attention_rows / _groups into att (groups split from kTeamAttnMin on), 2 the
  // groups split at every length.
  static constexpr int64_t kAttnM1 = 1;

  int64_t H_, G_, D_, attn_isa_;
  std::vector<Linear> linears_;
  std::vector<Layer> layers_;
  c10::optional<torch::Tensor> lnf_w_, lnf_b_;
  double lnf_eps_ = 1e-5;
  int64_t head_ = -1, emb_kind_ = kEmbPanels, vocab_ = 0;
  torch::Tensor emb_, inv_freq_;
  int64_t team_ = 0, layer_bytes_ = 0, inner_ = 0, weight_bytes_ = 0;
  int64_t copy_bytes_ = 0;                 // the int8 / int4 linears' q8_rows_t.h copies if all were made
  std::atomic<bool> copies_fit_{false};    // weights + copies <= 3/4 LLC (copy_wanted); Linear points here
  std::atomic<bool> vrows_fit_{false};     // weights <= kAmxVrowsMaxBytes (step_linear.h WeightSums::vrows_fit)
  mutable Profile prof_;
  mutable std::mutex arena_mu_;
  mutable std::mutex rope_mu_;
  mutable torch::Tensor rope_cos_ = torch::empty({0}), rope_sin_;  // rope_table's rows, [P, D/2]
  mutable Arena arena_;
};

}  // namespace codeshell::step
