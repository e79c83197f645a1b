"""Causal prefill attention straight from the engine's KV cache, through the native kernel
`prefill_attention` (csrc/attention_prefill.cpp, AVX512-BF16; AMX-BF16 tiles on AMX CPUs, `use_amx`).

What this is: T new queries per row (a prompt, a chunk of one, a padded batch of prompts, the
part of a prompt after a cached prefix), each attending to keys 0..its position of its own
cache slot, grouped-query heads, bf16 in and out with fp32 scores, softmax and sums. The
keys past a query's position are never computed, and the cache is read in place (no gather of
the batch's slots, no [B, 1, T, S] mask). What this is not: decode attention (one query per
row: `ops.decode_attention`, `attention.packed_attention`), or a path for fp32 models or CPUs
without AVX-512: `prefill_attention_ok` says when it applies; else a bf16 prompt attends through
decode's kernel one query each (engine/kv_cache.py `CacheView.attend`, session 31: decode's bits
for every prompt row) and anything else runs PyTorch's SDPA with the boolean mask. On an AVX-512 CPU without AVX512-BF16 (Ice Lake / Cascade Lake
Xeons) the kernel runs with its two bf16 instructions emulated by fp32 FMAs (session 23; see
`prefill_attention_ok`).
On AVX2 CPUs (no AVX-512) a bf16 prompt whose head dim is a multiple of 16 runs
`prefill_attention_lanes` (the same source's AVX2 section, session 42): 8 queries in a register's
lanes, each query's row still exactly decode's (`lanes_ok`; CODESHELL_PREFILL_ATTN_LANES=0 runs
decode's kernel one query each as before).
"""

from __future__ import annotations

import os

import torch

from . import _ext
from .ops import ISA_LEVELS, isa_level


def prefill_attention_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `prefill_attention` takes these tensors: CPU bf16 queries [B, H, T, D] with T > 1 and
    a contiguous bf16 cache layer, D a multiple of 32 up to 256, and AVX512-BF16 here, or AVX-512
    without it: there the kernel's vdpbf16ps steps run as two fp32 FMAs on the widened pairs and its
    bf16 rounding in integer steps (csrc/attention_prefill.cpp `dpbf16`, `to_bf16`), where PyTorch's
    SDPA computes the whole masked square (docs/kernels-log.md "Session 23, helper C");
    CODESHELL_PREFILL_ATTN_NOBF16=0 keeps PyTorch's SDPA there."""
    if not (q.device.type == "cpu" and q.dim() == 4 and q.shape[2] > 1 and q.dtype == torch.bfloat16
            and k_cache.dtype == torch.bfloat16 and k_cache.is_contiguous() and q.stride(3) == 1
            and q.shape[3] % 32 == 0 and q.shape[3] <= 256):
        return False
    level = isa_level()
    if level >= ISA_LEVELS.index("avx512_bf16"):
        return True
    return level >= ISA_LEVELS.index("avx512_vnni") and os.environ.get("CODESHELL_PREFILL_ATTN_NOBF16", "1") != "0"


KEY_BLOCKS = (16, 32, 64)
"""Keys per block of the kernel's online softmax (csrc/attention_prefill.cpp): each block costs
every query row two horizontal reductions, a scalar exp and the rescale of its fp32 output, so
larger blocks spread that over more vdpbf16ps work; 16 is the session-15 kernel (its bits)."""


def key_block(head_dim: int) -> int:
    """The key block for this head dim: `CODESHELL_PREFILL_ATTN_KB` (16, 32 or 64; for A/B) if set,
    else DEFAULT_KEY_BLOCK. The block changes the last bits (another running-max schedule), not
    which keys a query sees; every row's result is still independent of the batch around it."""
    env = os.environ.get("CODESHELL_PREFILL_ATTN_KB", "").strip()
    if env:
        if int(env) not in KEY_BLOCKS:
            raise ValueError(f"CODESHELL_PREFILL_ATTN_KB={env!r}: expected one of {KEY_BLOCKS}")
        return int(env)
    return DEFAULT_KEY_BLOCK


DEFAULT_KEY_BLOCK = 64
"""Measured (`python benchmarks/trace_prefill.py --shape small --attention-only --rounds 40 --kb 16 32 64`,
key blocks alternating in one process, medians; docs/kernels-log.md "Session 18, helper C"): 16 / 32 / 64
keys 1.90 / 1.30 / 1.04 ms at the small shape (H 8, G 2, D 128, T 512), 7.89 / 5.49 / 4.44 ms at the
7B's (H 32, G 8), 0.228 / 0.149 / 0.139 ms at codeshell-mini's (D 32, T 256)."""


