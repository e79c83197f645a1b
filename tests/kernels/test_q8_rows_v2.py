"""csrc/q8_rows.h's x-unsigned schedule (CODESHELL_Q8R_V2=1, session 20): int8 rows at M = 2..16 on
CPUs without AMX (`avx512_vnni:q8`) with x + 128 as vpdpbusd's unsigned operand and the weight
signed as stored (no xor of every broadcast weight run), each block's T_b taken back by the
weight rows' own block sums (128 sum w, two vpdpbusd a row and block) instead of x's (128 sx_b).
The same exact int32 T_b, so the same bits: every output against CODESHELL_Q8R_V2=0 (and with the
prefetch switches beside it), every row against the same row alone (M = 1, tile_r16_q8 / tile_v,
the panel's bits) and M = 1 against `ops.reference`. Shapes: N leaving a partial last group of 8
weight rows (and of E rows), K = 128 .. 4096 (1 .. 32 blocks: the accumulator slots past 16 blocks,
the tree without its +0 slots), extreme weights and x (|w| = 127, x at +-127 after rounding, a
zero row), with and without bias; M = 2 through CODESHELL_Q8_PANEL_MIN_M=2 (E = 8).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int8
from codeshell.testing import assert_rows_bitwise

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1
VNNI = ops.ISA_LEVELS.index("avx512_vnni")
SWITCHES = ("CODESHELL_Q8R_V2", "CODESHELL_Q8R_PF0", "CODESHELL_Q8_PANEL_MIN_M", "CODESHELL_Q8_ROWS_MAX_M",
            "CODESHELL_Q8R_ASM", "CODESHELL_Q8R_EPI", "CODESHELL_Q8R_T8",
            "CODESHELL_Q8R_PREP")
SHAPES = [(37, 1024), (301, 128), (67, 256), (1029, 1024), (45, 2048), (29, 4096), (16, 384), (9, 640)]


def q8_rows_case(n, k, with_bias, extreme, seed):
    """An int8 weight [n, k] (per-row scales), its bias or None and 16 x rows [16, k]: random, or at
    the int8 ends with a zero row (`extreme`); every 41st column x 9 so the x scales differ by column."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if extreme:  # rows at the int8 ends (|q| = 127 everywhere after the per-row scale)
        w = torch.sign(w) * 0.05
        w[0] = 0.05
        w[1] = -0.05
    pw = quantize_int8(w)
    bias = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(16, k, generator=g) * 3
    if extreme:
        x = torch.sign(x) * 3  # every x rounds to +-127
        x[3] = 0
    x[:, ::41] *= 9
    return pw, bias, x

@needs_native
@pytest.mark.parametrize("extreme", [False, True], ids=["randn", "extreme"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k", [pytest.param(*s, id=f"{s[0]}x{s[1]}") for s in SHAPES])
def test_q8_rows_v2_keeps_the_bits(n, k, with_bias, extreme, monkeypatch):
    if LEVEL < VNNI:
        pytest.skip("needs AVX512-VNNI")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")  # below AMX: q8_rows.h runs on an AMX CPU too
    for v in SWITCHES:
        monkeypatch.delenv(v, raising=False)
    mod = _ext.get()
    pw, bias, x = q8_rows_case(n, k, with_bias, extreme, seed=n * 3 + k)

    def call(xx):
        return mod.decode_int8_q8(xx.contiguous(), pw.data, pw.scales, bias, VNNI)

    alone = torch.cat([call(x[i:i + 1]) for i in range(16)])
    ref = ops.reference(x, pw, bias, "avx512_vnni:q8")
    err = (alone - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), f"{n}x{k}: max abs error {err:.3g} against the reference"
    monkeypatch.setenv("CODESHELL_Q8_PANEL_MIN_M", "2")  # M = 2 on q8_rows.h too (E = 8)
    for m in range(2, 17):
        monkeypatch.setenv("CODESHELL_Q8R_V2", "0")
        old = call(x[:m])
        assert_rows_bitwise(old, alone[:m], f"q8_rows.h (V2=0) at M={m}, int8 {n}x{k}")
        for pf0 in ("0", "2", "6"):
            monkeypatch.setenv("CODESHELL_Q8R_V2", "1")
            monkeypatch.setenv("CODESHELL_Q8R_PF0", pf0)
            assert_rows_bitwise(call(x[:m]), old, f"q8_rows.h v2 (PF0={pf0}) at M={m}, int8 {n}x{k}",
                                against="CODESHELL_Q8R_V2=0")
        monkeypatch.delenv("CODESHELL_Q8R_PF0")
        monkeypatch.delenv("CODESHELL_Q8R_V2")
        assert_rows_bitwise(call(x[:m]), old, f"q8_rows.h (defaults) at M={m}, int8 {n}x{k}", against="V2=0")
        # session 27: M = 5..8's transposed result stores (store_t8) against the scalar stores
        monkeypatch.setenv("CODESHELL_Q8R_T8", "0")
        assert_rows_bitwise(call(x[:m]), old, f"q8_rows.h (T8=0) at M={m}, int8 {n}x{k}", against="V2=0")
        monkeypatch.delenv("CODESHELL_Q8R_T8")
        # and Prepared's x layout by gathers instead of M = 5..8's qword transpose
        monkeypatch.setenv("CODESHELL_Q8R_PREP", "0")
        assert_rows_bitwise(call(x[:m]), old, f"q8_rows.h (PREP=0) at M={m}, int8 {n}x{k}", against="V2=0")
        monkeypatch.delenv("CODESHELL_Q8R_PREP")
