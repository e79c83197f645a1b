"""`linear(x, packed, bias)`: y = x @ W^T + b for packed (bf16/int8/int4) weights, dispatched by
M, x's dtype and the CPU's instruction sets.

What this is: the runtime entry point and the one dispatcher (`plan`): it names the kernel
path ("<isa>:<kernel>") for each call from the ISA level the extension detected (cpuid, the
AMX permission; `CODESHELL_KERNEL_ISA` caps it) and, where two prefill paths compete (above
`ROW_INVARIANT_MAX_M` rows: our vdpbf16ps kernel vs torch's oneDNN bf16 matmul on a CPU without
AMX, the int8/int4 prefill candidates), the one measured faster on this machine for that weight shape, M bucket and x dtype,
once per machine (`CHOICE_TIMES` keeps this process's measurements; `choices.py` keeps the
winners on disk for later processes). Decode-sized M streams the weight once
for all rows (native kernels); int8/int4 prefill runs AMX-INT8 tiles on int8-rounded x where
the CPU has them, or expands blocks of weight rows to bf16 / fp32 for a bf16 / sgemm matmul. Without the native extension every path falls back to torch
(with one warning at first use). Math is fp32 (bf16 paths: bf16 products of bf16 x, which
only run when x is bf16 already); the result has x's dtype.

What this is not: an autograd op (inference only; tensors are used under no_grad semantics)
and not a replacement for nn.Linear's module plumbing (the model wires PackedWeight in).
"""

from __future__ import annotations

import os
from collections import Counter

import torch
import torch.nn.functional as F

from . import _ext, choices, measure
from .packing import PackedWeight, activation_block, bf16_rows, dequantize, quantize_activations

ROW_INVARIANT_MAX_M = 64
"""Row invariance: for M up to this many rows, every row of `linear(x)` has exactly the bits
that row gives alone (`linear(x)[i] == linear(x[i:i+1])[0]`), for each weight kind (bf16,
int8, int4) and x dtype (bf16, fp32), at each ISA level (the same level for both calls). So
a batch's result does not depend on which other rows share the call: batched decode equals
decode at batch 1, and a prompt-lookup verify step (the drafts of several sequences packed
into one call of up to 8 x (1 + 7) = 64 rows) gives the greedy tokens of plain decoding. The
engine caps the rows of a verify step at this. How: every M in 1..ROW_INVARIANT_MAX_M takes one
path per (weight, x dtype, level), whose per-row arithmetic (accumulation order, activation
rounding, epilogue) does not depend on M or on a row's place in a tile; no measured choice
between paths of different rounding is made there. Larger M (prefill) may pick the fastest
path per M bucket and is not invariant (`tests/kernels/test_invariance.py`)."""

DECODE_MAX_M = ROW_INVARIANT_MAX_M
"""Largest M sent to the int8/int4 streaming decode kernels (bf16: `BF16_PANEL_MAX_M`); larger
M goes to the measured prefill paths. Equal to `ROW_INVARIANT_MAX_M`: the prefill paths
(AMX-INT8 tiles, bf16 expansion, sgemm) round differently from the streaming kernels, so a
verify step of up to 64 rows stays on the streaming kernels (it was 16, chosen for speed)."""

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
    """True when the native kernels (AVX2 baseline) are built and loadable (builds on first call, ~1 min)."""
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
        mod.dequant_bf16(p.data, p.out_features, k, n0, n1, out)
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


# ---- dispatch: the one place that decides which kernel (and ISA) runs -------------------

ISA_LEVELS = ("avx2", "avx512_vnni", "avx512_bf16", "amx")
"""Kernel ISA levels, lowest first (csrc/isa.h); each needs the features of those before it.
`CODESHELL_KERNEL_ISA=<level>` caps the dispatch at that level (e.g. `avx2` runs the AVX2
kernels on an AVX-512 machine, which is how their tests run here)."""

PATHS_RUN: Counter = Counter()
"""(kind, path) -> calls since import: which kernels actually ran (tests print it)."""

