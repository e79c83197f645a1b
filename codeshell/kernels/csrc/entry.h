// The extension's C++ entry points, declared once.
//
// What this is: the declarations of the functions each source file defines for others to call:
// kernels.cpp binds them all to Python (PYBIND11_MODULE), and decode_step.cpp calls the matmul,
// attention and fused ones directly, with no pybind in between (the native decode step).
// What this is not: documentation of the kernels (see each definition) or a stable ABI; the
// tensors' shapes and dtypes are checked by the definitions themselves.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

// kernels.cpp: AVX2 fp32-unpacking kernels for int8/int4 weights (exact fp32 x; the shapes the
// integer kernels do not take).
torch::Tensor decode_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& bias);
torch::Tensor decode_int4(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& offset, int64_t G,
                          const c10::optional<torch::Tensor>& bias);

// panel_bf16.cpp: bf16 weights in panels of 16 rows.
torch::Tensor decode_bf16(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                          const c10::optional<torch::Tensor>& bias, int64_t isa);
torch::Tensor prefill_bf16_amx(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                               const c10::optional<torch::Tensor>& bias, bool gelu, bool out_bf16);
void dequant_bf16(const torch::Tensor& w, int64_t N, int64_t K, int64_t n0, int64_t n1, torch::Tensor& out);
void rows_bf16(const torch::Tensor& w, int64_t N, int64_t K, int64_t n0, int64_t n1, torch::Tensor& out);
void gather_bf16(const torch::Tensor& w, int64_t N, int64_t K, const torch::Tensor& ids, torch::Tensor& out);
torch::Tensor pack_bf16(const torch::Tensor& w);
int64_t bf16_peak(int64_t Kt, int64_t reps, bool loads);
torch::Tensor prefill_bf16_dot(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                               const c10::optional<torch::Tensor>& bias, bool gelu = false, bool out_bf16 = false);
int64_t bf16_dot_peak(int64_t reps);
torch::Tensor prefill_bf16_fma(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                               const c10::optional<torch::Tensor>& bias, bool gelu = false, bool out_bf16 = false,
                               int64_t isa = 1);
int64_t bf16_fma_peak(int64_t reps, int64_t isa);

// isa.cpp
py::dict cpu_features_dict();

// qdot_int4.cpp / qdot_int8.cpp (the split qdot.cpp; qdot.h shares their helpers): int8-activation
// kernels for quantised weights.
int64_t q8_block_int8(int64_t K);
torch::Tensor decode_int4_q8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& offset, int64_t G,
                             const c10::optional<torch::Tensor>& bias, int64_t isa);
torch::Tensor decode_int8_q8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& bias, int64_t isa);

// qgemm_amx.cpp: AMX-INT8 and AVX512-VNNI prefill for quantised weights.
torch::Tensor prefill_q8_amx(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& offset, int64_t G,
                             const c10::optional<torch::Tensor>& bias);
torch::Tensor prefill_q8_amx_epi(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                                 int64_t G, const c10::optional<torch::Tensor>& bias, bool gelu);
// qgemm_amx.cpp (session 38): prefill_q8_amx's M <= 64 rows into `out` (no result tensor, no copy).
void rows_q8_amx_out(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                     const c10::optional<torch::Tensor>& offset, int64_t G, const c10::optional<torch::Tensor>& bias,
                     torch::Tensor& out);
torch::Tensor prefill_q8_vnni(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                              const c10::optional<torch::Tensor>& offset, int64_t G,
                              const c10::optional<torch::Tensor>& bias);

// kernels.cpp (q8_gemm_avx2.h): AVX2 integer prefill GEMM for int8 (G = 0) / int4 weights on x rounded
// to int8 in decode's blocks (ops path "avx2:gemm").
torch::Tensor prefill_q8_avx2(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                              const c10::optional<torch::Tensor>& offset, int64_t G,
                              const c10::optional<torch::Tensor>& bias);

// sampling.cpp
int64_t sample_temperature(const torch::Tensor& logits, double temperature, double u);
torch::Tensor sample_temperature_rows(const torch::Tensor& logits, const torch::Tensor& temperatures,
                                      const torch::Tensor& us);
torch::Tensor argmax_rows(const torch::Tensor& logits);
// the picks argmax_rows gives on the bf16 rounding of fp32 rows [N, V], without writing it
void argmax_rows_rounded(const float* logits, int64_t N, int64_t V, int64_t* out);

// attention.cpp
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                               const torch::Tensor& slots, const torch::Tensor& lens, double scale);
torch::Tensor packed_attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                               const torch::Tensor& slots, const torch::Tensor& lens, double scale, int64_t isa);

// fused.cpp: residual add + LayerNorm, GELU, RoPE for the model's inference path.
std::vector<torch::Tensor> fused_add_layer_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& r,
                                                const c10::optional<torch::Tensor>& weight,
                                                const c10::optional<torch::Tensor>& bias, double eps);
