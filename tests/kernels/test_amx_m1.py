"""Session 37 helper A: M = 1 on AMX CPUs.

bf16 (`amx:bf16`, panel_bf16_amx.h `decode_amx_m1`): one row of x on 1-row A / C tiles, x read in place
(K % 32 == 0) or row 0 of the packed tiles (else), the tile configuration loaded once a thread and call
(CODESHELL_AMX_BF16_M1=0: decode_amx as before), on owned shares or chunks (CODESHELL_AMX_BF16_M1_SPLIT). int8 / int4 (`amx:q8`, qdot_int8.cpp / qdot_int4.cpp `amx_m1`): the 16-row
tiles the VNNI-only CPUs run at M = 1 (tile_r16_q8 / q8_m1_e.h, tile_r16_q4e / q4_m1_e.h) and their
split instead of q8_panel.h / tile_v (CODESHELL_AMX_Q8_M1=0: as before).

Checked, at 1 and 2 threads: the switch on and off give the same bits at M = 1 (with and without a bias,
N ending in a partial panel / tile, K not a multiple of 32 for bf16, int4 with offsets, groups of 128 /
256, K past the 16-row tiles' one span); each row of every M up to ops.ROW_INVARIANT_MAX_M is bit for bit
that row alone at M = 1 (row invariance); and the reference within tolerance."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, prepack, quantize_int4, quantize_int8
from codeshell.testing import assert_rows_bitwise
from tests.kernels.test_q4_m1_e import assert_switch_keeps_bits

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1


def _amx(monkeypatch):
    if LEVEL < ops.ISA_LEVELS.index("amx"):
        pytest.skip("needs AMX")
    for var in ("CODESHELL_KERNEL_ISA", "CODESHELL_AMX_BF16_M1", "CODESHELL_AMX_Q8_M1"):
        monkeypatch.delenv(var, raising=False)
    return _ext.get()


def _rows_invariant(mod, path, pw, n, k, tol):
    g = torch.Generator().manual_seed(k + n)
    top = ops.ROW_INVARIANT_MAX_M
    x = torch.randn(top, k, generator=g) * torch.rand(top, 1, generator=g) * 4
    x[1] = 0
    if path == "amx:bf16":
        x = x.to(torch.bfloat16)
    bias = torch.randn(n, generator=g)
    alone = torch.cat([ops._compute(path, mod, x[i:i + 1], pw, bias) for i in range(top)])
    ref = ops.reference(x, pw, bias, path)
    assert (alone - ref).abs().max().item() <= tol * ref.abs().max().item()
    for m in (2, 3, 5, 8, 16, 17, 33, top):
        assert_rows_bitwise(ops._compute(path, mod, x[:m], pw, bias), alone[:m], f"{path} {n}x{k} M={m}")


BF16_SHAPES = [(45, 37), (149, 100), (384, 256), (1024, 256), (2065, 256), (256, 1024), (300, 2048)]


@needs_native
@pytest.mark.parametrize("split", ["1", "0"], ids=["owned", "chunks"])
@pytest.mark.parametrize("n,k", BF16_SHAPES, ids=[f"{n}x{k}" for n, k in BF16_SHAPES])
def test_bf16_m1(n, k, split, threads, monkeypatch):
    mod = _amx(monkeypatch)
    monkeypatch.setenv("CODESHELL_AMX_BF16_M1_SPLIT", split)  # decode_amx_m1's split (the default: owned)
    pw = prepack(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05)
    assert ops.plan(pw, 1, torch.bfloat16) == "amx:bf16"
    assert_switch_keeps_bits(mod, pw, k, n, "CODESHELL_AMX_BF16_M1", k + 3, "amx:bf16", torch.bfloat16)
    _rows_invariant(mod, "amx:bf16", pw, n, k, 1e-4)


Q8_SHAPES = [(45, 256), (384, 256), (1024, 256), (2061, 256), (256, 1024), (64, 2048), (48, 4096)]


@needs_native
@pytest.mark.parametrize("n,k", Q8_SHAPES, ids=[f"{n}x{k}" for n, k in Q8_SHAPES])
def test_int8_m1(n, k, threads, monkeypatch):
    mod = _amx(monkeypatch)
    pw = quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05)
    assert ops.plan(pw, 1, torch.float32) == "amx:q8"
    assert_switch_keeps_bits(mod, pw, k, n, "CODESHELL_AMX_Q8_M1", k + 9, "amx:q8")
    _rows_invariant(mod, "amx:q8", pw, n, k, 2e-5)


Q4_CASES = [(45, 256, 128, True), (384, 256, 128, True), (1024, 256, 128, True), (256, 1024, 128, True),
            (45, 256, 128, False), (29, 512, 256, True), (100, 1024, 256, False), (48, 4096, 128, True)]


@needs_native
@pytest.mark.parametrize("n,k,group,symmetric", Q4_CASES, ids=[f"{n}x{k}g{g}{'s' if s else 'a'}" for n, k, g, s in Q4_CASES])
def test_int4_m1(n, k, group, symmetric, threads, monkeypatch):
    mod = _amx(monkeypatch)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k + group)) * 0.05
    pw = quantize_int4(w, group_size=group, symmetric=symmetric)
    assert ops.plan(pw, 1, torch.float32) == "amx:q8"
    assert_switch_keeps_bits(mod, pw, k, n, "CODESHELL_AMX_Q8_M1", k + 5, "amx:q8")
    _rows_invariant(mod, "amx:q8", pw, n, k, 2e-5)
