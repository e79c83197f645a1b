"""`PackedLinear`: an inference-only drop-in for `nn.Linear` over a `PackedWeight`;
`PackedEmbedding`, the token embedding read from the same panels when the output head is
tied to it; and `prepare_model`, which swaps a loaded model's linears for them where that is
faster.

This is the one place that decides, per device and dtype, which matmul a linear runs:
CPU bfloat16 weights go to the native kernels (re-laid out into panels, one layer at a time,
so the model's size does not double; a tied embedding shares the head's panels); float32
models keep torch's sgemm (packing them to bf16 would change their numbers); CUDA keeps
cuBLAS. Quantized formats (int8/int4) build `PackedLinear`s directly.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from . import _ext, ops
from .ops import linear
from .packing import PackedWeight, bf16_rows, prepack


class FastLinear:
    """The per-call work of `ops.linear` that does not change between calls of one weight, done
    once: the fp32 bias, the path `ops.plan` names for each (M, x dtype, ISA cap) -- plan's
    answer for a key never changes within a process (measured choices are cached there too) --
    and the checks. A call is then a reshape, `ops._compute` and the cast back.

    Why: at decode a linear's kernel takes a few microseconds on a small model (6.3 us on
    codeshell-mini at M = 1) and `ops.linear` around it cost ~22 us (validation, the bias
    converted to fp32 on every call, plan's lookups, the PackedWeight built per call).
    Anything `linear` would reject (wrong width, not CPU, no native build) goes through
    `linear` itself, so errors and the torch fallback stay the checked entry's."""

    __slots__ = ("packed", "bias", "_paths")

    def __init__(self, packed: PackedWeight, bias32: torch.Tensor | None):
        self.packed = packed
        self.bias = bias32          # fp32 [N] contiguous, or None
        self._paths: dict = {}      # (M, x dtype, $CODESHELL_KERNEL_ISA) -> plan's path

    def raw(self, x: torch.Tensor) -> torch.Tensor | None:
        """y [M, N] as the kernel returns it (fp32; bf16 for `onednn:bf16`, and for the GEMMs of
        `_GEMMS` (`avx512_bf16:gemm`, `avx512_vnni:gemm`) with bf16 x, see below) for x [..., K], or None where the fast
        path does not apply (the caller then uses `__call__`).

        With bf16 x on `avx512_bf16:gemm` (or `avx512_vnni:gemm`) the GEMM's epilogue rounds its fp32 sums (bias added) to
        bf16 itself (`prefill_bf16_dot(out_bf16=True)`): the bits of the fp32 result's
        `.to(torch.bfloat16)`, which every caller does next anyway (the model's fused RoPE cast
        of c_attn's rows, the residual add's cast of attn.c_proj / mlp.c_proj, `__call__`'s cast).
        Why: at the small shape (M = 512) a layer wrote 7 MiB of fp32 for the next op to read
        back; bf16 halves both. `CODESHELL_DOT_BF16OUT=0` (read per call) returns fp32 as before."""
        p = self.packed
        k = p.in_features
        if x.shape[-1] != k or x.device.type != "cpu":
            return None
        mod = _ext.get()
        if mod is None:
            return None
        x2 = x.reshape(-1, k)
        if x.dtype != torch.bfloat16:  # as linear: other dtypes enter the kernels as fp32
            x2 = x2.to(torch.float32).contiguous()
        path = self._path(x2.shape[0], x.dtype)
        y = epilogue_call(path, mod, x2, p, self.bias, False) if x.dtype == torch.bfloat16 else None
        return ops._compute(path, mod, x2, p, self.bias) if y is None else y

    def _path(self, m: int, dtype: torch.dtype, epilogue: str | None = None) -> str:
        key = (m, dtype, os.environ.get("CODESHELL_KERNEL_ISA"), epilogue)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = ops.plan(self.packed, m, dtype, epilogue)
        return path

    def raw_gelu(self, x: torch.Tensor) -> torch.Tensor | None:
        """bf16 gelu_tanh of y rounded to bf16, [M, N], for bf16 x [..., K] at prefill M (above
        ROW_INVARIANT_MAX_M) by the path `ops.plan` chose for this weight as a GELU linear
        (`epilogue="gelu"`: its candidates timed with the GELU, session 41): the GEMMs whose epilogue
        applies it while the sums are in cache (`epilogue_call`), else the path's output then the
        fused GELU pass (`gelu_call`); None at decode M (one path for every M up to
        ROW_INVARIANT_MAX_M, none with a GELU epilogue: the model runs `forward_raw` and the fused GELU)
        and for other x.
        By default the epilogue's GELU is `gelu16_fast` (csrc/simd512.h: within one bf16 ulp of the
        exact GELU, as the fused GELU is); `CODESHELL_GELU_FAST=0` gives the bits of `raw` then
        `fused_gelu_tanh(y, None, True)`."""
        p = self.packed
        if x.dtype != torch.bfloat16 or x.shape[-1] != p.in_features or x.device.type != "cpu":
            return None
        mod = _ext.get()
        if mod is None:
            return None
        x2 = x.reshape(-1, p.in_features)
        if x2.shape[0] <= ops.ROW_INVARIANT_MAX_M:
            return None
        return gelu_call(self._path(x2.shape[0], x.dtype, "gelu"), mod, x2, p, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """y [..., N] in x's dtype: what `ops.linear(x, packed, bias)` returns."""
        y = self.raw(x)
        if y is None:
            return linear(x, self.packed, self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.packed.out_features)


_GEMMS = {"avx512_bf16:gemm": "prefill_bf16_dot", "avx512_vnni:gemm": "prefill_bf16_fma"}
"""The bf16-weight prefill GEMMs whose epilogue can round to bf16 or apply the GELU (`FastLinear.raw`
/ `raw_gelu`) -> their binding: the vdpbf16ps GEMM and the fp32-FMA GEMM (AVX-512 without
AVX512-BF16, session 24), the same epilogues (csrc/panel_bf16.cpp store_rows_b16 / store_rows_gelu);
and `amx:bf16` on bf16 weights above ROW_INVARIANT_MAX_M rows (`_gemm`)."""


def _gemm(path: str | None, p, m: int) -> str | None:
    """The binding whose epilogue rounds to bf16 / applies the GELU for this call, or None. Session
    37 (helper C): `amx:bf16` (`prefill_bf16_amx`, the same store_rows_b16 / store_rows_gelu) on a
    bf16 weight at M > ROW_INVARIANT_MAX_M: the prompt only, where the vdpbf16ps GEMM takes them too
    (at M <= 64 the AMX tiles are also decode's path, whose rows keep the fp32 result and the fused
    GELU: row invariance). CODESHELL_AMX_EPI=0 (read per call, A/B): fp32 out as before."""
    if path in _GEMMS:
        return _GEMMS[path]
    if (path == "amx:bf16" and p.kind == "bf16" and m > ops.ROW_INVARIANT_MAX_M
            and os.environ.get("CODESHELL_AMX_EPI", "1") != "0"):
        return "prefill_bf16_amx"
    return None


def epilogue_call(path: str, mod, x2: torch.Tensor, p, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor | None:
    """y [M, N] as bf16 from the epilogue of `path`'s kernel for bf16 x2 [M, K]: the sums (bias
    added) rounded to bf16, or (gelu) the GELU of them rounded, while they are in cache (`_gemm`'s
    GEMMs, `_q8_epi`'s AMX-INT8 tiles); None where the path has no such epilogue (or
    CODESHELL_DOT_BF16OUT=0 for the rounding). What `FastLinear.raw` / `raw_gelu` run, and what
    the plan times for such a candidate (`measure._time_call`)."""
    m = x2.shape[0]
    gemm = _gemm(path, p, m)
    if gemm is not None and (gelu or os.environ.get("CODESHELL_DOT_BF16OUT", "1") != "0"):
        ops.PATHS_RUN[(p.kind, path + ("+gelu" if gelu else "+bf16"))] += 1
        if gelu:
            return getattr(mod, gemm)(x2.contiguous(), p.data, p.out_features, bias, True)
        return getattr(mod, gemm)(x2.contiguous(), p.data, p.out_features, bias, False, True)
    if _q8_epi(path, p, m, x2.dtype):
        ops.PATHS_RUN[(p.kind, path + ("+gelu" if gelu else "+bf16"))] += 1
        return mod.prefill_q8_amx_epi(x2.contiguous(), p.data, p.scales, p.group_size if p.kind == "int4" else 0,
                                      bias, gelu)
    return None


def gelu_call(path: str, mod, x2: torch.Tensor, p, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 gelu_tanh(y) [M, N] for bf16 x2 [M, K] by one path: its kernel's GELU epilogue where it
    has one (`epilogue_call`), else its output (fp32, or bf16 from oneDNN) then the fused GELU pass,
    as the model's inference path runs it (model.py `CodeShellMLP.forward_inference`: the same
    call, so the same bits). The call `ops.plan` times for each candidate of a GELU linear
    (`epilogue="gelu"`, `measure._time_call`) and `FastLinear.raw_gelu` runs at prefill M.
    Why (session 41): the plan timed the GEMMs alone, so for c_fc it weighed the vdpbf16ps GEMM
    with its epilogue against oneDNN / panel64 without the pass that writes their output, reads it
    back and writes it again through the GELU (session 40, helper C: a stored `onednn:bf16` for
    codeshell-mini's c_fc, 1.34 ms + 0.18 ms of GELU a layer against ~0.8 ms for the GEMM with its
    epilogue; session 40 then overrode the plan for GELU linears, `_gelu_epi_gemm`, now gone)."""
    y = epilogue_call(path, mod, x2, p, bias, True)
    if y is not None:
        return y
    ops.PATHS_RUN[(p.kind, path + "+gelu pass")] += 1
    y = ops._compute(path, mod, x2, p, bias)
    if y.dtype not in (torch.float32, torch.bfloat16):
        y = y.to(torch.bfloat16)
    return mod.fused_gelu_tanh(y.contiguous(), None, True)


def _q8_epi(path: str | None, p, m: int, x_dtype: torch.dtype) -> bool:
    """Whether this call takes `prefill_q8_amx_epi` (session 38, helper A): the AMX-INT8 prompt
    tiles (`amx:q8` at M > DECODE_MAX_M) on an int8 / int4 weight without offsets, bf16 x, the
    result as bf16 (the sum rounded, or c_fc's GELU of it) from the tiles' epilogue, as `_gemm`
    gives bf16 weights: the fp32 result, its cast and the fused GELU's pass were the int8 / int4
    prompt's extra traffic (and x's fp32 copy). The bits: `raw`'s fp32 then the model's cast / the
    fused GELU (gelu16 with CODESHELL_GELU_FAST=0; gelu16_fast by default, within one bf16 ulp).
    Offsets (asymmetric int4) are added to the fp32 result after the tiles, so they keep the fp32
    path. CODESHELL_Q8_EPI=0 (read per call, A/B): fp32 out as before."""
    return (path == "amx:q8" and p.kind in ("int8", "int4") and p.offsets is None and m > ops.DECODE_MAX_M
            and x_dtype == torch.bfloat16 and os.environ.get("CODESHELL_Q8_EPI", "1") != "0")


class PackedLinear(nn.Module):
    """y = x @ W^T + b with W packed (bf16, int8 or int4); no autograd."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.kind, self.in_features, self.out_features = packed.kind, packed.in_features, packed.out_features
        self.group_size = packed.group_size
        self.register_buffer("data", packed.data, persistent=False)
        self.register_buffer("scales", packed.scales, persistent=False)
        self.register_buffer("offsets", packed.offsets, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        self._fast: FastLinear | None = None
        self._fast_key: tuple = ()

    @property
    def packed(self) -> PackedWeight:
        return self.fast.packed

    @property
    def fast(self) -> FastLinear:
        """The call cache, rebuilt when a buffer was replaced (`.to()`, `load_state_dict` into a
        new tensor) or the bias changed in place (its version counter)."""
        bufs, old = self._buffers, self._fast_key  # (plain dict reads: this runs on every call)
        b = bufs["bias"]
        if (old and old[0] is bufs["data"] and old[1] is bufs["scales"] and old[2] is bufs["offsets"]
                and old[3] is b and (b is None or old[4] == b._version)):
            return self._fast
        p = PackedWeight(self.kind, self.out_features, self.in_features, self.data, self.scales,
                         self.offsets, self.group_size)
        b32 = ops._bias_fp32(None if b is None else b.detach(), self.out_features)  # linear's own check
        self._fast = FastLinear(p, b32)
        self._fast_key = (self.data, self.scales, self.offsets, b, None if b is None else b._version)
        return self._fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x)

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """y [M, N] (x flattened to [M, K]) as the kernel returns it: fp32 (bf16 where the path
        is `onednn:bf16`, or the vdpbf16ps GEMM on bf16 x: `FastLinear.raw`) with the bias
        added, before `forward`'s cast to x's dtype. The model's inference path feeds it to the
        fused ops, which round fp32 as that cast would."""
        y = self.fast.raw(x)
        return self.forward(x).reshape(-1, self.out_features) if y is None else y

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor | None:
        """bf16 gelu_tanh(y) [M, N] at prefill M by the path planned for a GELU linear (its GEMM's
        epilogue, or its output then the fused GELU), else None (`FastLinear.raw_gelu`; the model
        then runs `forward_raw` and the fused GELU)."""
        return self.fast.raw_gelu(x)

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"


_NATIVE_ROWS_MAX = 16  # rows a lookup copies one by one natively; more go through one gather


class PackedEmbedding(nn.Module):
    """Token embedding looked up from a bf16 `PackedWeight` (the tied output head's panels),
    so a tied model keeps one copy of the vocabulary matrix. Inference only."""

    def __init__(self, packed: PackedWeight):
        super().__init__()
        if packed.kind != "bf16":
            raise ValueError(f"PackedEmbedding takes a bf16 PackedWeight, got {packed.kind}")
        self.num_embeddings, self.embedding_dim = packed.out_features, packed.in_features
        self.register_buffer("data", packed.data, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        mod = _ext.get() if flat.numel() <= _NATIVE_ROWS_MAX else None
        if mod is not None and flat.device.type == "cpu":
            # Decode looks up 1-16 rows a step: one native row copy each (~2 us) instead of
            # bf16_rows' advanced indexing into the panel layout (~25 us at one row).
            n, k = self.num_embeddings, self.embedding_dim
            out = torch.empty(flat.numel(), k, dtype=torch.bfloat16)
            for i, r in enumerate(flat.tolist()):
                if not 0 <= r < n:
                    raise IndexError(f"token id {r} is out of range for an embedding of {n} rows")
                mod.rows_bf16(self.data, n, k, r, r + 1, out[i:i + 1])
            return out.reshape(*ids.shape, k)
        mod = _ext.get() if flat.device.type == "cpu" else None
        if mod is not None and hasattr(mod, "gather_bf16") and os.environ.get("CODESHELL_EMBED_NATIVE", "1") != "0":
            # A prompt's rows: one native gather (`gather_bf16`: the next row's lines prefetched,
            # rows over the threads; an id out of range raises IndexError there), the same values
            # as bf16_rows' advanced indexing (CODESHELL_EMBED_NATIVE=0), 1.3 -> ~0.5 ms for a
            # 512-token prompt at the small shape.
            out = torch.empty(flat.numel(), self.embedding_dim, dtype=torch.bfloat16)
            mod.gather_bf16(self.data, self.num_embeddings, self.embedding_dim, flat.to(torch.int64).contiguous(), out)
            return out.reshape(*ids.shape, self.embedding_dim)
        p = PackedWeight("bf16", self.num_embeddings, self.embedding_dim, self.data)
        return bf16_rows(p, flat).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bf16 panels shared with the output head"


def prepare_model(model: nn.Module) -> int:
    """Swap the bf16 CPU linears of a loaded (inference) model for `PackedLinear`s.

    Returns how many were swapped (0 when the native kernels are unavailable, the model is
    not bf16, or it is not on the CPU).
    """
    from .ops import available
    p = model.transformer.wte.weight
    if p.device.type != "cpu" or p.dtype != torch.bfloat16 or not available():
        return 0
    head = getattr(model, "lm_head", None)
    tied = isinstance(head, nn.Linear) and head.weight is p
    del p
    # (parent, name) only: holding the old modules here would keep every old weight alive
    # until the end, doubling peak memory (the 7B model would need 30 GiB).
    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16]
    del head
    for parent, name in swaps:  # one at a time: the old weight is freed before the next copy
        child = getattr(parent, name)
        is_head = tied and parent is model and name == "lm_head"
        packed = PackedLinear(prepack(child.weight), child.bias)
        del child
        setattr(parent, name, packed)
        if is_head:
            model.transformer.wte = PackedEmbedding(packed.packed)
    return len(swaps)


def gelu_linears(model: nn.Module) -> set[int]:
    """ids of the model's linears whose output the model's inference path feeds to the GELU-tanh
    (`forward_gelu`: each block's mlp.c_fc where the activation is one of model.py's
    `_GELU_TANH`); empty for other activations or models without those blocks."""
    from ..model import _GELU_TANH
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if getattr(cfg, "activation_function", None) not in _GELU_TANH or blocks is None:
        return set()
    return {id(b.mlp.c_fc) for b in blocks if hasattr(getattr(b, "mlp", None), "c_fc")}


def choose_prefill_paths(model: nn.Module, max_rows: int) -> dict[tuple, str]:
    """At load: the prefill path of each distinct weight shape of the model's linears (the output
    head excepted), with activations of the model's dtype, when a prefill of up to `max_rows`
    rows goes past the decode kernels (M > ROW_INVARIANT_MAX_M): `ops.plan` measures the
    candidates where several compete (at each of `measure.PREFILL_MEASURE_ROWS`) and keeps the winner
    for every prefill M (in this process and on disk, `choices.py`), so no request pays for it
    later. A linear whose output goes through the GELU (`gelu_linears`: c_fc) is planned as one
    (`epilogue="gelu"`: each candidate timed with its GELU epilogue or its separate GELU pass,
    session 41), apart from a linear of the same shape without it. Returns {(kind, N, K, group
    size, symmetric, epilogue): path}; {} when nothing is packed for the native kernels or no
    prefill goes past the decode kernels.
    Why at load: measured at first use, the first prompt paid ~6 extra calls per weight shape
    and M (a 7B bf16 prompt of 512 tokens: seconds) -- the request a user waits for. The output
    head is left out: a prefill computes its logits for the last rows only.
    """
    if max_rows <= ops.ROW_INVARIANT_MAX_M:
        return {}
    head = getattr(model, "lm_head", None)
    wte = model.transformer.wte
    x_dtype = wte.dtype if isinstance(wte, PackedEmbedding) else wte.weight.dtype
    gelu = gelu_linears(model)
    seen: dict[tuple, PackedWeight] = {}
    for mod in model.modules():
        if mod is head:
            continue
        p = mod.packed if isinstance(mod, PackedLinear) else getattr(mod, "_kernel", None)
        if isinstance(p, PackedWeight):
            # (a PackedLinear's forward_gelu plans its own path; other linears run forward_raw then the GELU)
            epi = "gelu" if id(mod) in gelu and isinstance(mod, PackedLinear) and x_dtype == torch.bfloat16 else None
            seen.setdefault((p.kind, p.out_features, p.in_features, p.group_size, p.offsets is None, epi), p)
    # keyed as `seen`: int4 weights of one shape may differ in group size or symmetry
    return {key: ops.plan(p, ops.ROW_INVARIANT_MAX_M + 1, x_dtype, key[-1]) for key, p in seen.items()}
