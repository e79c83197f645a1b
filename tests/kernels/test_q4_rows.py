"""csrc/q4_rows.h: int4 (groups of 128 / 256) at M = 3..16 on CPUs without AMX (`avx512_vnni:q8`; 2..16 here,
CODESHELL_Q4_ROWS_MIN_M=2).

The kernel promises tile_q4v's bits (the M = 1 kernel's per-lane epilogue), so every row of every
M = 2..16 is checked bit for bit against the same row alone (M = 1, tile_q4v / tile_q4v12) and
against the earlier M >= 2 kernels (CODESHELL_Q4_ROWS=0: tile_q4v12 / tile_q4v / run_q4r), and the
output against the path's reference (`ops.reference`) within 2e-5 of the largest output. Shapes:
groups of 128 and 256, with and without offsets and bias, N leaving partial tiles for every
tile width (2, 4, 8 and 16 weight rows), K with more than 16 groups (the scale table's and the
affine sums' second 16-group pass), an all-zero row of x. Checked at each AVX-512 level below AMX
(CODESHELL_KERNEL_ISA caps the level, so an AMX CPU runs this kernel too).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops
from codeshell.testing import assert_rows_bitwise, int4_rows_case

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1

# (group, symmetric, N, K): N = 37 leaves 1 / 1 / 5 / 5 rows past the 2- / 4- / 8- / 16-row tiles.
WEIGHTS = [(128, False, 37, 1024), (128, True, 37, 256), (256, True, 19, 1024), (256, False, 23, 2048),
           (128, True, 21, 4096)]


@needs_native
@pytest.mark.parametrize("level", ["avx512_vnni", "avx512_bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("group,sym,n,k", [pytest.param(*w, id=f"g{w[0]}-{'sym' if w[1] else 'offs'}-{w[2]}x{w[3]}")
                                           for w in WEIGHTS])
def test_q4_rows_matches_m1_old_kernels_and_reference(level, with_bias, group, sym, n, k, monkeypatch):
    lvl = ops.ISA_LEVELS.index(level)
    if lvl > LEVEL:
        pytest.skip(f"{level} above this CPU's highest kernel ISA ({ops.ISA_LEVELS[LEVEL]})")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", level)
    for var in ("CODESHELL_Q4_ROWS", "CODESHELL_Q4_ROWS_MIN_M", "CODESHELL_Q4_ROWS_MAX_M"):
        monkeypatch.delenv(var, raising=False)
    mod, path, pw, bias, x, alone = int4_rows_case(n, k, group, sym, with_bias, (n * k, 3, k + 1), 37, 5)
    for m in range(2, 17):
        monkeypatch.setenv("CODESHELL_Q4_ROWS_MIN_M", "2")  # the default starts at 3
        new = ops._compute(path, mod, x[:m], pw, bias)
        monkeypatch.delenv("CODESHELL_Q4_ROWS_MIN_M")
        monkeypatch.setenv("CODESHELL_Q4_ROWS", "0")
        old = ops._compute(path, mod, x[:m], pw, bias)
        monkeypatch.delenv("CODESHELL_Q4_ROWS")
        for name, y in (("q4_rows.h", new), ("the earlier kernels (CODESHELL_Q4_ROWS=0)", old)):
            assert_rows_bitwise(y, alone[:m], f"{name} at {level}, int4 {n}x{k} g{group} sym={sym}")
    print(f"{path} (q4_rows.h, M = 2..16) at {level}: int4 {n}x{k} g{group} sym={sym} bias={with_bias}: rows bitwise "
          f"those of M = 1 (tile_q4v) and of CODESHELL_Q4_ROWS=0, M = 1 within 2e-5 of the reference")
