"""`avx2:q8` int4 at the AVX2 level (session 31): csrc/q4_rows_avx2.h (8 weight rows in the vector lanes,
the group size at compile time, the nibbles' -8 as an integer term, x rounded by its vector round_x) in
place of qdot_int4.cpp's tile_q4 for groups of 64 / 128 / 256, at every M.

Its arithmetic is its own (not tile_q4's bits), the same for every M: every row of every M =
1..ops.ROW_INVARIANT_MAX_M (and a prefill-sized M) must have, bit for bit, the bits that row gets alone;
the rows are within 2e-6 of the largest output of the exact reference (`ops.quantize_activations`'
int8-rounded x times the dequantised weight in float64; the fp32 `ops.reference` is itself off by up to
~3e-5 on these extremes, by cancellation, as tile_q4 is) and within 5e-5 of tile_q4's
(CODESHELL_Q4_AVX2_ROWS=0: the same integers, another fp32 order, -8 * scale * xs as an fp32 term). Shapes: groups of 64 / 128 / 256, symmetric and with offsets, K = 256 / 1024 / 4096 (more groups a
row than one 8x8 scale transpose, and fewer), N not a multiple of the 8-row tile, with and without bias, an
all-zero row of x (group scales 0: the output is the bias exactly), x and weights at the rounding's extremes.
Groups of 32 keep tile_q4 (checked: the switch changes nothing there).
Session 32 (helper C): the tiles reduce the 8 weight rows' sums a pair of rows at a time (tile2); the
integers and the fp32 steps are unchanged, so CODESHELL_Q4_AVX2_V2=0 (the session-31 tiles) must give the
same bits at every M (checked on M = 1..9, 16, 33, the cap and a prefill-sized M).
Session 35 (helper C): M = 1's prefetch order and the scales' prefetch (CODESHELL_Q4_AVX2_M1_PFMODE 0..3)
and M > 1's prefetch order (CODESHELL_Q4_AVX2_MN_PFMODE 0 / 1)
change no bits (checked at M = 1 on every shape; M > 1 at M = 2, 3, 5, 8 and the cap).
Runs at the avx2 level on any AVX2 CPU (CODESHELL_KERNEL_ISA=avx2 caps an AVX-512 one).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4
from codeshell.testing import assert_rows_bitwise

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
AVX2 = ops.ISA_LEVELS.index("avx2")
CASES = [(37, 1024, 128, True), (45, 1024, 128, False), (21, 4096, 128, False), (19, 256, 64, True),
         (30, 512, 256, False), (12, 256, 256, True), (9, 4096, 64, True)]


def _x(m: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    x[:, ::37] *= 8
    x[min(3, m - 1)] = 0  # an all-zero row: every group scale 0
    return x


def _call(mod, x, pw, bias):
    return mod.decode_int4_q8(x, pw.data, pw.scales, pw.offsets, pw.group_size, bias, AVX2)


@needs_native
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k,g,sym", CASES, ids=[f"{n}x{k}g{g}{'s' if s else 'a'}" for n, k, g, s in CASES])
def test_rows_match_m1_and_reference(n, k, g, sym, with_bias, monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    monkeypatch.delenv("CODESHELL_Q4_AVX2_ROWS", raising=False)
    monkeypatch.delenv("CODESHELL_Q4_AVX2_V2", raising=False)
    mod = _ext.get()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05
    w[0, :g] = torch.linspace(-1, 1, g)  # nibbles 0..15 in one group
    pw = quantize_int4(w, group_size=g, symmetric=sym)
    path = ops.plan(pw, 1, torch.float32)
    assert path == "avx2:q8", path
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)) if with_bias else None
    top = ops.ROW_INVARIANT_MAX_M
    x = _x(top + 6, k)
    x[1] = 127.0  # a row of x at the rounding's extreme
    x[2, ::2] = -127.0
    alone = torch.cat([_call(mod, x[i:i + 1], pw, bias) for i in range(top + 6)])
    xq = ops.quantize_activations(x.contiguous(), ops.activation_block(pw)).double()
    ref = xq @ ops.dequantize(pw).double().T + (bias.double() if with_bias else 0)
    top_ref = ref.abs().max().item()
    err = (alone.double() - ref).abs().max().item()
    assert err <= 2e-6 * top_ref, f"{n}x{k} g{g}: max abs error {err:.3g} against the exact reference"
    monkeypatch.setenv("CODESHELL_Q4_AVX2_ROWS", "0")
    old = _call(mod, x, pw, bias)
    monkeypatch.delenv("CODESHELL_Q4_AVX2_ROWS")
    assert not torch.equal(old, alone) or n * k < 4096, "the switch should select tile_q4 (other fp32 order)"
    diff = (old - alone).abs().max().item()
    assert diff <= 5e-5 * top_ref, f"{n}x{k} g{g}: {diff:.3g} from tile_q4"
    assert torch.equal(alone[3], bias if with_bias else torch.zeros(n)), "an all-zero row of x gives the bias"
    for m in list(range(1, top + 1)) + [top + 6]:
        assert_rows_bitwise(_call(mod, x[:m], pw, bias), alone[:m], f"q4_rows_avx2.h {n}x{k} g{g} bias={with_bias}")
    monkeypatch.setenv("CODESHELL_Q4_AVX2_V2", "0")
    for m in list(range(1, 10)) + [16, 33, top, top + 6]:
        assert torch.equal(_call(mod, x[:m], pw, bias), alone[:m]), f"session-31 tiles {n}x{k} g{g} M={m}: other bits"
    monkeypatch.delenv("CODESHELL_Q4_AVX2_V2")
    # M = 1's prefetch modes (session 35: ascending order, the scales ahead, both, session 32's): the same bits
    for mode in ("0", "1", "2", "3"):
        monkeypatch.setenv("CODESHELL_Q4_AVX2_M1_PFMODE", mode)
        for i in (0, 1, 3):
            assert torch.equal(_call(mod, x[i:i + 1], pw, bias), alone[i:i + 1]), f"M = 1 prefetch mode {mode}: other bits"
    monkeypatch.delenv("CODESHELL_Q4_AVX2_M1_PFMODE")
    # M > 1's prefetch order (session 35 part 2: ascending, 1; session 31's same-place, 0): the same bits
    for mode in ("0", "1"):
        monkeypatch.setenv("CODESHELL_Q4_AVX2_MN_PFMODE", mode)
        for m in (2, 3, 5, 8, top):
            assert torch.equal(_call(mod, x[:m], pw, bias), alone[:m]), f"M > 1 prefetch mode {mode} M={m}: other bits"
    monkeypatch.delenv("CODESHELL_Q4_AVX2_MN_PFMODE")


@needs_native
def test_groups_of_32_keep_tile_q4(monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    mod = _ext.get()
    pw = quantize_int4(torch.randn(24, 256, generator=torch.Generator().manual_seed(3)) * 0.05, group_size=32)
    x = _x(9, 256)
    monkeypatch.setenv("CODESHELL_Q4_AVX2_ROWS", "0")
    old = _call(mod, x, pw, None)
    monkeypatch.delenv("CODESHELL_Q4_AVX2_ROWS")
    assert torch.equal(_call(mod, x, pw, None), old)
