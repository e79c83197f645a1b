// The native decode step's per-call state (decode_step.h's DecodeStep): its buffers, its batch-1
// prefetch side jobs' settings and its phase profile.
//
// What this is: `Arena` (the step's output buffers for M rows, reused from call to call), `StepPf`
// (CODESHELL_STEP_PF*: the batch-1 prefetch side jobs, read once a step) and `Profile` (where a step's
// time goes, per phase, and the trace of decode's calls: DecodeStep.profile / profile_times /
// trace_times). What this is not: any arithmetic. None of these changes a result bit.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <vector>

#include "switches.h"

namespace codeshell::step {

// The step's buffers for M rows: allocated for the largest M seen (`rows`), viewed as [M, ...]
// (the views remade only when M changes). One per DecodeStep, used under its mutex; a call
// that finds it busy (two threads stepping one model) uses a fresh one.
struct Arena {
  int64_t rows = 0, vcap = 1, M = 0, Vv = -1;  // capacity; the views' M and V
  // bases [rows, width]; views [M, width] (att / q as [M, H, D])
  torch::Tensor b_x, b_h0, b_h1, b_y, b_qkv, b_q, b_att, b_g, b_fqkv, b_fc, b_ffc, b_fpend, b_xc, b_xi, b_head, b_freqs,
      b_cos, b_sin;
  torch::Tensor x, h0, h1, y, qkv, q, att, g, fqkv, fc, ffc, fpend, xc, xi, head, freqs, cos, sin;

  // C the width, W = (H + 2G) D, I the MLP's inner width, V the head's rows (0: none), half = D/2
  void shape(int64_t M_, int64_t C, int64_t W, int64_t I, int64_t V, int64_t half, int64_t H, int64_t D) {
    if (M_ == M && V == Vv) return;
    // plain tensors and views even when the first call runs under torch.inference_mode (the
    // engine's): an inference tensor cannot be written (cos_out) by a later call outside it
    c10::InferenceMode normal(false);
    if (M_ > rows || V > vcap) {
      const auto b = torch::TensorOptions().dtype(torch::kBFloat16), f = torch::TensorOptions().dtype(torch::kFloat32);
      rows = std::max(rows, M_);
      vcap = std::max(vcap, V);
      b_x = torch::empty({rows, C}, b), b_h0 = torch::empty({rows, C}, b), b_h1 = torch::empty({rows, C}, b);
      b_y = torch::empty({rows, C}, b), b_qkv = torch::empty({rows, W}, b), b_q = torch::empty({rows, C}, b);
      b_att = torch::empty({rows, C}, b), b_g = torch::empty({rows, I}, b);
      b_fqkv = torch::empty({rows, W}, f), b_fc = torch::empty({rows, C}, f), b_ffc = torch::empty({rows, I}, f);
      b_fpend = torch::empty({rows, C}, f), b_xc = torch::empty({rows, C}, f), b_xi = torch::empty({rows, I}, f);
      b_head = torch::empty({rows * vcap}, f);
      b_freqs = torch::empty({rows, half}, f), b_cos = torch::empty({rows, half}, f), b_sin = torch::empty({rows, half}, f);
    }
    M = M_;
    Vv = V;
    auto v = [&](const torch::Tensor& t) { return t.narrow(0, 0, M); };
    x = v(b_x), h0 = v(b_h0), h1 = v(b_h1), y = v(b_y), qkv = v(b_qkv), g = v(b_g);
    q = v(b_q).view({M, H, D}), att = v(b_att).view({M, H, D});
    fqkv = v(b_fqkv), fc = v(b_fc), ffc = v(b_ffc), fpend = v(b_fpend), xc = v(b_xc), xi = v(b_xi);
    const int64_t Vh = std::max<int64_t>(V, 1);
    head = b_head.narrow(0, 0, M * Vh).view({M, Vh});  // contiguous [M, V]
    freqs = v(b_freqs), cos = v(b_cos), sin = v(b_sin);
  }

