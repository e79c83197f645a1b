"""`linear(x, packed, bias)`: y = x @ W^T + b for packed (bf16/int8/int4) weights, dispatched by M.

What this is: the runtime entry point. For M (= rows of x after flattening leading dims)
<= `DECODE_MAX_M` (`BF16_PANEL_MAX_M` for bf16) it calls the native streaming kernels (one
pass over the weight for all rows), and large bf16 weights take them 64 rows a call at any
M; otherwise it expands blocks of weight rows to fp32 with the native dequantisers and runs
MKL sgemm via torch.mm on each block (compute-bound prefill; on an AVX2-only CPU fp32 sgemm
is ~4x faster than torch's bf16 matmul). Without the native extension every path falls
back to torch (with one warning at first use). Math is fp32 throughout; the result has x's
dtype.

What this is not: an autograd op (inference only; tensors are used under no_grad semantics)
and not a replacement for nn.Linear's module plumbing (the model wires PackedWeight in).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _ext
from .packing import PackedWeight, activation_block, bf16_rows, dequantize, quantize_activations

DECODE_MAX_M = 16
"""Largest M sent to the int8/int4 streaming decode kernels (bf16: `BF16_PANEL_MAX_M`); larger
M goes to blocked dequant + sgemm."""

BF16_PANEL_MAX_M = 64
"""bf16 weights: the panel kernel takes up to this many rows in one pass (each panel chunk is
re-read from L1 by every 6-row tile; x's k-block stays in L2). Measured against dequant +
sgemm with 2 threads at M = 64: 7B c_attn 43 vs 70 ms, c_fc 79 vs 125 ms, a 768x512 linear
0.5 vs 0.9 ms; at M = 512 sgemm wins on small K (bench_kernels.py --m 64 512)."""

BF16_PANEL_PREFILL_MIN_WEIGHTS = 1 << 24
"""bf16 weights of at least this many values (a 4096x4096 linear) run a prefill as 64-row
panel calls rather than dequant + sgemm. 2 threads, M = 512, median of 4 alternating rounds:
7B c_attn 216 vs 248 ms, c_fc 537 vs 578, mlp.c_proj 552 vs 637, attn.c_proj 137 vs 140;
on small weights sgemm wins (512x2048: 12 vs 9 ms)."""

_PREFILL_BLOCK_BYTES = 4 << 20  # fp32 weight block per sgemm call: fits L3 (32 MiB) with x


def available() -> bool:
    """True when the native AVX2 kernels are built and loadable (builds on first call, ~1 min)."""
    return _ext.get() is not None


def set_num_threads(n: int | None = None) -> int:
    """Sets torch's intra-op threads (which the kernels use) to n, default the cores this
    process may run on (os.sched_getaffinity); returns the number set."""
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def _as_2d_fp32(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"x has in_features {x.shape[-1]} but the weight expects {k}")
    if x.device.type != "cpu":
        raise ValueError(f"codeshell.kernels works on CPU tensors, x is on {x.device}")
    return x.reshape(-1, k).to(torch.float32).contiguous()


def _bias_fp32(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if bias is None:
        return None
    if bias.numel() != n:
        raise ValueError(f"bias has {bias.numel()} elements, expected out_features={n}")
    return bias.reshape(n).to(torch.float32).contiguous()


def _dequant_rows(mod, p: PackedWeight, n0: int, n1: int, buf: torch.Tensor) -> torch.Tensor:
    """fp32 rows [n0, n1) of the weight [n1-n0, K], written into buf (flat fp32, >= (n1-n0)*K).
    bf16 panels come out K-major (a transposed view), which sgemm takes without a copy."""
    k = p.in_features
    out = buf[: (n1 - n0) * k]
    if p.kind == "bf16":
        if mod is None:
            out.view(n1 - n0, k).copy_(bf16_rows(p, slice(n0, n1)))
            return out.view(n1 - n0, k)
        mod.dequant_bf16(p.data, p.out_features, n0, n1, out)
        return out.view(k, n1 - n0).t()
    if mod is None:
        rows = PackedWeight(p.kind, n1 - n0, k, p.data[n0:n1],
                            None if p.scales is None else p.scales[n0:n1],
                            None if p.offsets is None else p.offsets[n0:n1], p.group_size)
        out.view(n1 - n0, k).copy_(dequantize(rows))
    elif p.kind == "int8":
        mod.dequant_int8(p.data, p.scales, n0, n1, out)
    else:
        mod.dequant_int4(p.data, p.scales, p.offsets, p.group_size, n0, n1, out)
    return out.view(n1 - n0, k)


def _prefill(mod, x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Blocked: y^T[n0:n1] = W_fp32[n0:n1] @ x^T for row blocks small enough to stay in cache."""
    n, k, m = p.out_features, p.in_features, x.shape[0]
    # >= 128 rows per block: with K = 16384 a 4 MiB block is only 64 rows, which costs MKL ~25%
    rows = min(n, max(128, (_PREFILL_BLOCK_BYTES // (4 * k)) // 16 * 16))
    buf = torch.empty(rows * k, dtype=torch.float32)
    yt = torch.empty(n, m, dtype=torch.float32)  # [N, M]: each block's rows are contiguous
    xt = x.t()
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = _dequant_rows(mod, p, n0, n1, buf)
        if bias is None:
            torch.mm(w, xt, out=yt[n0:n1])
        else:
            torch.addmm(bias[n0:n1, None], w, xt, out=yt[n0:n1])
    return yt.t()


def _decode(mod, x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    # int8/int4 weights take the integer-dot kernels (x quantised to int8 per block, see
    # `activation_block`): 2-3x the fp32-unpacking kernels, which are compute bound here.
    if p.kind == "bf16":
        return mod.decode_bf16(x, p.data, p.out_features, bias)
    q8 = activation_block(p) is not None
    if p.kind == "int8":
        return (mod.decode_int8_q8 if q8 else mod.decode_int8)(x, p.data, p.scales, bias)
    return (mod.decode_int4_q8 if q8 else mod.decode_int4)(x, p.data, p.scales, p.offsets, p.group_size, bias)


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, *,
           impl: str = "auto") -> torch.Tensor:
    """y[..., N] = x[..., K] @ W^T + bias, W given packed; returns x's dtype.

    impl: "auto" (native kernels when available, else torch), "native" (error if the
    extension is unavailable), "torch" (no native code: torch dequant + matmul), or
    "reference" (dequantise the whole weight to fp32 and F.linear; slow, for tests).
    """
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"packed must be a PackedWeight (from prepack/quantize_int8/quantize_int4), "
                        f"got {type(packed).__name__}")
    if impl not in ("auto", "native", "torch", "reference"):
        raise ValueError(f"impl must be auto, native, torch or reference, got {impl!r}")
    n, k = packed.out_features, packed.in_features
    lead = x.shape[:-1]
    x2 = _as_2d_fp32(x, k)
    b = _bias_fp32(bias, n)
    if impl == "reference":
        # The definition of what the native path computes: decode-sized M with a quantised
        # weight multiplies int8-rounded activations (`quantize_activations`).
        block = activation_block(packed)
        if block is not None and x2.shape[0] <= DECODE_MAX_M:
            x2 = quantize_activations(x2, block)
        y = F.linear(x2, dequantize(packed), b)
    else:
        mod = None if impl == "torch" else _ext.get()
        if impl == "native" and mod is None:
            raise RuntimeError(f"native kernels unavailable: {_ext.unavailable_reason()}")
        if mod is None:
            y = _torch_path(x2, packed, b)
        elif x2.shape[0] <= (BF16_PANEL_MAX_M if packed.kind == "bf16" else DECODE_MAX_M):
            y = _decode(mod, x2, packed, b)
        elif packed.kind == "bf16" and n * k >= BF16_PANEL_PREFILL_MIN_WEIGHTS:
            y = torch.cat([_decode(mod, x2[i:i + BF16_PANEL_MAX_M], packed, b)
                           for i in range(0, x2.shape[0], BF16_PANEL_MAX_M)])
        else:
            y = _prefill(mod, x2, packed, b)
    return y.to(x.dtype).reshape(*lead, n)


def _torch_path(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """No native code: the blocked fp32 dequant + sgemm path with torch doing the dequant
    (slow for bf16 decode, which is why `prepare_model` packs nothing without the kernels)."""
    return _prefill(None, x, p, bias)


def sample_temperature(logits: torch.Tensor, temperature: float, u: float) -> int | None:
    """The first token whose cumulative probability under softmax(logits / temperature) exceeds
    u times the total (u uniform in [0, 1)): an inverse-CDF draw, native and fused. None when
    the native kernels cannot take it (not a CPU fp32 vector, or no build); the caller then
    uses torch ops for the same draw."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 1:
        return None
    mod = _ext.get()
    return None if mod is None else int(mod.sample_temperature(logits.contiguous(), float(temperature), float(u)))


def sample_temperature_rows(logits: torch.Tensor, temperatures: list[float], us: list[float]) -> list[int] | None:
    """`sample_temperature` for each row of logits [B, V] (row b with temperatures[b], us[b]),
    rows in parallel over the threads. None where the native kernels cannot take it."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2:
        return None
    mod = _ext.get()
    if mod is None:
        return None
    t = torch.tensor(temperatures, dtype=torch.float64)
    u = torch.tensor(us, dtype=torch.float64)
    return mod.sample_temperature_rows(logits.contiguous(), t, u).tolist()


def decode_attention_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `decode_attention` takes this query and cache (else the caller runs SDPA)."""
    return (q.device.type == "cpu" and q.dim() == 4 and q.shape[2] == 1
            and q.dtype in (torch.bfloat16, torch.float32) and k_cache.dtype in (torch.bfloat16, torch.float32)
            and k_cache.is_contiguous() and available())


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One-query grouped-query attention straight from a KV cache layer (native kernel; check
    `decode_attention_ok` first).

    q [B, H, 1, D]; k_cache, v_cache [slots, G, max_len, D] (bf16 or fp32, contiguous); slots,
    lens int64 [B]: row b attends keys 0..lens[b]-1 of cache slot slots[b]. Returns [B, H, 1, D]
    in q's dtype, softmax and accumulation in fp32.
    """
    if not decode_attention_ok(q, k_cache):
        raise ValueError("decode_attention needs one CPU query per row, bf16/fp32 tensors, a contiguous "
                         f"cache and the native kernels ({_ext.unavailable_reason() or 'available'})")
    mod = _ext.get()
    b, h, _, d = q.shape
    return mod.decode_attention(q.reshape(b, h, d).contiguous(), k_cache, v_cache, slots, lens, scale).view(b, h, 1, d)