_CHOICES: dict[tuple, str] = {}  # (kind, N, K, "prefill", level, x dtype[, "gelu"]) -> the measured winner
CHOICE_TIMES: dict[tuple, dict[str, float]] = {}
"""The measurements behind each choice: key -> {path: seconds per row of the whole weight (best of
measure.MEASURE_ROUNDS), summed over measure.PREFILL_MEASURE_ROWS}."""
CHOICE_CHECKS: dict[tuple, dict] = {}
"""Per choice key measured in this process: how far to trust it (`measure.measure`): looks taken, each
look's scatter and winner, the winner's margin, the host's load, and whether it was stored."""


def isa_level() -> int:
    """Highest kernel ISA level usable here (index into `ISA_LEVELS`), after the
    CODESHELL_KERNEL_ISA cap; -1 without the native kernels."""
    env = os.environ.get("CODESHELL_KERNEL_ISA")
    hit = _LEVEL.get(env)  # plan() runs for every linear call: ~1.5 us of lookups saved each
    if hit is not None and "mod" in _ext._state:
        return hit
    if _ext.get() is None:
        return -1
    level = _ext.features()["max_isa"]
    cap = (env or "").strip().lower()
    if cap:
        if cap not in ISA_LEVELS:
            raise ValueError(f"CODESHELL_KERNEL_ISA={cap!r}: expected one of {', '.join(ISA_LEVELS)}")
        level = min(level, ISA_LEVELS.index(cap))
    _LEVEL[env] = level
    return level


_LEVEL: dict[str | None, int] = {}  # CODESHELL_KERNEL_ISA value -> level (the build is per process)


