"""The vdpbf16ps row tiles at 9..64 rows (csrc/panel_bf16_dot_rows.h, `avx512_bf16:panel`): every schedule
its switches allow (tiles of 1..16 rows, one or two panels a pass, small k-blocks, the prefetch off) gives
the same bits as Bf16Dot's 8-row tiles (CODESHELL_BF16_DOT_ROWS=0), close to the fp32 reference, at edge
shapes (N not a multiple of 16 or of the panels a pass, odd K, K past one k-block), with and without bias;
every row has the bits of that row alone (row invariance, ops.ROW_INVARIANT_MAX_M).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, prepack

LEVEL = ops.isa_level() if available() else -1
needs_bf16 = pytest.mark.skipif(LEVEL < ops.ISA_LEVELS.index("avx512_bf16"),
                                reason="needs the native kernels on an AVX512-BF16 CPU")
PATH = "avx512_bf16:panel"

SCHEDULES = [
    {},  # the default plan
    {"CODESHELL_BF16_DOT_ROWS_TILE": "12"},
    {"CODESHELL_BF16_DOT_ROWS_TILE": "5", "CODESHELL_BF16_DOT_ROWS_KB": "16"},
    {"CODESHELL_BF16_DOT_ROWS_NP": "2"},
    {"CODESHELL_BF16_DOT_ROWS_NP": "2", "CODESHELL_BF16_DOT_ROWS_TILE": "7", "CODESHELL_BF16_DOT_ROWS_KB": "24"},
    {"CODESHELL_BF16_DOT_ROWS_TILE": "1", "CODESHELL_BF16_DOT_ROWS_PF": "0"},
]
KEYS = ("CODESHELL_BF16_DOT_ROWS_TILE", "CODESHELL_BF16_DOT_ROWS_NP", "CODESHELL_BF16_DOT_ROWS_KB",
        "CODESHELL_BF16_DOT_ROWS_PF")


def _set(monkeypatch, sched):
    for name in KEYS:
        monkeypatch.delenv(name, raising=False)
    for name, v in sched.items():
        monkeypatch.setenv(name, v)


def _w(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / k ** 0.5


@needs_bf16
@pytest.mark.parametrize("n,k", [(16, 64), (50, 384), (37, 129), (70, 1030), (33, 17)])
@pytest.mark.parametrize("m", [9, 12, 13, 16, 17, 23, 24, 25, 33, 47, 64])
def test_dot_rows_same_bits(monkeypatch, n, k, m):
    mod = _ext.get()
    w = _w(n, k)
    p = prepack(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    bias = torch.randn(n)
    monkeypatch.setenv("CODESHELL_BF16_DOT_ROWS", "0")
    old = [ops._compute(PATH, mod, x, p, b) for b in (None, bias)]
    monkeypatch.setenv("CODESHELL_BF16_DOT_ROWS", "1")
    for sched in SCHEDULES:
        _set(monkeypatch, sched)
        for b, want in zip((None, bias), old):
            got = ops._compute(PATH, mod, x, p, b)
            assert torch.equal(got, want), (sched, m, n, k, (got - want).abs().max().item())
    ref = x.float() @ w.bfloat16().float().T + bias
    assert (old[1] - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@needs_bf16
def test_dot_rows_invariant(monkeypatch):
    mod = _ext.get()
    n, k = 45, 512
    p = prepack(_w(n, k, 1))
    x = torch.randn(64, k).bfloat16()
    one = torch.cat([ops._compute(PATH, mod, x[i:i + 1], p, None) for i in range(64)])
    for sched in SCHEDULES:
        _set(monkeypatch, sched)
        for m in (9, 16, 24, 25, 40, 64):
            got = ops._compute(PATH, mod, x[:m], p, None)
            assert torch.equal(got, one[:m]), (sched, m)
