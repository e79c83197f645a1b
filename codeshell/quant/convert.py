"""`codeshell quantize`: stream a full-precision checkpoint into a quantized safetensors folder.

Reads one tensor at a time (memory-mapped), quantizes the block linears with `QuantScheme`,
keeps every other tensor in its stored dtype, and writes shards of at most `shard_bytes`, so
the 7B model quantizes in a few GiB of memory. The output folder holds ``config.json`` (with
the scheme under ``quantization``), ``model.safetensors`` or shards plus
``model.safetensors.index.json``, and the tokenizer files. It loads back with `LLM(folder)`.
This module does not run models.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config import CodeShellConfig
from ..tokenizer import TOKENIZER_FILES
from ..weights import (IGNORED_SUFFIXES, CheckpointError, _bigcode_qkv_to_fused, _progress, iter_tensors,
                       load_config, resolve_model_path, weight_files)
from .linear import quantize_int4, quantize_int8
from .load import BLOCK_LINEARS, linear_shapes
from .scheme import QuantError, QuantScheme

DEFAULT_SHARD_BYTES = 2 << 30


def check_scheme_fits(cfg: CodeShellConfig, scheme: QuantScheme) -> None:
    """Fail before reading any weight if the group size does not divide some linear's width."""
    for kind, (_, k) in linear_shapes(cfg).items():
        scheme.check_width(k, f"transformer.h.*.{kind} (in_features {k})")
    if scheme.quantize_head:
        scheme.head_scheme().check_width(cfg.n_embd, "lm_head")


def quantize_tensor(w: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """One float weight [N, K] -> the module buffers `{qweight, scales[, zeros]}`."""
    if scheme.bits == 8:
        q, s = quantize_int8(w)
        return {"qweight": q, "scales": s}
    q, s, z = quantize_int4(w, scheme.group_size, scheme.symmetric)
    out = {"qweight": q, "scales": s}
    if z is not None:
        out["zeros"] = z
    return out


class _ShardWriter:
    """Accumulates tensors and writes a safetensors shard whenever `limit` bytes are buffered."""

    def __init__(self, out: Path, limit: int):
        self.out, self.limit = out, limit
        self.buf: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[dict[str, torch.Tensor] | str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.weight_map or name in self.buf:
            raise CheckpointError(f"tensor {name!r} appears twice in the source checkpoint")
        self.buf[name] = t.contiguous()
        self.size += t.numel() * t.element_size()
        if self.size >= self.limit:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file
        if not self.buf:
            return
        fname = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.buf, str(self.out / fname), metadata={"format": "pt"})
        self.weight_map.update({n: fname for n in self.buf})
        self.shards.append(fname)
        self.buf, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.out / self.shards[0], self.out / "model.safetensors")
            return
        names = {}
        for i, fname in enumerate(self.shards):
            new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / fname, self.out / new)
            names[fname] = new
        index = {"metadata": {}, "weight_map": {k: names[v] for k, v in sorted(self.weight_map.items())}}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def quantize_checkpoint(model: str | os.PathLike, out: str | os.PathLike, scheme: QuantScheme,
                        shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write a quantized copy of checkpoint `model` to folder `out`; returns `out`."""
    src = resolve_model_path(model)
    if src.is_file():
        raise CheckpointError(f"{src} is a file; `codeshell quantize` takes a checkpoint folder")
    cfg = load_config(src)
    if cfg.quantization:
        raise QuantError(f"{src} is already quantized ({cfg.quantization}); quantize the original checkpoint")
    from .nf4 import is_nf4_checkpoint
    if is_nf4_checkpoint(src):
        raise QuantError(f"{src} is a bitsandbytes NF4 checkpoint; quantize the original checkpoint "
                         "(LLM(path, quantization=...) re-quantizes NF4 in memory)")
    check_scheme_fits(cfg, scheme)
    out = Path(out)
    if out.resolve() == src.resolve():
        raise QuantError("the output folder is the source folder; choose another OUT")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise QuantError(f"output folder {out} exists and is not empty (use --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    files = weight_files(src)
    quantized = {f"transformer.h.{i}.{n}.weight" for i in range(cfg.n_layer) for n in BLOCK_LINEARS}
    if scheme.quantize_head:
        quantized.add("lm_head.weight")
    writer = _ShardWriter(out, shard_bytes)
    with _progress(sum(f.stat().st_size for f in files), f"Quantizing to {scheme.name}") as advance:
        for file in files:
            for name, t in iter_tensors(file):
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"entry {name!r} in {file.name} is not a tensor")
                nbytes = t.numel() * t.element_size()
                if cfg.bigcode_interleaved_qkv and name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
                    t = _bigcode_qkv_to_fused(t, cfg)
                if name in quantized:
                    for suffix, qt in quantize_tensor(t, scheme.module_scheme(name[: -len(".weight")])).items():
                        writer.add(name[: -len("weight")] + suffix, qt)
                else:
                    writer.add(name, t)
                    if name == "transformer.wte.weight" and scheme.quantize_head and cfg.tie_word_embeddings:
                        for suffix, qt in quantize_tensor(t, scheme.head_scheme()).items():
                            writer.add("lm_head." + suffix, qt)
                advance(nbytes)
                del t
    writer.close()
    out_cfg = {**cfg.to_dict(), "quantization": scheme.to_dict()}
    out_cfg.setdefault("torch_dtype", cfg.torch_dtype or "bfloat16")
    (out / "config.json").write_text(json.dumps(out_cfg, indent=2))
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    return out
