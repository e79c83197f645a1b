"""int4 M = 1 without AMX with groups of 32 / 64 (a Q4_0 GGUF's layers): q4_m1_g32.h's 16-row tile
(session 22 helper D; CODESHELL_Q4_M1_G32=off: tile_q4v a row at a time, as before) gives tile_q4v's
bits for every row, at 1-3 threads, N not a multiple of 16 (the tail rows run tile_q4v), offsets or
symmetric (Q4_0 is symmetric), bias, a zero group of x, the prefetch distances; and the defaults'
M = 1 rows equal row 0 of M = 2, 3, 8, 16 and are within 2e-5 of `ops.reference`
(codeshell.testing.assert_m1_rows_and_reference). K up to 16384 (512 groups of 32: the tile's
limit) and past it (K = 32768 at G = 32: tile_q4v)."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4, set_num_threads
from codeshell.testing import assert_m1_rows_and_reference

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
VNNI = ops.ISA_LEVELS.index("avx512_vnni")
needs_vnni = pytest.mark.skipif(not available() or ops.isa_level() < VNNI, reason="needs AVX512-VNNI")

SWITCHES = ("CODESHELL_Q4_M1_G32", "CODESHELL_Q4_M1_PF", "CODESHELL_Q4_M1_PFS", "CODESHELL_Q4_M1_SPLIT",
            "CODESHELL_M1_PRIME", "CODESHELL_CHUNKS_TEAM")
SHAPES = [(37, 1024, 32, True), (1029, 2048, 32, False), (50, 4096, 32, True), (64, 4096, 64, False),
          (21, 16384, 32, True), (16, 512, 64, True), (11, 256, 32, False), (19, 32768, 32, True)]


@needs_native
@needs_vnni
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,k,group,symmetric", [pytest.param(*s, id=f"{s[0]}x{s[1]}-g{s[2]}-{'sym' if s[3] else 'offs'}")
                                                 for s in SHAPES])
def test_int4_m1_g32_tile16_gives_tile_q4v_bits(n, k, group, symmetric, threads, monkeypatch):
    mp = monkeypatch
    mp.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")
    for v in SWITCHES:
        mp.delenv(v, raising=False)
    mod = _ext.get()
    g = torch.Generator().manual_seed(n * 5 + k + threads)
    pw = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group_size=group, symmetric=symmetric)
    bias = torch.randn(n, generator=g) if n % 2 else None
    x = torch.randn(16, k, generator=g) * 3
    x[0, :group] = 0  # a zero group (scale 0) in row 0
    x1 = x[:1].contiguous()

    def call(xx):
        return mod.decode_int4_q8(xx, pw.data, pw.scales, pw.offsets, pw.group_size, bias, VNNI)

    before = torch.get_num_threads()
    try:
        set_num_threads(threads)
        mp.setenv("CODESHELL_Q4_M1_G32", "off")
        old = call(x1)  # tile_q4v a row at a time: before session 22
        mp.delenv("CODESHELL_Q4_M1_G32")
        for pf, pfs in (("8192", "1"), ("0", "0"), ("2048", "2")):
            mp.setenv("CODESHELL_Q4_M1_PF", pf)
            mp.setenv("CODESHELL_Q4_M1_PFS", pfs)
            assert torch.equal(call(x1), old), f"PF={pf} PFS={pfs}: bits differ"
        for v in SWITCHES:
            mp.delenv(v, raising=False)
        assert_m1_rows_and_reference(old, {}, x1, pw, bias, "avx512_vnni:q8", call=call, x=x, ms=(2, 3, 8, 16))
    finally:
        set_num_threads(before)