def prefill_candidates(p: PackedWeight, x_dtype: torch.dtype, level: int) -> list[str]:
    """The paths that may run a prefill (M above the decode limits) of this weight: more than
    one means the fastest is measured once per (kind, N, K, x dtype) over the prefill Ms and
    cached: one path for every M above the decode limits (see `_choose`)."""
    if p.kind == "bf16" and x_dtype == torch.bfloat16 and level >= ISA_LEVELS.index("amx"):
        # AMX tiles at every M (decode included, see `plan`): one path, so a bf16 model's rows
        # are invariant at every M (a prompt prefilled alone or padded into a batch of 8 gives
        # the same KV), and the same path in every process. torch's oneDNN bf16 matmul is not
        # a candidate here: it measured 0.86-0.94x our AMX kernel at M = 512 (docs/kernels.md).
        return ["amx:bf16"]
    if p.kind == "bf16" and x_dtype == torch.bfloat16 and level >= ISA_LEVELS.index("avx512_bf16"):
        # bf16 activations (a bf16 model) without AMX: our vdpbf16ps GEMM (`prefill_bf16_dot`:
        # 4 panels x 6 rows register blocks, K in L1 chunks), the decode kernel in 64-row calls
        # and torch's own bf16 matmul (oneDNN) on row blocks of the weight, measured.
        return ["avx512_bf16:gemm", "avx512_bf16:panel64", "onednn:bf16"]
    if x_dtype == torch.bfloat16 and p.kind != "bf16" and level >= ISA_LEVELS.index("avx512_vnni"):
        # int8/int4 with bf16 x: integer GEMMs on x rounded to int8 as decode rounds it (where
        # the integer kernels take K): AMX-INT8 tiles (`amx:q8`) or, without AMX, 512-bit
        # vpdpbusd (`avx512_vnni:q8`, `prefill_q8_vnni`); or blocks of rows expanded to bf16
        # (int8: q itself, exact, the scales applied to the output columns; int4: the
        # dequantised weight rounded to bf16) for our AMX-BF16 kernel or torch's bf16 matmul
        # (AVX512-BF16 CPUs), or the fp32 sgemm path. fp32 x keeps exact weight-only math
        # (sgemm) at prefill.
        amx = level >= ISA_LEVELS.index("amx")
        q8 = [] if activation_block(p) is None else ["amx:q8"] if amx else ["avx512_vnni:q8"]
        if q8 and not amx and p.kind == "int4" and os.environ.get("CODESHELL_VNNI_Q4_MEASURE", "0") != "1":
            # Session 41 (helper C, Zen 4): int4 without AMX takes the vpdpbusd GEMM, unmeasured. The others
            # dequantise the whole weight every call (onednn:bf16: to fp32 then bf16 a 1024-row block at a time;
            # sgemm:fp32 likewise), a cost per call that a serving prompt's ~90 rows cannot carry: the 7B
            # shapes (group 32) at M = 90 ran 3.9-8.8x slower on oneDNN than on avx512_vnni:q8, at M = 512
            # 1.7-2.9x; yet a measurement in a loaded minute (and on its 256-row slice, which charges the
            # call's x rounding, whatever N, to the q8 path's few rows) stored onednn:bf16 for all four
            # shapes of the 1.7B q4_0 model: its 90-token prompt then took 6.5 s instead of ~0.5
            # (docs/kernels-log.md, session 41 helper C). CODESHELL_VNNI_Q4_MEASURE=1: measured as before.
            return q8
        bf16 = ["onednn:bf16"] if level >= ISA_LEVELS.index("avx512_bf16") else []
        return q8 + (["amx:bf16"] if amx else []) + bf16 + ["sgemm:fp32"]
    if p.kind == "bf16" and level >= ISA_LEVELS.index("avx512_vnni"):
        # fp32 FMA on an AVX-512 CPU (fp32 x, or bf16 x without AVX512-BF16): our fp32-FMA GEMM
        # (`prefill_bf16_fma`: weight chunks widened to fp32 per K chunk, 4 panels x 6 rows
        # register blocks; session 24 helper A: 1.2-1.4x sgemm on an Ice Lake-class Xeon), the
        # 512-bit panel kernel in 64-row calls and torch's fp32 sgemm (MKL uses AVX-512 on Intel),
        # measured (session 23 helper A, docs/kernels-log.md), not a size threshold.
        # CODESHELL_PREFILL_FMA_GEMM=0 leaves the GEMM out (the session-23 candidates).
        gemm = [] if os.environ.get("CODESHELL_PREFILL_FMA_GEMM", "1") == "0" else ["avx512_vnni:gemm"]
        return gemm + ["avx512_vnni:panel64", "sgemm:fp32"]
    if x_dtype == torch.bfloat16 and p.kind != "bf16" and activation_block(p) is not None:
        # int8/int4 with bf16 x on AVX2 (no VNNI): the vpmaddubsw streaming kernel at every M on x
        # rounded to int8 as decode rounds it (`avx2:q8`), or the fp32 sgemm path, measured. Session
        # 30, AMD Zen 3, 512 rows of the small shapes: q8 0.75-1.27x sgemm by shape (K = 4096 ahead,
        # K = 1024 behind), where sgemm alone left the int8 / int4 prompt at 0.85x / 0.69x llama.cpp.
        # Session 30 helper B: an integer GEMM on the same rounding (`avx2:gemm`, csrc/q8_gemm_avx2.h:
        # 6 x-row x 16 weight-row register blocks of vpmaddwd on int16, the weights unpacked once per
        # call), measured with them. CODESHELL_Q8_GEMM_AVX2=0 leaves it out (the candidates before).
        gemm = [] if os.environ.get("CODESHELL_Q8_GEMM_AVX2", "1") == "0" else ["avx2:gemm"]
        return gemm + ["avx2:q8", "sgemm:fp32"]
    if p.kind == "bf16":
        # fp32 FMA on an AVX2-only CPU (session 30 helper A, AMD Zen 3): our GEMM on 256-bit vectors
        # (`avx2:gemm`, csrc/gemm_fma.h: weight chunks widened to fp32 per K chunk, 6 rows x 16
        # columns register blocks; the same bits as `avx2:panel`) and the decode panel kernel in
        # 64-row calls, measured (session 30 also offered torch's fp32 sgemm: see below).
        # Session 31, lead: at every weight size only the paths with decode's bits (the GEMM and
        # the panel kernel, a speed choice between the same bits), no sgemm: with the prompt's
        # attention also decode's per query (engine/kv_cache.py `CacheView.attend`), a prompt row
        # gets the bits a decode step would give it, so greedy text does not depend on the batch,
        # the padding or a cached prefix (session 30 had restricted the GEMM to weights from
        # BF16_PANEL_PREFILL_MIN_WEIGHTS after codeshell-mini's batch-8 text differed from batch 1:
        # the cause was PyTorch's SDPA, whose last prompt row had other bits in a padded batch).
        # CODESHELL_PREFILL_FMA_GEMM=0: the choice before session 30 (`avx2:panel64` from
        # BF16_PANEL_PREFILL_MIN_WEIGHTS values, else sgemm).
        if os.environ.get("CODESHELL_PREFILL_FMA_GEMM", "1") == "0":
            return ["avx2:panel64"] if p.out_features * p.in_features >= BF16_PANEL_PREFILL_MIN_WEIGHTS else ["sgemm:fp32"]
        return ["avx2:gemm", "avx2:panel64"]
    return ["sgemm:fp32"]


