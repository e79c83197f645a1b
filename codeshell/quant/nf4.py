"""bitsandbytes NF4 checkpoints, read without bitsandbytes and run with bitsandbytes' numbers.

Two layouts are read; both with plain (float32 absmax per block) and nested ("double quant":
uint8 absmax indices decoded through a second, 256-value code) statistics:

1. The released ``CodeShell-7B-Chat-int4``: one ``pytorch_model.bin`` written with bitsandbytes
   0.41, in which every block linear is ``<name>.weight.data`` (uint8 [ceil(n/2), 1], two 4-bit
   indices per byte, high nibble first, over the row-major flattened [out, in] weight) and
   ``<name>.weight.quant_state``, the list bitsandbytes 0.41's ``quantize_4bit`` returned::

       [absmax, shape, dtype, blocksize, nested, quant_type, code]
       nested = None  or  [offset, [absmax2, code2, blocksize2, False, torch.float32, None, None]]

   (``Params4bit.cuda`` quantized ``weight.half()``, so ``dtype`` is float16 there). The list
   holds only tensors, ``torch.Size``, a ``torch.dtype``, ints, strings, None and a bool, all on
   torch's ``weights_only`` allow-list, so no extra globals are allowed.
2. transformers + bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True,
   bnb_4bit_quant_type="nf4")`` then ``save_pretrained``): safetensors with ``<name>.weight``
   (the packed bytes, in ``bnb_4bit_quant_storage``), ``.weight.absmax``, ``.weight.quant_map``,
   ``.weight.nested_absmax``, ``.weight.nested_quant_map`` and
   ``.weight.quant_state.bitsandbytes__nf4`` (JSON bytes: blocksize, shape, dtype,
   nested_blocksize, nested_offset), and ``quantization_config`` in config.json.

The numbers are bitsandbytes': absmax = code2[q] * absmax2[block // blocksize2] + offset
(float32) when nested; w = code[index] * absmax[block] in float32, then cast to the activation
dtype; y = F.linear(x, w, bias). That is what bitsandbytes 0.50's CPU forward
(``gemm_4bit``) computes, so by default the weights stay NF4 in memory (`NF4Linear`, ~4.5 bits
per weight) and each forward dequantizes them. Asking for ``quantization="int8"`` or an int4
scheme instead re-quantizes each dequantized weight to that format (faster kernels, further from
bitsandbytes' numbers: docs/quant.md gives the measured distance). fp4 and 8-bit (LLM.int8)
bitsandbytes checkpoints are refused with a message saying so.

`write_nf4_checkpoint` writes layout 1 with bitsandbytes' own quantizer (test fixtures).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CodeShellConfig
from ..weights import CheckpointError, LoadHook, _bigcode_qkv_to_fused, build_empty, weight_files
from .linear import QuantLinear
from .load import BLOCK_LINEARS, _filled, _trim_heap, block_linear_names, build_quantized_empty, finalize
from .scheme import QuantScheme

# bitsandbytes' NF4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_SUFFIX_DATA, _SUFFIX_STATE = ".weight.data", ".weight.quant_state"
# transformers' save_pretrained: the parts of one quantized weight, after "<prefix>.weight".
_HF_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_HF_QS = "quant_state.bitsandbytes__"
METHOD = "bitsandbytes-nf4"


class QuantStateError(CheckpointError):
    """NF4 statistics that do not follow bitsandbytes' layout (names the tensor and the field)."""


def _bad(name: str, what: str) -> QuantStateError:
    return QuantStateError(f"corrupt NF4 quant_state for {name!r}: {what} (expected the bitsandbytes "
                           "list [absmax, shape, dtype, blocksize, nested stats or None, 'nf4', code])")


def _bad_hf(name: str, what: str) -> QuantStateError:
    return QuantStateError(f"corrupt bitsandbytes NF4 tensors for {name!r}: {what}")


# ---- the numbers ---------------------------------------------------------------------------

def decode_nested_absmax(qabsmax: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor,
                         blocksize2: int, offset: torch.Tensor | float) -> torch.Tensor:
    """Nested statistics as bitsandbytes decodes them: code2[q] * absmax2[i // blocksize2] + offset (fp32)."""
    n = qabsmax.numel()
    scale2 = absmax2.reshape(-1).float().repeat_interleave(blocksize2)[:n]
    off = offset.float().reshape(()) if isinstance(offset, torch.Tensor) else torch.tensor(offset, dtype=torch.float32)
    return code2.float()[qabsmax.reshape(-1).long()] * scale2 + off


