// The native decode step: a decode or prompt-lookup verify step's transformer blocks in one call.
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
// fork of the off path waited for its second thread to get a core; docs/kernels.md, sessions 12,
// 17, 18 and 19). Neither changes any op's arithmetic: every output element is computed by the
// same code on the same inputs, whichever thread runs its chunk.

#include <torch/extension.h>

#include "attention_rows.h"
#include "entry.h"
#include "isa.h"
#include "panel_rows.h"
#include "parallel.h"
#include "q8_rows_t.h"
#include "q8_wsum.h"
#include "step_hints.h"
#include "switches.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

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
};

struct Linear {
  int64_t kind, kernel, isa, N, K, group;
  torch::Tensor data;                                  // panels (bf16), q (int8), nibbles (uint8)
  c10::optional<torch::Tensor> scales, offsets, bias;  // fp32; bias [N] or none
  std::shared_ptr<WeightSums> wsum = std::make_shared<WeightSums>();
};

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
  if (l.K % 128 == 0 && l.isa >= codeshell::kAvx512Vnni && l.isa < codeshell::kAmx &&
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
// Lake-class Xeon; made only there). CODESHELL_Q8R_TP4=0 (read per call): neither made nor used.
// The same bits (tests/kernels/test_q8_rows_t.py).
const void* int4_packed(const Linear& l, int64_t M) {
#if CODESHELL_HAVE_AVX512
  // l.isa too (session 30): a linear capped below VNNI (CODESHELL_KERNEL_ISA=avx2) runs the AVX2
  // kernel, which never reads the copy
  if (M < 5 || M > 8 || l.K % 128 != 0 || (l.group != 128 && l.group != 256) || l.isa != codeshell::kAvx512Vnni ||
      codeshell::cpu_features().max_isa != codeshell::kAvx512Vnni || !copy_wanted(l, "CODESHELL_Q8R_TP4"))
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

struct Layer {
  c10::optional<torch::Tensor> ln1_w, ln1_b, ln2_w, ln2_b;
  double ln1_eps, ln2_eps;
  int64_t attn, proj, fc, mlp_proj;  // indices into DecodeStep::linears_
};

// bf16 [M, K] -> fp32 out [M, K]: exact (what `.to(torch.float32)` gives), without the dispatcher.
void to_f32(const torch::Tensor& x, torch::Tensor& out) {
  const bf16* src = x.data_ptr<bf16>();
  float* dst = out.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; ++i) dst[i] = float(src[i]);
}

// y [M, N] fp32 for x bf16 [M, K] contiguous: ops._compute's call for this linear's path. The
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
    case kQ8:  // into `out` as the bf16 paths (no output allocation a call)
      if (l.kind == kInt8 && xf.size(0) > 1) int8_q8_batched(l, xf, out);
      else if (l.kind == kInt8) decode_int8_q8_out(xf, l.data, *l.scales, l.bias, l.isa, out);
      else if (const void* p4 = xf.size(0) >= 5 ? int4_packed(l, xf.size(0)) : nullptr) {
        codeshell::q8rows::SumsHintScope hint(l.data.data_ptr(), l.N, l.K, nullptr, nullptr, p4);
        decode_int4_q8_out(xf, l.data, *l.scales, l.offsets, l.group, l.bias, l.isa, out);
      } else {
        decode_int4_q8_out(xf, l.data, *l.scales, l.offsets, l.group, l.bias, l.isa, out);
      }
      return out;
    case kUnpack:
      if (l.kind == kInt8) return decode_int8(xf, l.data, *l.scales, l.bias);
      return decode_int4(xf, l.data, *l.scales, l.offsets, l.group, l.bias);
    default: break;
  }
  TORCH_CHECK(false, "DecodeStep: unknown kernel code ", l.kernel);
  return {};
}

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

// The batch-1 step's prefetch side jobs (session 26, helper C; parallel.h Team::prefetch_async).
// While the master runs a serial stretch of the step alone (RoPE + KV store + attention after c_attn,
// the LayerNorm before c_fc and before the next c_attn / the head, and after the argmax the engine's
// Python until the next token's first c_attn) the team's helper, which would spin, prefetches the
// first bytes of each thread's share of the linear that comes next (`fronts`), so that linear starts
// from cache. CODESHELL_STEP_PF (read once a step): 0 off (as before), 1 on (default: see
// docs/kernels.md, session 26 helper C), unset: on unless the weights are LLC-resident (StepPf::read);
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
    ns[p] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - last).count();
    last = now;
  }
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