def plan(p: PackedWeight, m: int, x_dtype: torch.dtype = torch.float32, epilogue: str | None = None) -> str:
    """The path `linear(impl="native")` takes for M rows of x of this dtype: "<isa>:<kernel>".

    * bf16 weights, bf16 x: `amx:bf16` at every M on an AMX CPU; else, M <= BF16_PANEL_MAX_M,
      `avx512_bf16:panel` (vdpbf16ps) with AVX512-BF16, `avx2:panel` (fp32 FMA) without, and
      `avx2:panel` for fp32 x (never rounded to bf16).
    * int8/int4, M <= DECODE_MAX_M (= ROW_INVARIANT_MAX_M), K % 128 == 0: `amx:q8` with AMX
      (512-bit vpdpbusd kernels below 12 rows, AMX-INT8 tiles from 12: the same bits),
      `avx512_vnni:q8` (the vpdpbusd kernels at every M) without; else
      `avx2:q8` (vpmaddubsw) on int8-rounded x (the same integers either way), or
      `avx2:unpack` (exact fp32) for shapes the integer kernels do not take.
    * larger M: `prefill_candidates`; one candidate runs as is, several are measured once
      (one winner per weight shape for every prefill M). epilogue="gelu" (session 41): the
      weight is a GELU linear's (c_fc, `FastLinear.raw_gelu`): its own choice, each candidate timed
      with its GELU (the GEMM's epilogue, or its output then the fused GELU pass: `module.gelu_call`);
      None: timed up to the output in x's dtype (the GEMMs' bf16 epilogue where they have it).
    Up to ROW_INVARIANT_MAX_M rows every M takes the same path (row invariance).
    "torch" without the native kernels.
    """
    level = isa_level()
    if level < 0:
        return "torch"
    if p.kind == "bf16":
        if m <= BF16_PANEL_MAX_M:
            bf16_dot = x_dtype == torch.bfloat16 and level >= ISA_LEVELS.index("avx512_bf16")
            if not bf16_dot:
                # fp32 FMA: at 512 bits on any AVX-512 CPU (`avx512_vnni:panel`, Avx512Fma), the
                # same bits as `avx2:panel` (CODESHELL_KERNEL_ISA=avx2 keeps the AVX2 kernel)
                return "avx512_vnni:panel" if level >= ISA_LEVELS.index("avx512_vnni") else "avx2:panel"
            # One path for every M <= 64 (ROW_INVARIANT_MAX_M): tdpbf16ps sums a k-tile in another
            # order than a vdpbf16ps chain (measured: not the same bits), so a choice per M
            # bucket made a row's result depend on the batch. With AMX, the tiles at every M:
            # per core, 7B shapes, caches flushed, against vdpbf16ps (one chain per panel): M = 1
            # even within the noise (+-15%: c_attn 4.9-6.4 vs 5.3-6.5 ms, c_fc 14.8 vs 14.1),
            # M = 8 1.3-1.5x faster (c_attn 5.0-5.6 vs 7.3-8.5), M = 64 (a full verify step)
            # 3-5x (c_attn 9.1-10.3 vs 38-42, c_fc 24-41 vs 110-125).
            return "amx:bf16" if level >= ISA_LEVELS.index("amx") else "avx512_bf16:panel"
    elif m <= DECODE_MAX_M:
        if activation_block(p) is None:
            return "avx2:unpack"
        # the 512-bit kernels read 128 weights of a row per step
        if p.in_features % 128 != 0 or level < ISA_LEVELS.index("avx512_vnni"):
            return "avx2:q8"
        # With AMX: `amx:q8` = the vpdpbusd kernels below 12 rows (4 for int4 groups of 32 /
        # 64) and AMX-INT8 tiles from there (csrc/qdot.cpp
        # amx_rows_min_m), both ending in one fp32 epilogue (csrc/q8_epilogue.h): the same bits
        # at every M, so the choice inside is a speed choice only. int8 gives the same bits with
        # and without AMX (csrc/q8_panel.h; without AMX tile_v at M = 1-2, where the panel ran
        # 1.6-2.1x slower than AVX2 on AMD Zen); int4 without AMX keeps the per-lane epilogue of its
        # vpdpbusd kernels (other last bits, the same invariance) but on the Ice Lake-class Xeon and
        # Zen 4 (csrc/qdot_int4.cpp q4_epi_kind: amx:q8's bits).
        return "amx:q8" if level >= ISA_LEVELS.index("amx") else "avx512_vnni:q8"
    return _choose(p, m, x_dtype, level, prefill_candidates(p, x_dtype, level), epilogue)


