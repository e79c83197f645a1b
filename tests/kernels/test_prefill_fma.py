"""The fp32-FMA GEMM for bf16 weights on AVX-512 CPUs (`avx512_vnni:gemm`, csrc/prefill_bf16_avx512.h
prefill_fma, session 24): the same bits as the AVX-512 panel kernel (`avx512_vnni:panel`, itself
the bits of `avx2:panel`) at prefill M, for bf16 and fp32 x, every register block behind
CODESHELL_FMA_BLOCK and any K chunk / work item; close to the fp32 reference; its bf16 and GELU
epilogues the bits of the fp32 result's cast / fused GELU; a row's bits do not depend on M; the
dispatch offers it (and CODESHELL_PREFILL_FMA_GEMM=0 leaves it out); and the bf16 peak of
`codeshell.bench` counts the fp32-FMA ceiling on CPUs without bf16 hardware.
"""

from __future__ import annotations

import pytest
import torch

from codeshell import bench
from codeshell.kernels import _ext, available, ops, prepack

LEVEL = ops.isa_level() if available() else -1
needs_512 = pytest.mark.skipif(LEVEL < ops.ISA_LEVELS.index("avx512_vnni"),
                               reason="needs the native kernels on an AVX-512 CPU")
needs_avx2 = pytest.mark.skipif(LEVEL < 0, reason="needs the native kernels (AVX2)")


