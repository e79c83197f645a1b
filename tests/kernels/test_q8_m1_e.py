"""Session 28 helper C: int8 M = 1 on the shared epilogue's bits for rows of 1-16 blocks of 128 (csrc/q8_m1_e.h,
taken from tile_r16_q8<1> in qdot_int8.cpp's run_r16_q8; CODESHELL_Q8_M1E=0: tile_r16_q8 as before).

Checked: bit for bit tile_r16_q8's results (the switch off) for K = 128 .. 2048 (1, 2, 4, 8, 16 blocks) and
K it does not take (3 blocks; 4096 runs tile_v), with and without a bias, row counts ending in a partial
16-row tile; and at codeshell-mini's head and linear shapes each row of every M up to
ops.ROW_INVARIANT_MAX_M bit for bit the same row alone at M = 1, the reference within 2e-5."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import ops, quantize_int8
from tests.kernels.test_q4_m1_e import (PATH, assert_rows_invariant_and_reference, assert_switch_keeps_bits,
                                        needs_native, vnni_module)


def _setup(monkeypatch):
    mod = vnni_module(monkeypatch)
    monkeypatch.delenv("CODESHELL_Q8_M1E", raising=False)
    monkeypatch.delenv("CODESHELL_M1_UNPACK", raising=False)
    return mod


@needs_native
@pytest.mark.parametrize("k", [128, 256, 384, 512, 1024, 2048, 4096])
def test_m1e_bitwise_old_tile(k, monkeypatch):
    mod = _setup(monkeypatch)
    for n in (16, 45, 384):
        pw = quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05)
        assert ops.plan(pw, 1, torch.float32) == PATH
        assert_switch_keeps_bits(mod, pw, k, n, "CODESHELL_Q8_M1E", k + 9)


@needs_native
@pytest.mark.parametrize("n,k", [(2048, 256), (1024, 256), (256, 1024), (45, 512)])
def test_m1e_rows_invariant_and_reference(n, k, monkeypatch):
    mod = _setup(monkeypatch)
    pw = quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05)
    assert_rows_invariant_and_reference(mod, pw, n, k, "int8")


@needs_native
@pytest.mark.parametrize("k", [128, 256, 512, 1024, 2048])
def test_m1e_unpack_reduce_keeps_bits(k, monkeypatch):
    """Session 41 helper B: CODESHELL_M1_UNPACK=1 (q8_epilogue.h reduce_lanes16_unpack) against =0 (vpermt2d's
    tree), the same bits; partial 16-row tiles included."""
    mod = _setup(monkeypatch)
    for n in (16, 45, 384):
        pw = quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(2 * n + k)) * 0.05)
        assert ops.plan(pw, 1, torch.float32) == PATH
        assert_switch_keeps_bits(mod, pw, k, n, "CODESHELL_M1_UNPACK", k + 13)