def _choose(p: PackedWeight, m: int, x_dtype: torch.dtype, level: int, cands: list[str],
            epilogue: str | None = None) -> str:
    if len(cands) == 1:
        return cands[0]
    # One path per weight for every prefill M, not one per M bucket: the candidates differ in
    # their last bits (each is row invariant on its own: a row's result does not depend on M),
    # so a choice per bucket made a prompt's KV, and so its greedy tokens, depend on how it was
    # prefilled (alone: M = T; padded into a group: M = B x T) wherever the buckets' measured
    # winners differed (seen: codeshell-mini's greedy text at batch 8 unlike batch 1).
    # x's dtype too: the candidates differ by dtype (bf16 x may take bf16 paths, fp32 x never).
    # A GELU linear's choice is its own (session 41): the candidates' order with the GELU (the GEMM's
    # epilogue against the others' separate pass) need not be the order without it.
    key = (p.kind, p.out_features, p.in_features, "prefill", ISA_LEVELS[level], str(x_dtype).split(".")[-1])
    if epilogue is not None:
        key += (epilogue,)
    if key not in _CHOICES:
        # a winner measured by an earlier process on this machine (choices.py), while this
        # code still offers it; else measure now and keep the result for later processes, only
        # when the measurement is one to trust (`measure.measure`: steady repeats, a quiet host, a
        # second look where the first was unsteady or close); an untrusted winner holds for this
        # process only and the next process measures again
        # (session 36) a stored winner measured while the host ran well below the speed it runs at
        # now (`measure.relook`) is measured again, and the stored times join the new looks
        # and an untrusted measurement is kept as a provisional entry whose times the next
        # measurement merges (each candidate's least), unless a trusted entry is stored
        whole = measure.mode() == "full"
        stored = choices.entry(key, cands, whole=whole)
        stored = stored if stored is not None and stored.get("path") in cands else None
        if stored is not None and not measure.relook(stored):
            _CHOICES[key] = stored["path"]
        else:
            prior = stored or choices.entry(key, cands, whole=whole, provisional=True)
            _CHOICES[key], CHOICE_TIMES[key], CHOICE_CHECKS[key], trusted = measure.measure(
                key, cands, p, x_dtype, _CHOICES, prior=prior if prior and prior.get("path") in cands else None)
            if trusted or stored is None:
                choices.store(key, _CHOICES[key], CHOICE_TIMES[key], CHOICE_CHECKS[key])
    return _CHOICES[key]


