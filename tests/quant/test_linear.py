"""Quantized linears against their plain-PyTorch reference, and the quantizers' error bounds."""

from __future__ import annotations

import pytest
import torch

from codeshell.quant.linear import (Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, int4_linear_reference,
                                    int8_linear_reference, pack_int4, quantize_int4, quantize_int8, unpack_int4)
from codeshell.quant.scheme import QuantError, QuantScheme
from codeshell.kernels.packing import quantize_activations


def _as_run(mod, x: torch.Tensor) -> torch.Tensor:
    """x as the module's fast path multiplies it: int8-rounded per block for decode-sized
    batches on the native integer kernels (see `QuantLinear.activation_block`), else as is."""
    x2 = x.float().reshape(-1, x.shape[-1])
    block = mod.activation_block(x2.shape[0])
    return (x2 if block is None else quantize_activations(x2, block)).reshape(x.shape)


def _w(n=64, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g) * 0.1


def test_pack_roundtrip():
    q = torch.randint(0, 16, (48, 64), dtype=torch.uint8)
    p = pack_int4(q)
    assert p.shape == (48, 32) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p), q)
    assert int(p[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)


def test_int8_quantize_error_is_half_a_step():
    w, _ = _w()
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    assert int(q.abs().max()) == 127


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_quantize_error_is_bounded(group, symmetric):
    w, _ = _w()
    q, s, z = quantize_int4(w, group, symmetric)
    assert (z is None) == symmetric and s.dtype == torch.float16 and s.shape == (64, 256 // group)
    deq = dequantize_int4(q, s, z, group)
    step = s.float().repeat_interleave(group, dim=1)
    # Within half a step inside the grid; at the edges (symmetric: +7 steps; zero point: the
    # rounded zero shifts the grid) clipping adds at most another half step.
    assert ((deq - w).abs() <= step + 1e-6).all()
    assert ((deq - w).abs() <= step / 2 + 1e-6).float().mean() > 0.97
    rel = (deq - w).norm() / w.norm()
    assert rel < 0.12  # gaussian weights: about 9-10% for both variants


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_int8_module_matches_reference(dtype, m):
    w, b = _w()
    mod = Int8Linear.from_float(w, b)
    x = torch.randn(2, m, 256).to(dtype)
    ref = int8_linear_reference(_as_run(mod, x), mod.qweight, mod.scales, mod.bias)
    y = mod(x)
    assert y.dtype == dtype and y.shape == (2, m, 64)
    tol = 1e-4 if dtype == torch.float32 else 3e-2 * ref.abs().max().item()
    torch.testing.assert_close(y.float(), ref, atol=tol, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 4, 21])  # decode (int8 activations on the native path), prefill
def test_int4_module_matches_reference(dtype, group, symmetric, rows):
    w, b = _w()
    mod = Int4Linear.from_float(w, b, group_size=group, symmetric=symmetric, keep_portable=True)
    assert mod.fast, "a fast CPU int4 kernel should take this shape"
    x = torch.randn(rows, 1, 256).to(dtype)
    ref = int4_linear_reference(_as_run(mod, x), mod.qweight, mod.scales, mod.zeros, group, mod.bias)
    y = mod(x)
    assert y.dtype == dtype
    scale = ref.abs().max().item()
    # bf16: activations, scales and zero offsets are rounded to bf16 inside the kernel.
    tol = 2e-5 * scale + 1e-5 if dtype == torch.float32 else 2e-2 * scale
    assert (y.float() - ref).abs().max().item() <= tol


def test_int4_fallback_path_matches_reference():
    """Group 16 and widths the kernel refuses run through dequantize + matmul."""
    w, b = _w(n=24, k=48)
    mod = Int4Linear.from_float(w, b, group_size=16, symmetric=False)
    assert not mod.fast
    x = torch.randn(4, 48)
    ref = int4_linear_reference(x, mod.qweight, mod.scales, mod.zeros, 16, mod.bias)
    torch.testing.assert_close(mod(x), ref, atol=1e-5, rtol=1e-5)


def test_finalized_int4_frees_portable_copy():
    w, b = _w()
    mod = Int4Linear.from_float(w, b, group_size=128)
    assert mod.qweight is None and mod.fast
    with pytest.raises(RuntimeError, match="keep_portable"):
        mod.dequantize()


@pytest.mark.parametrize("spec,bits,group,sym", [("int8", 8, None, True), ("int4", 4, 128, True),
                                                 ("int4-g32-zp", 4, 32, False), ("INT4-g64", 4, 64, True)])
def test_scheme_parse(spec, bits, group, sym):
    s = QuantScheme.parse(spec)
    assert (s.bits, s.group_size, s.symmetric) == (bits, group, sym)
    assert QuantScheme.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("spec,msg", [("int3", "unknown quantization"), ("int4-g48", "group size 48"),
                                      ("int8-g32", "unknown quantization"), ({"bits": 2}, "unknown bits 2"),
                                      ({"bits": 4, "group_size": 128, "method": "gptq"}, "method")])
def test_scheme_errors(spec, msg):
    with pytest.raises(QuantError, match=msg):
        QuantScheme.parse(spec)


def test_group_must_divide_width():
    with pytest.raises(QuantError, match="does not divide the input width 48 of x.c_fc"):
        QuantScheme(bits=4, group_size=32).check_width(48, "x.c_fc")


@pytest.mark.parametrize("n", [96, 48])
def test_kernel_layout_repack_matches_torch(n):
    """Our byte-op repack (or its fallback) gives exactly torch's packed layout."""
    from codeshell.quant.linear import to_int4_kernel_layout
    q = torch.randint(0, 16, (n, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert torch.equal(to_int4_kernel_layout(pack_int4(q)), want)
