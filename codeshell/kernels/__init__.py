"""Fast weight-only matmuls for CodeShell inference on CPU (AVX2+FMA baseline; AVX512-VNNI,
AVX512-BF16 and AMX paths where the CPU has them), with torch fallbacks.

Public API (see docs/kernels.md):

    from codeshell.kernels import prepack, quantize_int8, quantize_int4, linear, available
    pw = prepack(layer.weight)            # once at load: bf16 panels   (or quantize_int8 / quantize_int4)
    y = linear(x, pw, layer.bias)         # y[..., N] = x[..., K] @ W^T + b, dispatched by M

What this is not: a module/model integration (the model owns nn.Module plumbing) and not a
GPU path. The native kernels build on first use (JIT, cached in ~/.cache/codeshell/kernels);
without a compiler or AVX2 everything runs through plain torch after one warning. Which
kernel (and instruction set) runs is decided in one place, `ops.plan`;
CODESHELL_KERNEL_ISA=avx2|avx512_vnni|avx512_bf16|amx caps it.
"""

from . import hugepages
from .module import FastLinear, PackedEmbedding, PackedLinear, choose_prefill_paths, prepare_model
from .ops import (
    BF16_PANEL_MAX_M,
    DECODE_MAX_M,
    ISA_LEVELS,
    ROW_INVARIANT_MAX_M,
    available,
    decode_attention,
    decode_attention_ok,
    isa_level,
    linear,
    plan,
    sample_temperature,
    sample_temperature_rows,
    set_num_threads,
    argmax_rows,
)
from .packing import (
    KINDS,
    PackedWeight,
    bf16_rows,
    dequantize,
    int4_from_parts,
    int8_from_parts,
    pack_nibbles,
    prepack,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)

__all__ = [
    "BF16_PANEL_MAX_M",
    "DECODE_MAX_M",
    "ISA_LEVELS",
    "ROW_INVARIANT_MAX_M",
    "KINDS",
    "FastLinear",
    "PackedEmbedding",
    "PackedLinear",
    "PackedWeight",
    "prepare_model",
    "choose_prefill_paths",
    "available",
    "bf16_rows",
    "decode_attention",
    "decode_attention_ok",
    "dequantize",
    "int4_from_parts",
    "int8_from_parts",
    "isa_level",
    "linear",
    "pack_nibbles",
    "plan",
    "prepack",
    "quantize_int4",
    "sample_temperature",
    "sample_temperature_rows",
    "argmax_rows",
    "quantize_int8",
    "set_num_threads",
    "unpack_nibbles",
]
