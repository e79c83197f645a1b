"""The AVX2 integer prefill GEMM for int8 / int4 weights (`avx2:gemm`, csrc/q8_gemm_avx2.h): x rounded
to int8 in decode's blocks, vpmaddwd on int16 in 6 x 16 register blocks. Checks: against the reference
(the same rounding of x, fp32 math on the dequantised weight) for int8 and int4 (symmetric, with
offsets, groups 32 / 64 / 128 / 256), tails in M and N, bias; exactness of the integer part (x and the
weight scaled to integers: every product and block sum is exact, so the result is the exact dot);
row invariance of the GEMM on its own (a row's bits do not depend on M or on its place in the
tiles); that int4's nibble kernel gives the int16 kernel's bits; that it is offered as a measured candidate at the AVX2 level; bad input is one error."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, int4_from_parts, int8_from_parts, measure, ops, quantize_int4, quantize_int8

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")


def _weight(kind: str, n: int, k: int, group: int = 128, symmetric: bool = True):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 7 + k)) * 0.05
    return quantize_int8(w) if kind == "int8" else quantize_int4(w, group, symmetric=symmetric)


def _x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


@needs_native
@pytest.mark.parametrize("kind,group,symmetric", [("int8", 0, True), ("int4", 128, True), ("int4", 128, False),
                                                  ("int4", 32, False), ("int4", 64, True), ("int4", 256, False)])
@pytest.mark.parametrize("m,n,k", [(65, 40, 512), (100, 16, 256), (7, 33, 1024)])
def test_matches_reference(kind, group, symmetric, m, n, k):
    pw = _weight(kind, n, k, group or 128, symmetric)
    x, bias = _x(m, k), torch.randn(n, generator=torch.Generator().manual_seed(5))
    y = ops._compute("avx2:gemm", _ext.get(), x, pw, bias)
    ref = ops.reference(x, pw, bias, "avx2:gemm")
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_native
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_integer_part_is_exact(kind):
    # x's blocks each hold 127 (so dx = 1 and x's integers are x itself), the weight's scales are 1
    # (int4: offsets 0): the result is the exact integer dot, which fp32 holds exactly (< 2^24).
    m, n, k = 70, 24, 512
    g = torch.Generator().manual_seed(2)
    xi = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int32)
    xi[:, ::128] = 127
    if kind == "int8":
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        pw, wi = int8_from_parts(q, torch.ones(n)), q.to(torch.int64)
    else:
        nib = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        from codeshell.kernels.packing import pack_nibbles
        pw = int4_from_parts(pack_nibbles(nib), torch.ones(n, k // 128), None, 128)
        wi = nib.to(torch.int64) - 8
    y = ops._compute("avx2:gemm", _ext.get(), xi.float(), pw, None)
    exact = xi.to(torch.int64) @ wi.t()
    assert torch.equal(y, exact.float())


@needs_native
@pytest.mark.parametrize("kind,symmetric", [("int8", True), ("int4", True), ("int4", False)])
def test_rows_invariant(kind, symmetric):
    # the GEMM on its own: a row's result has the same bits at any M and any place in the 6-row tiles
    pw = _weight(kind, 50, 384, 128, symmetric)
    x = _x(131, 384, seed=9)
    mod = _ext.get()
    full = ops._compute("avx2:gemm", mod, x, pw, None)
    for i in (0, 5, 6, 64, 127, 130):
        assert torch.equal(ops._compute("avx2:gemm", mod, x[i:i + 1], pw, None)[0], full[i]), i
    for lo, hi in ((3, 70), (125, 131)):
        assert torch.equal(ops._compute("avx2:gemm", mod, x[lo:hi], pw, None), full[lo:hi]), (lo, hi)


@needs_native
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_offered_and_chosen_by_measurement(kind, monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", "off")
    pw = _weight(kind, 48, 256)
    assert ops.prefill_candidates(pw, torch.bfloat16, 0) == ["avx2:gemm", "avx2:q8", "sgemm:fp32"]
    monkeypatch.setenv("CODESHELL_Q8_GEMM_AVX2", "0")
    assert ops.prefill_candidates(pw, torch.bfloat16, 0) == ["avx2:q8", "sgemm:fp32"]
    monkeypatch.delenv("CODESHELL_Q8_GEMM_AVX2")
    # scripted times: the GEMM wins when it measures fastest
    monkeypatch.setattr(measure, "_time_call", lambda c, *a: {"avx2:gemm": 1.0, "avx2:q8": 2.0, "sgemm:fp32": 3.0}[c])
    monkeypatch.setattr(measure, "_host_load", lambda: 0.0)
    ops._CHOICES.clear()
    assert ops.plan(pw, 200, torch.bfloat16) == "avx2:gemm"
    x = _x(200, 256).bfloat16()
    from codeshell.kernels import linear
    y = linear(x, pw, impl="native").float()
    ref = linear(x, pw, impl="reference").float()
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    ops._CHOICES.clear()


@needs_native
def test_bad_input_is_one_error():
    mod = _ext.get()
    pw = _weight("int8", 8, 64)
    with pytest.raises(RuntimeError, match="prefill_q8_avx2: int8 weight"):
        mod.prefill_q8_avx2(_x(4, 96), pw.data, pw.scales, None, 0, None)
    p4 = _weight("int4", 8, 256)
    with pytest.raises(RuntimeError, match="prefill_q8_avx2: int4 group"):
        mod.prefill_q8_avx2(_x(4, 256), p4.data, p4.scales, None, 48, None)
    with pytest.raises(RuntimeError, match="prefill_q8_avx2: scales"):
        mod.prefill_q8_avx2(_x(4, 64), pw.data, pw.scales[:4], None, 0, None)


@needs_native
@pytest.mark.parametrize("group,symmetric", [(128, True), (32, False), (64, False), (256, True)])
def test_int4_nibble_kernel_same_bits_as_int16(group, symmetric, monkeypatch):
    # int4 runs the vpmaddubsw nibble kernel (sum nib * x, 8 * sum x taken back out); the int16 kernel
    # (CODESHELL_Q8_GEMM_U4=0) sums (nib - 8) * x: the same integers, so the same bits
    pw = _weight("int4", 45, 512, group, symmetric)
    x, bias = _x(77, 512, seed=4), torch.randn(45, generator=torch.Generator().manual_seed(6))
    mod = _ext.get()
    y = ops._compute("avx2:gemm", mod, x, pw, bias)
    monkeypatch.setenv("CODESHELL_Q8_GEMM_U4", "0")
    assert torch.equal(ops._compute("avx2:gemm", mod, x, pw, bias), y)


@needs_native
def test_stored_choice_among_other_candidates_is_measured_again(monkeypatch, tmp_path):
    # a winner stored by a process with the GEMM switched off (CODESHELL_Q8_GEMM_AVX2=0) is not reused
    # by one that offers it: the shape is measured again among the current candidates
    from codeshell.kernels import choices
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", str(tmp_path / "choices.json"))
    monkeypatch.setattr(measure, "_host_load", lambda: 0.0)
    monkeypatch.setattr(measure, "_others_per_core", lambda mark: 0.0)
    monkeypatch.setattr(measure, "_time_call", lambda c, *a: {"avx2:gemm": 1.0, "avx2:q8": 3.0, "sgemm:fp32": 2.0}[c])
    pw = _weight("int8", 32, 256)
    ops._CHOICES.clear()
    monkeypatch.setenv("CODESHELL_Q8_GEMM_AVX2", "0")
    assert ops.plan(pw, 300, torch.bfloat16) == "sgemm:fp32"  # stored among avx2:q8, sgemm:fp32
    key = ("int8", 32, 256, "prefill", "avx2", "bfloat16")
    assert choices.lookup(key) == "sgemm:fp32"
    ops._CHOICES.clear()
    monkeypatch.delenv("CODESHELL_Q8_GEMM_AVX2")
    assert choices.lookup(key, ops.prefill_candidates(pw, torch.bfloat16, 0)) is None
    assert ops.plan(pw, 300, torch.bfloat16) == "avx2:gemm"
    ops._CHOICES.clear()