def _w(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / k ** 0.5


def _panel(mod, x, p, bias, isa="avx512_vnni"):
    """`<isa>:panel` in 64-row calls (its limit): the reference bits."""
    return torch.cat([ops._compute(f"{isa}:panel", mod, x[i:i + 64].contiguous(), p, bias)
                      for i in range(0, x.shape[0], 64)])


# the GEMM on each vector width: 512-bit (panel_bf16.cpp prefill_fma) and 256-bit (session 30,
# csrc/gemm_fma.h, `avx2:gemm`: tests/kernels/test_bf16_avx2_gemm.py has its other checks)
ISAS = [pytest.param("avx512_vnni", marks=needs_512), pytest.param("avx2", marks=needs_avx2)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k", [(16, 64), (50, 384), (37, 129), (70, 1030), (33, 17), (200, 600)])
@pytest.mark.parametrize("m", [65, 97, 130, 513])
def test_same_bits_as_the_panel_kernel(isa, n, k, m, record_property):
    path = f"{isa}:gemm"
    record_property("isa_path", path)
    mod = _ext.get()
    w = _w(n, k)
    p = prepack(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    bias = torch.randn(n)
    for b in (None, bias):
        want = _panel(mod, x.float(), p, b, isa)
        y = ops._compute(path, mod, x, p, b)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        assert torch.equal(y, want), (m, n, k, (y - want).abs().max().item())
        assert torch.equal(ops._compute(path, mod, x.float(), p, b), want)  # fp32 x
    ref = x.float() @ w.bfloat16().float().T
    assert (y - bias - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert torch.allclose(y, ops.reference(x, p, bias, path), rtol=1e-4, atol=1e-4)


@needs_512
@pytest.mark.parametrize("xpack", ["0", "1"])
@pytest.mark.parametrize("block", ["0", "1", "2", "3"])
@pytest.mark.parametrize("kc,item", [("64", "1"), ("256", "1"), ("96", "3")])
def test_blocks_chunks_and_items_do_not_change_bits(block, kc, item, xpack, monkeypatch):
    # Each output sums k in order in one FMA chain whatever the register block (3x8, 4x6, 2x12,
    # 2x14), the K chunk or the work item: the same bits as the panel kernel, tails included
    # (N = 300: 19 panels, a tail of fewer panels than the block; K = 1030: a partial chunk)
    mod = _ext.get()
    p = prepack(_w(300, 1030, 3))
    x = torch.randn(131, 1030, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = _panel(mod, x.float(), p, None)
    monkeypatch.setenv("CODESHELL_FMA_BLOCK", block)
    monkeypatch.setenv("CODESHELL_FMA_KC", kc)
    monkeypatch.setenv("CODESHELL_FMA_ITEM", item)
    # session 26: x packed [kc / 16][MR][16] a tile (CODESHELL_FMA_XPACK=1, the default) or [kc][MR]
    monkeypatch.setenv("CODESHELL_FMA_XPACK", xpack)
    assert torch.equal(mod.prefill_bf16_fma(x, p.data, 300, None), want), (block, kc, item, xpack)


@needs_512
@pytest.mark.parametrize("wpf", ["0", "1"])
@pytest.mark.parametrize("xvec,xpack", [("0", "0"), ("1", "0"), ("1", "1")])
@pytest.mark.parametrize("block,kc,item", [("1", "256", "1"), ("0", "64", "2"), ("2", "96", "3")])
def test_weight_prefetch_and_vector_pack_do_not_change_bits(wpf, xvec, xpack, block, kc, item, monkeypatch):
    # Session 25: the next weight chunk prefetched into L2 (CODESHELL_FMA_WPF) and x packed 16 k
    # of a row at a time (CODESHELL_FMA_XPACK_V): the panel kernel's bits with either switch, for
    # bf16 and fp32 x, with rows past the last full tile (M = 131), k past the last 16 (K = 1030,
    # 17) and several items per thread (the prefetch then reaches into the next item)
    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_FMA_WPF", wpf)
    monkeypatch.setenv("CODESHELL_FMA_XPACK_V", xvec)
    monkeypatch.setenv("CODESHELL_FMA_XPACK", xpack)  # session 26's k-blocked pack (masked tails)
    monkeypatch.setenv("CODESHELL_FMA_BLOCK", block)
    monkeypatch.setenv("CODESHELL_FMA_KC", kc)
    monkeypatch.setenv("CODESHELL_FMA_ITEM", item)
    for n, k in ((300, 1030), (37, 17), (130, 512)):
        p = prepack(_w(n, k, 7))
        x = torch.randn(131, k, generator=torch.Generator().manual_seed(2)).bfloat16()
        want = _panel(mod, x.float(), p, None)
        assert torch.equal(mod.prefill_bf16_fma(x, p.data, n, None), want), (n, k)
        assert torch.equal(mod.prefill_bf16_fma(x.float(), p.data, n, None), want), (n, k)


@needs_512
def test_row_bits_do_not_depend_on_m():
    mod = _ext.get()
    p = prepack(_w(130, 520, 5))
    x = torch.randn(600, 520, generator=torch.Generator().manual_seed(5)).bfloat16()
    full = mod.prefill_bf16_fma(x, p.data, 130, None).clone()
    for m in (65, 97, 131):
        assert torch.equal(mod.prefill_bf16_fma(x[:m].contiguous(), p.data, 130, None), full[:m]), m
        assert torch.equal(mod.prefill_bf16_fma(x[m:].contiguous(), p.data, 130, None), full[m:]), m


@needs_512
@pytest.mark.parametrize("epi", ["0", "1"])
@pytest.mark.parametrize("n,k", [(37, 100), (300, 1030)])
def test_bf16_and_gelu_epilogues_are_the_unfused_bits(n, k, epi, monkeypatch):
    # CODESHELL_FMA_EPI=1 (session 26, the default): the epilogues fused into each tile's last K
    # chunk (from the accumulators); =0: store_rows* over the item's sums after its last chunk
    monkeypatch.setenv("CODESHELL_GELU_FAST", "0")
    monkeypatch.setenv("CODESHELL_FMA_EPI", epi)
    mod = _ext.get()
    p = prepack(_w(n, k, n))
    bias = torch.randn(n) * 4
    x = (torch.randn(71, k, generator=torch.Generator().manual_seed(k)) * 3).bfloat16()
    y = mod.prefill_bf16_fma(x, p.data, n, bias)
    b16 = mod.prefill_bf16_fma(x, p.data, n, bias, False, True)
    assert b16.dtype == torch.bfloat16 and torch.equal(b16.view(torch.int16), y.bfloat16().view(torch.int16))
    g = mod.prefill_bf16_fma(x, p.data, n, bias, True)
    assert torch.equal(g.view(torch.int16), mod.fused_gelu_tanh(y, None, True).view(torch.int16))


@needs_512
@pytest.mark.parametrize("block,kc,item", [("1", "256", "1"), ("0", "64", "2"), ("2", "96", "3"), ("3", "256", "1")])
@pytest.mark.parametrize("n,k,m", [(300, 1030, 131), (37, 17, 65), (130, 256, 97)])
def test_fused_epilogue_is_the_unfused_bits(block, kc, item, n, k, m, monkeypatch):
    # The fused epilogue (CODESHELL_FMA_EPI=1) against session 24's pass over c (=0): fp32 out,
    # bf16 out and both GELUs (fast and exact), with bias and without, tails of rows (M % MR),
    # columns (N % 16), panels (fewer than the block) and a single K chunk (K = 256 / 17)
    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_FMA_BLOCK", block)
    monkeypatch.setenv("CODESHELL_FMA_KC", kc)
    monkeypatch.setenv("CODESHELL_FMA_ITEM", item)
    p = prepack(_w(n, k, 11))
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(3)) * 3).bfloat16()
    for bias in (None, torch.randn(n) * 4):
        for fast in ("0", "1"):
            monkeypatch.setenv("CODESHELL_GELU_FAST", fast)
            got = {}
            for epi in ("0", "1"):
                monkeypatch.setenv("CODESHELL_FMA_EPI", epi)
                got[epi] = (mod.prefill_bf16_fma(x, p.data, n, bias), mod.prefill_bf16_fma(x, p.data, n, bias, False, True),
                            mod.prefill_bf16_fma(x, p.data, n, bias, True))
            for a, b in zip(got["0"], got["1"]):
                assert torch.equal(a.view(torch.int32) if a.dtype == torch.float32 else a.view(torch.int16),
                                   b.view(torch.int32) if b.dtype == torch.float32 else b.view(torch.int16)), (block, n, k, m, fast)


@needs_512
def test_dispatch_offers_the_gemm_and_the_switch_removes_it(monkeypatch):
    p = prepack(_w(64, 128))
    if LEVEL >= ops.ISA_LEVELS.index("avx512_bf16"):
        assert "avx512_vnni:gemm" in ops.prefill_candidates(p, torch.float32, LEVEL)  # fp32 x: FMA
        return
    assert ops.prefill_candidates(p, torch.bfloat16, LEVEL)[0] == "avx512_vnni:gemm"
    monkeypatch.setenv("CODESHELL_PREFILL_FMA_GEMM", "0")
    assert ops.prefill_candidates(p, torch.bfloat16, LEVEL) == ["avx512_vnni:panel64", "sgemm:fp32"]


@needs_512
def test_packed_linear_epilogues_on_the_fma_gemm(monkeypatch):
    # forward_raw / forward_gelu: bf16 out and the GELU epilogue where the chosen path is this GEMM
    monkeypatch.setenv("CODESHELL_GELU_FAST", "0")
    from codeshell.kernels.module import PackedLinear
    if LEVEL >= ops.ISA_LEVELS.index("avx512_bf16"):
        pytest.skip("bf16 x takes the bf16 hardware's paths on this CPU")
    lin = PackedLinear(prepack(torch.randn(96, 128)), torch.randn(96))
    x = torch.randn(100, 128).to(torch.bfloat16)
    # the measured choice of this weight's prefill path, set to the GEMM (as a measurement may)
    monkeypatch.setitem(ops._CHOICES, ("bf16", 96, 128, "prefill", ops.ISA_LEVELS[LEVEL], "bfloat16"),
                        "avx512_vnni:gemm")
    assert lin.fast._path(100, torch.bfloat16) == "avx512_vnni:gemm"
    raw = lin.forward_raw(x)
    y = _ext.get().prefill_bf16_fma(x, lin.fast.packed.data, 96, lin.fast.bias)
    assert raw.dtype == torch.bfloat16 and torch.equal(raw, y.bfloat16())
    assert torch.equal(lin.forward_gelu(x), _ext.get().fused_gelu_tanh(y, None, True))


@needs_avx2
@pytest.mark.parametrize("isa", [0, 1])
def test_fma_peak_is_measured_and_in_the_bench_peak(isa):
    if isa == 1 and LEVEL < ops.ISA_LEVELS.index("avx512_vnni"):
        pytest.skip("no AVX-512")
    mod = _ext.get()
    per_thread = 10 * 128 * 6 * 64 * 2 if isa == 1 else 10 * 128 * 2 * 6 * 16 * 2
    assert mod.bf16_fma_peak(10, isa) == per_thread * torch.get_num_threads()
    tf = bench.fma_tflops(repeats=1, reps=2000)
    assert tf is not None and tf > 0
    if LEVEL < ops.ISA_LEVELS.index("avx512_bf16"):  # no bf16 hardware: the fp32-FMA ceiling counts
        from codeshell.config import CodeShellConfig
        cfg = CodeShellConfig(n_embd=128, n_layer=1, n_head=4, num_query_groups=2, n_inner=512)
        peak = bench.bf16_matmul_peak(16, cfg, repeats=1)
        assert peak["fma_kernel"] > 0 and peak["torch_fp32"] > 0
        assert peak["peak"] == max(v for k, v in peak.items() if k != "peak")
