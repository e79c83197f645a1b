"""codeshell.kernels: every native kernel against the plain-PyTorch reference, plus the fallback.

Tolerance: native and reference both accumulate in fp32 but in different orders, so we
require max|y - ref| <= 2e-5 * max|ref| (observed ~1e-6). The torch fallback for bf16 decode
rounds activations to bf16 (torch's bf16 gemv), so it gets bf16 tolerance (1e-2).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from codeshell.kernels.packing import activation_block
from codeshell.kernels import (
    BF16_PANEL_MAX_M,
    DECODE_MAX_M,
    PackedWeight,
    _ext,
    available,
    dequantize,
    int4_from_parts,
    int8_from_parts,
    linear,
    pack_nibbles,
    prepack,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")

# (kind, args, N, K): odd N and K not a multiple of the 8-wide vectors where the format allows it.
CASES = [
    ("bf16", {}, 37, 100),
    ("int8", {}, 35, 203),
    ("int4", {"group_size": 32, "symmetric": True}, 35, 96),
    ("int4", {"group_size": 64, "symmetric": False}, 19, 192),
    ("int4", {"group_size": 128, "symmetric": False}, 21, 256),
    # the 512-bit integer kernels (K % 128 == 0) with N leaving 1 row after their blocked 3-row
    # (int8) tiles from M = 9, and int4 groups of 256
    ("int8", {}, 37, 384),
    ("int4", {"group_size": 256, "symmetric": True}, 19, 512),
]
MS = list(range(1, DECODE_MAX_M + 2)) + [40, BF16_PANEL_MAX_M, BF16_PANEL_MAX_M + 1]  # each side of both limits


def make(kind: str, args: dict, n: int, k: int, seed: int = 0) -> PackedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if kind == "bf16":
        return prepack(w)
    if kind == "int8":
        return quantize_int8(w)
    return quantize_int4(w, **args)


def exact(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only math with unrounded activations (what the torch path computes)."""
    return torch.nn.functional.linear(x.float(), dequantize(pw), bias).to(x.dtype)


def close(y: torch.Tensor, ref: torch.Tensor, rel: float = 2e-5) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.float().abs().max().item(), f"max abs err {err}"


@needs_native
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}x{c[3]}-{c[1]}")
@pytest.mark.parametrize("with_bias", [False, True])
def test_native_matches_reference_all_m(case, with_bias):
    kind, args, n, k = case
    pw = make(kind, args, n, k)
    bias = torch.randn(n) if with_bias else None
    for m in MS:
        x = torch.randn(m, k)
        close(linear(x, pw, bias, impl="native"), linear(x, pw, bias, impl="reference"))


@needs_native
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_model_sized_rows(kind):
    # K = 4096 exercises full vector loops and the multi-block prefill path (several row blocks).
    n, k = 600, 4096
    pw = make(kind, {"group_size": 128, "symmetric": False}, n, k)
    bias = torch.randn(n)
    for m in (1, 8, 16, 64, 300):
        x = torch.randn(m, k)
        close(linear(x, pw, bias, impl="native"), linear(x, pw, bias, impl="reference"))


@needs_native
def test_noncontiguous_batched_and_bf16_input():
    pw = make("int8", {}, 33, 64)
    base = torch.randn(3, 64, 10)
    x = base.transpose(1, 2)  # [3, 10, 64], not contiguous
    y = linear(x, pw, impl="native")
    assert y.shape == (3, 10, 33)
    close(y, linear(x.contiguous(), pw, impl="reference"))
    xb = torch.randn(2, 5, 64).to(torch.bfloat16)
    yb = linear(xb, pw, impl="native")
    assert yb.dtype == torch.bfloat16
    close(yb, linear(xb, pw, impl="reference"), rel=1e-2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}x{c[3]}")
def test_torch_path_matches_reference(case):
    kind, args, n, k = case
    pw = make(kind, args, n, k)
    bias = torch.randn(n)
    for m in (1, 7, DECODE_MAX_M + 1, 40):
        x = torch.randn(m, k)
        rel = 1e-2 if kind == "bf16" and m <= DECODE_MAX_M else 2e-5
        close(linear(x, pw, bias, impl="torch"), exact(x, pw, bias), rel=rel)


