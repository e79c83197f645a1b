"""The fused GELU's two widths (csrc/fused.cpp: 8 lanes on AVX2, 16 on AVX-512) give the same
bits for every value, so which one a CPU runs never changes a model's output: every input and
output dtype, a bias, vector tails, both far tails, zeros, infinities and NaN. The AVX2 path is
the one CODESHELL_KERNEL_ISA=avx2 selects; on a CPU without AVX-512 the two calls run the same
path and the test says so in its skip."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops

pytestmark = pytest.mark.skipif(not available(), reason="native kernels unavailable on this machine")


@pytest.mark.parametrize("rows,N", [(1, 7), (1, 256), (3, 13), (5, 1536), (17, 1000), (64, 16 * 65 + 3)])
@pytest.mark.parametrize("kind", ["fp32", "fp32->bf16", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gelu_16_lanes_equal_8_lanes(monkeypatch, rows, N, kind, with_bias):
    if ops.isa_level() < ops.ISA_LEVELS.index("avx512_vnni"):
        pytest.skip("no AVX-512 here: only the 8-lane GELU runs")
    g = torch.Generator().manual_seed(rows * 7 + N)
    v = torch.randn(rows, N, generator=g) * 6
    flat = v.view(-1)
    flat[:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -30.0])[: flat.numel()]
    if kind == "bf16":
        v = v.to(torch.bfloat16)
    bias = torch.randn(N, generator=g) if with_bias and kind != "bf16" else None
    out_bf16 = kind != "fp32"
    mod = _ext.get()
    wide = mod.fused_gelu_tanh(v, bias, out_bf16)
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    narrow = mod.fused_gelu_tanh(v, bias, out_bf16)
    assert wide.dtype == narrow.dtype
    a = wide.view(torch.int16 if out_bf16 else torch.int32)
    b = narrow.view(torch.int16 if out_bf16 else torch.int32)
    assert torch.equal(a, b), f"{int((a != b).sum())} of {a.numel()} values differ"
