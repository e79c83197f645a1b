"""Packed attention for the engine's single-token queries (decode and prompt-lookup verify
steps), through the native kernel `packed_attention` (csrc/attention.cpp).

What this is: one call for M single queries of any KV-cache slots, each attending to keys
0..lens[i]-1 of its slot, with exactly `decode_attention`'s result for each query (bit for
bit: greedy text must not depend on whether a token was verified or plainly decoded), but
consecutive queries of one slot (a sequence's last token and its drafts) sharing one pass
over the slot's keys and values. What this is not: a dispatcher or a prefill kernel; the
check for whether the native kernels apply is `ops.decode_attention_ok`.
"""

from __future__ import annotations

import torch

from . import _ext
from .ops import decode_attention_ok, isa_level


def packed_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float, isa: int | None = None) -> torch.Tensor:
    """q [M, H, 1, D]; k_cache, v_cache [slots, G, max_len, D] (bf16 or fp32, contiguous); slots,
    lens int64 [M]: query i attends keys 0..lens[i]-1 of slot slots[i]. Returns [M, H, 1, D] in
    q's dtype, equal to `decode_attention` of the same arguments. Check `decode_attention_ok`
    first. `isa` (default: `ops.isa_level()`, which CODESHELL_KERNEL_ISA caps): from the
    AVX-512 levels on, 16-lane registers (the same bits as the AVX2 code)."""
    if not decode_attention_ok(q, k_cache):
        raise ValueError("packed_attention needs one CPU query per row, bf16/fp32 tensors, a contiguous "
                         f"cache and the native kernels ({_ext.unavailable_reason() or 'available'})")
    m, h, _, d = q.shape
    return _ext.get().packed_attention(q.reshape(m, h, d).contiguous(), k_cache, v_cache, slots, lens, scale,
                                       isa_level() if isa is None else isa).view(m, h, 1, d)
