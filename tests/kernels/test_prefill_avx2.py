"""Prefill (M above the decode limits) of int8 / int4 weights with bf16 x at the AVX2 level (an
AVX2-only CPU, or CODESHELL_KERNEL_ISA=avx2 elsewhere): the candidates are the vpmaddubsw streaming
kernel (`avx2:q8`, x rounded to int8 in decode's blocks) and the fp32 sgemm path, measured once per
shape; the winner matches the reference, and `avx2:q8` at a prefill M gives each row the bits that
row gives alone (it is decode's kernel). fp32 x keeps exact weight-only math (sgemm only)."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, linear, ops, quantize_int4, quantize_int8

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")


def _weight(kind: str, n: int, k: int):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05
    return quantize_int8(w) if kind == "int8" else quantize_int4(w, 128)


@needs_native
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_avx2_prefill_candidates_and_bits(kind, monkeypatch, record_property):
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    monkeypatch.setenv("CODESHELL_Q8_GEMM_AVX2", "0")  # the two kernels this file is about (the GEMM: test_q8_gemm_avx2.py)
    pw = _weight(kind, 70, 512)
    assert ops.prefill_candidates(pw, torch.bfloat16, 0) == ["avx2:q8", "sgemm:fp32"]
    assert ops.prefill_candidates(pw, torch.float32, 0) == ["sgemm:fp32"]
    x = torch.randn(90, 512, generator=torch.Generator().manual_seed(3)).bfloat16()
    y = linear(x, pw, impl="native")
    key = (kind, 70, 512, "prefill", "avx2", "bfloat16")
    assert set(ops.CHOICE_TIMES[key]) == {"avx2:q8", "sgemm:fp32"}
    record_property("prefill_choice", f"{kind}: {ops.plan(pw, 90, torch.bfloat16)} of {ops.CHOICE_TIMES[key]}")
    ref = linear(x, pw, impl="reference").float()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    mod = _ext.get()
    full = ops._compute("avx2:q8", mod, x, pw, None)
    torch.testing.assert_close(full, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    for i in (0, 37, 89):  # decode's kernel: a row alone has the bits it has among 90
        assert torch.equal(ops._compute("avx2:q8", mod, x[i:i + 1], pw, None)[0], full[i]), i
