"""Batch-1 (M = 1) kernels without AMX after session 18: qdot.cpp's int4 16-row tile (q4_m1.h, the
default at K <= 2048 with groups of 128 / 256; CODESHELL_Q4_M1_R16=0: tile_q4v12), int4's split
by size (parallel_owned under 4 MiB of weight; CODESHELL_Q4_M1_SPLIT=0: parallel_chunks), the M = 1
prefetch distance (CODESHELL_Q8_M1_PF / CODESHELL_Q4_M1_PF, hint *_PFH) and int8's contiguous
split (CODESHELL_Q8_M1_SPLIT=1: parallel_owned), the chunk priming (CODESHELL_M1_PRIME=1) and
parallel_chunks on the shared Team (CODESHELL_CHUNKS_TEAM=1). None of them may change a bit: every row of
M = 1 must equal the earlier kernels' (tile_q4v12 / tile_q4v / tile_r16_q8 / tile_v with 2 KiB
prefetch) and row 0 of M = 2, 3, 8, 16 (row invariance), within 2e-5 of `ops.reference`.
Shapes: K = 256 / 1024 / 2048 (1-16 groups of 128, or of 256), N not a multiple of 16 (the
tile's tail rows run tile_q4v12) and below 16, offsets / symmetric, bias, a zero group of x,
1-3 threads (chunks that start at any multiple of 16).
Session 19: the int4 M = 1 scale / offset rows prefetched tiles ahead (CODESHELL_Q4_M1_PFS, default 1;
0 as before) and the 16-row tile up to 32 groups (CODESHELL_Q4_M1_R16_G, default 32; 16 as before):
K = 4096 / 8192 / 16384 rows too, the same bits.
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4, quantize_int8, set_num_threads
from codeshell.testing import assert_m1_rows_and_reference

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
VNNI = ops.ISA_LEVELS.index("avx512_vnni")
needs_vnni = pytest.mark.skipif(not available() or ops.isa_level() < VNNI, reason="needs AVX512-VNNI")

SWITCHES = ("CODESHELL_Q4_M1_R16", "CODESHELL_Q4_M1_PF", "CODESHELL_Q4_M1_PFH", "CODESHELL_Q8_M1_PF",
            "CODESHELL_Q8_M1_PFH", "CODESHELL_Q8_M1_SPLIT", "CODESHELL_Q4_M1_FUSED", "CODESHELL_Q4_M1_SPLIT",
            "CODESHELL_Q4V12", "CODESHELL_Q4_ROWS_MIN_M", "CODESHELL_CHUNKS_TEAM", "CODESHELL_M1_PRIME",
            "CODESHELL_Q4_M1_PFS", "CODESHELL_Q4_M1_R16_G", "CODESHELL_Q8_M1_SPLIT_MAX_MB")
INT4 = [(37, 1024, 128, False), (1029, 1024, 128, True), (203, 2048, 128, False), (45, 256, 128, True),
        (11, 1024, 128, False), (70, 2048, 256, False), (33, 512, 256, True), (50, 4096, 128, False)]
INT8 = [(1029, 1024), (37, 4096), (45, 2048), (9, 1024), (21, 8192)]


@pytest.fixture
def vnni_env(monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")  # below AMX: these kernels run on an AMX CPU too
    for v in SWITCHES:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def _int4(mod, pw, x, bias):
    return mod.decode_int4_q8(x, pw.data, pw.scales, pw.offsets, pw.group_size, bias, VNNI)


def _int8(mod, pw, x, bias):
    return mod.decode_int8_q8(x, pw.data, pw.scales, bias, VNNI)


def _defaults_rows_reference(mp, old, call, x, pw, bias, ms):
    # every test's tail: the switches back to their defaults, then the defaults' M = 1 bits (`old`),
    # row 0 of M in ms, and `old` against the reference (codeshell.testing)
    for v in SWITCHES:
        mp.delenv(v, raising=False)
    assert_m1_rows_and_reference(old, {}, x[:1].contiguous(), pw, bias, "avx512_vnni:q8", call=call, x=x, ms=ms)


@needs_native
@needs_vnni
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k,group,symmetric", [pytest.param(*s, id=f"{s[0]}x{s[1]}-g{s[2]}-{'sym' if s[3] else 'offs'}")
                                                 for s in INT4])
def test_int4_m1_tile16_and_prefetch_give_the_earlier_bits(n, k, group, symmetric, with_bias, threads, vnni_env):
    mp = vnni_env
    mod = _ext.get()
    g = torch.Generator().manual_seed(n * 7 + k + threads)
    pw = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group_size=group, symmetric=symmetric)
    bias = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(16, k, generator=g) * 3
    x[0, :group] = 0  # a zero group (scale 0) in row 0
    x1 = x[:1].contiguous()
    before = torch.get_num_threads()
    try:
        set_num_threads(threads)
        mp.setenv("CODESHELL_Q4_M1_R16", "0")
        mp.setenv("CODESHELL_Q4_M1_PF", "2048")
        mp.setenv("CODESHELL_Q4_M1_SPLIT", "0")
        old = _int4(mod, pw, x1, bias)  # tile_q4v12 / tile_q4v, 2 KiB ahead, parallel_chunks: before session 18
        mp.delenv("CODESHELL_Q4_M1_SPLIT")  # below: the default split (parallel_owned under 4 MiB)
        for r16 in ("0", "1"):
            for pf, pfh in (("0", "0"), ("8192", "0"), ("8192", "1"), ("4096", "3")):
                mp.setenv("CODESHELL_M1_PRIME", "1" if pfh == "1" else "0")
                mp.setenv("CODESHELL_Q4_M1_R16", r16)
                mp.setenv("CODESHELL_Q4_M1_PF", pf)
                mp.setenv("CODESHELL_Q4_M1_PFH", pfh)
                assert torch.equal(_int4(mod, pw, x1, bias), old), f"R16={r16} PF={pf} PFH={pfh}: bits differ"
        _defaults_rows_reference(mp, old, lambda xx: _int4(mod, pw, xx, bias), x, pw, bias, (2, 3, 8, 16))
    finally:
        set_num_threads(before)
    tile16 = k // group <= 16
    print(f"int4 M = 1 {n}x{k} g{group} at {threads} threads: path avx512_vnni:q8 "
          f"{'q4_m1.h tile16 (+ tile_q4v12 tail)' if tile16 else 'tile_q4v'} against tile_q4v12 / tile_q4v")


@needs_native
@needs_vnni
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,k", [pytest.param(*s, id=f"{s[0]}x{s[1]}") for s in INT8])
def test_int8_m1_prefetch_and_split_give_the_earlier_bits(n, k, threads, vnni_env):
    mp = vnni_env
    mod = _ext.get()
    g = torch.Generator().manual_seed(n + k * 3 + threads)
    pw = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    bias = torch.randn(n, generator=g)
    x = torch.randn(16, k, generator=g) * 2
    x[0, 128:256] = 0  # a zero block
    x1 = x[:1].contiguous()
    before = torch.get_num_threads()
    try:
        set_num_threads(threads)
        mp.setenv("CODESHELL_Q8_M1_PF", "2048")
        old = _int8(mod, pw, x1, bias)  # 2 KiB ahead, parallel_chunks: before session 18
        for split in ("0", "1"):
            for pf, pfh in (("0", "0"), ("8192", "0"), ("8192", "2"), ("16384", "1")):
                mp.setenv("CODESHELL_M1_PRIME", "1" if pfh == "2" else "0")
                mp.setenv("CODESHELL_Q8_M1_SPLIT", split)
                mp.setenv("CODESHELL_Q8_M1_PF", pf)
                mp.setenv("CODESHELL_Q8_M1_PFH", pfh)
                for _ in range(3 if split == "1" else 1):  # a stolen share covers every row once, call after call
                    assert torch.equal(_int8(mod, pw, x1, bias), old), f"SPLIT={split} PF={pf} PFH={pfh}: bits differ"
        _defaults_rows_reference(mp, old, lambda xx: _int8(mod, pw, xx, bias), x, pw, bias, (2, 3, 16))
    finally:
        set_num_threads(before)
    print(f"int8 M = 1 {n}x{k} at {threads} threads: path avx512_vnni:q8 "
          f"{'tile_r16_q8' if k <= 2048 else 'tile_v'}, prefetch / split variants")


@needs_native
@needs_vnni
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,k", [pytest.param(*s, id=f"{s[0]}x{s[1]}")
                                 for s in [(1536, 1024), (1029, 4096), (2053, 4096), (45, 2048), (8192, 1024)]])
def test_int8_m1_split_by_size_gives_the_chunks_bits(n, k, threads, vnni_env):
    """Session 21: int8 M = 1 runs parallel_owned for a weight of at most 8 MiB by default
    (CODESHELL_Q8_M1_SPLIT unset; CODESHELL_Q8_M1_SPLIT_MAX_MB moves the size) and parallel_chunks
    above: the same bits as parallel_chunks everywhere (CODESHELL_Q8_M1_SPLIT=0), call after call (a
    stolen share covers every row once), with sizes at, below and above the threshold; tile_r16_q8
    (K <= 2048) and tile_v (K = 4096)."""
    mp = vnni_env
    mod = _ext.get()
    g = torch.Generator().manual_seed(n * 5 + k + threads)
    pw = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    bias = torch.randn(n, generator=g)
    x = torch.randn(16, k, generator=g) * 2
    x1 = x[:1].contiguous()
    before = torch.get_num_threads()
    try:
        set_num_threads(threads)
        mp.setenv("CODESHELL_Q8_M1_SPLIT", "0")
        old = _int8(mod, pw, x1, bias)  # parallel_chunks: before session 21
        mp.delenv("CODESHELL_Q8_M1_SPLIT")
        mib = (n * k) / 2**20
        for max_mb in (None, "0", "1", "4", "8", "64"):
            if max_mb is None:
                mp.delenv("CODESHELL_Q8_M1_SPLIT_MAX_MB", raising=False)
            else:
                mp.setenv("CODESHELL_Q8_M1_SPLIT_MAX_MB", max_mb)
            for _ in range(3):
                assert torch.equal(_int8(mod, pw, x1, bias), old), f"SPLIT_MAX_MB={max_mb} ({mib:.2f} MiB): bits differ"
        _defaults_rows_reference(mp, old, lambda xx: _int8(mod, pw, xx, bias), x, pw, bias, (2, 3))
    finally:
        set_num_threads(before)
    print(f"int8 M = 1 {n}x{k} ({mib:.2f} MiB) at {threads} threads: path avx512_vnni:q8 "
          f"{'tile_r16_q8' if k <= 2048 else 'tile_v'}, {'parallel_owned' if n * k <= 8 << 20 else 'parallel_chunks'} "
          "by default, against parallel_chunks")


@needs_native
@needs_vnni
@pytest.mark.parametrize("threads", [2, 3])
def test_chunks_on_the_shared_team_give_the_same_bits(threads, vnni_env):
    # CODESHELL_CHUNKS_TEAM=1 (parallel.h, off by default): parallel_chunks outside a decode step runs
    # its chunks on Team::shared instead of an at::parallel_for region; every row once, call after call
    mp = vnni_env
    mod = _ext.get()
    g = torch.Generator().manual_seed(threads)
    p8 = quantize_int8(torch.randn(1029, 1024, generator=g) * 0.05)
    p4 = quantize_int4(torch.randn(2003, 4096, generator=g) * 0.05, group_size=128, symmetric=False)
    x8, x4 = torch.randn(1, 1024, generator=g), torch.randn(1, 4096, generator=g)
    before = torch.get_num_threads()
    try:
        set_num_threads(threads)
        ref8, ref4 = _int8(mod, p8, x8, None), _int4(mod, p4, x4, None)
        mp.setenv("CODESHELL_CHUNKS_TEAM", "1")
        for _ in range(10):
            assert torch.equal(_int8(mod, p8, x8, None), ref8)
            assert torch.equal(_int4(mod, p4, x4, None), ref4)
    finally:
        set_num_threads(before)
    print(f"int8 / int4 M = 1 at {threads} threads: parallel_chunks on Team::shared (CODESHELL_CHUNKS_TEAM=1)")


INT4_WIDE = [(1029, 4096, 128, False), (37, 4096, 128, True), (45, 8192, 256, False), (21, 8192, 128, True),
             (19, 16384, 128, False), (203, 1024, 128, False)]


@needs_native
@needs_vnni
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,k,group,symmetric", [pytest.param(*s, id=f"{s[0]}x{s[1]}-g{s[2]}-{'sym' if s[3] else 'offs'}")
                                                 for s in INT4_WIDE])
def test_int4_m1_scale_prefetch_and_wide_tile16_give_the_earlier_bits(n, k, group, symmetric, threads, vnni_env):
    # session 19: the scale / offset rows prefetched 0-5 tiles ahead (past the last row too), the
    # 16-row tile at 16 / 32 / 64 / 128 groups a row (K = 4096 .. 16384), against the kernels before
    # session 18 (tile_q4v12 / tile_q4v, 2 KiB ahead, parallel_chunks), row 0 of M = 2, 3, 16
    mp = vnni_env
    mod = _ext.get()
    g = torch.Generator().manual_seed(n * 5 + k + threads)
    pw = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group_size=group, symmetric=symmetric)
    bias = torch.randn(n, generator=g)
    x = torch.randn(16, k, generator=g) * 3
    x[0, group:2 * group] = 0  # a zero group (scale 0) in row 0
    x1 = x[:1].contiguous()
    before = torch.get_num_threads()
    try:
        set_num_threads(threads)
        for v, val in (("CODESHELL_Q4_M1_R16", "0"), ("CODESHELL_Q4_M1_PF", "2048"), ("CODESHELL_Q4_M1_SPLIT", "0"),
                       ("CODESHELL_Q4_M1_PFS", "0")):
            mp.setenv(v, val)
        old = _int4(mod, pw, x1, bias)
        for v in ("CODESHELL_Q4_M1_R16", "CODESHELL_Q4_M1_PF", "CODESHELL_Q4_M1_SPLIT"):
            mp.delenv(v)
        for r16g in ("16", "32", "64", "128"):
            for pfs in ("0", "1", "2", "5"):
                mp.setenv("CODESHELL_Q4_M1_R16_G", r16g)
                mp.setenv("CODESHELL_Q4_M1_PFS", pfs)
                assert torch.equal(_int4(mod, pw, x1, bias), old), f"R16_G={r16g} PFS={pfs}: bits differ"
        _defaults_rows_reference(mp, old, lambda xx: _int4(mod, pw, xx, bias), x, pw, bias, (2, 3, 16))
    finally:
        set_num_threads(before)
    print(f"int4 M = 1 {n}x{k} g{group} at {threads} threads: scale prefetch 0-5 tiles ahead, 16-row tile up "
          f"to 16-128 groups, against tile_q4v12 / tile_q4v")
