// The decode step's choice of kernel for a linear's batched int8 / int4 calls on AMX CPUs (2..16 rows of x),
// measured on the step's own calls. Session 38, helper B.
//
// What this is: `RowsTune` (kept per Linear, in its WeightSums) and `RowsTuneCall`, a scope around one call of
// `apply` (step_layers.cpp) that names the path of this call (a Q8AmxVrowsScope code, entry.h: kQ8PathPanel
// q8_panel.h, kQ8PathRows q8_rows.h, kQ8PathTiles the AMX-INT8 row tiles) and times it. The first calls of each
// row count M try the candidates in blocks of kBlock calls (a step calls each linear once, so all the step's
// linears run one path for kBlock steps; the first call of a block is not counted), kRounds blocks a path in
// rotated order; then the path with the least median time is kept for that (linear, M). Blocks, not one call
// a path in turn: per-call rotation measured each path just after the others had run (codeshell-mini int8:
// its choices made the b8 step 1.13x slower than session 37's rule, every linear 1.5-2.5 us slower a call). The three give the same bits (all end in q8_epilogue.h: tests/kernels/test_invariance.py,
// test_amx_rows.py), so switching between calls changes no result, only the time.
// Why: which of the three is fastest at 2..16 rows depends on the weight's shape and on where it is read
// from in the step (session 37: warm alone q8_rows.h beat q8_panel.h at M = 2..8 on every shape, but in the
// small shape's step it lost, 9.80 against 8.72 ms; session 38: alone, from L3, 1 thread, M = 8, the tiles read
// the K = 1024 weights at 1.18-1.22x their M = 1 time against q8_panel.h's 1.31-1.36x, and the K = 4096
// mlp.c_proj at 1.38x against 1.29x), and the rules before (the tiles from 12 rows, q8_rows.h for steps of at
// most 32 MiB of weights) were fixed from two model sizes. Measuring in the step times each path with the
// step's cold weights, its thread team and its neighbours.
// Candidates: q8_panel.h and the tiles always; q8_rows.h only where the session 37 rule allowed it (the step's
// weights at most kAmxVrowsMaxBytes: its 5..8-row transposed copy is a second weight in memory).
// Default: measured only in steps whose weights exceed kAmxVrowsMaxBytes, where the rules ran q8_panel.h below
// 12 rows (codeshell-mini's step, of at most 32 MiB, keeps session 37's q8_rows.h: measured there with per-call
// rotation the choices cost its b8 step 1.13x; the blocks below were not measured on it in a quiet minute).
// CODESHELL_Q8_ROWS_TUNE=1: measured in every step; =0 (read per call): the rules before everywhere.
// CODESHELL_Q8_AMX_VROWS or CODESHELL_Q8_AMX_MIN_M set: those switches decide (A/B runs), nothing is tuned.
// CODESHELL_Q8_ROWS_TUNE_LOG=1: each choice to stderr with its medians.
// What this is not: thread-safe for two callers of one Linear at once (a step's linears are applied by its
// master thread only, one call at a time), nor a kernel.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>

#include "entry.h"
#include "switches.h"

namespace codeshell::step {

struct RowsTune {
  // kBlock calls in a row on one path (the first of them not counted: it runs after the other paths' calls,
  // with their caches), kRounds blocks of each path, the paths' blocks rotated each round
  static constexpr int kPaths = 3, kRounds = 2, kBlock = 4, kSamples = kRounds * (kBlock - 1), kMaxM = 16;
  int8_t chosen[kMaxM + 1];               // per M: the kept path, -1 while measuring
  uint8_t calls[kMaxM + 1];               // per M: calls so far while measuring
  float ns[kMaxM + 1][kPaths][kSamples];  // per M, path: the counted calls' wall times
  RowsTune() {
    std::fill(chosen, chosen + kMaxM + 1, int8_t(-1));
    std::fill(calls, calls + kMaxM + 1, uint8_t(0));
  }
};

// One call of apply's q8 path: code() for Q8AmxVrowsScope; the call timed until this goes out of scope.
// `tunable`: an AMX linear whose 2..16-row calls the three kernels take (int8, or int4 with groups of 128 /
// 256; K % 128 == 0); `vrows_fit`: the step's weights are small enough for q8_rows.h (its copies).
class RowsTuneCall {
 public:
  RowsTuneCall(RowsTune& t, int64_t M, bool tunable, bool vrows_fit, int64_t N, int64_t K)
      : t_(t), M_(M), N_(N), K_(K), vrows_fit_(vrows_fit) {
    code_ = vrows_fit ? kQ8PathVrowsRule : kQ8PathRules;  // the rules before
    // unset: measured only in steps past the 32 MiB rule (vrows_fit false); 1: in every step; 0: never
    const int64_t on = env_int("CODESHELL_Q8_ROWS_TUNE", -1);
    if (!tunable || M < 2 || M > RowsTune::kMaxM || on == 0 || (on < 0 && vrows_fit) ||
        env_int("CODESHELL_Q8_AMX_VROWS", -1) >= 0 || env_int("CODESHELL_Q8_AMX_MIN_M", -1) >= 0)
      return;
    if (t.chosen[M] >= 0) {
      code_ = kCodes[t.chosen[M]];
      return;
    }
    const int n = cands();  // candidates: 0 panel, 2 tiles (, 1 q8_rows.h)
    const int c = t.calls[M], blk = c / RowsTune::kBlock, in = c % RowsTune::kBlock;
    const int round = blk / n, slot = (blk + round) % n;  // the blocks' order rotated each round
    path_ = n == 3 ? slot : (slot == 0 ? 0 : 2);
    code_ = kCodes[path_];
    sample_ = in == 0 ? -1 : round * (RowsTune::kBlock - 1) + in - 1;
    timing_ = true;
    t0_ = std::chrono::steady_clock::now();
  }
  ~RowsTuneCall() {
    if (!timing_) return;
    const float ns = float(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0_).count());
    RowsTune& t = t_;
    if (sample_ >= 0) t.ns[M_][path_][sample_] = ns;
    if (++t.calls[M_] < cands() * RowsTune::kRounds * RowsTune::kBlock) return;
    float best = 0;
    int keep = -1;
    for (int p = 0; p < RowsTune::kPaths; ++p) {
      if (!used(p)) continue;
      float v[RowsTune::kSamples];
      std::copy(t.ns[M_][p], t.ns[M_][p] + RowsTune::kSamples, v);
      std::nth_element(v, v + RowsTune::kSamples / 2, v + RowsTune::kSamples);
      const float med = v[RowsTune::kSamples / 2];
      if (env_flag("CODESHELL_Q8_ROWS_TUNE_LOG", false))
        std::fprintf(stderr, "q8 rows tune %ldx%ld M=%ld %s: %.1f us\n", long(N_), long(K_), long(M_), kNames[p], med / 1e3);
      if (keep < 0 || med < best) {
        best = med;
        keep = p;
      }
    }
    t.chosen[M_] = int8_t(keep);
  }
  int code() const { return code_; }  // for Q8AmxVrowsScope

 private:
  static constexpr int kCodes[RowsTune::kPaths] = {kQ8PathPanel, kQ8PathRows, kQ8PathTiles};
  static constexpr const char* kNames[RowsTune::kPaths] = {"q8_panel.h", "q8_rows.h", "tiles"};
  int cands() const { return vrows_fit_ ? 3 : 2; }
  bool used(int p) const { return vrows_fit_ || p != 1; }
  RowsTune& t_;
  int64_t M_, N_, K_;
  bool vrows_fit_;
  int code_, path_ = 0, sample_ = -1;
  bool timing_ = false;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace codeshell::step