def use_amx(kb: int) -> bool:
    """Whether a call with this key block runs the AMX-BF16 kernel (csrc/attention_prefill.cpp
    `run_item_amx`, session 37): on an AMX CPU (`isa_level()`, so CODESHELL_KERNEL_ISA caps it) with
    64-key blocks, unless CODESHELL_PREFILL_ATTN_AMX=0 (read per call: A/B runs and tests), which
    keeps the vdpbf16ps kernel. Measured on a 2-vCPU Sapphire Rapids-class Xeon
    (`benchmarks/bench_prefill_attn.py`, docs/kernels-log.md "Session 37, helper C"): the vdpbf16ps
    kernel is bound by vdpbf16ps's rate there (0.07-0.09 TFLOP/s a core). Its own last bits (the
    tiles sum in another order); every row still independent of the batch around it."""
    return (kb == 64 and isa_level() >= ISA_LEVELS.index("amx")
            and os.environ.get("CODESHELL_PREFILL_ATTN_AMX", "1") not in ("0", "off"))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      positions: torch.Tensor, scale: float, kb: int | None = None) -> torch.Tensor:
    """q [B, H, T, D] bf16 (a view is fine: the last dim contiguous); k_cache, v_cache [slots, G,
    max_len, D] bf16 with this call's keys already stored; slots int64 [B]; positions int64 [B, T]:
    query t of row b is at positions[b, t] and sees keys 0..positions[b, t] of slot slots[b].
    Returns [B, T, H, D] bf16 (the layout the output projection reads). Check
    `prefill_attention_ok` first. kb: keys per block (`key_block(D)` by default)."""
    if not prefill_attention_ok(q, k_cache):
        raise ValueError("prefill_attention needs CPU bf16 queries [B, H, T > 1, D % 32 == 0], a contiguous bf16 "
                         f"cache and AVX512-BF16 ({_ext.unavailable_reason() or 'available'})")
    kb = key_block(q.shape[3]) if kb is None else kb
    return _ext.get().prefill_attention(q, k_cache, v_cache, slots.contiguous(), positions.contiguous(), scale, kb,
                                        use_amx(kb))


def lanes_enabled() -> bool:
    """CODESHELL_PREFILL_ATTN_LANES (default 1; read per call: A/B runs and tests): 0 or off runs an
    AVX2 prompt's attention through decode's kernel one query at a time (`packed_attention`, the
    path before session 42) instead of `prefill_attention_lanes`. The same bits either way."""
    return os.environ.get("CODESHELL_PREFILL_ATTN_LANES", "1") not in ("0", "off")


def lanes_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `prefill_attention_lanes` runs for these tensors: CPU bf16 queries [B, H, T, D] (the
    last dim contiguous), a contiguous bf16 cache layer, D a multiple of 16 (decode's vector path,
    whose bits it reproduces), the native kernels at the AVX2 level (`isa_level()`: on AVX-512 CPUs
    `prefill_attention` runs, or decode's kernel with 16-lane registers; the lanes kernel is not
    measured there), and the switch on (`lanes_enabled`)."""
    return (q.device.type == "cpu" and q.dim() == 4 and q.dtype == torch.bfloat16 and q.stride(3) == 1
            and k_cache.dtype == torch.bfloat16 and k_cache.is_contiguous() and q.shape[3] % 16 == 0
            and isa_level() == ISA_LEVELS.index("avx2") and lanes_enabled())


def prefill_attention_lanes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                            positions: torch.Tensor, scale: float) -> torch.Tensor:
    """`prefill_attention`'s arguments and result ([B, T, H, D] bf16) on AVX2 (csrc/attention_prefill.cpp,
    its AVX2 section): 8 consecutive queries of a row share each key broadcast and value row, and every
    query's row has exactly the bits `decode_attention` gives that query alone (its FMA chains, hsum8
    tree, softmax sums and value chains in decode's order). Any positions (a padded row, a prefix);
    D % 16 == 0. The caller checks `lanes_ok` (or calls it directly: tests, benchmarks)."""
    return _ext.get().prefill_attention_lanes(q, k_cache, v_cache, slots.contiguous(), positions.contiguous(), scale)