def _compute(path: str, mod, x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] by one named path (fp32, or bf16 for `onednn:bf16`); x [M, K] in the caller's
    dtype. Tests call this directly to check every path the machine has."""
    PATHS_RUN[(p.kind, path)] += 1
    n, m = p.out_features, x.shape[0]
    isa, _, kernel = path.partition(":")
    if kernel == "panel64" and m > BF16_PANEL_MAX_M:  # 64-row calls of the panel kernel
        sub = f"{isa}:panel"
        return torch.cat([_compute(sub, mod, x[i:i + BF16_PANEL_MAX_M], p, bias)
                          for i in range(0, m, BF16_PANEL_MAX_M)])
    if path in ("avx512_bf16:panel", "avx512_bf16:panel64"):
        return mod.decode_bf16(x.to(torch.bfloat16).contiguous(), p.data, n, bias, ISA_LEVELS.index(isa))
    if path == "avx512_bf16:gemm":
        return mod.prefill_bf16_dot(x.to(torch.bfloat16).contiguous(), p.data, n, bias)
    if path == "avx512_vnni:gemm":  # fp32 FMA GEMM; bf16 x widened inside (exact), fp32 x as is
        return mod.prefill_bf16_fma((x if x.dtype in (torch.bfloat16, torch.float32) else x.float()).contiguous(),
                                    p.data, n, bias)
    if path == "avx2:gemm" and p.kind == "bf16":  # the AVX2 fp32-FMA GEMM; bf16 x widened inside (exact), fp32 x as is
        return mod.prefill_bf16_fma((x if x.dtype in (torch.bfloat16, torch.float32) else x.float()).contiguous(),
                                    p.data, n, bias, isa=0)
    if path == "amx:bf16" and p.kind == "bf16":
        return mod.prefill_bf16_amx(x.to(torch.bfloat16).contiguous(), p.data, n, bias)
    if path in ("amx:bf16", "onednn:bf16"):
        return _bf16_blocks(mod, x.to(torch.bfloat16).contiguous(), p, bias, amx=path == "amx:bf16")
    x = x.to(torch.float32).contiguous()
    if path == "amx:q8" and m > DECODE_MAX_M:  # AMX-INT8 prefill tiles; x rounded to int8 in decode's blocks
        return mod.prefill_q8_amx(x, p.data, p.scales, p.offsets, p.group_size if p.kind == "int4" else 0, bias)
    if path == "avx512_vnni:q8" and m > DECODE_MAX_M:  # vpdpbusd prefill GEMM; x rounded as above
        return mod.prefill_q8_vnni(x, p.data, p.scales, p.offsets, p.group_size if p.kind == "int4" else 0, bias)
    if path in ("avx2:panel", "avx2:panel64", "avx512_vnni:panel", "avx512_vnni:panel64"):
        return mod.decode_bf16(x, p.data, n, bias, ISA_LEVELS.index(isa))
    if path == "avx2:gemm" and p.kind != "bf16":  # AVX2 integer GEMM; x rounded as decode rounds it
        return mod.prefill_q8_avx2(x, p.data, p.scales, p.offsets, p.group_size if p.kind == "int4" else 0, bias)
    if path == "sgemm:fp32":
        return _prefill(mod, x, p, bias)
    if p.kind == "int8" and kernel == "q8":
        return mod.decode_int8_q8(x, p.data, p.scales, bias, ISA_LEVELS.index(isa))
    if p.kind == "int8" and path == "avx2:unpack":
        return mod.decode_int8(x, p.data, p.scales, bias)
    if p.kind == "int4" and kernel == "q8":
        return mod.decode_int4_q8(x, p.data, p.scales, p.offsets, p.group_size, bias, ISA_LEVELS.index(isa))
    if p.kind == "int4" and path == "avx2:unpack":
        return mod.decode_int4(x, p.data, p.scales, p.offsets, p.group_size, bias)
    raise ValueError(f"no path {path!r} for a {p.kind} weight")


_BF16_BLOCK_ROWS = 1024  # rows of W per torch.mm: 8 MiB of bf16 at K = 4096 (blocks of 256 ran 2-10x slower)


def _bf16_rows(mod, p: PackedWeight, n0: int, n1: int, buf: torch.Tensor, fbuf: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows [n0, n1) of W as plain bf16 [R, K] (in buf), and the per-row scale still to apply
    to the output columns (int8: q is exact in bf16, the scale is applied after; else None)."""
    k, r = p.in_features, n1 - n0
    w = buf[:r]
    if p.kind == "bf16":
        mod.rows_bf16(p.data, p.out_features, k, n0, n1, w)
        return w, None
    if p.kind == "int8":
        w.copy_(p.data[n0:n1])
        return w, p.scales[n0:n1]
    if not fbuf:
        fbuf.append(torch.empty(buf.shape[0] * k, dtype=torch.float32))
    w.copy_(_dequant_rows(mod, p, n0, n1, fbuf[0]))  # int4: fp32 dequantised, rounded to bf16
    return w, None