class DecodeStep {
 public:
  // H query heads, G KV groups of D dims; attn_isa: packed_attention's isa (ops.isa_level()).
  DecodeStep(int64_t H, int64_t G, int64_t D, int64_t attn_isa) : H_(H), G_(G), D_(D), attn_isa_(attn_isa) {
    TORCH_CHECK(H > 0 && G > 0 && D > 0 && D % 2 == 0 && H % G == 0, "DecodeStep: bad head shape H=", H, " G=", G,
                " D=", D);
    codeshell::check_isa(attn_isa);
  }

  // One linear: y = x @ W^T + bias by `kernel` (Kernel) at `isa`; returns its index.
  int64_t add_linear(int64_t kind, int64_t kernel, int64_t isa, const torch::Tensor& data,
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
    weight_bytes_ += data.nbytes();
    if (kind != kBf16 && K % 128 == 0) copy_bytes_ += N * K;  // q8_rows_t.h's copy: a byte a weight
    static const int64_t l3 = l3_bytes();
    copies_fit_.store(l3 > 0 && weight_bytes_ + copy_bytes_ <= l3 / 4 * 3, std::memory_order_relaxed);
    return int64_t(linears_.size()) - 1;
  }

  // One block: ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj (linear indices from add_linear).
  void add_layer(const c10::optional<torch::Tensor>& ln1_w, const c10::optional<torch::Tensor>& ln1_b, double ln1_eps,
                 int64_t attn, int64_t proj, const c10::optional<torch::Tensor>& ln2_w,
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
  void set_team(int64_t mode) {
    TORCH_CHECK(mode >= 0 && mode <= 2, "DecodeStep.set_team: mode must be 0 (off), 1 (on) or 2 (auto), got ", mode);
    team_ = mode;
  }
  int64_t team() const { return team_; }
  bool use_team() const { return team_ == 1 || (team_ == 2 && layer_bytes_ <= kTeamBytes); }

  void set_final(const c10::optional<torch::Tensor>& w, const c10::optional<torch::Tensor>& b, double eps) {
    lnf_w_ = w;
    lnf_b_ = b;
    lnf_eps_ = eps;
  }

  int64_t layers() const { return int64_t(layers_.size()); }
  int64_t far_prefetch_kpairs() const { return far_prefetch(); }

  // h bf16 [M, C]: the step's embedded rows (M <= 64); cos, sin fp32 [M, D/2] (none: no RoPE);
  // kc, vc the KV cache [layers, slots, G, max_len, D] (bf16); slots, positions, lens
  // int64 [M]: token i is at positions[i] of slot slots[i] and attends keys 0..lens[i]-1.
  // Returns ln_f's output bf16 [M, C].
  torch::Tensor run(const torch::Tensor& x, const c10::optional<torch::Tensor>& cos,
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
  std::tuple<torch::Tensor, std::vector<int64_t>> decode(const std::vector<int64_t>& tokens,
                                                         const std::vector<int64_t>& positions,
                                                         const std::vector<int64_t>& slots, const torch::Tensor& kc,
                                                         const torch::Tensor& vc, double scale,
                                                         bool want_logits) const {
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
  void decode_rows(Arena& a, const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                   const std::vector<int64_t>& slots, const torch::Tensor& kc, const torch::Tensor& vc, double scale,
                   bool want_logits, const std::pair<torch::Tensor, torch::Tensor>& table, torch::Tensor& logits,
                   std::vector<int64_t>& picks, bool end_job = true) const {
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
  void end_prefetch(const StepPf& pf) const {
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
  std::vector<int64_t> decode_greedy(int64_t token, int64_t position, int64_t slot, int64_t n,
                                     const std::vector<int64_t>& stop, const torch::Tensor& kc,
                                     const torch::Tensor& vc, double scale, int64_t budget_ns = 0) const {
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
  std::vector<std::vector<int64_t>> decode_greedy_rows(std::vector<int64_t> tokens, std::vector<int64_t> positions,
                                                       const std::vector<int64_t>& slots, const std::vector<int64_t>& ns,
                                                       const std::vector<std::vector<int64_t>>& stops,
                                                       const torch::Tensor& kc, const torch::Tensor& vc, double scale,
                                                       int64_t budget_ns = 0) const {
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
  int64_t copy_bytes_made() const {
    int64_t b = 0;
    for (const Linear& l : linears_) {
      b += int64_t(l.wsum->packed.size());
#if CODESHELL_HAVE_AVX512
      b += int64_t(l.wsum->packed4.w.size() + 4 * (l.wsum->packed4.sc.size() + l.wsum->packed4.of.size()));
#endif
    }
    return b;
  }
  bool copies_fit() const { return copies_fit_.load(std::memory_order_relaxed); }

  // The output head: linear `index` (add_linear; K = C). Its logits are decode's.
  void set_head(int64_t index) {
    TORCH_CHECK(0 <= index && index < int64_t(linears_.size()) && linears_[index].K == H_ * D_,
                "DecodeStep.set_head: no linear ", index, " of width ", H_ * D_);
    head_ = index;
  }

  // The token embedding: kind 0 the head's bf16 panels [ceil(V/16), Kp/2, 32] (PackedEmbedding),
  // kind 1 a bf16 [V, C] table (nn.Embedding).
  void set_embedding(int64_t kind, const torch::Tensor& table, int64_t V) {
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
  void set_rope(const torch::Tensor& inv_freq) {
    TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat32 && inv_freq.is_contiguous() && inv_freq.dim() == 1 &&
                    inv_freq.numel() == D_ / 2,
                "DecodeStep.set_rope: inv_freq must be a contiguous fp32 [", D_ / 2, "] tensor");
    inv_freq_ = inv_freq;
    std::lock_guard<std::mutex> lock(rope_mu_);
    rope_cos_ = torch::empty({0}), rope_sin_ = torch::Tensor();  // rope_table's rows were of the old frequencies
  }

  // The phase profile (Profile): on / off (turning it on clears it), and (calls, {phase: seconds}).
  void set_profile(bool on) {
    prof_ = Profile{};
    prof_.on = on;
  }
  bool profile() const { return prof_.on; }
  // Profile::trace as (entry, body, body end, exit, 1 if the call woke a sleeping helper) per call.
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> trace_times() const {
    std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> out;
    for (const auto& c : prof_.trace) out.emplace_back(c.entry, c.body, c.body_end, c.exit, c.woke);
    return out;
  }
  std::tuple<int64_t, std::vector<std::tuple<std::string, double>>> profile_times() const {
    std::vector<std::tuple<std::string, double>> out;
    for (int p = 0; p < kPhases; ++p) out.emplace_back(kPhaseNames[p], prof_.ns[p] * 1e-9);
    return {prof_.calls, out};
  }

 private:
  enum : int64_t { kEmbPanels = 0, kEmbRows = 1 };

  // The KV cache's checks (decode's and run's), and each token's slot and position inside it.
  void check_cache(const torch::Tensor& kc, const torch::Tensor& vc, int64_t M, const int64_t* sp,
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
  // The L3 one core sees (sysfs index3; in K), 0 if unknown. Not sysconf(_SC_LEVEL3_CACHE_SIZE):
  // on the EPYC VM it gave 384 MiB, the whole package's, where a core's CCD has 32 MiB.
  static int64_t l3_bytes() {
    std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    if (f == nullptr) return 0;
    long kb = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%ld%c", &kb, &unit);
    std::fclose(f);
    if (got < 1 || kb <= 0) return 0;
    return int64_t(kb) * (got == 2 && (unit == 'M' || unit == 'm') ? 1 << 20 : 1 << 10);
  }

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
  // ([1, 64]: serial) (docs/kernels.md, session 21 helper D). VML's cos / sin are elementwise: a
  // row's values do not depend on the call's length or threads (measured: [64, 64] rows one by one
  // and the whole, 1 and 2 threads, the same bits; test_decode_step compares the step with the
  // Python path), so the table's rows are the bits decode computed. The table is made here, before
  // the step takes its team, where a fork finds its threads.
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
  std::pair<torch::Tensor, torch::Tensor> rope_table(const std::vector<int64_t>& positions) const {
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
  void embed(const std::vector<int64_t>& tokens, torch::Tensor& x) const {
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
  // Posts the side job for linear l: `bytes` from the front of each thread's share of its rows at
  // M = 1 (qdot_int8.cpp / qdot_int4.cpp: one share a thread (parallel_owned) for int8 weights of at
  // most 8 MiB and int4 under 4 MiB, else parallel_chunks, whose first chunks the threads take first).
  // The rows a share starts at are multiples of 16; a row's bytes are data's bytes / N (int8 [N, K],
  // int4 nibbles [N, K/2], bf16 panels of 16 rows). Only where the prefetch lands depends on this.
  void post_prefetch(codeshell::Team& t, const Linear& l, int64_t bytes, const StepPf& pf) const {
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

  static constexpr int64_t kTeamAttnMin = 512;
  // CODESHELL_ATTN_M1 (read per call in a team at M = 1): 0 the packed_attention calls below (before
  // session 22), 1 packed_attention_rows / _groups into att (groups split from kTeamAttnMin on), 2 the
  // groups split at every length.
  static constexpr int64_t kAttnM1 = 1;
  torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& kl, const torch::Tensor& vl,
                       const torch::Tensor& slots, const torch::Tensor& lens, double scale, torch::Tensor& att) const {
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
  torch::Tensor blocks(Arena& a, const torch::Tensor& x, const c10::optional<torch::Tensor>& cos,
                       const c10::optional<torch::Tensor>& sin, const torch::Tensor& kc, const torch::Tensor& vc,
                       const torch::Tensor& slots, const torch::Tensor& positions, const torch::Tensor& lens,
                       double scale, const Linear* after = nullptr, const StepPf& pf = StepPf()) const {
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
  mutable Profile prof_;
  mutable std::mutex arena_mu_;
  mutable std::mutex rope_mu_;
  mutable torch::Tensor rope_cos_ = torch::empty({0}), rope_sin_;  // rope_table's rows, [P, D/2]
  mutable Arena arena_;
};

}  // namespace

void register_decode_step(py::module& m) {
  py::class_<DecodeStep>(m, "DecodeStep",
                         "A decode / verify step's blocks and final LayerNorm in one call (csrc/decode_step.cpp)")
      .def(py::init<int64_t, int64_t, int64_t, int64_t>(), py::arg("H"), py::arg("G"), py::arg("D"),
           py::arg("attn_isa"))
      .def("add_linear", &DecodeStep::add_linear, "(kind, kernel, isa, data, scales, offsets, bias, group, N, K) -> index")
      .def("add_layer", &DecodeStep::add_layer,
           "(ln1 weight, bias, eps, c_attn, c_proj, ln2 weight, bias, eps, c_fc, mlp c_proj)")
      .def("set_final", &DecodeStep::set_final, "ln_f's weight, bias, eps")
      .def_property_readonly("layers", &DecodeStep::layers)
      // The whole step runs without the GIL, as the kernels it calls do (kernels.cpp).
      .def("run", &DecodeStep::run, py::call_guard<py::gil_scoped_release>(),
           "(x, cos, sin, k cache, v cache, slots, positions, lens, scale) -> ln_f output bf16 [M, C]")
      .def("decode", &DecodeStep::decode, py::call_guard<py::gil_scoped_release>(), py::arg("tokens"),
           py::arg("positions"), py::arg("slots"), py::arg("k_cache"), py::arg("v_cache"), py::arg("scale"),
           py::arg("want_logits") = true,
           "(tokens, positions, slots, k cache, v cache, scale, want_logits=True) -> (logits bf16 [M, V] or None, "
           "greedy picks)")
      .def("decode_greedy", &DecodeStep::decode_greedy, py::call_guard<py::gil_scoped_release>(), py::arg("token"),
           py::arg("position"), py::arg("slot"), py::arg("n"), py::arg("stop"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("scale"), py::arg("budget_ns") = 0,
           "(token, position, slot, n, stop ids, k cache, v cache, scale, budget_ns=0) -> up to n greedy picks of one sequence "
           "(each fed back at the next position; stops after a pick in stop)")
      .def("decode_greedy_rows", &DecodeStep::decode_greedy_rows, py::call_guard<py::gil_scoped_release>(),
           py::arg("tokens"), py::arg("positions"), py::arg("slots"), py::arg("ns"), py::arg("stops"),
           py::arg("k_cache"), py::arg("v_cache"), py::arg("scale"), py::arg("budget_ns") = 0,
           "(tokens, positions, slots, ns, stop ids per row, k cache, v cache, scale, budget_ns=0) -> each row's "
           "greedy picks (up to ns[r], stopping after a pick in stops[r]; a stopped row leaves the batch)")
      .def("set_head", &DecodeStep::set_head, "the output head: a linear index (add_linear)")
      .def("set_embedding", &DecodeStep::set_embedding, "(kind 0 panels / 1 rows, bf16 table, V)")
      .def("set_rope", &DecodeStep::set_rope, "RoPE's inverse frequencies fp32 [D/2]")
      .def_property("team", &DecodeStep::team, &DecodeStep::set_team,
                    "the whole step in one thread team: 0 off, 1 on, 2 auto (on where the layers are small)")
      .def_property_readonly("uses_team", &DecodeStep::use_team)
      .def_property_readonly("far_prefetch", &DecodeStep::far_prefetch_kpairs,
                             "k-pairs of the bf16 batched rows' L2 prefetch in its calls (0: none; step_hints.h)")
      .def_property("profile", &DecodeStep::profile, &DecodeStep::set_profile,
                    "time each phase of decode's calls (setting it clears the sums)")
      .def("copy_bytes_made", &DecodeStep::copy_bytes_made, "bytes of q8_rows_t.h's transposed copies made so far")
      .def("copies_fit", &DecodeStep::copies_fit, "the weights and their transposed copies fit 3/4 of the LLC")
      .def("profile_times", &DecodeStep::profile_times, "(calls, [(phase, seconds summed over the calls)])")
      .def("trace_times", &DecodeStep::trace_times,
           "decode's calls since profile was set on: (entry, body start, body end, exit) steady_clock ns "
           "(time.perf_counter_ns's clock) and 1 where the call woke a sleeping helper of its team");
  // For the tests: decode's picks without bf16 logits must equal argmax_rows on them, ties included.
  m.def(
      "argmax_rows_rounded",
      [](const torch::Tensor& logits) {
        TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == torch::kFloat32 &&
                        logits.size(1) > 0,
                    "argmax_rows_rounded: logits must be a contiguous fp32 [N, V] tensor with V > 0");
        auto out = torch::empty({logits.size(0)}, logits.options().dtype(torch::kInt64));
        argmax_rows_rounded(logits.data_ptr<float>(), logits.size(0), logits.size(1), out.data_ptr<int64_t>());
        return out;
      },
      py::call_guard<py::gil_scoped_release>(),
      "the first maximal index of each row of fp32 logits [N, V] rounded to bf16 (argmax_rows of .to(bfloat16))");
  // kernels/step.py's `_Checks.valid` (every decode / verify step, before the native call): whether
  // dicts[i].get(keys[i]) is objs[i] for every i and tensors[j]._version == versions[j]. The same
  // answer as its Python loops; why native: after a step has streamed the weights through the caches,
  // the ~200 dicts a small-shape model's check reads are all cold, and Python's loop takes their misses
  // one after another (~65 us a token in place, 11 us in a hot loop, session 20 helper B); here the
  // loop is a few instructions an entry, so the out-of-order core overlaps the misses of many entries,
  // and each dict is prefetched a few entries ahead.
  m.def(
      "same_entries",
      [](const py::list& dicts, const py::list& keys, const py::list& objs, const py::list& tensors,
         const py::list& versions) -> bool {
        const Py_ssize_t n = PyList_GET_SIZE(dicts.ptr());
        TORCH_CHECK(PyList_GET_SIZE(keys.ptr()) == n && PyList_GET_SIZE(objs.ptr()) == n &&
                        PyList_GET_SIZE(tensors.ptr()) == PyList_GET_SIZE(versions.ptr()),
                    "same_entries: dicts, keys and objs (and tensors and versions) must have one entry each");
        PyObject** d = reinterpret_cast<PyListObject*>(dicts.ptr())->ob_item;
        PyObject** k = reinterpret_cast<PyListObject*>(keys.ptr())->ob_item;
        PyObject** o = reinterpret_cast<PyListObject*>(objs.ptr())->ob_item;
        constexpr Py_ssize_t kAhead = 8;
        for (Py_ssize_t i = 0; i < n && i < kAhead; ++i) __builtin_prefetch(d[i]);
        for (Py_ssize_t i = 0; i < n; ++i) {
          if (i + kAhead < n) __builtin_prefetch(d[i + kAhead]);
          TORCH_CHECK(PyDict_Check(d[i]), "same_entries: entry ", i, " is not a dict");
          PyObject* v = PyDict_GetItemWithError(d[i], k[i]);  // borrowed; NULL: absent (dict.get's None)
          if (v == nullptr) {
            if (PyErr_Occurred()) throw py::error_already_set();
            v = Py_None;
          }
          if (v != o[i]) return false;
        }
        const Py_ssize_t nt = PyList_GET_SIZE(tensors.ptr());
        PyObject** t = reinterpret_cast<PyListObject*>(tensors.ptr())->ob_item;
        PyObject** ver = reinterpret_cast<PyListObject*>(versions.ptr())->ob_item;
        for (Py_ssize_t j = 0; j < nt; ++j) {
          TORCH_CHECK(THPVariable_Check(t[j]), "same_entries: tensors[", j, "] is not a tensor");
          const long long want = PyLong_AsLongLong(ver[j]);
          if (want == -1 && PyErr_Occurred()) throw py::error_already_set();
          if (int64_t(THPVariable_Unpack(t[j])._version()) != want) return false;
        }
        return true;
      },
      "dicts[i].get(keys[i]) is objs[i] for all i and tensors[j]._version == versions[j] for all j "
      "(kernels/step.py _Checks.valid)");
  // For the tests: fn() with the calling thread as the master of the process's thread team (as
  // inside a step with the team on), so the kernels fn calls split their loops as they do in a
  // step (fused.cpp's for_rows / for_pieces, sampling.cpp's row segments).
  // Returns (fn's result, the loops that went to the helpers); False without a team (1 thread,
  // or another thread holds it).
  m.def("run_in_team", [](const py::function& fn) -> py::object {
    const int threads = at::get_num_threads();
    codeshell::Team* t = threads > 1 && codeshell::current_team() == nullptr ? codeshell::Team::shared(threads) : nullptr;
    if (t == nullptr || !t->try_own()) return py::bool_(false);
    omp_set_num_threads(1);
    codeshell::small_split_off() = false;
    t->begin();
    codeshell::current_team() = t;
    auto done = [&] {
      codeshell::current_team() = nullptr;
      t->end();
      t->disown();
      omp_set_num_threads(threads);
    };
    const uint64_t loops0 = t->loops();
    try {
      py::object r = fn();
      const uint64_t loops = t->loops() - loops0;
      done();
      return py::make_tuple(r, loops);
    } catch (...) {
      done();
      throw;
    }
  }, "fn() as the master of the thread team (as inside a decode step with the team on)");
  // For the tests (test_switch_cache.py): the switches' cache (switches.h) from Python. A name is
  // interned first (the cache is keyed by a name's address; a node set's strings never move).
  struct Names {
    std::set<std::string> set;
    const char* get(const std::string& n) { return set.insert(n).first->c_str(); }
  };
  static Names* names = new Names();  // never freed: its strings are cache keys for the process
  static const auto read_switches = [](const std::vector<std::string>& ns) {
    std::vector<c10::optional<std::string>> out;
    for (const std::string& n : ns) {
      const char* v = codeshell::env_detail::get(names->get(n));
      out.push_back(v == nullptr ? c10::nullopt : c10::optional<std::string>(v));
    }
    return out;
  };
  m.def("env_switches", [](const std::vector<std::string>& ns) { return read_switches(ns); },
        "each name's value (None: unset) read through the switches' cache, as env_flag / env_int read it");
  m.def("env_switches_scoped", [](const std::vector<std::string>& ns, py::function fn) {
    // inside one EnvScope (as a decode step's call): the values before fn(), and after it
    const codeshell::EnvScope scope;
    auto before = read_switches(ns);
    fn();
    return py::make_tuple(before, read_switches(ns));
  }, "(values, values after fn()) read inside one EnvScope");
  m.def("env_cache_stats", [] {
    const codeshell::env_detail::State& s = codeshell::env_detail::state;
    return py::make_tuple(s.checks, s.changes, s.lookups, s.off);
  }, "this thread's switch cache: (fingerprint checks, changes seen, cached lookups, CODESHELL_ENV_CACHE=0)");
  // For the tests (test_step_prefetch.py): the process team's (posted, taken by a helper) prefetch
  // side jobs so far (parallel.h Team::prefetch_async); (0, 0) with one thread.
  m.def("team_side_jobs", []() -> py::tuple {
    const int threads = at::get_num_threads();
    if (threads < 2) return py::make_tuple(0, 0);
    const codeshell::Team* t = codeshell::Team::shared(threads);
    return py::make_tuple(t->side_posts(), t->side_runs());
  }, "(prefetch side jobs posted, taken by a helper) of the process's thread team");
  // For the tests (test_q8_wsum.py): decode_int8_q8 with the weight's block sums table hinted as
  // the decode step hints it at batch > 1 (q8_wsum.h); the table made here per call.
  m.def("decode_int8_q8_wsum", [](const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                                  const c10::optional<torch::Tensor>& bias, int64_t isa) {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.size(1) % 128 == 0,
                "q must be a contiguous int8 [N, K] tensor with K % 128 == 0");
    // as the step: CODESHELL_Q8R_WSUM=0 neither makes nor hands over a table
    const bool on = codeshell::env_flag("CODESHELL_Q8R_WSUM", true);
    const std::vector<int32_t> sums =
        on ? codeshell::q8rows::block_sums(q.data_ptr<int8_t>(), q.size(0), q.size(1)) : std::vector<int32_t>();
    // and, as the step, q8_rows_t.h's transposed copy at 5..8 rows (CODESHELL_Q8R_TP=0: none)
    std::vector<uint8_t> packed;
#if CODESHELL_HAVE_AVX512
    if (on && x.dim() == 2 && x.size(0) >= 5 && x.size(0) <= 8 && codeshell::env_flag("CODESHELL_Q8R_TP", true))
      packed = codeshell::q8rt::pack(q.data_ptr<int8_t>(), q.size(0), q.size(1));
#endif
    codeshell::q8rows::SumsHintScope hint(q.data_ptr<int8_t>(), q.size(0), q.size(1), on ? sums.data() : nullptr,
                                          packed.empty() ? nullptr : packed.data());
    return decode_int8_q8(x, q, scale, bias, isa);
  }, "decode_int8_q8 with q's block sums (and at 5..8 rows its transposed copy) hinted (the decode step's batch > 1 int8 calls)");
  // For the tests (test_q8_rows_t.py): decode_int4_q8 with q's q8_rows_t.h copy hinted at 5..8 rows
  // as the decode step hints it (made here per call; CODESHELL_Q8R_TP4=0: none).
  m.def("decode_int4_q8_packed", [](const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                                    const c10::optional<torch::Tensor>& offset, int64_t G,
                                    const c10::optional<torch::Tensor>& bias, int64_t isa) {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8 && q.is_contiguous() && scale.is_contiguous() &&
                    (!offset.has_value() || offset->is_contiguous()),
                "q must be contiguous uint8 nibbles [N, K / 2] with contiguous scales / offsets");
#if CODESHELL_HAVE_AVX512
    const int64_t N = q.size(0), K = 2 * q.size(1);
    if (x.dim() == 2 && x.size(0) >= 5 && x.size(0) <= 8 && K % 128 == 0 && (G == 128 || G == 256) &&
        codeshell::env_flag("CODESHELL_Q8R_TP4", true)) {
      const codeshell::q8rt::Pack4 p = codeshell::q8rt::pack_q4(
          q.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.has_value() ? offset->data_ptr<float>() : nullptr, N, K, G);
      codeshell::q8rows::SumsHintScope hint(q.data_ptr(), N, K, nullptr, nullptr, &p);
      return decode_int4_q8(x, q, scale, offset, G, bias, isa);
    }
#endif
    return decode_int4_q8(x, q, scale, offset, G, bias, isa);
  }, "decode_int4_q8 with q's transposed copy hinted at 5..8 rows (the decode step's batch 5..8 int4 calls)");
}
