"""Session 28 helper C: int4 M = 1 on the shared epilogue's bits for rows of 1-16 groups (csrc/q4_m1_e.h,
taken from tile_r16_q4e in qdot_int4.cpp's run_q4v_epi; CODESHELL_Q4_M1E=0: tile_r16_q4e as before).

Checked: bit for bit tile_r16_q4e's results (the switch off) for every K / G the header compiles (G = 128:
2, 4, 8, 16 groups; G = 256: 1, 2, 4, 8), symmetric and with offsets, with and without a bias, row counts
that end in a partial 16-row tile; K / G it does not take (12, 32 groups) fall back to the old tile; and at
codeshell-mini's shapes (K = 256 / 1024) each row of every M up to ops.ROW_INVARIANT_MAX_M bit for bit the
same row alone at M = 1 (the batched rows run other kernels: row invariance), and the reference within
2e-5 of the largest output.
Session 41 helper B: the lane sums' reduction by unpacks (q8_epilogue.h reduce_lanes16_unpack, CODESHELL_M1_UNPACK,
default on) gives the same bits as vpermt2d's tree (=0) at every K / G the header takes, with offsets or without."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4
from codeshell.testing import assert_rows_bitwise

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1
PATH = "avx512_vnni:q8"


def vnni_module(monkeypatch):
    """The native module with the avx512_vnni kernels forced (skips on a CPU without them)."""
    if LEVEL < ops.ISA_LEVELS.index("avx512_vnni"):
        pytest.skip("needs avx512_vnni")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")
    return _ext.get()


def _setup(monkeypatch):
    vnni_module(monkeypatch)
    monkeypatch.setenv("CODESHELL_Q4_EPI", "1")  # the epilogue family, whatever this CPU's default
    for var in ("CODESHELL_Q4_M1E", "CODESHELL_Q4_M1_R16E", "CODESHELL_Q4_M1_SCT", "CODESHELL_Q4_M1_R16E_G",
                "CODESHELL_M1_UNPACK"):
        monkeypatch.delenv(var, raising=False)
    return _ext.get()


def assert_switch_keeps_bits(mod, pw, k: int, n: int, var: str, seed: int, path: str = PATH,
                             dtype: torch.dtype = torch.float32) -> None:
    """`var` = 0 (the former tile) and 1 (the new one) give the same bits at M = 1 on `path` (x in
    `dtype`), with and without a bias (shared with test_q8_m1_e.py and test_amx_m1.py)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g) * 3
    x[:, ::31] *= 8
    x = x.to(dtype)
    for bias in (None, torch.randn(n, generator=g)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(var, "0")
            want = ops._compute(path, mod, x, pw, bias)
            mp.setenv(var, "1")
            got = ops._compute(path, mod, x, pw, bias)
        assert torch.equal(got, want), f"{var} {path} {n}x{k}: {(got - want).abs().max()}"


def assert_rows_invariant_and_reference(mod, pw, n: int, k: int, what: str) -> None:
    """Each row of every M up to ops.ROW_INVARIANT_MAX_M bit for bit the same row alone at M = 1
    (the batched rows run other kernels), and the reference within 2e-5 of the largest output
    (shared with test_q8_m1_e.py)."""
    g = torch.Generator().manual_seed(k)
    top = ops.ROW_INVARIANT_MAX_M
    x = torch.randn(top, k, generator=g) * torch.rand(top, 1, generator=g) * 4
    x[1] = 0
    bias = torch.randn(n, generator=g)
    alone = torch.cat([ops._compute(PATH, mod, x[i:i + 1], pw, bias) for i in range(top)])
    ref = ops.reference(x, pw, bias, PATH)
    assert (alone - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
    for m in range(2, top + 1):
        assert_rows_bitwise(ops._compute(PATH, mod, x[:m], pw, bias), alone[:m], f"{what} {n}x{k} M={m}")


@needs_native
@pytest.mark.parametrize("group,ng", [(128, 2), (128, 4), (128, 8), (128, 16), (256, 1), (256, 2), (256, 4),
                                      (256, 8), (128, 12), (128, 32)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_m1e_bitwise_old_tile(group, ng, symmetric, monkeypatch):
    mod = _setup(monkeypatch)
    k = group * ng
    for n in (16, 45, 384):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05
        pw = quantize_int4(w, group_size=group, symmetric=symmetric)
        assert ops.plan(pw, 1, torch.float32) == PATH
        assert_switch_keeps_bits(mod, pw, k, n, "CODESHELL_Q4_M1E", k + 5)
        zero = torch.zeros(1, k)  # every group scale of x 0
        assert torch.equal(ops._compute(PATH, mod, zero, pw, None), torch.zeros(1, n))


@needs_native
@pytest.mark.parametrize("n,k,symmetric", [(384, 256, True), (1024, 256, True), (256, 1024, True),
                                           (45, 256, False), (29, 512, True)])
def test_m1e_rows_invariant_and_reference(n, k, symmetric, monkeypatch):
    mod = _setup(monkeypatch)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05
    assert_rows_invariant_and_reference(mod, quantize_int4(w, group_size=128, symmetric=symmetric), n, k, "int4")


@needs_native
@pytest.mark.parametrize("group,ng", [(128, 2), (128, 4), (128, 8), (128, 16), (256, 1), (256, 4)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_m1e_unpack_reduce_keeps_bits(group, ng, symmetric, monkeypatch):
    """CODESHELL_M1_UNPACK=1 (the unpack tree) against =0 (vpermt2d's), partial 16-row tiles included; the
    reference within 2e-5 of the largest output with the default."""
    mod = _setup(monkeypatch)
    k = group * ng
    for n in (16, 45, 384):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(3 * n + k)) * 0.05
        pw = quantize_int4(w, group_size=group, symmetric=symmetric)
        assert ops.plan(pw, 1, torch.float32) == PATH
        assert_switch_keeps_bits(mod, pw, k, n, "CODESHELL_M1_UNPACK", k + 11)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(n))
        ref = ops.reference(x, pw, None, PATH)
        got = ops._compute(PATH, mod, x, pw, None)
        assert (got - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


@needs_native
@pytest.mark.parametrize("group,ng", [(128, 8), (128, 12), (128, 32), (256, 4), (256, 16)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_r16_q4e_unpack_reduce_keeps_bits(group, ng, symmetric, monkeypatch):
    """tile_r16_q4e (CODESHELL_Q4_M1E=0, spans of 16 groups up to CODESHELL_Q4_M1_R16E_G=32) with the unpack
    tree against vpermt2d's: the same bits, one span and two."""
    mod = _setup(monkeypatch)
    monkeypatch.setenv("CODESHELL_Q4_M1E", "0")
    monkeypatch.setenv("CODESHELL_Q4_M1_R16E_G", "32")
    k = group * ng
    for n in (16, 45):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(5 * n + k)) * 0.05
        pw = quantize_int4(w, group_size=group, symmetric=symmetric)
        assert_switch_keeps_bits(mod, pw, k, n, "CODESHELL_M1_UNPACK", k + 17)
