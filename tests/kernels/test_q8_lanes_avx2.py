"""`avx2:q8` int8 at every M = 1..64 with CODESHELL_Q8_AVX2_LANES=1 (session 33, off by default: measured
slower at M = 8): csrc/q8_lanes_avx2.h (8 weight rows in the vector lanes, exact block sums, fp32 steps once per
8 outputs) in place of q8_m1_avx2.h / tile_q8 / q8_rows_avx2.h (the default).

Its fp32 steps are the int8 prompt GEMM's (q8_gemm_avx2.h, `prefill_q8_avx2`): the same rounding of x, exact
block sums, fma(float(S_b), dx_b, acc) in block order, acc * scale + bias. So every row of every M = 1..64 must
have, bit for bit, the bits that row gets alone (M = 1 takes the vpsignb way, M >= 2 the int16 vpmaddwd way:
the same integers), and the bits the prompt GEMM gives it; and the rows are within 2e-6 of the largest output
of a float64 reference of the same int8-rounded x and dequantised weight (tile_q8's 8 fp32 lanes a row were
within 2e-5 of the fp32 `ops.reference`). Shapes: activation blocks of 128, 64 and 32 (K = 384, 1088, 96), the
small shape's K = 1024 and 4096 (the spans of 1024 at M > 1), codeshell-mini's K = 256, N not a multiple of 8
or of the threads' chunks, weights at -127 and 127, x rows at +-127, an all-zero row of x, with and without
bias. The old path (the switch off) keeps tile_q8's bits at every M. Runs at the avx2 level on any AVX2 CPU.
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops
from codeshell.testing import assert_rows_bitwise
from test_q8_rows_avx2 import extreme_case  # the weight and x at the rounding's extremes

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
AVX2 = ops.ISA_LEVELS.index("avx2")
SWITCHES = ("CODESHELL_Q8_AVX2_LANES", "CODESHELL_Q8_AVX2_ROWS", "CODESHELL_Q8_AVX2_ROWS_MIN_M")
SHAPES = [(37, 384), (45, 1024), (21, 4096), (33, 1088), (70, 96), (51, 256)]


def _ref64(x: torch.Tensor, pw, bias, B: int) -> torch.Tensor:
    """float64 product of x rounded to int8 in blocks of B (quantize_x's integers) and the dequantised weight."""
    m, k = x.shape
    xb = x.double().reshape(m, k // B, B)
    amax = xb.abs().amax(-1, keepdim=True)
    d = (amax.float() / 127).double()
    q = torch.where(amax > 0, torch.round(xb.float() * (127 / amax.float())).double(), torch.zeros_like(xb))
    xr = (q * d).reshape(m, k)
    y = xr @ (pw.data.double() * pw.scales.double()[:, None]).T
    return y + (bias.double() if bias is not None else 0)


@needs_native
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_lanes_rows_match_m1_gemm_and_reference(n, k, with_bias, monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    for var in SWITCHES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CODESHELL_Q8_AVX2_LANES", "1")
    mod = _ext.get()
    pw, bias, x = extreme_case(n, k, with_bias, neg=96)
    assert ops.plan(pw, 1, torch.float32) == "avx2:q8"
    top = ops.ROW_INVARIANT_MAX_M
    alone = torch.cat([mod.decode_int8_q8(x[i:i + 1], pw.data, pw.scales, bias, AVX2) for i in range(top)])
    ref = _ref64(x, pw, bias, mod.q8_block_int8(k))
    err = (alone.double() - ref).abs().max().item()
    assert err <= 2e-6 * ref.abs().max().item(), f"{n}x{k}: max abs error {err:.3g} against the float64 reference"
    gemm = mod.prefill_q8_avx2(x, pw.data, pw.scales, None, 0, bias)
    assert_rows_bitwise(gemm, alone, f"prompt GEMM vs decode rows {n}x{k} bias={with_bias}")
    for m in list(range(1, 18)) + [31, 33, 47, 63, top]:
        new = mod.decode_int8_q8(x[:m], pw.data, pw.scales, bias, AVX2)
        assert_rows_bitwise(new, alone[:m], f"q8_lanes_avx2.h M={m} {n}x{k} bias={with_bias}")
    # the switch off (the default): tile_q8's bits at every M
    monkeypatch.setenv("CODESHELL_Q8_AVX2_LANES", "0")
    old1 = torch.cat([mod.decode_int8_q8(x[i:i + 1], pw.data, pw.scales, bias, AVX2) for i in range(top)])
    assert_rows_bitwise(mod.decode_int8_q8(x, pw.data, pw.scales, bias, AVX2), old1, f"old path {n}x{k}")
    assert (old1 - alone).abs().max().item() <= 2e-5 * ref.abs().max().item()
