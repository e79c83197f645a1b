"""Packed weight formats for `codeshell.kernels.linear`, and their plain-PyTorch reference dequantisers.

What this is: the one-time, load-time step that turns a linear layer's weight W[N, K]
(out_features x in_features, as in nn.Linear) into a `PackedWeight` the kernels read:

* ``bf16``: W in panels of 16 rows and pairs of columns, bfloat16 ``data``
  [P = ceil(N/16), Kp/2, 32] with Kp = K rounded up to 32 (zero past N and past K). For panel p
  and k-pair j the 32 values are (row 16p+i, column 2j+h) at position 2i+h. One 64-byte load
  is then 16 rows of (k, k+1) pairs: vdpbf16ps's operand as is, and 16 consecutive k-pairs
  are one AMX-BF16 B tile (1 KiB); on AVX2 a 32-byte load gives 8 rows of even k (v << 16)
  and of odd k (v & 0xffff0000) in fp32 (csrc/panel_bf16.cpp).
  `bf16_rows` turns selected rows back into a plain [rows, K] tensor (embedding lookups).
* ``int8``: per-output-channel symmetric: ``W ~= q[N, K] (int8, -127..127) * scales[N]``.
* ``int4``: group-wise along K, group size G in {32, 64, 128, ...} (multiple of 32 dividing K):
  ``W[n, k] ~= (nib[n, k] - 8) * scales[n, g] + offsets[n, g]`` with g = k // G and
  nib in 0..15. Symmetric quantisation has no offsets (None). An integer zero point z
  (``W = (nib - z) * s``) is the same thing with ``offsets = (8 - z) * s``; this is also
  torch's ``_weight_int4pack_mm`` convention (``(q - 8) * scale + zero``).
  Byte layout ``data`` uint8 [N, K/2]: each run of 32 weights k0..k0+31 is 16 bytes,
  byte i = nib[k0 + i] | nib[k0 + 16 + i] << 4 (so the AVX2 kernel unpacks with one mask
  and one shift per 32 weights).

What this is not: a quantisation-aware algorithm (GPTQ/AWQ live elsewhere); these are
round-to-nearest quantisers used for tests, benchmarks and as a simple default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("bf16", "int8", "int4")


@dataclass
class PackedWeight:
    """A linear weight in one of the `KINDS` layouts (see module docstring); build with
    `prepack`, `quantize_int8` or `quantize_int4`, never by hand."""

    kind: str
    out_features: int  # N
    in_features: int  # K
    data: torch.Tensor
    scales: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    group_size: int | None = None

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K] this packing represents (the reference for every kernel)."""
        return dequantize(self)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.offsets) if t is not None)

    def __repr__(self) -> str:
        g = f", group_size={self.group_size}, symmetric={self.offsets is None}" if self.kind == "int4" else ""
        return f"PackedWeight({self.kind}, out_features={self.out_features}, in_features={self.in_features}{g})"


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if weight.device.type != "cpu":
        raise ValueError(f"codeshell.kernels works on CPU tensors, weight is on {weight.device}")


PANEL = 16
K_ALIGN = 32  # bf16 panels hold K rounded up to this (one AMX tile depth)


