// The native decode step's linears (decode_step.h's DecodeStep): what a step holds per linear and the
// one call that runs it.
//
// What this is: the kernel codes kernels/step.py maps ops.plan's names to (`Kernel`), the weight kinds,
// `Linear` (a packed weight's tensors, its bias, its kernel and ISA, and the int8 block sums / the
// q8_rows_t.h transposed copies made for its batched calls), `Layer` (a block's LayerNorms and its four
// linears' indices) and `apply`, y = x @ W^T + bias by the linear's kernel into the step's buffers,
// ops._compute's call for that path (defined in step_layers.cpp).
// What this is not: a kernel (apply only calls the entry points of entry.h), nor the step's order of
// ops (step_layers.cpp `DecodeStep::blocks`).
#pragma once

#include <torch/extension.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "isa.h"
#include "q8_rows_t.h"
#include "q8_rows_tune.h"

namespace codeshell::step {

using bf16 = at::BFloat16;

// The kernel of one linear, as ops.plan names it ("<isa>:<kernel>"); codeshell/kernels/step.py
// maps the names to these codes (keep the two in step).
enum Kernel : int64_t {
  kAmxBf16 = 0,    // "amx:bf16", bf16 weight: prefill_bf16_amx on bf16 x
  kPanelBf16 = 1,  // "avx512_bf16:panel", bf16 weight: decode_bf16 (vdpbf16ps) on bf16 x
  kPanelF32 = 2,   // "avx2:panel", bf16 weight: decode_bf16 (fp32 FMA) on fp32 x
  kQ8 = 3,         // "<isa>:q8", int8/int4 weight: decode_int8_q8 / decode_int4_q8 on fp32 x
  kUnpack = 4,     // "avx2:unpack", int8/int4 weight: decode_int8 / decode_int4 on fp32 x
};
enum Kind : int64_t { kBf16 = 0, kInt8 = 1, kInt4 = 2 };

// An int8 weight's block sums for the batched int8 rows (q8_wsum.h), made at the first batched
// call (batch 1 never reads them) and kept with the Linear.
struct WeightSums {
  std::once_flag once;
  std::vector<int32_t> sums;
  std::once_flag pack_once;     // session 29: q8_rows_t.h's transposed copy, at the first call of 5..8 rows
  std::vector<uint8_t> packed;  // (CODESHELL_Q8R_TP=0: neither made nor handed over)
#if CODESHELL_HAVE_AVX512
  codeshell::q8rt::Pack4 packed4;  // int4's (CODESHELL_Q8R_TP4=0: neither)
#endif
  // The owning step's verdict: the model's weights and all its copies fit 3/4 of the LLC
  // (DecodeStep::copies_fit_, kept current by add_linear); null for a Linear outside a step.
  const std::atomic<bool>* copies_fit = nullptr;
  // Session 37: the owning step's weights total at most kAmxVrowsMaxBytes (DecodeStep::vrows_fit_): then
  // an AMX CPU runs this linear's 2..16 rows below the AMX rows on q8_rows.h (q8_amx_vrows) unless
  // CODESHELL_Q8_AMX_VROWS says otherwise; null for a Linear outside a step.
  const std::atomic<bool>* vrows_fit = nullptr;
  // Session 38: the measured kernel of this linear's 2..16-row calls on AMX CPUs (q8_rows_tune.h).
  RowsTune tune;
};

// Session 37 (helper B, docs/kernels-log.md): the step weights up to which AMX CPUs take q8_rows.h at 2..16
// rows by default. Measured (batch 8, bench_batch_phases, same runs): codeshell-mini (~15 MB of weights)
// int8 1.3-1.46x and int4 1.3x a step faster than q8_panel.h; the small shape (90-156 MB) 0.77-0.9x (int8
// and int4). Between these sizes not measured; why the larger model loses is not settled (its weights
// stream from farther than L2 each step, where q8_panel.h's / the tiles' reads keep up better).
constexpr int64_t kAmxVrowsMaxBytes = int64_t(32) << 20;

struct Linear {
  int64_t kind, kernel, isa, N, K, group;
  torch::Tensor data;                                  // panels (bf16), q (int8), nibbles (uint8)
  c10::optional<torch::Tensor> scales, offsets, bias;  // fp32; bias [N] or none
  std::shared_ptr<WeightSums> wsum = std::make_shared<WeightSums>();
};

// Session 38: whether apply's q8 path measures this linear's 2..16-row kernel (q8_rows_tune.h): AMX, K a
// multiple of 128, int8 or int4 in groups of 128 / 256 (the weights q8_panel.h, q8_rows.h and the tiles all take).
inline bool rows_tunable(const Linear& l) {
  return l.isa >= codeshell::kAmx && l.K % 128 == 0 &&
         (l.kind == kInt8 || (l.kind == kInt4 && (l.group == 128 || l.group == 256)));
}

struct Layer {
  c10::optional<torch::Tensor> ln1_w, ln1_b, ln2_w, ln2_b;
  double ln1_eps, ln2_eps;
  int64_t attn, proj, fc, mlp_proj;  // indices into DecodeStep::linears_
};

// y [M, N] fp32 for x bf16 [M, K] contiguous: ops._compute's call for this linear's path. The
// bf16 and `q8` paths write into `out` (fp32 [M, N]) and return it; the unpack kernels return
// their own tensor. `xf` (fp32 [M, K]) holds x converted for the paths that take fp32 x.
torch::Tensor apply(const Linear& l, const torch::Tensor& x, torch::Tensor& out, torch::Tensor& xf);

}  // namespace codeshell::step