  // the fp32 buffer for x converted for a linear of K inputs (C or I)
  torch::Tensor& xf(int64_t K, int64_t C) { return K == C ? xc : xi; }
};

// The batch-1 step's prefetch side jobs (session 26, helper C; parallel.h Team::prefetch_async).
// While the master runs a serial stretch of the step alone (RoPE + KV store + attention after c_attn,
// the LayerNorm before c_fc and before the next c_attn / the head, and after the argmax the engine's
// Python until the next token's first c_attn) the team's helper, which would spin, prefetches the
// first bytes of each thread's share of the linear that comes next (`fronts`), so that linear starts
// from cache. CODESHELL_STEP_PF (read once a step): 0 off (as before), 1 on (default: see
// docs/kernels-log.md, session 26 helper C), unset: on unless the weights are LLC-resident (StepPf::read);
// CODESHELL_STEP_PF_KB: KiB a share (in the step),
// CODESHELL_STEP_PF_END_KB: KiB a share for the next token's first c_attn, CODESHELL_STEP_PF_HINT:
// 0 T0, 1 T1, 2 T2, 3 NTA; CODESHELL_STEP_PF_OWN=1: only the helpers' shares (not the master's).
// Prefetches only: no bit of any result changes (tests/kernels/test_step_prefetch.py).
struct StepPf {
  bool on = false, own = false;
  int hint = 2;
  int64_t bytes = 0, end_bytes = 0;  // a share's
  // resident: the model's weights sit in the last-level cache (DecodeStep::llc_resident), where
  // the next linear's bytes are already near and a prefetch only adds the side job's posting and
  // stopping to every serial stretch: unset, the jobs run only for models larger than that (lead,
  // session 26: codeshell-mini int8 / int4, 17 MB, bench_quant b1 in 3 alternating pairs 2540 /
  // 2576 tok/s off against 2083 / 2130 on, medians); "1" runs them on any model.
  static StepPf read(bool resident) {
    StepPf s;
    const char* v = codeshell::env_detail::get("CODESHELL_STEP_PF");
    s.on = v == nullptr || *v == 0 ? !resident : codeshell::env_flag("CODESHELL_STEP_PF", true);
    if (!s.on) return s;
    s.bytes = std::max<int64_t>(0, codeshell::env_int("CODESHELL_STEP_PF_KB", 512)) << 10;
    s.end_bytes = std::max<int64_t>(0, codeshell::env_int("CODESHELL_STEP_PF_END_KB", 1024)) << 10;
    s.hint = int(codeshell::env_int("CODESHELL_STEP_PF_HINT", 2));
    s.own = codeshell::env_flag("CODESHELL_STEP_PF_OWN", false);
    return s;
  }
};

// Where a step's time goes (`DecodeStep.profile`, off by default; benchmarks/bench_decode_step.py
// --profile prints it): wall nanoseconds per phase summed over the calls, measured on the calling
// thread between the phases (a phase's parallel loop is inside its own time). Off, each mark is one
// predictable branch.
enum Phase : int { kEmbed, kNorm, kQkv, kRopeStore, kAttention, kProj, kFc, kGelu, kMlpProj, kHead, kPick, kCast,
                    kPhases };
constexpr const char* kPhaseNames[kPhases] = {"embed+rope rows", "layer norms", "c_attn",   "rope+kv store",
                                              "attention",       "attn.c_proj", "c_fc",     "gelu",
                                              "mlp.c_proj",      "head",        "argmax",   "logits cast"};
struct Profile {
  bool on = false;
  int64_t calls = 0;
  std::array<int64_t, kPhases> ns{};
  std::chrono::steady_clock::time_point last;
  void start() {
    if (on) last = std::chrono::steady_clock::now(), ++calls;
  }
  void mark(Phase p) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    const int64_t d = std::chrono::duration_cast<std::chrono::nanoseconds>(now - last).count();
    ns[p] += d;
    if (marks.size() < kMarksMax) marks.push_back({int64_t(p), d});
    last = now;
  }
  // Every mark's (phase, ns) in order (session 36 helper A; `DecodeStep.profile_marks`): the per-call
  // quantiles of a phase (benchmarks/bench_step_bytes.py --calls), which the sums above cannot give: on
  // a shared host a call the scheduler cut into inflates a sum, while the standalones report a call's
  // q25 (benchmarks/standalone/q4avx2_m1_cold.cpp). The first kMarksMax marks after the profile was turned on.
  static constexpr size_t kMarksMax = size_t(1) << 20;
  std::vector<std::array<int64_t, 2>> marks;
  // The trace of decode's calls (session 27, helper C; `DecodeStep.trace_times`): per call the
  // steady_clock nanoseconds (CLOCK_MONOTONIC: Python's time.perf_counter_ns reads the same clock) at
  // decode's entry (pybind's argument conversion and the GIL release done), the body's start (the
  // arena, the RoPE table, the team taken and woken), the body's end (the step's last op and the
  // side job posted) and decode's exit (the team handed back), and whether this call's begin() woke
  // a sleeping helper (a futex wake); so that the time between two tokens can be split into the native call's own entry / exit,
  // the team's wake and the Python around it (benchmarks/bench_decode_phases.py --trace). The first
  // kTraceMax calls after the profile was turned on.
  static constexpr size_t kTraceMax = 1 << 16;
  struct Call {
    int64_t entry = 0, body = 0, body_end = 0, exit = 0, woke = 0;
  };
  std::vector<Call> trace;
  Call cur;
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  void finish() {
    if (!on) return;
    cur.exit = now_ns();
    if (trace.size() < kTraceMax) trace.push_back(cur);
    cur = Call{};
  }
};

}  // namespace codeshell::step
