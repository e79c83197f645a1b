"""The official ``CodeShell-7B-Chat-int4`` checkpoint: bitsandbytes NF4, read without bitsandbytes.

That checkpoint is one ``pytorch_model.bin`` in which every block linear is stored as
``<name>.weight.data`` (uint8 [ceil(n/2), 1], two 4-bit indices per byte, high nibble first,
over the row-major flattened [out, in] weight) and ``<name>.weight.quant_state``, the list
bitsandbytes 0.40 kept for a 4-bit tensor:

    [absmax, shape, dtype, blocksize, nested, quant_type, code]

``absmax`` is one float32 scale per ``blocksize`` (64) values, or, with nested ("double
quant") statistics, uint8 indices and ``nested = [offset, [absmax2, code2, blocksize2, ...]]``
where absmax = code2[index] * absmax2[block of blocksize2] + offset; ``quant_type`` is
"nf4" and ``code`` the 16 NF4 levels; w = code[index] * absmax[block]. Everything else is
bfloat16. The pickled list holds only tensors, ``torch.Size``, a ``torch.dtype``, ints,
strings, None and a bool, all on torch's default ``weights_only`` allow-list, so the file is
read with ``torch.load(weights_only=True)`` and no extra globals.

We re-quantize each dequantized weight into our int4 format (groups of 64 with zero points by
default) as it streams in; NF4 is never run directly. `write_nf4_checkpoint` makes test
fixtures in the same layout (our own NF4 quantizer, following bitsandbytes' definitions).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..config import CodeShellConfig
from ..weights import CheckpointError, LoadHook, weight_files
from .linear import QuantLinear
from .load import _trim_heap
from .scheme import QuantScheme

# bitsandbytes' NF4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
DEFAULT_TARGET = QuantScheme(bits=4, group_size=64, symmetric=False)
_SUFFIX_DATA, _SUFFIX_STATE = ".weight.data", ".weight.quant_state"


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic-exponent code (256 sorted values in [-1, 1]) for nested absmax."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        n = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        b = torch.linspace(0.1, 1, n)
        means = ((b[:-1] + b[1:]) / 2.0) * 10 ** (-(max_exponent_bits - 1) + i)
        data += means.tolist()
        if signed:
            data += (-means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data))


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of sorted `code` for each element of x."""
    mid = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x.contiguous(), mid)


class QuantStateError(CheckpointError):
    """A ``.weight.quant_state`` entry that does not follow the bitsandbytes NF4 layout."""


def _bad(name: str, what: str) -> QuantStateError:
    return QuantStateError(f"corrupt NF4 quant_state for {name!r}: {what} (expected the bitsandbytes "
                           "list [absmax, shape, dtype, blocksize, nested stats or None, 'nf4', code])")


def _absmax(name: str, state: list, nblocks: int) -> torch.Tensor:
    absmax, nested = state[0], state[4]
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != nblocks:
        got = tuple(absmax.shape) if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise _bad(name, f"absmax should hold {nblocks} block scales, got {got}")
    if nested is None:
        if not absmax.is_floating_point():
            raise _bad(name, f"plain absmax must be floating point, got {absmax.dtype}")
        return absmax.reshape(-1).float()
    if (not isinstance(nested, (list, tuple)) or len(nested) != 2 or not isinstance(nested[1], (list, tuple))
            or len(nested[1]) < 3):
        raise _bad(name, "nested statistics should be [offset, [absmax2, code2, blocksize2, ...]]")
    offset, (absmax2, code2, bs2) = nested[0], nested[1][:3]
    if absmax.dtype != torch.uint8:
        raise _bad(name, f"nested absmax must be uint8 indices, got {absmax.dtype}")
    if not isinstance(code2, torch.Tensor) or code2.numel() != 256:
        raise _bad(name, "the nested code table should have 256 values")
    if not isinstance(bs2, int) or bs2 <= 0 or not isinstance(absmax2, torch.Tensor) \
            or absmax2.numel() != math.ceil(nblocks / bs2):
        raise _bad(name, f"nested absmax2/blocksize2 do not cover {nblocks} blocks")
    off = float(offset) if isinstance(offset, (torch.Tensor, float, int)) else None
    if off is None or not math.isfinite(off):
        raise _bad(name, f"nested offset should be a number, got {type(offset).__name__}")
    scale2 = absmax2.reshape(-1).float().repeat_interleave(bs2)[:nblocks]
    return code2.float()[absmax.reshape(-1).long()] * scale2 + off


