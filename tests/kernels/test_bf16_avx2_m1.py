"""The AVX2 bf16 decode at M = 1 on the x-stationary tile, and x's transpose in a per-thread scratch
(session 34 helper B; csrc/panel_bf16.cpp `avx2_m1_rows`, `avx2_transpose_x`, `decode_bf16` at isa
avx2): M = 1 gives bitwise the code before (CODESHELL_BF16_AVX2_M1=0: Avx2::micro<1, 4>) at partial
panels and 8-output blocks past N, K tails (x copied zero-padded) and K a multiple of 32 (x read in
place, also from a row inside a larger tensor), NaN / -inf / -0 in x, with and without bias, every
prefetch mode (CODESHELL_BF16_AVX2_M1_PF), every split (CODESHELL_BF16_AVX2_M1_SPLIT: session 35's
parallel_owned over 1 MiB, also forced on and off), 1 and 2 threads; every M in 2..64 gives bitwise the rows alone
and the std::vector transpose before (CODESHELL_BF16_AVX2_XKEEP=0). Runs on any CPU with the native
kernels (AVX2 is the baseline).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, prepack

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")

# (N, K): N of 1..14 panels (a last tile of 1..4 panels, one or several tiles a thread), a partial panel, K tails
# (13, 100, 1030: padded) and K = Kp (256, 1024: x in place); 2563 x 256: over 1 MiB (the owned split by
# default at K <= 512), 161 panels (a last tile of one partial panel at the weight's end)
SHAPES = [(40, 256), (37, 100), (19, 1030), (50, 13), (8, 64), (16 * 13 + 5, 256), (16 * 14, 256), (104, 1024), (96, 32),
          (16 * 160 + 3, 256)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _dec(mod, x, p, n, bias):
    return mod.decode_bf16(x.contiguous(), p.data, n, bias, 0).clone()


def _case(n, k, rows):
    g = torch.Generator().manual_seed(n * 31 + k)
    p = prepack(torch.randn(n, k, generator=g) / k ** 0.5)
    bias = torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    x[1, 3 % k] = float("nan")
    x[2, 1 % k] = float("-inf")
    x[3] = -0.0
    return p, bias, x


@needs_native
@pytest.mark.parametrize("n,k", SHAPES)
def test_m1_gives_the_bits_before(n, k, monkeypatch):
    mod = _ext.get()
    p, bias, x = _case(n, k, 6)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for i in range(6):
                row = x[i:i + 1]  # a view into x: read in place when K is a multiple of 32
                for b in (bias, None):
                    monkeypatch.setenv("CODESHELL_BF16_AVX2_M1", "0")
                    want = _dec(mod, row, p, n, b)
                    monkeypatch.delenv("CODESHELL_BF16_AVX2_M1")
                    for split in (None, "0", "1"):
                        if split is None:
                            monkeypatch.delenv("CODESHELL_BF16_AVX2_M1_SPLIT", raising=False)
                        else:
                            monkeypatch.setenv("CODESHELL_BF16_AVX2_M1_SPLIT", split)
                        for pf in ("0", "1", "2"):
                            monkeypatch.setenv("CODESHELL_BF16_AVX2_M1_PF", pf)
                            got = mod.decode_bf16(row, p.data, n, b, 0)
                            assert torch.equal(_bits(got), _bits(want)), (n, k, i, pf, split, threads, b is None)
                    monkeypatch.delenv("CODESHELL_BF16_AVX2_M1_PF")
                    monkeypatch.delenv("CODESHELL_BF16_AVX2_M1_SPLIT", raising=False)
    finally:
        torch.set_num_threads(old)


@needs_native
@pytest.mark.parametrize("n,k", SHAPES[:4])
def test_every_m_is_its_rows_alone_with_and_without_the_scratch(n, k, monkeypatch):
    mod = _ext.get()
    p, bias, x = _case(n, k, 64)
    alone = torch.cat([_dec(mod, x[i:i + 1], p, n, bias) for i in range(64)])
    for m in range(2, 65):
        monkeypatch.delenv("CODESHELL_BF16_AVX2_XKEEP", raising=False)
        got = _dec(mod, x[:m], p, n, bias)
        assert torch.equal(_bits(got), _bits(alone[:m])), (n, k, m)
        monkeypatch.setenv("CODESHELL_BF16_AVX2_XKEEP", "0")
        assert torch.equal(_bits(_dec(mod, x[:m], p, n, bias)), _bits(got)), (n, k, m)


@needs_native
def test_the_scratch_follows_the_call_size(monkeypatch):
    # calls after a larger one reuse the thread's scratch (a smaller K's zero rows written again),
    # a larger one grows it: the bits of the code before (a new std::vector a call) in any order
    mod = _ext.get()
    cases = [_case(40, k, 8) for k in (1030, 100, 4096, 13)]
    monkeypatch.setenv("CODESHELL_BF16_AVX2_M1", "0")
    monkeypatch.setenv("CODESHELL_BF16_AVX2_XKEEP", "0")
    want = [[_dec(mod, x[:m], p, 40, b) for m in (1, 3, 8)] for p, b, x in cases]
    monkeypatch.delenv("CODESHELL_BF16_AVX2_M1")
    monkeypatch.delenv("CODESHELL_BF16_AVX2_XKEEP")
    for _ in range(2):
        for (p, b, x), w in zip(cases, want):
            for m, wm in zip((1, 3, 8), w):
                assert torch.equal(_bits(_dec(mod, x[:m], p, 40, b)), _bits(wm))