def _bf16_blocks(mod, x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None, amx: bool) -> torch.Tensor:
    """bf16 x [M, K] times blocks of weight rows expanded to bf16 (`_bf16_rows`), by torch's
    bf16 matmul (oneDNN; bf16 out) or by our AMX kernel on the block repacked to panels (fp32
    out). The packed weight stays the only full copy; each block costs a copy of R*K*2 bytes."""
    n, k, m = p.out_features, p.in_features, x.shape[0]
    rows = min(n, _BF16_BLOCK_ROWS)
    buf, fbuf = torch.empty(rows, k, dtype=torch.bfloat16), []
    y = torch.empty(m, n, dtype=torch.float32 if amx else torch.bfloat16)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w, scale = _bf16_rows(mod, p, n0, n1, buf, fbuf)
        b = None if bias is None else bias[n0:n1]
        if amx:
            yb = mod.prefill_bf16_amx(x, mod.pack_bf16(w), n1 - n0, None if scale is not None else b)
        else:
            yb = torch.mm(x, w.t()) if scale is not None or b is None else torch.addmm(b.to(torch.bfloat16), x, w.t())
        if scale is not None:
            yb = yb.float() * scale if b is None else torch.addcmul(b, yb.float(), scale)
        y[:, n0:n1] = yb
    return y


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
    if x.shape[-1] != k:
        raise ValueError(f"x has in_features {x.shape[-1]} but the weight expects {k}")
    if x.device.type != "cpu":
        raise ValueError(f"codeshell.kernels works on CPU tensors, x is on {x.device}")
    b = _bias_fp32(bias, n)
    x2 = x.reshape(-1, k)
    if impl == "reference":
        y = reference(x2, packed, b, plan(packed, x2.shape[0], x.dtype))
    else:
        mod = None if impl == "torch" else _ext.get()
        if impl == "native" and mod is None:
            raise RuntimeError(f"native kernels unavailable: {_ext.unavailable_reason()}")
        if mod is None:
            y = _torch_path(_as_2d_fp32(x, k), packed, b)
        else:
            path = plan(packed, x2.shape[0], x.dtype)
            y = _compute(path, mod, x2 if x.dtype == torch.bfloat16 else _as_2d_fp32(x, k), packed, b)
    return y.to(x.dtype).reshape(*lead, n)


def reference(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None, path: str) -> torch.Tensor:
    """fp32 [M, N]: what `path` computes, in plain torch on the dequantised weight (fp32). The
    paths differ only in how x is rounded: `*:q8` (and int8 / int4 `avx2:gemm`) multiply int8-rounded activations
    (`quantize_activations`); the bf16 paths take x as it comes (they run only for bf16 x),
    and for int4 weights they multiply the dequantised weight rounded to bf16."""
    x = x.to(torch.float32)
    if path.endswith(":q8") or (path == "avx2:gemm" and p.kind != "bf16"):
        x = quantize_activations(x.contiguous(), activation_block(p))
    w = dequantize(p)
    if p.kind == "int4" and path in ("amx:bf16", "onednn:bf16"):
        w = w.to(torch.bfloat16).float()  # those paths expand int4 rows to bf16
    return F.linear(x, w, bias)


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


def argmax_rows(logits: torch.Tensor) -> torch.Tensor | None:
    """The first maximal index of each row of logits [N, V] (fp32 or bf16), as a long [N]
    tensor: torch's `max(-1).indices` at ~5-10x its speed. None where the native kernels cannot
    take it (not a contiguous CPU fp32/bf16 matrix, or no build)."""
    if (logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.bfloat16)
            or logits.dim() != 2 or not logits.is_contiguous() or logits.shape[1] == 0):
        return None
    mod = _ext.get()
    return None if mod is None else mod.argmax_rows(logits)


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
