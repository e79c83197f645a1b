"""The AVX2 fp32-FMA GEMM for bf16 weights (`avx2:gemm`, csrc/gemm_fma.h on 256-bit vectors,
session 30 helper A): the same bits as the AVX2 panel kernel (`avx2:panel` in 64-row calls) at
prefill M for bf16 and fp32 x, with and without bias (test_prefill_fma.py's
test_same_bits_as_the_panel_kernel, parametrized by vector width); here any K chunk / work item / prefetch switch
and shapes with partial panels and K not a multiple of the pair or the 32-k padding; close to the
fp32 reference; a row's bits do not depend on M; the dispatch offers it beside `avx2:panel64` and
`sgemm:fp32` (CODESHELL_PREFILL_FMA_GEMM=0 leaves it out); bad input is one clear error.
Runs on any CPU with the native kernels (AVX2 is the baseline).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, prepack

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")


def _w(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5


def _panel(mod, x, p, bias):
    """`avx2:panel` in 64-row calls (its limit): the reference bits."""
    return torch.cat([ops._compute("avx2:panel", mod, x[i:i + 64].float().contiguous(), p, bias)
                      for i in range(0, x.shape[0], 64)])


@needs_native
@pytest.mark.parametrize("kc,item,wpf", [("32", "1", "1"), ("64", "3", "0"), ("256", "4", "1"), ("512", "8", "1"),
                                         ("96", "2", "1")])
def test_chunks_items_and_prefetch_do_not_change_bits(kc, item, wpf, monkeypatch):
    # Each output is one FMA chain over k in order, whatever the K chunk (a store and reload of the
    # sums between chunks is exact), the panels per work item (tails of fewer) or the prefetch.
    mod = _ext.get()
    n, k, m = 300, 1030, 131
    p = prepack(_w(n, k, 3))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(9))
    want = _panel(mod, x, p, None)
    monkeypatch.setenv("CODESHELL_FMA2_KC", kc)
    monkeypatch.setenv("CODESHELL_FMA2_ITEM", item)
    monkeypatch.setenv("CODESHELL_FMA2_WPF", wpf)
    assert torch.equal(mod.prefill_bf16_fma(x, p.data, n, None, isa=0), want), (kc, item, wpf)


@needs_native
@pytest.mark.parametrize("kc", ["256", "64"])
@pytest.mark.parametrize("bias", [False, True])
def test_tile_store_is_the_item_store_bits(kc, bias, monkeypatch):
    # Each tile's final sums go to out (+ bias) right after its last block call (`store_tile`,
    # session 34) instead of the item's store_rows pass (CODESHELL_FMA2_EPI=0): the same fp32 adds,
    # so the same bits, with a partial last panel (N = 300), a tail tile (M = 131), K of one chunk
    # (K = 250 at KC 256) or several, and both against the panel kernel.
    mod = _ext.get()
    n, m = 300, 131
    for k in (250, 1030):
        p = prepack(_w(n, k, 4))
        b = torch.randn(n, generator=torch.Generator().manual_seed(2)) if bias else None
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(8)).bfloat16()
        monkeypatch.setenv("CODESHELL_FMA2_KC", kc)
        monkeypatch.setenv("CODESHELL_FMA2_EPI", "0")
        old = mod.prefill_bf16_fma(x, p.data, n, b, isa=0).clone()
        monkeypatch.setenv("CODESHELL_FMA2_EPI", "1")
        new = mod.prefill_bf16_fma(x, p.data, n, b, isa=0)
        assert torch.equal(new, old), (k, kc, bias)
        assert torch.equal(new, _panel(mod, x, p, b)), (k, kc, bias)


@needs_native
@pytest.mark.parametrize("k", [1024, 1030])
def test_row_bits_do_not_depend_on_m(k):
    # x's pack copies whole vectors of a row where its k are inside x and the tail (K's end, rows
    # past M: zeros) value by value; the tiles, chunks and prefetches are the same for every row.
    # So a row's bits are the same in a full tile (M = 600) or the tail tile (M = 97), or at M < 64.
    mod = _ext.get()
    p = prepack(torch.randn(300, k, generator=torch.Generator().manual_seed(k)))
    x = torch.randn(600, k, generator=torch.Generator().manual_seed(5)).bfloat16()
    full = mod.prefill_bf16_fma(x, p.data, 300, None, isa=0).clone()
    for m in (1, 7, 97, 130):
        assert torch.equal(mod.prefill_bf16_fma(x[:m].contiguous(), p.data, 300, None, isa=0), full[:m]), (m, k)
        assert torch.equal(mod.prefill_bf16_fma(x[m:].contiguous(), p.data, 300, None, isa=0), full[m:]), (m, k)


@needs_native
def test_the_dispatch_offers_it(monkeypatch):
    p = prepack(_w(64, 128))
    big = prepack(torch.zeros(4096, 4096))
    # with avx2:panel64 (the same bits, decode's) at every size, never sgemm (other bits)
    for w in (big, p):
        assert ops.prefill_candidates(w, torch.bfloat16, 0) == ["avx2:gemm", "avx2:panel64"]
        assert ops.prefill_candidates(w, torch.float32, 0) == ["avx2:gemm", "avx2:panel64"]
    # the choice before session 30: panel64 from the size threshold, sgemm below it
    monkeypatch.setenv("CODESHELL_PREFILL_FMA_GEMM", "0")
    assert ops.prefill_candidates(p, torch.bfloat16, 0) == ["sgemm:fp32"]
    assert ops.prefill_candidates(big, torch.bfloat16, 0) == ["avx2:panel64"]


@needs_native
def test_bad_input_is_one_clear_error():
    mod = _ext.get()
    p = prepack(_w(40, 64))
    x = torch.randn(70, 64)
    with pytest.raises(RuntimeError, match="fp32 only"):
        mod.prefill_bf16_fma(x, p.data, 40, None, True, False, 0)
    with pytest.raises(RuntimeError, match="isa 0"):
        mod.prefill_bf16_fma(x, p.data, 40, None, isa=2)
    with pytest.raises(RuntimeError, match="K=65"):
        mod.prefill_bf16_fma(torch.randn(70, 65), p.data, 40, None, isa=0)
    with pytest.raises(RuntimeError, match="bf16 or fp32"):
        mod.prefill_bf16_fma(x.double(), p.data, 40, None, isa=0)
