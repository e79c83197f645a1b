"""The batched-decode bf16 tiles (csrc/panel_bf16_rows.h, `avx512_vnni:panel` at 4..64 rows): every
schedule its switches allow (one tile of all rows, split tiles k-blocked in either loop order, 1-3
panels a pass, the prefetch off) gives the same bits as the old Avx512Fma tiles (CODESHELL_BF16_ROWS=0) and as
`avx2:panel`, close to the fp32 reference, at edge shapes (N not a multiple of 16 or of the panels
a pass, odd K, K past one k-block), with and without bias; rows are the same bits as M = 1's
(row invariance, ops.ROW_INVARIANT_MAX_M).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, prepack

LEVEL = ops.isa_level() if available() else -1
needs_512 = pytest.mark.skipif(LEVEL < ops.ISA_LEVELS.index("avx512_vnni"),
                               reason="needs the native kernels on an AVX-512 CPU")

SCHEDULES = [
    {},  # the default plan
    {"CODESHELL_BF16_ROWS_NP": "1"},
    {"CODESHELL_BF16_ROWS_NP": "3"},
    {"CODESHELL_BF16_ROWS_TILE": "8"},
    {"CODESHELL_BF16_ROWS_TILE": "8", "CODESHELL_BF16_ROWS_G": "1"},
    {"CODESHELL_BF16_ROWS_TILE": "6", "CODESHELL_BF16_ROWS_G": "3", "CODESHELL_BF16_ROWS_KB": "16"},
    {"CODESHELL_BF16_ROWS_TILE": "5", "CODESHELL_BF16_ROWS_NP": "3"},
    {"CODESHELL_BF16_ROWS_TILE": "3", "CODESHELL_BF16_ROWS_NP": "1", "CODESHELL_BF16_ROWS_PF": "0"},
    {"CODESHELL_BF16_ROWS_ORDER": "1"},
    {"CODESHELL_BF16_ROWS_ORDER": "1", "CODESHELL_BF16_ROWS_KB": "16", "CODESHELL_BF16_ROWS_G": "5"},
    {"CODESHELL_BF16_ROWS_TILE": "16", "CODESHELL_BF16_ROWS_G": "16"},
]


KEYS = ("CODESHELL_BF16_ROWS_NP", "CODESHELL_BF16_ROWS_TILE", "CODESHELL_BF16_ROWS_PF", "CODESHELL_BF16_ROWS_KB",
        "CODESHELL_BF16_ROWS_G", "CODESHELL_BF16_ROWS_ORDER", "CODESHELL_BF16_ROWS_MAX")


def _w(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / k ** 0.5


@needs_512
@pytest.mark.parametrize("n,k", [(16, 64), (50, 384), (37, 129), (70, 1030), (33, 17), (100, 600)])
@pytest.mark.parametrize("m", [4, 5, 7, 8, 9, 12, 13, 15, 16, 17, 23, 24, 25, 33, 47, 64])
def test_rows_same_bits(monkeypatch, n, k, m):
    mod = _ext.get()
    w = _w(n, k)
    p = prepack(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(n)
    monkeypatch.setenv("CODESHELL_BF16_ROWS", "0")
    old = [ops._compute("avx512_vnni:panel", mod, x, p, b) for b in (None, bias)]
    assert torch.equal(old[1], ops._compute("avx2:panel", mod, x, p, bias))
    monkeypatch.setenv("CODESHELL_BF16_ROWS", "1")
    for sched in SCHEDULES + [{"CODESHELL_BF16_ROWS_MAX": "16"}]:
        for name in KEYS:
            monkeypatch.delenv(name, raising=False)
        for name, v in sched.items():
            monkeypatch.setenv(name, v)
        for b, want in zip((None, bias), old):
            got = ops._compute("avx512_vnni:panel", mod, x, p, b)
            assert torch.equal(got, want), (sched, m, n, k, (got - want).abs().max().item())
    ref = x @ w.bfloat16().float().T + bias
    assert (old[1] - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@needs_512
def test_rows_invariant(monkeypatch):
    mod = _ext.get()
    n, k = 45, 512
    p = prepack(_w(n, k, 1))
    x = torch.randn(64, k)
    one = torch.cat([ops._compute("avx512_vnni:panel", mod, x[i:i + 1], p, None) for i in range(64)])
    for sched in SCHEDULES:
        for name in KEYS:
            monkeypatch.delenv(name, raising=False)
        for name, v in sched.items():
            monkeypatch.setenv(name, v)
        for m in (4, 6, 11, 16, 17, 29, 64):
            assert torch.equal(ops._compute("avx512_vnni:panel", mod, x[:m], p, None), one[:m]), (sched, m)


@needs_512
def test_rows_every_count(monkeypatch):
    """Every row count 2..64 (the tiles' 4..64 and the schedules around them) gives M = 1's bits, over
    an edge shape (N = 16 * 3 + 5, odd K past one k-block of 16) with the default plan and the split
    tiles in both loop orders."""
    mod = _ext.get()
    n, k = 53, 97
    p = prepack(_w(n, k, 2))
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(n)
    one = torch.cat([ops._compute("avx512_vnni:panel", mod, x[i:i + 1], p, bias) for i in range(64)])
    for sched in ({}, {"CODESHELL_BF16_ROWS_KB": "16"}, {"CODESHELL_BF16_ROWS_KB": "16", "CODESHELL_BF16_ROWS_ORDER": "1",
                                                         "CODESHELL_BF16_ROWS_G": "3"}):
        for name in KEYS:
            monkeypatch.delenv(name, raising=False)
        for name, v in sched.items():
            monkeypatch.setenv(name, v)
        for m in range(2, 65):
            got = ops._compute("avx512_vnni:panel", mod, x[:m], p, bias)
            assert torch.equal(got, one[:m]), (sched, m, (got - one[:m]).abs().max().item())
