"""The AVX-512F fp32-FMA bf16 panel kernel (`avx512_vnni:panel`, csrc/panel_bf16.cpp Avx512Fma):
the same bits as the AVX2 panel kernel (`avx2:panel`) at every M it takes and at edge shapes
(N not a multiple of 16, odd K, K past one k-block), close to the fp32 reference, row invariant,
and the dispatch: `plan` picks it for bf16 weights at M <= 64 on an AVX-512 CPU without
AVX512-BF16 (or for fp32 x), and CODESHELL_KERNEL_ISA=avx2 brings back `avx2:panel`.
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, prepack

LEVEL = ops.isa_level() if available() else -1
needs_512 = pytest.mark.skipif(LEVEL < ops.ISA_LEVELS.index("avx512_vnni"),
                               reason="needs the native kernels on an AVX-512 CPU")


def _w(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / k ** 0.5


@needs_512
@pytest.mark.parametrize("n,k", [(16, 64), (50, 384), (37, 129), (70, 1030), (33, 17)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 12, 13, 16, 17, 24, 25, 63, 64])
def test_same_bits_as_avx2_panel(n, k, m):
    mod = _ext.get()
    w = _w(n, k)
    p = prepack(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(n)
    for b in (None, bias):
        y512 = ops._compute("avx512_vnni:panel", mod, x, p, b)
        y2 = ops._compute("avx2:panel", mod, x, p, b)
        assert torch.equal(y512, y2), (m, n, k, (y512 - y2).abs().max().item())
    ref = x @ w.bfloat16().float().T
    assert (y512 - bias - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@needs_512
def test_rows_invariant_and_prefill_panel64():
    mod = _ext.get()
    n, k = 45, 512
    p = prepack(_w(n, k, 1))
    x = torch.randn(150, k)
    full = ops._compute("avx512_vnni:panel64", mod, x, p, None)
    for m in (1, 3, 8, 64):
        assert torch.equal(ops._compute("avx512_vnni:panel", mod, x[:m], p, None), full[:m])
    assert torch.equal(full, ops._compute("avx2:panel64", mod, x, p, None))


@needs_512
def test_plan_and_isa_cap(monkeypatch):
    monkeypatch.delenv("CODESHELL_KERNEL_ISA", raising=False)
    p = prepack(_w(50, 384))
    assert ops.plan(p, 8, torch.float32) == "avx512_vnni:panel"
    want_bf16 = "avx512_vnni:panel" if LEVEL < ops.ISA_LEVELS.index("avx512_bf16") else None
    if want_bf16:
        assert ops.plan(p, 1, torch.bfloat16) == want_bf16
        # the fp32-FMA GEMM first (session 24; tests/kernels/test_prefill_fma.py), then session 23's two
        assert ops.prefill_candidates(p, torch.bfloat16, LEVEL) == ["avx512_vnni:gemm", "avx512_vnni:panel64", "sgemm:fp32"]
    assert ops.prefill_candidates(p, torch.float32, LEVEL)[:2] == ["avx512_vnni:gemm", "avx512_vnni:panel64"]
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    assert ops.plan(p, 8, torch.float32) == "avx2:panel"
    assert ops.plan(p, 1, torch.bfloat16) == "avx2:panel"
