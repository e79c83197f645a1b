// packed_attention for a share of a step's queries into the caller's buffer (attention.cpp), for the
// native decode step's thread team (step_layers.cpp `attend`): the arguments checked and the
// switches read once a call by the master, then one packed_attention_rows call per chunk on the
// thread that runs it. Each row gets the bits packed_attention gives it.
#pragma once

#include <torch/extension.h>

#include <cstdint>

// CODESHELL_ATTN_RUN1, CODESHELL_ATTN_V16, CODESHELL_ATTN_LEAN and CODESHELL_ATTN_RUN_T as read for one call (and
// CODESHELL_ATTN_TREE, which packed_attention_switches stores process-wide as packed_attention does).
struct PackedAttentionSwitches {
  bool run1, v16, lean, run_t;
};

// packed_attention's checks of its arguments, and out contiguous of q's shape and dtype.
void packed_attention_check(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                            const torch::Tensor& slots, const torch::Tensor& lens, int64_t isa,
                            const torch::Tensor& out);
PackedAttentionSwitches packed_attention_switches();
// Queries [i0, i1) of q [M, H, D] into rows [i0, i1) of out, on the calling thread.
void packed_attention_rows(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                           const torch::Tensor& slots, const torch::Tensor& lens, double scale, int64_t isa,
                           const PackedAttentionSwitches& s, int64_t i0, int64_t i1, torch::Tensor& out);
// KV groups [g0, g1) (heads [g0 H/G, g1 H/G)) of every query of q into those heads of out, on the
// calling thread (a batch-1 decode query's groups split over the step's team).
void packed_attention_groups(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                             const torch::Tensor& slots, const torch::Tensor& lens, double scale, int64_t isa,
                             const PackedAttentionSwitches& s, int64_t g0, int64_t g1, torch::Tensor& out);
