"""csrc/q4_rows.h's session 19 schedule (CODESHELL_Q4_ROWS_V2, default on) against the session 17
schedule (CODESHELL_Q4_ROWS_V2=0), bit for bit, on CPUs without AMX (`avx512_vnni:q8`).

The v2 schedule writes each 8 x 2 tile's scale-product table during the tile before it (two
buffers that alternate within a thread's chunk of weight rows), issues a row's fp32 step two rows
late, and runs vpdpbusd through inline asm: the same integers and fp32 operations in the same
order, so every output must keep its bits. Checked: M = 3..16 (the 8 x 2 tiles at M = 5..16, the
remainder rows of M = 9..16, M = 3-4 unchanged), N with many tiles, several thread chunks (the
buffers restart at each chunk) and an odd last weight row (a 1-row tile without a precomputed
table), K with one table pass (v2) and several (the old schedule inside the v2 switch), groups of
128 and 256, with and without offsets and bias; every row also against the same row alone
(M = 1, tile_q4v's bits) and the output against the path's reference.
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops
from codeshell.testing import assert_rows_bitwise, int4_rows_case

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1

# (group, symmetric, N, K): N = 301 / 259: many 8 x 2 tiles, several thread chunks (chunks of a
# multiple of 16 rows, at least 64) and an odd last row; K = 2048 at g128 and 4096 at g256 are 16
# groups, K = 4096 at g128 32 groups (one v2 pass), K = 8192 at g128 64 groups (the old schedule).
WEIGHTS = [(128, True, 301, 1024), (128, False, 259, 256), (128, True, 259, 2048), (256, False, 301, 4096),
           (128, True, 131, 4096), (128, False, 67, 8192)]


@needs_native
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("group,sym,n,k", [pytest.param(*w, id=f"g{w[0]}-{'sym' if w[1] else 'offs'}-{w[2]}x{w[3]}")
                                           for w in WEIGHTS])
def test_q4_rows_v2_matches_v1_m1_and_reference(with_bias, group, sym, n, k, monkeypatch):
    if LEVEL < ops.ISA_LEVELS.index("avx512_vnni"):
        pytest.skip("needs AVX512-VNNI")
    # the level below AMX (an AMX CPU runs the int4 rows of the AMX bits otherwise)
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_bf16" if LEVEL >= ops.ISA_LEVELS.index("avx512_bf16")
                       else "avx512_vnni")
    for var in ("CODESHELL_Q4_ROWS", "CODESHELL_Q4_ROWS_MIN_M", "CODESHELL_Q4_ROWS_MAX_M", "CODESHELL_Q4_ROWS_V2"):
        monkeypatch.delenv(var, raising=False)
    mod, path, pw, bias, x, alone = int4_rows_case(n, k, group, sym, with_bias, (n + k, 5, k + 7), 29, 6)
    for m in range(3, 17):
        new = ops._compute(path, mod, x[:m], pw, bias)
        monkeypatch.setenv("CODESHELL_Q4_ROWS_V2", "0")
        old = ops._compute(path, mod, x[:m], pw, bias)
        monkeypatch.delenv("CODESHELL_Q4_ROWS_V2")
        assert_rows_bitwise(new, old, f"q4_rows.h v2 at M={m}, int4 {n}x{k} g{group} sym={sym}",
                            against="CODESHELL_Q4_ROWS_V2=0")
        assert_rows_bitwise(new, alone[:m], f"q4_rows.h v2 at M={m}, int4 {n}x{k} g{group} sym={sym}")