def test_fallback_warns_once_and_still_computes(monkeypatch):
    monkeypatch.delenv("CODESHELL_KERNELS_DISABLE", raising=False)  # that setting silences the warning
    saved = dict(_ext._state)
    _ext._reset_for_tests()

    def broken():
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(_ext, "_build", broken)
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            assert not available()
            pw = make("int4", {"group_size": 32, "symmetric": True}, 9, 64)
            x = torch.randn(4, 64)
            close(linear(x, pw), exact(x, pw))
            linear(x, pw)
        msgs = [str(w.message) for w in rec if "native kernels unavailable" in str(w.message)]
        assert len(msgs) == 1 and "no C++ compiler found" in msgs[0] and "second line" not in msgs[0]
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            linear(x, pw, impl="native")
    finally:
        _ext._state.clear()
        _ext._state.update(saved)


def test_int8_quantizer_error_bound():
    w = torch.randn(16, 300)
    pw = quantize_int8(w)
    assert pw.data.dtype == torch.int8 and pw.scales.shape == (16,)
    assert ((dequantize(pw) - w).abs() <= pw.scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_quantizer_error_bound(symmetric, group):
    w = torch.randn(8, 256) + (0.0 if symmetric else 0.7)
    pw = quantize_int4(w, group, symmetric)
    assert pw.data.shape == (8, 128) and pw.data.dtype == torch.uint8
    assert (pw.offsets is None) == symmetric
    s = pw.scales.repeat_interleave(group, dim=1)
    assert ((dequantize(pw) - w).abs() <= s / 2 + 1e-6).all()


def test_bf16_panel_layout_roundtrip_and_order():
    from codeshell.kernels import bf16_rows
    w = torch.randn(37, 40)
    p = prepack(w)
    # K = 40 is held padded to 64 (one AMX tile depth): [P, Kp/2, 32]
    assert tuple(p.data.shape) == (3, 32, 32) and p.data.dtype == torch.bfloat16
    assert torch.equal(dequantize(p), w.bfloat16().float())  # exact: only the bf16 rounding
    # documented order: panel 0, k-pair 5 holds (row i, column 10 + h) at position 2i + h
    wb = w.bfloat16()
    assert torch.equal(p.data[0, 5], wb[:16, 10:12].reshape(32))
    assert torch.equal(p.data[1, 19], wb[16:32, 38:40].reshape(32))
    assert torch.equal(p.data[2, :, 10:], torch.zeros(32, 22, dtype=torch.bfloat16))  # rows 37..47 padding
    assert torch.equal(p.data[:, 20:], torch.zeros(3, 12, 32, dtype=torch.bfloat16))  # columns 40..63 padding
    assert torch.equal(bf16_rows(p, torch.tensor([36, 0, 17])), wb[[36, 0, 17]])
    from codeshell.kernels.packing import panels_torch
    assert torch.equal(p.data, panels_torch(w))  # the native packer (when built) == the torch one
    if available():  # the native row expansion (torch's bf16 matmul path) == bf16_rows
        out = torch.empty(30, 40, dtype=torch.bfloat16)
        _ext.get().rows_bf16(p.data, 37, 40, 5, 35, out)
        assert torch.equal(out, wb[5:35])


def test_nibble_layout_roundtrip_and_order():
    nib = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_nibbles(nib)
    assert torch.equal(unpack_nibbles(packed), nib)
    # byte i of each 32-run holds k0+i (low) and k0+16+i (high)
    assert packed[0, 0].item() == nib[0, 0].item() | (nib[0, 16].item() << 4)
    assert packed[1, 17].item() == nib[1, 33].item() | (nib[1, 49].item() << 4)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="divides in_features=100"):
        quantize_int4(torch.randn(4, 100), 32)
    with pytest.raises(ValueError, match="2-D"):
        prepack(torch.randn(4))
    pw = prepack(torch.randn(4, 8))
    with pytest.raises(ValueError, match="in_features 9"):
        linear(torch.randn(2, 9), pw)
    with pytest.raises(ValueError, match="bias has 3"):
        linear(torch.randn(2, 8), pw, torch.randn(3))
    with pytest.raises(TypeError, match="PackedWeight"):
        linear(torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="impl"):
        linear(torch.randn(2, 8), pw, impl="fast")


