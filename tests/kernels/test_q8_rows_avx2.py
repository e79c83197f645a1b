"""`avx2:q8` int8 at M >= 2 (session 30): csrc/q8_rows_avx2.h (x widened to int16 once a call,
vpmaddwd on the weight's even / odd bytes) in place of qdot_int8.cpp's tile_q8 (vpsignb +
vpmaddubsw + vpmaddwd), which keeps M = 1.

Both sum the same exact int32 lanes per 32-byte chunk and share the block epilogue and hsum8, so every
row of every M = 1..ops.ROW_INVARIANT_MAX_M must have, bit for bit, the bits that row gets alone
(tile_q8), and the bits tile_q8 gives the whole batch (CODESHELL_Q8_AVX2_ROWS=0); and the rows are
within 2e-5 of the largest output of the reference (`ops.reference`: int8-rounded x times the
dequantised weight). Shapes: K with activation blocks of 128, 64 and 32 (K = 384, 1088, 96), the
small shape's K = 1024, K = 2048 (the widened kernel's largest, kAvx2RowsMaxK) and K = 4096 (tile_q8
at every M), N not a multiple of the threads' chunks, weights at -127 and 127
(the pair sums' extremes), with and without bias, an all-zero row of x (block scales 0).
Runs at the avx2 level on any AVX2 CPU (CODESHELL_KERNEL_ISA=avx2 caps an AVX-512 one).
Session 33: M = 1 runs csrc/q8_m1_avx2.h (tile_q8's bits, 8 weight rows a step; CODESHELL_Q8_AVX2_M1=0: tile_q8),
so the rows alone here are its outputs and every comparison below also checks it against tile_q8, and directly
against tile_q8 at M = 1 (the switch off). CODESHELL_Q8_AVX2_LANES=0 is set (the lanes kernel, off by default,
has other bits: test_q8_lanes_avx2.py).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int8
from codeshell.testing import assert_rows_bitwise

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
AVX2 = ops.ISA_LEVELS.index("avx2")
SWITCHES = ("CODESHELL_Q8_AVX2_ROWS", "CODESHELL_Q8_AVX2_ROWS_MIN_M", "CODESHELL_Q8_AVX2_M1")
SHAPES = [(37, 384), (45, 1024), (23, 2048), (19, 4096), (33, 1088), (70, 96)]


def _x(m: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    x[:, ::37] *= 8
    x[min(3, m - 1)] = 0  # an all-zero row: every block scale 0
    return x


def extreme_case(n: int, k: int, with_bias: bool, neg: int):
    """(int8 weight, bias or None, x of ROW_INVARIANT_MAX_M rows) at the rounding's extremes: weight row 0 at
    127 over its first 64 columns and -127 over columns 64..`neg` (the pair sums' extremes), x's row 1 at 127
    and row 2 at -127 on every second column, row 3 all zero (test_q8_lanes_avx2 shares it)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05
    w[0, :64] = 1.0  # quantised to 127 (the row's largest |w|)
    w[0, 64:neg] = -1.0
    pw = quantize_int8(w)
    assert pw.data[0, :64].eq(127).all() and pw.data[0, 64:neg].eq(-127).all()
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)) if with_bias else None
    x = _x(ops.ROW_INVARIANT_MAX_M, k)
    x[1] = 127.0  # a row of x at the rounding's extreme against the weight's extremes
    x[2, ::2] = -127.0
    return pw, bias, x


@needs_native
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_rows_match_m1_tile_q8_and_reference(n, k, with_bias, monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    for var in SWITCHES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CODESHELL_Q8_AVX2_LANES", "0")
    mod = _ext.get()
    pw, bias, x = extreme_case(n, k, with_bias, neg=128)
    path = ops.plan(pw, 1, torch.float32)
    assert path == "avx2:q8", path
    top = ops.ROW_INVARIANT_MAX_M
    alone = torch.cat([mod.decode_int8_q8(x[i:i + 1], pw.data, pw.scales, bias, AVX2) for i in range(top)])
    ref = ops.reference(x, pw, bias, path)
    err = (alone - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), f"{n}x{k}: max abs error {err:.3g} against the reference"
    for m in range(1, top + 1):
        monkeypatch.setenv("CODESHELL_Q8_AVX2_ROWS", "0")
        old = mod.decode_int8_q8(x[:m], pw.data, pw.scales, bias, AVX2)
        monkeypatch.delenv("CODESHELL_Q8_AVX2_ROWS")
        new = mod.decode_int8_q8(x[:m], pw.data, pw.scales, bias, AVX2)
        assert_rows_bitwise(new, alone[:m], f"q8_rows_avx2.h {n}x{k} bias={with_bias}")
        assert_rows_bitwise(old, alone[:m], f"tile_q8 {n}x{k} bias={with_bias}")
    # tile_q8 at M = 1 (CODESHELL_Q8_AVX2_M1=0): the bits of q8_m1_avx2.h
    monkeypatch.setenv("CODESHELL_Q8_AVX2_M1", "0")
    t1 = torch.cat([mod.decode_int8_q8(x[i:i + 1], pw.data, pw.scales, bias, AVX2) for i in range(top)])
    assert_rows_bitwise(t1, alone, f"tile_q8 vs q8_m1_avx2.h at M = 1 {n}x{k} bias={with_bias}")
    monkeypatch.delenv("CODESHELL_Q8_AVX2_M1")
    # q8_rows_avx2.h at M = 1 too (CODESHELL_Q8_AVX2_ROWS_MIN_M=1): the same bits as tile_q8
    monkeypatch.setenv("CODESHELL_Q8_AVX2_ROWS_MIN_M", "1")
    one = torch.cat([mod.decode_int8_q8(x[i:i + 1], pw.data, pw.scales, bias, AVX2) for i in range(top)])
    assert_rows_bitwise(one, alone, f"q8_rows_avx2.h at M = 1 {n}x{k}")

