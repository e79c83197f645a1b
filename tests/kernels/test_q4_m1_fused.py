"""int4 M = 1 without AMX past 16 groups a row (session 17): qdot.cpp's tile_q4f (the row's scale
products and affine constant taken per block of 16 groups beside the block's dots) and the rows'
split between threads by parallel.h's parallel_owned (a contiguous share a thread, the rest
stolen from the back).

Both are off by default (CODESHELL_Q4_M1_FUSED=1 / CODESHELL_Q4_M1_SPLIT=1 run them, read per call;
=0 or unset: tile_q4v, parallel_chunks). Each must give the bits of the default, row for row; and the row must equal the same row
inside M = 2..16 (row invariance: tile_q4v / tile_q4r / q4_rows.h there), within 2e-5 of
`ops.reference`. Shapes: the 7B width's K = 4096 (32 groups of 128) and 16384 (128), K = 8192
with groups of 256 (32), K = 2560 (20 groups: a block of 16, then a masked block of 4), K = 4608
with groups of 256 (18: a masked block of 2), odd N (not a multiple of the 16-row steps or of the
threads' shares), with and without offsets and bias, a zero block of x.
What this is not: K up to 2048 at G = 128 (tile_q4v12, tests/kernels/test_q8_small_m.py) or M >= 2.
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4, set_num_threads
from codeshell.testing import assert_m1_rows_and_reference

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
VNNI = ops.ISA_LEVELS.index("avx512_vnni")
needs_vnni = pytest.mark.skipif(not available() or ops.isa_level() < VNNI, reason="needs AVX512-VNNI")

SHAPES = [(37, 4096, 128, False), (1029, 4096, 128, True), (45, 16384, 128, False), (19, 16384, 128, True),
          (23, 8192, 256, False), (21, 2560, 128, False), (33, 4608, 256, True)]


def _call(mod, pw, x, bias):
    return mod.decode_int4_q8(x, pw.data, pw.scales, pw.offsets, pw.group_size, bias, VNNI)


@needs_native
@needs_vnni
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k,group,symmetric", [pytest.param(*s, id=f"{s[0]}x{s[1]}-g{s[2]}-{'sym' if s[3] else 'offs'}")
                                                 for s in SHAPES])
def test_int4_m1_fused_and_split_give_the_earlier_bits(n, k, group, symmetric, with_bias, monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")  # below AMX: these kernels run on an AMX CPU too
    for v in ("CODESHELL_Q4_M1_FUSED", "CODESHELL_Q4_M1_SPLIT", "CODESHELL_Q4V12", "CODESHELL_Q4_ROWS_MAX_M"):
        monkeypatch.delenv(v, raising=False)
    mod = _ext.get()
    g = torch.Generator().manual_seed(n * 13 + k)
    pw = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group_size=group, symmetric=symmetric)
    bias = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(16, k, generator=g) * 3
    x[0, group:2 * group] = 0  # a zero group (scale 0) in row 0
    x1 = x[:1].contiguous()
    outs = {}
    for fused in ("0", "1"):
        for split in ("0", "1"):
            monkeypatch.setenv("CODESHELL_Q4_M1_FUSED", fused)
            monkeypatch.setenv("CODESHELL_Q4_M1_SPLIT", split)
            outs[fused, split] = _call(mod, pw, x1, bias)
    print(f"int4 M = 1 {n}x{k} g{group}: paths avx512_vnni:q8 tile_q4f / tile_q4v, parallel_owned / parallel_chunks")
    old = outs["0", "0"]
    for key, out in outs.items():
        assert torch.equal(out, old), f"FUSED={key[0]} SPLIT={key[1]}: bits differ from tile_q4v + parallel_chunks"
    monkeypatch.delenv("CODESHELL_Q4_M1_FUSED")
    monkeypatch.delenv("CODESHELL_Q4_M1_SPLIT")
    assert torch.equal(_call(mod, pw, x1, bias), old)  # the defaults
    rows = {m: _call(mod, pw, x[:m].contiguous(), bias) for m in (2, 3, 5, 8, 16)}
    assert_m1_rows_and_reference(old, rows, x1, pw, bias, "avx512_vnni:q8")


@needs_native
@needs_vnni
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_int4_m1_split_covers_every_row_once(threads, monkeypatch):
    # parallel_owned at 1-3 threads (3: more threads than cores, so shares are stolen): every
    # output row has its M = 1 bits, call after call.
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")
    monkeypatch.delenv("CODESHELL_Q4_M1_SPLIT", raising=False)
    mod = _ext.get()
    g = torch.Generator().manual_seed(threads)
    n, k = 2001, 4096
    pw = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group_size=128, symmetric=False)
    x = torch.randn(1, k, generator=g)
    before = torch.get_num_threads()
    try:
        set_num_threads(threads)
        monkeypatch.setenv("CODESHELL_Q4_M1_SPLIT", "0")
        ref = _call(mod, pw, x, None)
        monkeypatch.setenv("CODESHELL_Q4_M1_SPLIT", "1")
        for _ in range(20):
            assert torch.equal(_call(mod, pw, x, None), ref)
    finally:
        set_num_threads(before)