def test_from_parts_roundtrip_and_zero_point_convention():
    w = torch.randn(6, 128)
    pw = quantize_int4(w, 64, symmetric=False)
    # integer zero point z <-> offsets = (8 - z) * scale
    z = 8.0 - pw.offsets / pw.scales
    again = int4_from_parts(pw.data, pw.scales, (8.0 - z) * pw.scales, 64)
    assert torch.allclose(dequantize(again), dequantize(pw), atol=1e-6)
    nib = unpack_nibbles(pw.data).float().reshape(6, 2, 64)
    direct = ((nib - z[..., None]) * pw.scales[..., None]).reshape(6, 128)
    assert torch.allclose(direct, dequantize(pw), atol=1e-5)
    with pytest.raises(ValueError, match="scales must have shape"):
        int4_from_parts(pw.data, pw.scales[:, :1], None, 64)
    p8 = quantize_int8(w)
    assert torch.equal(dequantize(int8_from_parts(p8.data, p8.scales)), dequantize(p8))
    with pytest.raises(ValueError, match="int8 weight"):
        int8_from_parts(p8.data.float(), p8.scales)


@needs_native
@pytest.mark.parametrize("kind,args", [("int8", {}), ("int4", {"group_size": 32, "symmetric": True}),
                                       ("int4", {"group_size": 128, "symmetric": False}),
                                       ("int4", {"group_size": 256, "symmetric": True})])
