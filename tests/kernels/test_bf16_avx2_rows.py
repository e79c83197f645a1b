"""The AVX2 bf16 decode rows on gemm_fma.h's register block (session 32 helper B; csrc/panel_bf16.cpp
`avx2_block_rows`, `decode_bf16` at isa avx2 for M >= 4 unless CODESHELL_BF16_AVX2_BLOCK says
otherwise): at every M in 1..64 each row is bitwise the row alone (M = 1, which stays on
Avx2::micro), bitwise the path before (CODESHELL_BF16_AVX2_BLOCK=0) and bitwise `avx2:gemm`
(prefill_bf16_fma isa 0) on the same rows; any K chunk (CODESHELL_BF16_AVX2_KC) or threshold gives
the same bits; NaN / inf in x and bias keep the same bits; in and out of the decode step's thread
team (through the decode step's tests, which run this kernel). Session 33 helper B's tiles
(`avx2_xrows` at M = 2 / 3 over 8-output blocks, Avx2::micro's tiles out of line at 4..31 rows, the
block from 32): every M the same bits as CODESHELL_BF16_AVX2_SMALL=0 (the code before) and as the rows alone, at partial
panels and blocks wholly past N, 1 and 2 threads. Runs on any CPU with the native kernels (AVX2 is
the baseline).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, prepack

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")

# (N, K): a partial panel and K tails (not a multiple of 8 / 32), codeshell-mini's K = 256, and a K
# of several 256-k chunks with a tail chunk (1030 -> Kp 1056: chunks 256 x 4 + 32)
SHAPES = [(40, 256), (37, 100), (19, 1030), (50, 13)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _dec(mod, x, p, n, bias):
    return mod.decode_bf16(x.contiguous(), p.data, n, bias, 0).clone()


@needs_native
@pytest.mark.parametrize("n,k", SHAPES)
def test_every_m_is_its_rows_alone_and_the_path_before(n, k, monkeypatch):
    mod = _ext.get()
    g = torch.Generator().manual_seed(n * k)
    p = prepack(torch.randn(n, k, generator=g) / k ** 0.5)
    bias = torch.randn(n, generator=g)
    x = torch.randn(64, k, generator=g)
    x[3, 5 % k] = float("nan")
    x[10, 7 % k] = float("inf")
    x[20] = 0.0
    x[21] = -0.0
    alone = torch.cat([_dec(mod, x[i:i + 1], p, n, bias) for i in range(64)])
    for m in range(1, 65):
        monkeypatch.delenv("CODESHELL_BF16_AVX2_BLOCK", raising=False)
        got = _dec(mod, x[:m], p, n, bias)
        assert torch.equal(_bits(got), _bits(alone[:m])), (n, k, m)
        # the same rows at another place of the call (the last m rows)
        assert torch.equal(_bits(_dec(mod, x[64 - m:], p, n, bias)), _bits(alone[64 - m:])), (n, k, m)
        monkeypatch.setenv("CODESHELL_BF16_AVX2_BLOCK", "0")
        assert torch.equal(_bits(_dec(mod, x[:m], p, n, bias)), _bits(got)), (n, k, m)
    # avx2:gemm (the prefill GEMM) gives the decode rows' bits at decode M too
    for m in (1, 5, 8, 36, 64):
        assert torch.equal(_bits(mod.prefill_bf16_fma(x[:m].contiguous(), p.data, n, bias, isa=0)),
                           _bits(alone[:m])), (n, k, m)


@needs_native
@pytest.mark.parametrize("kc,start", [("32", "4"), ("96", "1"), ("512", "2"), ("256", "9"), ("64", "65")])
def test_chunks_and_thresholds_do_not_change_bits(kc, start, monkeypatch):
    mod = _ext.get()
    n, k = 70, 1030
    g = torch.Generator().manual_seed(7)
    p = prepack(torch.randn(n, k, generator=g) / k ** 0.5)
    x = torch.randn(64, k, generator=g)
    want = {m: _dec(mod, x[:m], p, n, None) for m in (1, 2, 3, 4, 6, 7, 13, 33, 64)}
    monkeypatch.setenv("CODESHELL_BF16_AVX2_KC", kc)
    monkeypatch.setenv("CODESHELL_BF16_AVX2_BLOCK", start)
    for m, w in want.items():
        assert torch.equal(_bits(_dec(mod, x[:m], p, n, None)), _bits(w)), (kc, start, m)


@needs_native
def test_two_threads_give_the_same_bits():
    mod = _ext.get()
    n, k = 16384 // 8, 256
    g = torch.Generator().manual_seed(3)
    p = prepack(torch.randn(n, k, generator=g) / k ** 0.5)
    x = torch.randn(36, k, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _dec(mod, x, p, n, None)
        torch.set_num_threads(2)
        two = _dec(mod, x, p, n, None)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(_bits(one), _bits(two))


@needs_native
def test_bad_input_is_one_clear_error():
    mod = _ext.get()
    p = prepack(torch.randn(40, 64))
    with pytest.raises(RuntimeError, match="1..64 rows"):
        mod.decode_bf16(torch.randn(65, 64), p.data, 40, None, 0)
    with pytest.raises(RuntimeError, match="fp32 x"):
        mod.decode_bf16(torch.randn(8, 64).bfloat16(), p.data, 40, None, 0)
    with pytest.raises(RuntimeError, match="K=65"):
        mod.decode_bf16(torch.randn(8, 65), p.data, 40, None, 0)


@needs_native
@pytest.mark.parametrize("tiles,m", [("53", 8), ("332", 8), ("44", 8), ("6", 6), ("123", 6), ("66", 13)])
def test_explicit_tiles_do_not_change_bits(tiles, m, monkeypatch):
    # CODESHELL_BF16_AVX2_TILES (an A/B switch of Avx2::micro's row tiles; ignored where the digits
    # do not sum to M, as "66" at M = 13): one chain per output whatever the tile
    mod = _ext.get()
    n, k = 45, 1030
    g = torch.Generator().manual_seed(11)
    p = prepack(torch.randn(n, k, generator=g) / k ** 0.5)
    x = torch.randn(m, k, generator=g)
    alone = torch.cat([_dec(mod, x[i:i + 1], p, n, None) for i in range(m)])
    monkeypatch.setenv("CODESHELL_BF16_AVX2_BLOCK", "0")
    monkeypatch.setenv("CODESHELL_BF16_AVX2_TILES", tiles)
    assert torch.equal(_bits(_dec(mod, x, p, n, None)), _bits(alone)), (tiles, m)


@needs_native
@pytest.mark.parametrize("n,k", SHAPES + [(8, 64), (16 * 11 + 5, 256)])
def test_small_m_tiles_give_the_bits_before(n, k, monkeypatch):
    # M = 2 / 3 on 8-output blocks 5 / 3 at a time (a thread's last step shorter; the second block of
    # a panel past N at n = 8, 37, 19, 50: not stored), the row tiles out of line (M = 4..31) and the
    # block from 32 rows (12 before): the same chains, so the bits of CODESHELL_BF16_AVX2_SMALL=0 and
    # of the rows alone, at 1 and 2 threads
    mod = _ext.get()
    g = torch.Generator().manual_seed(n + k)
    p = prepack(torch.randn(n, k, generator=g) / k ** 0.5)
    bias = torch.randn(n, generator=g)
    x = torch.randn(40, k, generator=g)
    x[1, 3 % k] = float("nan")
    x[2, 1 % k] = float("-inf")
    alone = torch.cat([_dec(mod, x[i:i + 1], p, n, bias) for i in range(40)])
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for m in range(2, 41 if threads == 1 else 13):
                monkeypatch.delenv("CODESHELL_BF16_AVX2_SMALL", raising=False)
                got = _dec(mod, x[:m], p, n, bias)
                nob = _dec(mod, x[:m], p, n, None)
                assert torch.equal(_bits(got), _bits(alone[:m])), (n, k, m, threads)
                monkeypatch.setenv("CODESHELL_BF16_AVX2_SMALL", "0")
                assert torch.equal(_bits(_dec(mod, x[:m], p, n, bias)), _bits(got)), (n, k, m, threads)
                assert torch.equal(_bits(_dec(mod, x[:m], p, n, None)), _bits(nob)), (n, k, m, threads)
    finally:
        torch.set_num_threads(old)
