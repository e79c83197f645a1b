"""The AMX-INT8 prompt tiles' bf16 / GELU epilogues (`prefill_q8_amx_epi`, session 38 helper A).

What this tests: the bf16 result is exactly `prefill_q8_amx`'s fp32 result (bias added) rounded to
bf16 (what the model's cast does next), for int8 and symmetric int4 weights, bf16 or fp32 x (bf16 x
is quantised as x.float() would be: the same integers), 1 and 2 threads, rows that end inside a
16-row tile and columns that end inside a 16-column panel; the GELU epilogue with
CODESHELL_GELU_FAST=0 is `fused_gelu_tanh` of that fp32 result (the model's path without the
epilogue: the same bits), and by default within one bf16 ulp of it; the entry refuses M <= 64
(decode's rows keep the row-invariant tiles' fp32). `PackedLinear.forward_raw / forward_gelu` on
`amx:q8` take the epilogue at prompt M only, not for weights with offsets, not with
CODESHELL_Q8_EPI=0 (there `forward_gelu` is the fp32 result then the fused GELU pass, session 41).
Skips without AMX.
What this is not: a speed test (benchmarks/bench_quant.py, trace_prefill.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4, quantize_int8

LEVEL = ops.isa_level() if available() else -1
pytestmark = pytest.mark.skipif(LEVEL < ops.ISA_LEVELS.index("amx") if LEVEL >= 0 else True,
                                reason="needs the native kernels on an AMX CPU")


def _weight(kind, n, k, group=128, symmetric=True):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) / k ** 0.5
    if kind == "int8":
        return quantize_int8(w), 0
    p = quantize_int4(w, group_size=group, symmetric=symmetric)
    return p, p.group_size


CASES = [("int8", 1024, 256, 512, 128), ("int8", 1536, 1024, 131, 128), ("int8", 100, 96, 65, 128),
         ("int4", 1024, 256, 512, 128), ("int4", 1536, 1024, 131, 128), ("int4", 100, 128, 65, 32)]


@pytest.mark.parametrize("kind,n,k,m,group", CASES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_q8_epilogues_give_the_cast_and_the_fused_gelu_bits(kind, n, k, m, group, with_bias, threads, monkeypatch):
    mod = _ext.get()
    p, g = _weight(kind, n, k, group)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)) if with_bias else None
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    y = mod.prefill_q8_amx(x.float(), p.data, p.scales, None, g, bias).clone()  # the fp32 path
    b16 = mod.prefill_q8_amx_epi(x, p.data, p.scales, g, bias, False)
    assert b16.dtype == torch.bfloat16 and b16.shape == (m, n)
    assert torch.equal(b16, y.to(torch.bfloat16))
    assert torch.equal(mod.prefill_q8_amx_epi(x.float(), p.data, p.scales, g, bias, False), b16)  # fp32 x
    monkeypatch.setenv("CODESHELL_GELU_FAST", "0")
    assert torch.equal(mod.prefill_q8_amx_epi(x, p.data, p.scales, g, bias, True), mod.fused_gelu_tanh(y, None, True))
    monkeypatch.delenv("CODESHELL_GELU_FAST")
    fast = mod.prefill_q8_amx_epi(x, p.data, p.scales, g, bias, True).float()
    exact = mod.fused_gelu_tanh(y, None, True).float()
    assert ((fast - exact).abs() <= exact.abs() * 2 ** -7 + 1e-6).all()  # gelu16_fast: within a bf16 ulp
    ref = ops.reference(x, p, bias, "amx:q8")  # and the path's reference, as the fp32 path is tested
    assert (b16.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_q8_epilogue_refuses_decode_rows():
    mod = _ext.get()
    p, g = _weight("int8", 64, 128)
    x = torch.randn(ops.ROW_INVARIANT_MAX_M, 128).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="M > 64"):
        mod.prefill_q8_amx_epi(x, p.data, p.scales, g, None, False)


def _linear(kind, symmetric=True):
    from codeshell.kernels.module import PackedLinear
    p, _ = _weight(kind, 96, 128, group=32, symmetric=symmetric)
    lin = PackedLinear(p, torch.randn(96))
    for m in (100, ops.ROW_INVARIANT_MAX_M):  # the prompt's path pinned: the choice is measured per machine
        for epi in (None, "gelu"):  # (a GELU linear's own choice, session 41)
            lin.fast._paths[(m, torch.bfloat16, os.environ.get("CODESHELL_KERNEL_ISA"), epi)] = "amx:q8"
    return lin


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_packed_linear_q8_epilogue_only_at_prompt_rows(kind, monkeypatch):
    lin = _linear(kind)
    x = torch.randn(100, 128).to(torch.bfloat16)
    y = lin.forward_raw(x)
    assert y.dtype == torch.bfloat16
    g = lin.forward_gelu(x)
    assert g is not None and g.dtype == torch.bfloat16
    monkeypatch.setenv("CODESHELL_Q8_EPI", "0")
    y32 = lin.forward_raw(x)
    assert y32.dtype == torch.float32 and torch.equal(y, y32.to(torch.bfloat16))
    # without the epilogue the planned path's fp32 output, then the fused GELU pass (session 41: the
    # GELU linear's call on its own path, as the model ran it)
    assert torch.equal(lin.forward_gelu(x), _ext.get().fused_gelu_tanh(y32, None, True))
    monkeypatch.setenv("CODESHELL_GELU_FAST", "0")
    monkeypatch.delenv("CODESHELL_Q8_EPI")
    assert torch.equal(lin.forward_gelu(x), _ext.get().fused_gelu_tanh(y32, None, True))
    assert lin.forward_raw(x[:ops.ROW_INVARIANT_MAX_M]).dtype == torch.float32
    assert lin.forward_gelu(x[:ops.ROW_INVARIANT_MAX_M]) is None


def test_packed_linear_int4_offsets_keep_the_fp32_path():
    lin = _linear("int4", symmetric=False)
    x = torch.randn(100, 128).to(torch.bfloat16)
    y32 = lin.forward_raw(x)
    assert y32.dtype == torch.float32
    assert torch.equal(lin.forward_gelu(x), _ext.get().fused_gelu_tanh(y32, None, True))  # the separate pass


def test_bf16_epilogues_keep_their_bits_on_denormals_nan_and_inf(monkeypatch):
    # bf16_pack.h: vcvtneps2bf16 flushes denormals and keeps NaN payloads, bf16_bits does neither; a
    # vector with such a lane takes bf16_bits, so CODESHELL_B16_CVT on / off give the same bits. A zero
    # weight makes each output 0 + its bias (fp32), so every special value reaches both epilogues
    # (amx:bf16's store_rows_b16, amx:q8's store_item); the non-NaN lanes are torch's cast of the fp32
    # result, NaN lanes NaN.
    from codeshell.kernels import prepack
    mod = _ext.get()
    n, k, m = 64, 128, 80
    specials = torch.tensor([1e-40, -3e-39, float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 3.4e38,
                             -1.2e-38, 2.0 ** -126, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -9, -5.5, 7e-39, 65504.0, 1e-45])
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    bias[:16] = specials  # panel 0: every lane special; panel 1 a NaN in one lane only
    bias[17] = float("nan")
    x = torch.randn(m, k).to(torch.bfloat16)
    zero = prepack(torch.zeros(n, k))
    p, g = _weight("int8", n, k)
    pw = prepack(torch.randn(n, k) / k ** 0.5)
    y32 = {"zero": mod.prefill_bf16_amx(x, zero.data, n, bias, False, False).clone(),
           "rand": mod.prefill_bf16_amx(x, pw.data, n, bias, False, False).clone()}
    got = {}
    for hw in ("1", "0"):
        monkeypatch.setenv("CODESHELL_B16_CVT", hw)
        got[hw] = (mod.prefill_bf16_amx(x, zero.data, n, bias, False, True),
                   mod.prefill_q8_amx_epi(x, torch.zeros_like(p.data), p.scales, g, bias, False),
                   mod.prefill_bf16_amx(x, pw.data, n, bias, False, True))
    for a, b in zip(got["1"], got["0"]):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for out, ref in zip(got["1"], (y32["zero"], y32["zero"], y32["rand"])):
        nan = ref.isnan()
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out[~nan].view(torch.int16), ref[~nan].to(torch.bfloat16).view(torch.int16))
