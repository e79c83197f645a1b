"""The M = 1 schedule of decode_bf16 (panel_bf16.cpp, `decode_panels`): groups of panels in flight
at once, chunks claimed by the threads, a tail of single panels. Each M = 1 row must be right
(against the fp32 reference on the dequantised weight) and bitwise the row of an M = 2..5 call,
over N that spans several groups and chunks and leaves a tail (test_invariance.py's N <= 45 are
at most 3 panels, so they never run a whole group at M = 1).

What this is not: a speed test (docs/kernels-log.md, session 14 helper A, has the figures).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, prepack
from codeshell.testing import assert_rows_bitwise

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1

# N: 9 panels + 5 rows (2 groups of 4 and a tail, or one group of 8 and a tail), 63 panels (the
# small model's 1000-ish rows: chunks of the group size plus a 3-panel tail), 129 panels + 1 row;
# K: an odd one (the last pair half padding: x is copied as is at M = 1, pair by pair above), one
# that is not a multiple of 32, the small model's, and several k-blocks of the M >= 4 kernel.
SHAPES = [(149, 37), (149, 100), (1000, 1024), (2065, 4096)]


@needs_native
@pytest.mark.parametrize("isa,dtype", [pytest.param(0, torch.float32, id="avx2"),
                                       pytest.param(2, torch.bfloat16, id="avx512_bf16")])
@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_m1_rows_are_right_and_those_of_larger_m(isa, dtype, n, k):
    if isa > LEVEL:
        pytest.skip(f"isa {ops.ISA_LEVELS[isa]} above this CPU's ({ops.ISA_LEVELS[LEVEL]})")
    mod = _ext.get()
    g = torch.Generator().manual_seed(n + k)
    pw = prepack(torch.randn(n, k, generator=g) * 0.05)
    bias = torch.randn(n, generator=g)
    x = (torch.randn(5, k, generator=g) * 2).to(dtype)
    alone = torch.cat([mod.decode_bf16(x[i:i + 1].contiguous(), pw.data, n, bias, isa) for i in range(5)])
    ref = x.float() @ pw.dequantize().T + bias
    torch.testing.assert_close(alone, ref, rtol=1e-4, atol=1e-3 * k ** 0.5)
    for m in (2, 3, 4, 5):
        y = mod.decode_bf16(x[:m].contiguous(), pw.data, n, bias, isa)
        assert_rows_bitwise(y, alone[:m], f"{n}x{k} isa {isa}")


# panel_bf16_m1.h (session 39): avx512_bf16's M = 1 without AMX under its switches (panels in flight, the
# prefetch, a claimed chunk's panels, 1 and 2 threads) gives the bits of the default schedule and so of
# the rows of larger M above (one vdpbf16ps chain a panel whatever the schedule).
M1_SWITCHES = [{"CODESHELL_BF16_M1_NP": "1"}, {"CODESHELL_BF16_M1_NP": "2"}, {"CODESHELL_BF16_M1_NP": "4"},
               {"CODESHELL_BF16_M1_NP": "8"}, {"CODESHELL_BF16_M1_NP": "1", "CODESHELL_BF16_M1_PF": "2048"},
               {"CODESHELL_BF16_M1_NP": "4", "CODESHELL_BF16_M1_PF": "4096"},
               {"CODESHELL_BF16_M1_NP": "1", "CODESHELL_BF16_M1_GRAIN": "1"},
               {"CODESHELL_BF16_M1_NP": "8", "CODESHELL_BF16_M1_GRAIN": "3"}]


@needs_native
@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("threads", [1, 2])
def test_m1_switches_keep_the_bits(n, k, threads):
    if LEVEL < 2:
        pytest.skip("needs avx512_bf16")
    mod = _ext.get()
    g = torch.Generator().manual_seed(n * k)
    pw = prepack(torch.randn(n, k, generator=g) * 0.05)
    bias = torch.randn(n, generator=g)
    x = (torch.randn(1, k, generator=g) * 2).to(torch.bfloat16)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = mod.decode_bf16(x, pw.data, n, bias, 2)
        for sw in M1_SWITCHES:
            with pytest.MonkeyPatch.context() as mp:
                for name, v in sw.items():
                    mp.setenv(name, v)
                got = mod.decode_bf16(x, pw.data, n, bias, 2)
            assert torch.equal(got, want), f"{sw} {n}x{k} T{threads}: {(got - want).abs().max()}"
    finally:
        torch.set_num_threads(old)