def byte_table(code: torch.Tensor) -> torch.Tensor:
    """[256, 2] float32: the two code values (high nibble, low nibble) of each packed byte."""
    b = torch.arange(256, device=code.device)
    return torch.stack((code.float()[b >> 4], code.float()[b & 0x0F]), dim=-1).contiguous()


def dequantize_packed(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                      shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                      chunk: int = 1 << 23, lut: torch.Tensor | None = None) -> torch.Tensor:
    """code[index] * absmax[block] in float32, cast to `dtype`, in `shape` (bitsandbytes' dequantize_4bit).

    `packed` holds ceil(n/2) bytes, high nibble first. Works `chunk` values at a time (a
    multiple of the block size) so the temporaries stay small next to the result; `lut` is
    `byte_table(code)` when the caller keeps one.
    """
    n = math.prod(shape)
    p = packed.reshape(-1)
    lut = byte_table(code) if lut is None else lut
    am = absmax.reshape(-1).float()
    out = torch.empty(n, dtype=dtype, device=packed.device)
    step = max(1, chunk // blocksize) * blocksize
    buf = out if dtype == torch.float32 else None
    for v0 in range(0, n, step):
        v1 = min(n, v0 + step)
        m = v1 - v0
        nbytes = (m + 1) // 2
        if buf is out:
            if m % 2:  # odd n: the last byte's low nibble is padding, needs room
                vals = torch.empty(2 * nbytes, dtype=torch.float32, device=packed.device)
            else:
                vals = out[v0:v1]
        else:
            if buf is None:
                buf = torch.empty(2 * ((min(step, n) + 1) // 2), dtype=torch.float32, device=packed.device)
            vals = buf[: 2 * nbytes]
        torch.index_select(lut, 0, p[v0 // 2: v0 // 2 + nbytes].int(), out=vals.view(-1, 2))
        # The product is float32 and rounded once into `dtype` by `out=` (as `.to(dtype)` would).
        dst, b0, full = out[v0:v1], v0 // blocksize, m // blocksize * blocksize
        if full:
            torch.mul(vals[:full].view(-1, blocksize), am[b0:b0 + full // blocksize, None],
                      out=dst[:full].view(-1, blocksize))
        if full < m:  # a last, partial block
            torch.mul(vals[full:m], am[b0 + full // blocksize], out=dst[full:m])
    return out.reshape(shape)


class NF4Linear(QuantLinear):
    """A linear holding bitsandbytes NF4 weights (packed indices, fp32 absmax per block).

    forward = F.linear(x, dequantize(x.dtype), bias): bitsandbytes' CPU inference math. The
    weight is dequantized on every call (one [out, in] temporary in x's dtype).
    """

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        # Sizes depend on the file's block size: `set_nf4` replaces these placeholders.
        self.register_buffer("qweight", torch.empty(0, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.empty(0, dtype=torch.float32, device=device))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=device))
        self.blocksize = 64
        self._lut: torch.Tensor | None = None  # byte -> two code values, built from `code`

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nf4 blocksize={self.blocksize}"

    @torch.no_grad()
    def set_nf4(self, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> None:
        dev = self.bias.device if self.bias is not None else self.code.device
        # Own copies: a .bin is read memory-mapped, and views would keep the file's pages.
        self.qweight = packed.reshape(-1).to(dev, torch.uint8, copy=True)
        self.absmax = absmax.reshape(-1).to(dev, torch.float32, copy=True)
        self.code = code.reshape(-1).to(dev, torch.float32, copy=True)
        self.blocksize = blocksize
        self._lut = byte_table(self.code)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._lut is None or self._lut.device != self.code.device:
            self._lut = byte_table(self.code)
        return dequantize_packed(self.qweight, self.absmax, self.code, self.blocksize,
                                 (self.out_features, self.in_features), dtype, lut=self._lut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)


def build_nf4_empty(cfg: CodeShellConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """A CodeShellForCausalLM whose block linears are empty `NF4Linear`s (built on meta, no init cost)."""
    return build_empty(cfg, dtype, device, swap=block_linear_names(cfg),
                       make=lambda _, lin: NF4Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype))


# ---- checking one weight's statistics ------------------------------------------------------

def _check_code(name: str, code, bad) -> torch.Tensor:
    if not isinstance(code, torch.Tensor) or code.numel() != 16 or not code.is_floating_point():
        raise bad(name, "the code table should have 16 values")
    if not torch.allclose(code.detach().float().reshape(-1).cpu(), NF4_CODE, rtol=0, atol=1e-6):
        raise bad(name, "the code table is not bitsandbytes' NF4 table (fp4 or another 4-bit type?)")
    return code.detach().float().reshape(-1)


def _check_sizes(name: str, packed, shape, blocksize, absmax, bad) -> int:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise bad(name, f"blocksize {blocksize!r} is not one of bitsandbytes' {BLOCKSIZES}")
    n = math.prod(shape)
    if not isinstance(packed, torch.Tensor) or packed.numel() * packed.element_size() < (n + 1) // 2:
        got = f"{packed.dtype} x {packed.numel()}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise CheckpointError(f"NF4 data for {name!r} should be {(n + 1) // 2} packed bytes for shape "
                              f"{tuple(shape)}, got {got}")
    nblocks = -(-n // blocksize)
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != nblocks:
        got = tuple(absmax.shape) if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise bad(name, f"absmax should hold {nblocks} block scales, got {got}")
    return n


def _as_bytes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The packed indices as uint8 (bitsandbytes may store them in another dtype: quant_storage)."""
    b = packed.detach().contiguous().reshape(-1)
    if b.dtype != torch.uint8:
        b = b.view(torch.uint8)
    return b[: (n + 1) // 2]


def _nested(name: str, qabsmax: torch.Tensor, offset, absmax2, code2, bs2, bad) -> torch.Tensor:
    if qabsmax.dtype != torch.uint8:
        raise bad(name, f"nested absmax must be uint8 indices, got {qabsmax.dtype}")
    if not isinstance(code2, torch.Tensor) or code2.numel() != 256:
        raise bad(name, "the nested code table should have 256 values")
    if (not isinstance(bs2, int) or isinstance(bs2, bool) or bs2 <= 0 or not isinstance(absmax2, torch.Tensor)
            or absmax2.numel() != -(-qabsmax.numel() // bs2)):
        raise bad(name, f"nested absmax/blocksize do not cover {qabsmax.numel()} blocks")
    if isinstance(offset, torch.Tensor) and offset.numel() == 1:
        offset = offset.detach().float().reshape(())
    elif isinstance(offset, (float, int)) and not isinstance(offset, bool):
        offset = torch.tensor(float(offset), dtype=torch.float32)
    else:
        raise bad(name, f"nested offset should be a number, got {type(offset).__name__}")
    if not bool(torch.isfinite(offset)):
        raise bad(name, "nested offset is not finite")
    return decode_nested_absmax(qabsmax, absmax2, code2, bs2, offset)


def parse_list_state(name: str, data, state) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, tuple]:
    """Layout 1: (packed bytes, fp32 absmax, code, blocksize, shape) from the 0.41 quant_state list."""
    if not isinstance(state, (list, tuple)) or len(state) != 7:
        n = len(state) if isinstance(state, (list, tuple)) else type(state).__name__
        raise _bad(name, f"got {n} items")
    absmax, shape, dtype, blocksize, nested, quant_type, code = state
    if quant_type != "nf4":
        raise _bad(name, f"quant type {quant_type!r} is not supported (only 'nf4')")
    if not isinstance(shape, (torch.Size, list, tuple)) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise _bad(name, f"shape {shape!r} is not a list of positive integers")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise _bad(name, f"dtype {dtype!r} is not a torch float dtype")
    code = _check_code(name, code, _bad)
    n = _check_sizes(name, data, shape, blocksize, absmax, _bad)
    if data.dtype != torch.uint8:
        raise CheckpointError(f"NF4 data for {name!r} should be uint8, got {data.dtype}")
    if nested is None:
        if not absmax.is_floating_point():
            raise _bad(name, f"plain absmax must be floating point, got {absmax.dtype}")
        am = absmax.detach().float().reshape(-1)
    else:
        if (not isinstance(nested, (list, tuple)) or len(nested) != 2 or not isinstance(nested[1], (list, tuple))
                or len(nested[1]) < 3):
            raise _bad(name, "nested statistics should be [offset, [absmax2, code2, blocksize2, ...]]")
        am = _nested(name, absmax, nested[0], *nested[1][:3], _bad)
    return _as_bytes(data, n), am, code, blocksize, tuple(shape)


def parse_hf_state(name: str, parts: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, tuple]:
    """Layout 2: the same from transformers' `weight`, `weight.absmax`, ..., `weight.quant_state.*`."""
    meta_t = parts["qs"]
    try:
        meta = json.loads(bytes(meta_t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise _bad_hf(name, "quant_state.bitsandbytes__nf4 is not bitsandbytes' packed JSON") from None
    if not isinstance(meta, dict):
        raise _bad_hf(name, "quant_state.bitsandbytes__nf4 is not a JSON object")
    if meta.get("quant_type") != "nf4":
        raise _bad_hf(name, f"quant type {meta.get('quant_type')!r} is not supported (only 'nf4')")
    shape, blocksize = meta.get("shape"), meta.get("blocksize")
    if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise _bad_hf(name, f"shape {shape!r} is not a list of positive integers")
    code = _check_code(name, parts.get("quant_map"), _bad_hf)
    absmax = parts["absmax"]
    n = _check_sizes(name, parts["weight"], shape, blocksize, absmax, _bad_hf)
    if "nested_blocksize" in meta:
        for k in ("nested_absmax", "nested_quant_map"):
            if k not in parts:
                raise _bad_hf(name, f"nested statistics without weight.{k}")
        am = _nested(name, absmax, meta.get("nested_offset"), parts["nested_absmax"], parts["nested_quant_map"],
                     meta["nested_blocksize"], _bad_hf)
    else:
        if not absmax.is_floating_point():
            raise _bad_hf(name, f"plain absmax must be floating point, got {absmax.dtype}")
        am = absmax.float().reshape(-1)
    return _as_bytes(parts["weight"], n), am, code, blocksize, tuple(shape)


def dequantize_nf4(name: str, data: torch.Tensor, state) -> torch.Tensor:
    """One layout-1 NF4 tensor back to float32 in its original shape, checking every field of `state`."""
    packed, am, code, bs, shape = parse_list_state(name, data, state)
    return dequantize_packed(packed, am, code, bs, shape)


# ---- which layout a folder holds -----------------------------------------------------------

def hf_quantization_config(path: Path) -> dict | None:
    """config.json's ``quantization_config`` (transformers), or None."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return raw.get("quantization_config") if isinstance(raw, dict) else None


def check_hf_quantization_config(q) -> None:
    """Refuse, in one line, the transformers quantization configs this runtime does not read."""
    if not isinstance(q, dict):
        raise CheckpointError(f"config.json `quantization_config` must be an object, got {q!r}")
    method = q.get("quant_method")
    if method != "bitsandbytes":
        raise CheckpointError(f"config.json `quantization_config.quant_method` is {method!r}: this runtime reads "
                              "bitsandbytes NF4 checkpoints, `codeshell quantize` folders and GGUF files")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise CheckpointError("bitsandbytes 8-bit (LLM.int8) checkpoints are not supported; "
                              "only 4-bit NF4 (load_in_4bit, bnb_4bit_quant_type 'nf4')")
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        raise CheckpointError("config.json `quantization_config` (bitsandbytes) has neither load_in_4bit nor "
                              "load_in_8bit set")
    qt = q.get("bnb_4bit_quant_type", "fp4")
    if qt != "nf4":
        raise CheckpointError(f"bitsandbytes 4-bit quant type {qt!r} is not supported; only 'nf4'")


def nf4_layout(path: Path) -> str | None:
    """"transformers" (safetensors + quantization_config), "list" (bitsandbytes 0.41 pickled lists) or None."""
    q = hf_quantization_config(path)
    if q is not None:
        check_hf_quantization_config(q)
        return "transformers"
    index = path / "pytorch_model.bin.index.json"
    if index.exists():
        try:
            keys = json.loads(index.read_text())["weight_map"].keys()
        except Exception:
            return None
        return "list" if any(k.endswith(_SUFFIX_STATE) for k in keys) else None
    try:
        files = weight_files(path)
    except CheckpointError:
        return None
    if len(files) != 1 or files[0].suffix != ".bin":
        return None
    try:
        sd = torch.load(str(files[0]), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None  # the regular loader reports unreadable files
    ok = isinstance(sd, dict) and any(isinstance(k, str) and k.endswith(_SUFFIX_STATE) for k in sd)
    return "list" if ok else None


def is_nf4_checkpoint(path: Path) -> bool:
    """Whether a checkpoint folder holds bitsandbytes NF4 weights (either layout)."""
    return nf4_layout(path) is not None


# ---- loading -------------------------------------------------------------------------------

def _split_name(name: str) -> tuple[str, str] | None:
    """(module prefix, part) for an NF4 tensor name of either layout, else None."""
    for suffix, part in ((_SUFFIX_DATA, "data"), (_SUFFIX_STATE, "state")):
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    head, sep, tail = name.rpartition(".weight.")
    if sep:
        if tail in _HF_PARTS:
            return head, tail
        if tail.startswith(_HF_QS):
            return head, "qs"
    return None


def _bigcode_rows_to_fused(name: str, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                           shape: tuple, cfg: CodeShellConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt_bigcode MHA's c_attn rows per head [q|k|v] -> [all q | all k | all v], on NF4 rows.

    A row permutation moves whole blocks only when every block lies inside one row."""
    n_rows, k = shape
    if k % blocksize:
        raise CheckpointError(f"NF4 weight {name!r}: gpt_bigcode's per-head q|k|v rows can be reordered only "
                              f"when the block size {blocksize} divides the width {k}")
    rows = _bigcode_qkv_to_fused(torch.arange(n_rows), cfg)
    return (packed.reshape(n_rows, k // 2)[rows].reshape(-1),
            absmax.reshape(n_rows, k // blocksize)[rows].reshape(-1))


def _has_nested(qs: torch.Tensor) -> bool:
    """Whether a ``quant_state.bitsandbytes__nf4`` tensor (packed JSON) announces nested statistics."""
    return b'"nested_blocksize"' in bytes(qs.reshape(-1).to(torch.uint8).tolist())


def nf4_hook(model: nn.Module, cfg: CodeShellConfig, layout: str, scheme: QuantScheme | None) -> LoadHook:
    """A loader hook gathering each block linear's NF4 tensors and filling its module.

    With `scheme` None the modules are `NF4Linear`s and keep NF4; otherwise the dequantized
    weight is re-quantized into the scheme's int8/int4 module."""
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    pending: dict[str, dict[str, object]] = {}

    def module_for(prefix: str, name: str) -> QuantLinear:
        m = qmods.get(prefix)
        if m is None:
            raise CheckpointError(f"NF4 tensor {name!r} is not a block linear of this model "
                                  f"(expected transformer.h.N.attn.c_attn/c_proj or mlp.c_fc/c_proj)")
        return m

    def complete(entry: dict) -> bool:
        if layout == "list":
            return "data" in entry and "state" in entry
        if not {"weight", "qs", "absmax", "quant_map"} <= entry.keys():
            return False
        return not _has_nested(entry["qs"]) or {"nested_absmax", "nested_quant_map"} <= entry.keys()

    def hook(name: str, t) -> list[str] | None:
        split = _split_name(name)
        if split is None and layout == "transformers" and name.endswith(".weight"):
            prefix = name[: -len(".weight")]
            if prefix in qmods:
                split = (prefix, "weight")
        if split is None:
            return None
        prefix, part = split
        m = module_for(prefix, name)
        if layout == "transformers" and part == "weight" and isinstance(t, torch.Tensor) \
                and t.is_floating_point() and t.dim() == 2 and t.shape[1] > 1:
            raise CheckpointError(f"{name!r} is not quantized in this checkpoint (llm_int8_skip_modules?); "
                                  "checkpoints that leave block linears unquantized are not supported")
        entry = pending.setdefault(prefix, {})
        entry[part] = t
        if not complete(entry):
            return []
        del pending[prefix]
        wname = prefix + ".weight"
        if layout == "list":
            packed, am, code, bs, shape = parse_list_state(wname, entry["data"], entry["state"])
        else:
            packed, am, code, bs, shape = parse_hf_state(wname, entry)
        want = (m.out_features, m.in_features)
        if len(shape) != 2 or tuple(shape) != want:
            raise CheckpointError(f"NF4 weight {wname!r} has shape {tuple(shape)}, expected {want} from config.json")
        if cfg.bigcode_interleaved_qkv and prefix.endswith("attn.c_attn"):
            packed, am = _bigcode_rows_to_fused(wname, packed, am, bs, shape, cfg)
        if isinstance(m, NF4Linear):
            m.set_nf4(packed, am, code, bs)
            return [f"{prefix}.qweight", f"{prefix}.absmax", f"{prefix}.code"]
        w = dequantize_packed(packed, am, code, bs, shape)
        m.set_weight(w)
        del w
        _trim_heap()
        return _filled(prefix, m)

    def missing() -> list[str]:
        """File names of the parts of weights that started arriving but never completed."""
        out = []
        for prefix, entry in pending.items():
            if layout == "list":
                want = {"data": _SUFFIX_DATA, "state": _SUFFIX_STATE}
            else:
                want = {"weight": ".weight", "qs": f".weight.{_HF_QS}nf4", "absmax": ".weight.absmax",
                        "quant_map": ".weight.quant_map"}
                if "qs" in entry and _has_nested(entry["qs"]):
                    want.update(nested_absmax=".weight.nested_absmax", nested_quant_map=".weight.nested_quant_map")
            out += [prefix + suffix for part, suffix in want.items() if part not in entry]
        return out

    hook.missing = missing  # type: ignore[attr-defined]
    return hook


def load_nf4(path: Path, cfg: CodeShellConfig, dtype: torch.dtype, device: str | torch.device,
             scheme: QuantScheme | None) -> tuple[nn.Module, CodeShellConfig]:
    """Load an NF4 folder: as NF4 (`scheme` None, bitsandbytes' numbers) or re-quantized to `scheme`."""
    from ..weights import load_state_into
    layout = nf4_layout(path)
    if layout is None:
        raise CheckpointError(f"{path} is not a bitsandbytes NF4 checkpoint")
    if scheme is None:
        model = build_nf4_empty(cfg, dtype, device)
    else:
        model = build_quantized_empty(cfg, dtype, scheme, device)
    hook = nf4_hook(model, cfg, layout, scheme)
    try:
        load_state_into(model, path, cfg, hook=hook)
    except CheckpointError as e:
        lost = hook.missing()
        if lost and "is missing tensor(s)" in str(e):  # name the file's tensors, not our modules' buffers
            more = f" (and {len(lost) - 5} more)" if len(lost) > 5 else ""
            raise CheckpointError(f"NF4 checkpoint {path} is missing tensor(s): {', '.join(lost[:5])}{more}") from None
        raise
    finalize(model)
    if scheme is not None:
        return model, cfg.replace(quantization=scheme.to_dict())
    first = next(m for m in model.modules() if isinstance(m, NF4Linear))
    return model, cfg.replace(quantization={"method": METHOD, "layout": layout, "blocksize": first.blocksize})


# ---- writing layout 1 (fixtures) -----------------------------------------------------------

def _bnb():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise CheckpointError("writing NF4 checkpoints needs bitsandbytes (pip install bitsandbytes)") from None
    return bnbf


def quant_state_as_list(qs) -> list:
    """A bitsandbytes ``QuantState`` as the list bitsandbytes 0.41 pickled (layout 1)."""
    nested = None
    if qs.nested:
        s2 = qs.state2
        nested = [qs.offset, [s2.absmax, s2.code, s2.blocksize, False, s2.dtype, None, None]]
    return [qs.absmax, torch.Size(qs.shape), qs.dtype, qs.blocksize, nested, qs.quant_type, qs.code]


def write_nf4_checkpoint(src_state: dict[str, torch.Tensor], cfg: CodeShellConfig, out: str | Path,
                         nested: bool = True) -> Path:
    """Write a CodeShell-7B-Chat-int4-layout folder from float tensors, quantized by bitsandbytes.

    As the released quantizer did (bitsandbytes 0.41 ``Params4bit.cuda`` on the bfloat16
    checkpoint): each block linear's weight, rounded to bfloat16, is cast to float16 and
    quantized with ``quantize_4bit(blocksize=64, quant_type='nf4', compress_statistics=nested)``;
    its bytes go to ``<name>.data`` and its state, as 0.41's list, to ``<name>.quant_state``.
    Everything else is stored in bfloat16, plus what the released loader (its quantizer.py's
    ``load_state_dict_for_quantized_model``) reads besides: ``lm_head.weight`` when the head is
    tied and each layer's ``attn.rotary_emb.inv_freq``.
    """
    bnbf = _bnb()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    linears = {f"transformer.h.{i}.{n}.weight" for i in range(cfg.n_layer) for n in BLOCK_LINEARS}
    sd: dict[str, object] = {}
    for name, t in src_state.items():
        if name in linears:
            data, qs = bnbf.quantize_4bit(t.detach().to(torch.bfloat16).half().contiguous(), blocksize=64,
                                          compress_statistics=nested, quant_type="nf4")
            sd[name + ".data"], sd[name + ".quant_state"] = data, quant_state_as_list(qs)
        else:
            sd[name] = t.to(torch.bfloat16)
    if "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    if cfg.position_embedding_type == "rope":  # the official model's rotary buffer, float32
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d))
        for i in range(cfg.n_layer):
            sd[f"transformer.h.{i}.attn.rotary_emb.inv_freq"] = inv_freq.clone()
    torch.save(sd, out / "pytorch_model.bin")
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_dtype": "bfloat16"}, indent=2))
    return out