torch::Tensor fused_gelu_tanh(const torch::Tensor& v, const c10::optional<torch::Tensor>& bias, bool out_bf16);
void fused_rope_(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads, int64_t D);
torch::Tensor fused_rope_bf16(const torch::Tensor& y, const torch::Tensor& cos, const torch::Tensor& sin,
                              int64_t heads, int64_t D);
void register_fused(py::module& m);

// Output-buffer variants for the native decode step (session 12, helper B): the same work as
// the entry points above, written into the caller's buffers (decode_step.cpp reuses them
// across steps instead of allocating every op's output).
// panel_bf16.cpp: out contiguous fp32 with >= M * N values.
void decode_bf16_out(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                     const c10::optional<torch::Tensor>& bias, int64_t isa, torch::Tensor& out);
void prefill_bf16_amx_out(const torch::Tensor& x, const torch::Tensor& w, int64_t N,
                          const c10::optional<torch::Tensor>& bias, torch::Tensor& out);
// fused.cpp: outputs of the input's shape.
void fused_add_layer_norm_out(const torch::Tensor& x, const c10::optional<torch::Tensor>& r,
                              const c10::optional<torch::Tensor>& weight, const c10::optional<torch::Tensor>& bias,
                              double eps, torch::Tensor& h, torch::Tensor& y);
void fused_gelu_tanh_out(const torch::Tensor& v, const c10::optional<torch::Tensor>& bias, bool out_bf16,
                         torch::Tensor& out);
void fused_rope_bf16_out(const torch::Tensor& y, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads,
                         int64_t D, torch::Tensor& out);
void f32_to_bf16(const float* src, at::BFloat16* dst, int64_t n);
// qdot_int8.cpp: out contiguous fp32 with >= M * N values.
void decode_int8_q8_out(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                        const c10::optional<torch::Tensor>& bias, int64_t isa, torch::Tensor& out);
void decode_int4_q8_out(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                        const c10::optional<torch::Tensor>& offset, int64_t G,
                        const c10::optional<torch::Tensor>& bias, int64_t isa, torch::Tensor& out);
// qdot_int8.cpp (session 37): whether an AMX CPU runs M rows of x (2..16, below the AMX rows) on
// q8_rows.h (int8; int4 groups of 128 / 256: run_q4) rather than q8_panel.h: CODESHELL_Q8_AMX_VROWS=0 / 1
// (read per call), else this thread's Q8AmxVrowsScope (the decode step's choice for a linear), else no.
bool q8_amx_vrows(int64_t M);
// qdot_int4.cpp: whether int4 weights without AMX take the shared epilogue's bits (q8_epilogue.h: q8_rows.h,
// q8_rows_t.h's copy, q4_m1_e.h) rather than tile_q4v's per-lane bits: by CPU kind (Ice Lake, Zen 4), or
// CODESHELL_Q4_EPI=0 / 1 (read per call). The decode step makes the int4 copy only for this family.
bool q4_epi_kind();
// The scope's codes (session 38: the step's measured choice, q8_rows_tune.h): kQ8PathRules the rules
// (q8_panel.h, the tiles from amx_rows_min_m), kQ8PathVrowsRule q8_rows.h below the tiles (session 37's
// rule for small steps), and for M = 2..16 the path forced: kQ8PathPanel q8_panel.h (int4 at M = 2:
// tile_v / q4_m1_e.h as the rules have it), kQ8PathRows q8_rows.h, kQ8PathTiles the AMX-INT8 row tiles.
enum Q8Path : int { kQ8PathRules = 0, kQ8PathVrowsRule = 1, kQ8PathTiles = 2, kQ8PathPanel = 3, kQ8PathRows = 4 };
struct Q8AmxVrowsScope {
  int prev;
  explicit Q8AmxVrowsScope(int code);
  ~Q8AmxVrowsScope();
};
// This thread's Q8AmxVrowsScope code where it forces M's path (M = 2..16), else kQ8PathRules (qdot.h
// use_amx_rows reads it).
int q8_amx_forced(int64_t M);

// decode_step.cpp: the blocks of a decode / verify step in one call (DecodeStep).
void register_decode_step(py::module& m);

// attention_prefill.cpp: causal prefill attention over the KV cache (AVX512-BF16; amx: AMX-BF16 tiles).
torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                const torch::Tensor& slots, const torch::Tensor& positions, double scale, int64_t key_block,
                                bool amx);
// attention_prefill.cpp, AVX2: the same attention, each query decode_attention's bits (8 queries in lanes).
torch::Tensor prefill_attention_lanes(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                      const torch::Tensor& slots, const torch::Tensor& positions, double scale);