def padded_k(k: int) -> int:
    """Columns a bf16 panel holds for in_features k (k rounded up to `K_ALIGN`)."""
    return -(-k // K_ALIGN) * K_ALIGN


def prepack(weight: torch.Tensor) -> PackedWeight:
    """bf16 panel packing of W[N, K] (any float dtype in; rounded to bfloat16). A copy: the
    caller may free `weight` afterwards."""
    _check_weight(weight)
    n, k = weight.shape
    w = weight.detach().to(torch.bfloat16).contiguous()
    from . import _ext, hugepages
    mod = _ext.get()
    # on huge pages: decode streams these panels every token (hugepages.py says why)
    return PackedWeight("bf16", n, k, hugepages.resident(panels_torch(w) if mod is None else mod.pack_bf16(w)))


def panels_torch(w: torch.Tensor) -> torch.Tensor:
    """The bf16 panel layout [P, Kp/2, 32] of W [N, K] in torch ops (the reference for the
    native `pack_bf16`, and the path without it)."""
    n, k = w.shape
    p, kp = -(-n // PANEL), padded_k(k)
    w = torch.nn.functional.pad(w.to(torch.bfloat16), (0, kp - k, 0, p * PANEL - n))
    # [P, i, j, h] -> [P, j, i, h]: position 2i + h of k-pair j holds W[16p + i, 2j + h]
    return w.reshape(p, PANEL, kp // 2, 2).permute(0, 2, 1, 3).contiguous().reshape(p, kp // 2, 2 * PANEL)


def bf16_rows(p: PackedWeight, rows: torch.Tensor | slice) -> torch.Tensor:
    """bf16 rows [len(rows), K] of a bf16 `PackedWeight` (a gather: cost is the rows read)."""
    if p.kind != "bf16":
        raise ValueError(f"bf16_rows takes a bf16 PackedWeight, got {p.kind}")
    idx = torch.arange(p.out_features)[rows] if isinstance(rows, slice) else rows
    d = p.data.view(p.data.shape[0], p.data.shape[1], PANEL, 2)
    return d[idx // PANEL, :, idx % PANEL, :].reshape(idx.numel(), -1)[:, : p.in_features]


def quantize_int8(weight: torch.Tensor) -> PackedWeight:
    """Symmetric per-output-channel int8: scale[n] = max|W[n, :]| / 127, round to nearest."""
    _check_weight(weight)
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return PackedWeight("int8", w.shape[0], w.shape[1], q, scales.contiguous())


def quantize_int4(weight: torch.Tensor, group_size: int = 128, symmetric: bool = True) -> PackedWeight:
    """Group-wise int4 along K. Symmetric: q in -8..7, scale = max|W_g| / 7, no offsets.
    Asymmetric: scale = (max - min) / 15, integer zero point z = round(-min / scale) in 0..15,
    stored as offsets = (8 - z) * scale."""
    _check_weight(weight)
    n, k = weight.shape
    if group_size <= 0 or group_size % 32 or k % group_size:
        raise ValueError(f"int4 group_size={group_size} must be a positive multiple of 32 that divides "
                         f"in_features={k}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scales = (w.abs().amax(dim=2) / 7.0).clamp_min(tiny)
        nib = torch.round(w / scales[..., None]).clamp_(-8, 7) + 8
        offsets = None
    else:
        lo, hi = w.amin(dim=2), w.amax(dim=2)
        scales = ((hi - lo) / 15.0).clamp_min(tiny)
        zero = torch.round(-lo / scales).clamp_(0, 15)
        nib = (torch.round(w / scales[..., None]) + zero[..., None]).clamp_(0, 15)
        offsets = ((8.0 - zero) * scales).contiguous()
    data = pack_nibbles(nib.reshape(n, k).to(torch.uint8))
    return PackedWeight("int4", n, k, data, scales.contiguous(), offsets, group_size)


def int4_from_parts(data: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                    group_size: int) -> PackedWeight:
    """PackedWeight from already-quantised int4 parts (e.g. loaded from a checkpoint): data uint8
    [N, K/2] in the layout above (GGUF Q4_0 blocks use the same nibble order: Q4_0 is
    symmetric, group 32, scale d -> scales = d, offsets None), scales [N, K/G], offsets [N, K/G]
    or None. For an integer zero point z pass offsets = (8 - z) * scales."""
    if data.dtype != torch.uint8 or data.dim() != 2:
        raise ValueError(f"int4 data must be uint8 [N, K/2], got {data.dtype} {tuple(data.shape)}")
    n, k = data.shape[0], data.shape[1] * 2
    if group_size <= 0 or group_size % 32 or k % group_size:
        raise ValueError(f"int4 group_size={group_size} must be a positive multiple of 32 that divides K={k}")
    shape = (n, k // group_size)
    for name, t in (("scales", scales), ("offsets", offsets)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"int4 {name} must have shape {shape}, got {tuple(t.shape)}")
    return PackedWeight("int4", n, k, data.contiguous(), scales.float().contiguous(),
                        None if offsets is None else offsets.float().contiguous(), group_size)


def int8_from_parts(q: torch.Tensor, scales: torch.Tensor) -> PackedWeight:
    """PackedWeight from int8 q [N, K] and per-output-channel scales [N] (W = q * scales[:, None])."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"int8 weight must be int8 [N, K], got {q.dtype} {tuple(q.shape)}")
    if tuple(scales.shape) != (q.shape[0],):
        raise ValueError(f"int8 scales must have shape ({q.shape[0]},), got {tuple(scales.shape)}")
    return PackedWeight("int8", q.shape[0], q.shape[1], q.contiguous(), scales.float().contiguous())


def pack_nibbles(nib: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles [N, K] (values 0..15, K % 32 == 0) -> packed bytes [N, K/2] (layout above)."""
    n, k = nib.shape
    if k % 32:
        raise ValueError(f"in_features={k} must be a multiple of 32 for int4 packing")
    v = nib.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (v[:, :, 0, :] | (v[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()


def unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: bytes [N, K/2] -> uint8 nibbles [N, K]."""
    n, half = data.shape
    v = data.reshape(n, half // 16, 1, 16)
    return torch.cat([v & 0x0F, v >> 4], dim=2).reshape(n, half * 2)


def dequantize(p: PackedWeight) -> torch.Tensor:
    """Plain-PyTorch reference: the fp32 weight [N, K] of any PackedWeight."""
    if p.kind == "bf16":
        return bf16_rows(p, slice(None)).float()
    if p.kind == "int8":
        return p.data.float() * p.scales[:, None]
    if p.kind == "int4":
        n, k, g = p.out_features, p.in_features, p.group_size
        q = unpack_nibbles(p.data).float().reshape(n, k // g, g) - 8.0
        w = q * p.scales[..., None]
        if p.offsets is not None:
            w = w + p.offsets[..., None]
        return w.reshape(n, k)
    raise ValueError(f"unknown PackedWeight kind {p.kind!r}; expected one of {KINDS}")


# ---- int8 activations (what the integer-dot decode kernels compute with) ------------------


def activation_block(p: PackedWeight) -> int | None:
    """Block size along K in which the integer-dot decode kernel quantises x for this weight,
    or None when that kernel does not take it (then decode is exact fp32 weight-only math).

    int4: the weight's group (K % 64 == 0, group <= 256); int8: 128, 64 or 32, the first
    dividing K. bf16 weights are never combined with quantised activations.
    """
    k = p.in_features
    if p.kind == "int4":
        return p.group_size if k % 64 == 0 and p.group_size <= 256 else None
    if p.kind == "int8":
        return next((b for b in (128, 64, 32) if k % b == 0), None)
    return None


def quantize_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 x [M, K] -> the fp32 values the integer kernels multiply with: per block of
    `block` along K, d = amax / 127 and x' = round_half_even(x * (127 / amax)) * d (int8,
    -127..127; an all-zero block stays zero). Mirrors `quantize_x` in csrc/qdot.cpp."""
    m, k = x.shape
    xb = x.float().reshape(m, k // block, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    # not `127.0 / amax`: torch evaluates a scalar over a tensor as reciprocal(amax) * 127,
    # rounded twice, which rounds a few elements differently from the kernel's 127.f / amax.
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)
    return (q * (amax / 127.0)).reshape(m, k)
