"""Weight-only quantized linears (int8 per output channel, int4 group-wise) and their math.

Each module is a drop-in for ``nn.Linear``: it takes activations in the model's dtype and
returns the same dtype. Weights are stored in a plain, portable layout (what
`codeshell quantize` writes and what the reference functions read):

- int8: ``qweight`` int8 [N, K], ``scales`` float32 [N];  w = q * s
- int4: ``qweight`` uint8 [N, K/2] (column 2i in the low nibble, 2i+1 in the high one),
  ``scales`` float16 [N, K/G], optional ``zeros`` uint8 [N, K/G];  w = (q - z) * s, z = 8
  when symmetric.

`int8_linear_reference` / `int4_linear_reference` are the plain-PyTorch definitions the fast
paths are tested against. ``finalize()`` picks the fast path once per module, measured on this
project's AVX2 CPU (docs/quant.md): first `codeshell.kernels` (native integer-dot decode
kernels, which quantise activations to int8 per block for M <= 16, and for a bf16 prefill on
AMX-INT8 tiles where those measured fastest -- `activation_block` says when -- else
dequantise-plus-matmul prefill), then PyTorch's own CPU weight-only kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) when the native build is
unavailable, else dequantize-then-matmul. A finalized int4 module drops the portable copy
(unless ``keep_portable``), so it can be run but not saved back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels

# ---- quantize (float -> portable layout) -------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scales float32 [N]); symmetric, absmax per row to 127."""
    wf = w.float()
    scales = (wf.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(wf / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 (any int dtype) -> uint8 [N, K/2], even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] in 0..15 (inverse of `pack_int4`)."""
    return torch.stack((p & 0x0F, p >> 4), dim=-1).reshape(p.shape[0], -1)


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [N, K] -> (qweight uint8 [N, K/2], scales float16 [N, K/G], zeros uint8 [N, K/G] or None).

    Symmetric: s = absmax / 7, q = round(w / s) + 8 clipped to 0..15 (-8 is reachable only by
    rounding, like llama.cpp's Q4_0). Zero point: s = (max - min) / 15, z = round(-min / s).
    Scales are rounded to float16 *before* q is computed, so q is optimal for the stored scale.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"group size {group_size} does not divide the width {K}")
    g = w.float().reshape(N, K // group_size, group_size)
    if symmetric:
        s = (g.abs().amax(dim=-1) / 7.0).to(torch.float16).float()
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group: any scale
        q = torch.round(g / s[..., None]).add_(8).clamp_(0, 15)
        zeros = None
    else:
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
        s = ((hi - lo) / 15.0).to(torch.float16).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-lo / s).clamp_(0, 15)
        q = torch.round(g / s[..., None]).add_(z[..., None]).clamp_(0, 15)
        zeros = z.to(torch.uint8)
    return pack_int4(q.reshape(N, K)), s.to(torch.float16), zeros


# ---- dequantize and reference forwards ---------------------------------------------------


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (qweight.to(torch.float32) * scales.float()[:, None]).to(dtype)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(qweight).float()  # [N, K]
    N, K = q.shape
    z = 8.0 if zeros is None else zeros.float()[..., None]
    w = (q.reshape(N, K // group_size, group_size) - z) * scales.float()[..., None]
    return w.reshape(N, K).to(dtype)


def int8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: x @ (q * s)^T + b, computed in float32, returned in x's dtype."""
    y = x.float() @ dequantize_int8(qweight, scales).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int4_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor | None, group_size: int,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: x @ ((q - z) * s)^T + b, computed in float32, returned in x's dtype."""
    y = x.float() @ dequantize_int4(qweight, scales, zeros, group_size).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- torch's CPU int4 kernel layout ---------------------------------------------------------

_REPACK_MATCHES: bool | None = None  # does `_repack_32row` reproduce torch's layout on this CPU?


def _repack_32row(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] (0..15, N % 32 == 0) -> the layout torch's AVX2 int4 kernel reads:
    per tile of 32 rows, for each k, 16 bytes holding rows j (low nibble) and j + 16 (high).

    Found by probing ``_convert_weight_to_int4pack_for_cpu``; byte ops here avoid that op's
    int32 [N, K] input (4 bytes per weight) and run ~2x faster, which is most of an int4 load.
    """
    n, k = q.shape
    v = q.reshape(n // 32, 2, 16, k)
    return (v[:, 0] | (v[:, 1] << 4)).transpose(1, 2).contiguous().reshape(n, k // 2)


def to_int4_kernel_layout(qweight: torch.Tensor) -> torch.Tensor:
    """Portable int4 (uint8 [N, K/2]) -> torch's packed CPU layout for _weight_int4pack_mm_for_cpu."""
    global _REPACK_MATCHES
    q = unpack_int4(qweight)
    if _REPACK_MATCHES is None:  # other ISAs (AVX-512) tile differently: check once, by example
        probe = torch.randint(0, 16, (64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
        _REPACK_MATCHES = ref.shape == (64, 32) and torch.equal(_repack_32row(probe), ref)
    if _REPACK_MATCHES and q.shape[0] % 32 == 0:
        return _repack_32row(q)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


# ---- modules -------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class QuantLinear(nn.Module):
    """Common parts: shapes, optional bias, flattening the leading dims."""

    bits: int

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        self._per_dtype: dict[torch.dtype, torch.Tensor] = {}  # kernel-ready scales per activation dtype
        self._kernel: kernels.PackedWeight | None = None  # codeshell.kernels layout, after finalize()
        self._bias_f32: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.device.type == "cpu":  # bias fused into the kernel call
            return self._fast_linear()(x)
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _fast_linear(self) -> kernels.FastLinear:
        """kernels.linear's per-call work done once for this weight (kernels.FastLinear)."""
        fast = self.__dict__.get("_fast")
        if fast is None or fast.packed is not self._kernel or fast.bias is not self._bias_f32:
            fast = self._fast = kernels.FastLinear(self._kernel, self._bias_f32)
        return fast

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """[M, N] as the kernel returns it (fp32 with the bias; bf16 on `onednn:bf16`), before
        the cast to x's dtype: the model's fused inference path rounds it where it is used."""
        if self._kernel is not None and x.device.type == "cpu":
            y = self._fast_linear().raw(x)
            if y is not None:
                return y
        return self.forward(x).reshape(-1, self.out_features)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def finalize(self) -> None:
        """Called once every buffer holds its loaded value: build kernel layouts."""
        self._per_dtype.clear()
        self._kernel = None
        self._bias_f32 = None if self.bias is None else self.bias.float().contiguous()

    @staticmethod
    def _native_ok(t: torch.Tensor | None) -> bool:
        return t is not None and t.device.type == "cpu" and kernels.available()

    def activation_block(self, m: int, x_dtype: torch.dtype = torch.float32) -> int | None:
        """Block along K in which a batch of `m` rows of x (of `x_dtype`) is rounded to int8 by
        the fast path (None: no rounding of x): decode-sized batches on the integer kernels, and
        a bf16 prefill where AMX-INT8 tiles measured fastest (`kernels.plan`). The reference of
        the fast path is `int*_linear_reference` on `codeshell.kernels.packing.quantize_activations(x, block)`."""
        if self._kernel is None or not kernels.plan(self._kernel, m, x_dtype).endswith(":q8"):
            return None
        return kernels.packing.activation_block(self._kernel)

    def kernel_tensors(self) -> list[torch.Tensor]:
        """Tensors the fast path holds outside the module's buffers (kernel layouts)."""
        k = self._kernel
        held = [] if k is None else [t for t in (k.data, k.scales, k.offsets) if t is not None]
        return held + [t for t in (getattr(self, "_packed", None), getattr(self, "_sz_f32", None)) if t is not None]


class Int8Linear(QuantLinear):
    """int8 weight [N, K] with one float32 scale per output channel."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   bias_dtype: torch.dtype = torch.float32) -> "Int8Linear":
        m = cls(weight.shape[1], weight.shape[0], bias is not None, bias_dtype)
        m.set_weight(weight)
        if bias is not None:
            m.bias.copy_(bias)
        m.finalize()
        return m

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        q, s = quantize_int8(weight)
        self.qweight.copy_(q)
        self.scales.copy_(s)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    @torch.no_grad()
    def finalize(self) -> None:
        super().finalize()
        if self._native_ok(self.qweight):  # shares qweight and scales, no copy
            # qweight moved once onto huge pages (kernels/hugepages.py): the kernels stream it every token
            self.qweight = kernels.hugepages.resident(self.qweight)
            self._kernel = kernels.int8_from_parts(self.qweight, self.scales.float().contiguous())

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device.type == "cpu" and x2.dtype in _KERNEL_DTYPES:
            s = self._per_dtype.get(x2.dtype)
            if s is None:
                s = self._per_dtype[x2.dtype] = self.scales.to(x2.dtype)
            return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, s)
        return F.linear(x2, self.dequantize(x2.dtype))


class Int4Linear(QuantLinear):
    """int4 weight in groups of `group_size` input columns, symmetric or with zero points."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = True, bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        if in_features % group_size or in_features % 2:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        self.group_size, self.symmetric = group_size, symmetric
        ng = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, ng, dtype=torch.float16, device=device))
        self.register_buffer("zeros", None if symmetric else
                             torch.empty(out_features, ng, dtype=torch.uint8, device=device))
        self._packed: torch.Tensor | None = None  # torch's CPU int4 kernel layout, after finalize()
        self._sz_f32: torch.Tensor | None = None  # [K/G, N, 2] (scale, zero) for that kernel

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, symmetric={self.symmetric}"

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 128,
                   symmetric: bool = True, bias_dtype: torch.dtype = torch.float32,
                   keep_portable: bool = False) -> "Int4Linear":
        m = cls(weight.shape[1], weight.shape[0], bias is not None, group_size, symmetric, bias_dtype)
        m.set_weight(weight)
        if bias is not None:
            m.bias.copy_(bias)
        m.finalize(keep_portable=keep_portable)
        return m

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        q, s, z = quantize_int4(weight, self.group_size, self.symmetric)
        self.qweight.copy_(q)
        self.scales.copy_(s)
        if z is not None:
            self.zeros.copy_(z)

    @property
    def fast(self) -> bool:
        return self._kernel is not None or self._packed is not None

    def kernel_ok(self) -> bool:
        """Whether torch's packed CPU int4 kernel takes this shape (measured constraints)."""
        return (self.qweight is not None and self.qweight.device.type == "cpu"
                and self.group_size in (32, 64, 128, 256) and self.out_features % 16 == 0
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))

    @torch.no_grad()
    def finalize(self, keep_portable: bool = False) -> None:
        """Repack for the CPU kernel and, unless `keep_portable`, free the portable layout."""
        super().finalize()
        self._packed = self._sz_f32 = None
        if self._native_ok(self.qweight) and self.group_size % 32 == 0:
            nib = unpack_int4(self.qweight)  # [N, K] 0..15 -> codeshell.kernels' run-of-32 layout
            s = self.scales.float()
            off = None if self.zeros is None else (8.0 - self.zeros.float()) * s
            data = kernels.hugepages.resident(kernels.pack_nibbles(nib))  # streamed every token: huge pages
            self._kernel = kernels.int4_from_parts(data, s, off, self.group_size)
            del nib
        elif self.kernel_ok():
            self._set_torch_layout()
        else:
            return
        if not keep_portable:
            self.qweight = None
            self.zeros = None

    def _set_torch_layout(self) -> None:
        self._packed = to_int4_kernel_layout(self.qweight)
        # The kernel computes (q - 8) * scale + zero; ours is (q - z) * s = (q - 8) * s + (8 - z) * s.
        s = self.scales.float()  # [N, K/G]
        zero = torch.zeros_like(s) if self.zeros is None else (8.0 - self.zeros.float()) * s
        self._sz_f32 = torch.stack((s, zero), dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.qweight is None:
            raise RuntimeError("this Int4Linear was finalized for the CPU kernel without keep_portable=True")
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x2.device.type == "cpu" and x2.dtype in _KERNEL_DTYPES:
            sz = self._per_dtype.get(x2.dtype)
            if sz is None:
                sz = self._per_dtype[x2.dtype] = self._sz_f32.to(x2.dtype)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self._packed, self.group_size, sz)
        return F.linear(x2, self.dequantize(x2.dtype))
