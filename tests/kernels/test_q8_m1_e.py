"""Session 28 helper C: int8 M = 1 on the shared epilogue's bits for rows of 1-16 blocks of 128 (csrc/q8_m1_e.h,
taken from tile_r16_q8<1> in qdot_int8.cpp's run_r16_q8; CODESHELL_Q8_M1E=0: tile_r16_q8 as before).

Checked: bit for bit tile_r16_q8's results (the switch off) for K = 128 .. 2048 (1, 2, 4, 8, 16 blocks) and
K it does not take (3 blocks; 4096 runs tile_v), with and without a bias, row counts ending in a partial
16-row tile; and at codeshell-mini's head and linear shapes each row of every M up to
ops.ROW_INVARIANT_MAX_M bit for bit the same row alone at M = 1, the reference within 2e-5."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int8
from codeshell.testing import assert_rows_bitwise

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1
PATH = "avx512_vnni:q8"


def _setup(monkeypatch):
    if LEVEL < ops.ISA_LEVELS.index("avx512_vnni"):
        pytest.skip("needs avx512_vnni")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")
    monkeypatch.delenv("CODESHELL_Q8_M1E", raising=False)
    return _ext.get()


@needs_native
@pytest.mark.parametrize("k", [128, 256, 384, 512, 1024, 2048, 4096])
def test_m1e_bitwise_old_tile(k, monkeypatch):
    mod = _setup(monkeypatch)
    for n in (16, 45, 384):
        pw = quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05)
        assert ops.plan(pw, 1, torch.float32) == PATH
        g = torch.Generator().manual_seed(k + 9)
        x = torch.randn(1, k, generator=g) * 3
        x[:, ::31] *= 8
        for bias in (None, torch.randn(n, generator=g)):
            monkeypatch.setenv("CODESHELL_Q8_M1E", "0")
            want = ops._compute(PATH, mod, x, pw, bias)
            monkeypatch.setenv("CODESHELL_Q8_M1E", "1")
            got = ops._compute(PATH, mod, x, pw, bias)
            assert torch.equal(got, want), f"{n}x{k}: {(got - want).abs().max()}"


@needs_native
@pytest.mark.parametrize("n,k", [(2048, 256), (1024, 256), (256, 1024), (45, 512)])
def test_m1e_rows_invariant_and_reference(n, k, monkeypatch):
    mod = _setup(monkeypatch)
    pw = quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05)
    g = torch.Generator().manual_seed(k)
    top = ops.ROW_INVARIANT_MAX_M
    x = torch.randn(top, k, generator=g) * torch.rand(top, 1, generator=g) * 4
    x[1] = 0
    bias = torch.randn(n, generator=g)
    alone = torch.cat([ops._compute(PATH, mod, x[i:i + 1], pw, bias) for i in range(top)])
    ref = ops.reference(x, pw, bias, PATH)
    assert (alone - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
    for m in range(2, top + 1):
        assert_rows_bitwise(ops._compute(PATH, mod, x[:m], pw, bias), alone[:m], f"int8 {n}x{k} M={m}")
