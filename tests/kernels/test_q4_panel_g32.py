"""int4 with groups of 32 / 64 (a GGUF Q4_0's layers) at the batched decode's M on CPUs without AMX that take the
shared epilogue (q4_epi_kind: Zen 4, the Ice Lake-class Xeon; forced here with CODESHELL_Q4_EPI=1): q8_panel.h's
transposed runs of 128 k with 128 / G blocks each (session 41 helper C; from CODESHELL_Q4_PANEL_G32_MIN_M rows,
default 8) give tile_v's bits (CODESHELL_Q4_PANEL_G32_MIN_M=0, as before) for every row, every row the bits it gets
alone (M = 1), within 2e-5 of `ops.reference`: N not a multiple of 16 (a short last panel), offsets or symmetric,
bias or not, K from one run of 128 to 4096, M 8..64 with tails of the 8-row blocks, 1-2 threads.
What this is not: a speed test (benchmarks/bench_batch_phases.py, kernels-log.md session 41 helper C)."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4, set_num_threads

VNNI = ops.ISA_LEVELS.index("avx512_vnni")
needs_vnni = pytest.mark.skipif(not available() or ops.isa_level() < VNNI, reason="needs AVX512-VNNI")
SHAPES = [(35, 256, 32, True), (19, 128, 32, False), (130, 1024, 64, False), (50, 4096, 32, True),
          (16, 512, 64, True), (33, 4096, 64, False)]


@needs_vnni
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,k,group,symmetric", [pytest.param(*s, id=f"{s[0]}x{s[1]}-g{s[2]}-{'sym' if s[3] else 'offs'}")
                                                 for s in SHAPES])
def test_int4_g32_panel_gives_tile_v_bits(n, k, group, symmetric, threads, monkeypatch):
    mp = monkeypatch
    if ops.isa_level() >= ops.ISA_LEVELS.index("amx"):
        mp.setenv("CODESHELL_KERNEL_ISA", "avx512_bf16")  # the CPUs without AMX (AMX keeps its tiles)
    mp.setenv("CODESHELL_Q4_EPI", "1")
    mod = _ext.get()
    g = torch.Generator().manual_seed(n * 7 + k + group)
    pw = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group_size=group, symmetric=symmetric)
    bias = torch.randn(n, generator=g) if n % 2 else None
    x = torch.randn(64, k, generator=g) * torch.rand(64, 1, generator=g) * 4
    x[:, ::37] *= 8
    x[5, : 2 * group] = 0  # zero groups of x (d = 0)
    old_threads = torch.get_num_threads()
    set_num_threads(threads)
    try:
        mp.setenv("CODESHELL_Q4_PANEL_G32_MIN_M", "0")
        alone = torch.cat([ops._compute("avx512_vnni:q8", mod, x[i:i + 1], pw, bias) for i in range(64)])
        for m in (8, 9, 15, 16, 17, 33, 64):
            mp.setenv("CODESHELL_Q4_PANEL_G32_MIN_M", "0")
            old = ops._compute("avx512_vnni:q8", mod, x[:m], pw, bias).clone()
            mp.delenv("CODESHELL_Q4_PANEL_G32_MIN_M")
            new = ops._compute("avx512_vnni:q8", mod, x[:m], pw, bias)
            assert torch.equal(new.view(torch.int32), old.view(torch.int32)), (n, k, group, m)
            assert torch.equal(new.view(torch.int32), alone[:m].view(torch.int32)), (n, k, group, m)
        mp.setenv("CODESHELL_Q4_PANEL_G32_MIN_M", "2")  # the panel at M = 2..7 too: the same bits
        for m in (2, 3, 7):
            assert torch.equal(ops._compute("avx512_vnni:q8", mod, x[:m], pw, bias).view(torch.int32),
                               alone[:m].view(torch.int32)), (n, k, group, m)
    finally:
        set_num_threads(old_threads)
    ref = ops.reference(x[:16], pw, bias, "avx512_vnni:q8")
    assert (new[:16] - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


@needs_vnni
@pytest.mark.parametrize("kind,n,k,group,m", [("int4", 50, 4096, 32, 16), ("int4", 19, 1024, 64, 9),
                                              ("int4", 35, 1024, 128, 33), ("int8", 37, 1536, 0, 33),
                                              ("int8", 21, 512, 0, 64)])
def test_panel_asm_loop_keeps_bits(kind, n, k, group, m, monkeypatch):
    # Session 41: q8_panel.h's row loop by inline asm (an embedded {1to16} broadcast of x's quad, the accumulators
    # in place) gives the intrinsic loop's sums (CODESHELL_Q8_PANEL_ASM=0): the panel's users without AMX, int4
    # groups of 32 / 64 from 8 rows, int4 groups of 128 and int8 from 17 rows (q8_rows.h below).
    from codeshell.kernels import quantize_int8
    if ops.isa_level() >= ops.ISA_LEVELS.index("amx"):
        monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_bf16")
    monkeypatch.setenv("CODESHELL_Q4_EPI", "1")
    g = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=g) * 0.05
    pw = quantize_int8(w) if kind == "int8" else quantize_int4(w, group_size=group, symmetric=False)
    x = torch.randn(m, k, generator=g) * 3
    bias = torch.randn(n, generator=g)
    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_Q8_PANEL_ASM", "0")
    old = ops._compute("avx512_vnni:q8", mod, x, pw, bias).clone()
    monkeypatch.delenv("CODESHELL_Q8_PANEL_ASM")
    new = ops._compute("avx512_vnni:q8", mod, x, pw, bias)
    assert torch.equal(new.view(torch.int32), old.view(torch.int32))