def dequantize_nf4(name: str, data: torch.Tensor, state) -> torch.Tensor:
    """One NF4 tensor back to float32 in its original shape, checking every field of `state`."""
    if not isinstance(state, (list, tuple)) or len(state) != 7:
        n = len(state) if isinstance(state, (list, tuple)) else type(state).__name__
        raise _bad(name, f"got {n} items")
    shape, dtype, blocksize, quant_type, code = state[1], state[2], state[3], state[5], state[6]
    if quant_type != "nf4":
        raise _bad(name, f"quant type {quant_type!r} is not supported (only 'nf4')")
    if not isinstance(shape, (torch.Size, list, tuple)) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise _bad(name, f"shape {shape!r} is not a list of positive integers")
    if not isinstance(dtype, torch.dtype):
        raise _bad(name, f"dtype {dtype!r} is not a torch dtype")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise _bad(name, f"blocksize {blocksize!r} is not a positive integer")
    if not isinstance(code, torch.Tensor) or code.numel() != 16:
        raise _bad(name, "the code table should have 16 values")
    n = math.prod(shape)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.numel() != (n + 1) // 2:
        got = f"{data.dtype} x {data.numel()}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise CheckpointError(f"NF4 data for {name!r} should be {(n + 1) // 2} uint8 bytes for shape "
                              f"{tuple(shape)}, got {got}")
    nblocks = math.ceil(n / blocksize)
    absmax = _absmax(name, state, nblocks)
    p = data.reshape(-1)
    idx = torch.stack((p >> 4, p & 0x0F), dim=-1).reshape(-1)[:n].long()  # high nibble first
    w = code.float()[idx] * absmax.repeat_interleave(blocksize)[:n]
    return w.reshape(tuple(shape))


def quantize_nf4(w: torch.Tensor, nested: bool, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, list]:
    """bitsandbytes-style NF4 of w: (data uint8 [ceil(n/2), 1], quant_state list)."""
    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    idx = _nearest(blocks / absmax.clamp(min=1e-12)[:, None], NF4_CODE).reshape(-1)[:n].to(torch.uint8)
    if n % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    data = ((idx[0::2] << 4) | idx[1::2]).reshape(-1, 1)
    stats = None
    if nested:
        offset = absmax.mean()
        a = absmax - offset
        code2 = dynamic_map()
        nb = a.numel()
        a_pad = torch.cat([a, a.new_zeros((-nb) % NESTED_BLOCKSIZE)]).view(-1, NESTED_BLOCKSIZE)
        absmax2 = a_pad.abs().amax(dim=1).clamp(min=1e-12)
        qa = _nearest(a_pad / absmax2[:, None], code2).reshape(-1)[:nb].to(torch.uint8)
        stats = [offset, [absmax2, code2, NESTED_BLOCKSIZE, False, torch.float32, None, None]]
        absmax = qa
    state = [absmax, torch.Size(w.shape), w.dtype, blocksize, stats, "nf4", NF4_CODE.clone()]
    return data, state


def is_nf4_checkpoint(path: Path) -> bool:
    """Whether a checkpoint folder stores `.weight.quant_state` entries (bitsandbytes 4-bit)."""
    index = path / "pytorch_model.bin.index.json"
    if index.exists():
        try:
            keys = json.loads(index.read_text())["weight_map"].keys()
        except Exception:
            return False
        return any(k.endswith(_SUFFIX_STATE) for k in keys)
    files = weight_files(path)
    if len(files) != 1 or files[0].suffix != ".bin":
        return False
    try:
        sd = torch.load(str(files[0]), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False  # the regular loader reports unreadable files
    return isinstance(sd, dict) and any(isinstance(k, str) and k.endswith(_SUFFIX_STATE) for k in sd)


def nf4_hook(model: nn.Module, cfg: CodeShellConfig, scheme: QuantScheme) -> LoadHook:
    """A loader hook pairing `.weight.data` with `.weight.quant_state` and re-quantizing them."""
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    pending: dict[str, dict[str, object]] = {}

    def hook(name: str, t) -> list[str] | None:
        for suffix, key in ((_SUFFIX_DATA, "data"), (_SUFFIX_STATE, "state")):
            if name.endswith(suffix):
                prefix = name[: -len(suffix)]
                break
        else:
            return None
        m = qmods.get(prefix)
        if m is None:
            raise CheckpointError(f"NF4 tensor {name!r} is not a block linear of this model "
                                  f"(expected transformer.h.N.attn.c_attn/c_proj or mlp.c_fc/c_proj)")
        entry = pending.setdefault(prefix, {})
        entry[key] = t
        if len(entry) < 2:
            return []
        del pending[prefix]
        w = dequantize_nf4(prefix + ".weight", entry["data"], entry["state"])
        if tuple(w.shape) != (m.out_features, m.in_features):
            raise CheckpointError(f"NF4 weight {prefix!r} has shape {tuple(w.shape)}, expected "
                                  f"{(m.out_features, m.in_features)} from config.json")
        m.set_weight(w)
        del w
        _trim_heap()
        filled = [f"{prefix}.qweight", f"{prefix}.scales"]
        return filled + ([f"{prefix}.zeros"] if getattr(m, "zeros", None) is not None else [])

    return hook


def write_nf4_checkpoint(src_state: dict[str, torch.Tensor], cfg: CodeShellConfig, out: str | Path,
                         nested: bool = True) -> Path:
    """Write a CodeShell-7B-Chat-int4-layout folder from float tensors (test fixtures, demos)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd: dict[str, object] = {}
    for name, t in src_state.items():
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and prefix.rsplit(".", 2)[-2:] in (["attn", "c_attn"], ["attn", "c_proj"],
                                                                        ["mlp", "c_fc"], ["mlp", "c_proj"]):
            data, state = quantize_nf4(t.to(torch.bfloat16), nested)
            sd[name + ".data"], sd[name + ".quant_state"] = data, state
        else:
            sd[name] = t.to(torch.bfloat16)
    torch.save(sd, out / "pytorch_model.bin")
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_dtype": "bfloat16"}, indent=2))
    return out
