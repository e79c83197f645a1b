"""Building and loading quantized CodeShell models, tensor by tensor.

Three sources end in the same model (block linears as `Int8Linear`/`Int4Linear`; NF4 as `NF4Linear`):
- a full-precision checkpoint, quantized as each weight streams in (`LLM(..., quantization=)`);
- a folder written by `codeshell quantize` (``config.json`` has a ``quantization`` key): its
  integer tensors are copied straight into the modules, no float weight is ever built;
- bitsandbytes NF4 checkpoints (see `codeshell.quant.nf4`: kept NF4, or re-quantized when asked).
GGUF files have their own reader (`codeshell.quant.gguf_io`). This module does not write files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..config import CodeShellConfig
from ..weights import (CheckpointError, LoadHook, _bigcode_qkv_to_fused, build_empty, load_state_into,
                       resolve_dtype)
from .linear import Int4Linear, Int8Linear, QuantLinear
from .scheme import QuantError, QuantScheme

log = logging.getLogger(__name__)

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def block_linear_names(cfg: CodeShellConfig) -> list[str]:
    """Module names of every block's linears, in checkpoint order."""
    return [f"transformer.h.{i}.{n}" for i in range(cfg.n_layer) for n in BLOCK_LINEARS]


def quantized_names(cfg: CodeShellConfig, scheme: QuantScheme) -> list[str]:
    """Module names that `scheme` stores quantized, in checkpoint order."""
    return block_linear_names(cfg) + (["lm_head"] if scheme.quantize_head else [])


def linear_shapes(cfg: CodeShellConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each block linear kind."""
    d, f = cfg.n_embd, cfg.ffn_dim
    return {"attn.c_attn": (cfg.qkv_dim, d), "attn.c_proj": (d, d), "mlp.c_fc": (f, d), "mlp.c_proj": (d, f)}


def make_quant_linear(in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                      bias_dtype: torch.dtype, name: str) -> QuantLinear:
    scheme.check_width(in_features, name)
    if scheme.bits == 8:
        return Int8Linear(in_features, out_features, bias, bias_dtype)
    return Int4Linear(in_features, out_features, bias, scheme.group_size, scheme.symmetric, bias_dtype)


def build_quantized_empty(cfg: CodeShellConfig, dtype: torch.dtype, scheme: QuantScheme,
                          device: str | torch.device = "cpu") -> nn.Module:
    """`weights.build_empty` with the quantized linears swapped in while still on meta."""
    return build_empty(cfg, dtype, device, swap=quantized_names(cfg, scheme), make=lambda name, lin: make_quant_linear(
        lin.in_features, lin.out_features, lin.bias is not None, scheme.module_scheme(name), dtype, name))


def _filled(prefix: str, m: QuantLinear) -> list[str]:
    names = [f"{prefix}.qweight", f"{prefix}.scales"]
    if getattr(m, "zeros", None) is not None:
        names.append(f"{prefix}.zeros")
    return names


def quantize_on_load_hook(model: nn.Module, cfg: CodeShellConfig, scheme: QuantScheme) -> LoadHook:
    """A loader hook that quantizes each float block-linear weight as it streams in."""
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}

    def set_weight(prefix: str, m: QuantLinear, t: torch.Tensor, where: str) -> list[str]:
        if tuple(t.shape) != (m.out_features, m.in_features):
            raise CheckpointError(f"tensor {where!r} has shape {tuple(t.shape)}, expected "
                                  f"{(m.out_features, m.in_features)} from config.json")
        m.set_weight(t)
        _trim_heap()  # quantizing leaves float temporaries in glibc's heap
        return _filled(prefix, m)

    def hook(name: str, t) -> list[str] | None:
        if not name.endswith(".weight"):
            return None
        prefix = name[: -len(".weight")]
        m = qmods.get(prefix)
        if m is not None:
            if cfg.bigcode_interleaved_qkv and prefix.endswith("attn.c_attn"):
                t = _bigcode_qkv_to_fused(t, cfg)
            return set_weight(prefix, m, t, name)
        if name == "transformer.wte.weight" and "lm_head" in qmods and cfg.tie_word_embeddings:
            wte = model.transformer.wte.weight
            if tuple(t.shape) != tuple(wte.shape):
                return None  # the plain path reports the shape error
            with torch.no_grad():
                wte.copy_(t)
            return [name, *set_weight("lm_head", qmods["lm_head"], t, name)]
        return None

    return hook


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc only).

    Repacking frees the portable int4 copy and a few temporaries per linear; glibc keeps
    such chunks in its heap (its mmap threshold rises after the first large free), which
    measured +150 MiB on a 100M-parameter model and would be gigabytes at 7B. Trimming after
    each module keeps the load's peak at the model's own size.
    """
    global _libc
    if _libc is None:
        try:
            import ctypes
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - raises AttributeError off glibc
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def finalize(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.finalize()
            _trim_heap()


def quantized_scheme_of(cfg: CodeShellConfig) -> QuantScheme | None:
    return QuantScheme.from_dict(cfg.quantization) if cfg.quantization else None


def load_quantized(path: Path, cfg: CodeShellConfig, dtype: str | torch.dtype | None,
                   device: str | torch.device, quantization: "str | dict | QuantScheme | None"
                   ) -> tuple[nn.Module, CodeShellConfig] | None:
    """Load `path` quantized, or return None when neither the folder nor the caller asks for it.

    The activation dtype defaults to bfloat16: the CPU kernels measured fastest with it; an NF4
    checkpoint kept as NF4 defaults to float32 (bitsandbytes' compute dtype, its exact numbers).
    """
    from . import nf4
    asked = QuantScheme.parse(quantization)
    stored = quantized_scheme_of(cfg)
    dt = resolve_dtype(dtype, default=torch.bfloat16)
    if stored is not None:
        if asked is not None and asked != stored:
            raise QuantError(f"{path} is already quantized as {stored.name}; load it without "
                             f"quantization={quantization!r}, or quantize the original checkpoint")
        model = build_quantized_empty(cfg, dt, stored, device)
        load_state_into(model, path, cfg)
    elif nf4.is_nf4_checkpoint(path):  # kept NF4 unless a scheme is asked: float32, bitsandbytes' numbers
        return nf4.load_nf4(path, cfg, dt if asked else resolve_dtype(dtype, default=torch.float32), device, asked)
    elif asked is not None:
        scheme = asked
        model = build_quantized_empty(cfg, dt, asked, device)
        load_state_into(model, path, cfg, hook=quantize_on_load_hook(model, cfg, asked))
    else:
        return None
    finalize(model)
    # The config now describes the model in memory (what the server reports).
    return model, cfg.replace(quantization=(stored or scheme).to_dict())
