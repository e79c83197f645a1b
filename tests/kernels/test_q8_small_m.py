"""The M = 1-2 kernels of `avx512_vnni:q8` without AMX (session 14): qdot.cpp's tile_r16_q8
(int8, 16 weight rows per tile, block sums reduced across rows) and tile_q4v12 (int4 groups of
128 / 256, tile_q4v without its per-row product table). (The `_out` entry points that the
native decode step calls run the same code into its buffers: tests/kernels/test_decode_step.py
holds the step to the Python path's bits.)

Each must give the bits of the kernel it replaced at M = 1-2 (tile_v for int8: q8_epilogue.h's
bits; tile_q4v for int4: its per-lane bits), row for row: CODESHELL_Q8_R16=0 / CODESHELL_Q4V12=0
(read per call) run the earlier kernels. Shapes: codeshell-mini's K = 256 and the small model's
K = 1024 (one span), K = 2048 (16 blocks: the span's end), K = 4096 (past it: the earlier kernels
run either way), N not a multiple of the 16-row tiles or of the threads' chunks, with and without
bias and int4 offsets, and an all-zero row of x (block scales 0).
What this is not: the M >= 3 kernels (tests/kernels/test_q8_no_amx.py, test_invariance.py).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4, quantize_int8

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
VNNI = ops.ISA_LEVELS.index("avx512_vnni")
needs_vnni = pytest.mark.skipif(not available() or ops.isa_level() < VNNI, reason="needs AVX512-VNNI")

WEIGHTS = [("int8", {}, 16, 256), ("int8", {}, 37, 256), ("int8", {}, 1029, 256), ("int8", {}, 45, 1024),
           ("int8", {}, 23, 2048), ("int8", {}, 19, 4096), ("int8", {}, 19, 384),
           ("int4", {"group_size": 128, "symmetric": False}, 37, 256),
           ("int4", {"group_size": 128, "symmetric": True}, 1029, 256),
           ("int4", {"group_size": 128, "symmetric": False}, 45, 1024),
           ("int4", {"group_size": 256, "symmetric": True}, 19, 1024),
           ("int4", {"group_size": 256, "symmetric": False}, 21, 2048),
           ("int4", {"group_size": 128, "symmetric": True}, 17, 4096)]


def _call(mod, pw, x, bias):
    if pw.kind == "int8":
        return mod.decode_int8_q8(x, pw.data, pw.scales, bias, VNNI)
    return mod.decode_int4_q8(x, pw.data, pw.scales, pw.offsets, pw.group_size, bias, VNNI)


@needs_native
@needs_vnni
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("kind,args,n,k", [pytest.param(*w, id=f"{w[0]}-{w[2]}x{w[3]}-"
                                                        f"g{w[1].get('group_size', 0)}") for w in WEIGHTS])
def test_small_m_kernels_give_the_earlier_kernels_bits(kind, args, n, k, with_bias, monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")  # below AMX: these kernels run on an AMX CPU too
    monkeypatch.delenv("CODESHELL_Q8_PANEL_MIN_M", raising=False)
    mod = _ext.get()
    g = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=g) * 0.05
    pw = quantize_int8(w) if kind == "int8" else quantize_int4(w, **args)
    bias = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(2, k, generator=g) * 3
    x[1, :128] = 0  # a zero block (scale 0) in row 1
    for m in (1, 2):
        xm = x[:m].contiguous()
        monkeypatch.setenv("CODESHELL_Q8_R16", "0")
        monkeypatch.setenv("CODESHELL_Q4V12", "0")
        old = _call(mod, pw, xm, bias)
        monkeypatch.setenv("CODESHELL_Q8_R16", "1")
        monkeypatch.setenv("CODESHELL_Q4V12", "1")
        new = _call(mod, pw, xm, bias)
        assert torch.equal(new, old), f"M={m}: the new kernel's bits differ from the earlier kernel's"
        alone = torch.cat([_call(mod, pw, xm[i:i + 1].contiguous(), bias) for i in range(m)])
        assert torch.equal(new, alone), f"M={m}: rows differ from the same rows alone"
        ref = ops.reference(xm, pw, bias, "avx512_vnni:q8")
        err = (new - ref).abs().max().item()
        assert err <= 2e-5 * ref.abs().max().item(), f"M={m}: max abs error {err:.3g} against the reference"


@needs_native
@needs_vnni
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k", [(19, 4096), (1029, 4096), (37, 8192), (45, 16384), (23, 2048)])
def test_int8_m1_rows_gives_tile_v_bits(n, k, with_bias, monkeypatch):
    # int8 M = 1 at K > 4096: tile_v (session 18; q8_rows.h in sessions 16-17, CODESHELL_Q8_M1_ROWS=1
    # runs it): the same bits, the same as the row inside M = 2 (tile_v) and M = 3
    # (q8_rows.h from panel_min_m). K = 4096: tile_v, K = 2048: tile_r16_q8, either way.
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")
    for v in ("CODESHELL_Q8_PANEL_MIN_M", "CODESHELL_Q8_ROWS_MAX_M", "CODESHELL_Q8_R16"):
        monkeypatch.delenv(v, raising=False)
    mod = _ext.get()
    g = torch.Generator().manual_seed(n + k)
    pw = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    bias = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(3, k, generator=g) * 3
    x[0, 128:256] = 0  # a zero block (scale 0)
    xm = x[:1].contiguous()
    monkeypatch.setenv("CODESHELL_Q8_M1_ROWS", "0")
    old = mod.decode_int8_q8(xm, pw.data, pw.scales, bias, VNNI)
    monkeypatch.setenv("CODESHELL_Q8_M1_ROWS", "1")
    new = mod.decode_int8_q8(xm, pw.data, pw.scales, bias, VNNI)
    assert torch.equal(new, old), "q8_rows.h at M = 1 differs from tile_v"
    monkeypatch.delenv("CODESHELL_Q8_M1_ROWS")
    assert torch.equal(mod.decode_int8_q8(xm, pw.data, pw.scales, bias, VNNI), new)  # the default: tile_v
    for m in (2, 3):
        rows = mod.decode_int8_q8(x[:m].contiguous(), pw.data, pw.scales, bias, VNNI)
        assert torch.equal(rows[:1], new), f"row 0 of M={m} differs from M = 1"