def test_int8_activations_stay_close_to_weight_only_math(kind, args):
    """Decode rounds x to int8 per block: the result stays within 1% (rms) of
    the exact weight-only product (step amax/127 per block: ~0.6% rms for gaussian x, far below
    the int4 weights' own error, ~10%)."""
    pw = make(kind, args, 256, 1024)
    assert activation_block(pw) == (128 if kind == "int8" else args["group_size"])
    for m in (1, 5, DECODE_MAX_M):
        x = torch.randn(m, 1024)
        ref = exact(x, pw)
        err = (linear(x, pw, impl="native") - ref).norm() / ref.norm()
        assert err < 1e-2, f"M={m}: relative error {err:.2e}"


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (heads, kv groups, head dim, scale): 4 heads per group (CodeShell's ratio), 6 (blocks of 4 + 2),
# 1 with a head dim the vector path does not take, 3 at CodeShell's head dim, and a scale so
# large that most probabilities underflow to 0
@pytest.mark.parametrize("h,g,d,scale", [(8, 2, 16, 0.25), (6, 1, 32, 0.2), (3, 3, 8, 0.3),
                                         (12, 4, 128, 128 ** -0.5), (4, 1, 16, 30.0)])
def test_decode_attention_matches_sdpa(dtype, h, g, d, scale):
    """Rows read their own cache slot (any order) up to their own length; GQA heads share KV."""
    from codeshell.kernels import decode_attention
    gen = torch.Generator().manual_seed(0)
    kc, vc = (torch.randn(5, g, 300, d, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(4, h, 1, d, generator=gen).to(dtype)
    slots, lens = torch.tensor([4, 0, 2, 3]), torch.tensor([40, 1, 17, 300])
    y = decode_attention(q, kc, vc, slots, lens, scale)
    assert y.shape == q.shape and y.dtype == dtype
    for b in range(4):
        k, v = (c[slots[b], :, :lens[b]].float()[None] for c in (kc, vc))
        ref = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1].float(), k, v, scale=scale, enable_gqa=True)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(y[b:b + 1].float(), ref, atol=tol, rtol=tol)


@needs_native
def test_decode_attention_rejects_bad_slots():
    from codeshell.kernels import decode_attention
    kc = torch.zeros(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="slot 2 is outside the cache"):
        decode_attention(torch.zeros(1, 2, 1, 8), kc, kc, torch.tensor([2]), torch.tensor([3]), 1.0)
    with pytest.raises(RuntimeError, match="length 9 is outside the cache"):
        decode_attention(torch.zeros(1, 2, 1, 8), kc, kc, torch.tensor([1]), torch.tensor([9]), 1.0)


@needs_native
def test_fused_temperature_draw_matches_the_torch_inverse_cdf():
    """sample_temperature is the same inverse-CDF draw as the torch ops in engine/sampling.py:
    equal tokens for the same uniform (but where float rounding puts u on a boundary), never a
    token of probability 0, and a clear error when nothing can be drawn."""
    from codeshell.kernels import sample_temperature
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(70144, generator=g) * 3
    logits[::7] = float("-inf")  # masked tokens
    logits[5] = 9.0
    for temp in (0.3, 0.8, 1.7):
        cdf = torch.softmax(logits / temp, -1).cumsum(-1)
        us = torch.rand(2000, generator=g)
        ref = torch.searchsorted(cdf, us * cdf[-1], right=True).clamp_(max=cdf.numel() - 1)
        got = torch.tensor([sample_temperature(logits, temp, float(u)) for u in us])
        assert (got == ref).float().mean() >= 0.995
        assert torch.isfinite(logits[got]).all()
    assert sample_temperature(logits, 1.0, 0.0) == 1  # u = 0: the first token that can be drawn (0 is masked)
    assert torch.isfinite(logits[sample_temperature(logits, 1.0, 0.9999999)])
    with pytest.raises(RuntimeError, match="nothing to sample"):
        sample_temperature(torch.full((10,), float("-inf")), 1.0, 0.5)
    assert sample_temperature(logits.double(), 1.0, 0.5) is None  # not fp32: the caller's torch path


@needs_native
def test_row_batched_temperature_draw_equals_one_row_at_a_time():
    from codeshell.kernels import sample_temperature, sample_temperature_rows
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 1003, generator=g) * 4
    logits[3, ::2] = float("-inf")
    temps = [0.2, 0.5, 0.7, 1.0, 1.3, 0.9, 2.0, 0.4, 1.1]
    us = torch.rand(9, generator=g).tolist()
    want = [sample_temperature(logits[i], temps[i], us[i]) for i in range(9)]
    assert sample_temperature_rows(logits, temps, us) == want
    assert sample_temperature_rows(logits.double(), temps, us) is None  # not fp32: per-row torch path
    bad = logits.clone()
    bad[4] = float("-inf")
    with pytest.raises(RuntimeError, match="nothing to sample"):
        sample_temperature_rows(bad, temps, us)


@needs_native
def test_large_bf16_prefill_in_panel_blocks_matches_reference(monkeypatch):
    """Large bf16 weights with fp32 x run M > 64 as 64-row panel calls (the last one partial)."""
    import codeshell.kernels.ops as ops
    pw, bias = make("bf16", {}, 70, 256), torch.randn(70)
    x = torch.randn(150, 256)
    want = linear(x, pw, bias, impl="reference")
    monkeypatch.setattr(ops, "BF16_PANEL_PREFILL_MIN_WEIGHTS", 70 * 256)
    # the AVX2 level's size threshold (on an AVX-512 CPU panel64 against sgemm is a measured
    # choice: tests/kernels/test_bf16_fma512.py)
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    monkeypatch.setenv("CODESHELL_PREFILL_FMA_GEMM", "0")  # else avx2:gemm is measured against these (session 30)
    calls = []
    real = ops._compute
    monkeypatch.setattr(ops, "_compute", lambda path, mod, x, *a: calls.append((path, x.shape[0])) or real(path, mod, x, *a))
    close(linear(x, pw, bias, impl="native"), want)
    assert calls == [("avx2:panel64", 150), ("avx2:panel", 64), ("avx2:panel", 64), ("avx2:panel", 22)]
