"""The AMX prefill kernels' buffers (csrc/scratch.h): per-thread scratch kept between calls and
the cache of freed output blocks must never change a result or hand out memory still in use.

What this tests: the same x gives the same bits before and after calls of other sizes (the
kept A / C / x-tile scratch grows and is reused, stale contents never leak into a result); a
result that is still held is not overwritten by the next call of the same shape; a freed
result's block is reused by the next call of that shape (the point of the cache) and that call
is still exact against the reference, as is a slightly smaller result given the same block;
the same at 1 and 2 threads. Both AMX prefill entry
points: `prefill_bf16_amx` (bf16 weights, and int8/int4 rows expanded to bf16) and
`prefill_q8_amx` (AMX-INT8). Skips without AMX.
What this is not: a speed test (benchmarks/bench_kernels.py, bench_quant.py).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, prepack, quantize_int4, quantize_int8

LEVEL = ops.isa_level() if available() else -1
pytestmark = pytest.mark.skipif(LEVEL < ops.ISA_LEVELS.index("amx") if LEVEL >= 0 else True,
                                reason="needs the native kernels on an AMX CPU")

# M x N x 4 bytes >= 1 MiB for the cached outputs; a small K keeps the test quick
N, K = 1024, 256


def _bf16(m, k=K, seed=0):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _ref(x, p):
    return ops.reference(x, p, None, "amx:bf16")


def test_bf16_scratch_reuse_keeps_bits(threads):
    mod = _ext.get()
    p = prepack(torch.randn(N, K, generator=torch.Generator().manual_seed(1)))
    x = _bf16(300)
    first = mod.prefill_bf16_amx(x, p.data, N, None).clone()
    # larger and smaller calls in between: the kept A tiles and C sums grow, then hold stale rows
    big = prepack(torch.randn(N, 4 * K, generator=torch.Generator().manual_seed(2)))
    mod.prefill_bf16_amx(_bf16(700, 4 * K, 3), big.data, N, None)
    mod.prefill_bf16_amx(_bf16(17, K, 4), p.data, N, None)
    mod.prefill_bf16_amx(_bf16(5, K, 5), p.data, N, None)  # decode-sized (one 16-row tile)
    again = mod.prefill_bf16_amx(x, p.data, N, None)
    assert torch.equal(first, again)
    ref = _ref(x, p)
    assert (again - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_bf16_output_not_reused_while_held(threads):
    mod = _ext.get()
    p = prepack(torch.randn(N, K, generator=torch.Generator().manual_seed(1)))
    x1, x2 = _bf16(512, seed=6), _bf16(512, seed=7)
    y1 = mod.prefill_bf16_amx(x1, p.data, N, None)
    keep = y1.clone()
    y2 = mod.prefill_bf16_amx(x2, p.data, N, None)
    assert y1.data_ptr() != y2.data_ptr()
    assert torch.equal(y1, keep)  # the second call did not write into the held result
    ref = _ref(x2, p)
    assert (y2 - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_bf16_output_block_reused_after_free(threads):
    mod = _ext.get()
    n = 1040  # 1500 and 1450 rows: 6.0-6.3 MB, above every other result in tests/kernels, so
    # the block a call takes from the cache is the one this test freed
    p = prepack(torch.randn(n, K, generator=torch.Generator().manual_seed(1)))
    bias = torch.randn(n)
    x1, x2 = _bf16(1500, seed=8), _bf16(1500, seed=9)
    y1 = mod.prefill_bf16_amx(x1, p.data, n, bias)
    ptr = y1.data_ptr()
    del y1
    y2 = mod.prefill_bf16_amx(x2, p.data, n, bias)
    assert y2.data_ptr() == ptr  # the freed block came back from the cache (no new pages)
    ref = ops.reference(x2, p, bias, "amx:bf16")
    assert (y2 - ref).abs().max() <= 2e-5 * ref.abs().max()
    assert y2.shape == (1500, n) and y2.dtype == torch.float32 and y2.is_contiguous()
    # a prompt a little shorter takes the same block (sizes within 1/4 share), its own shape
    del y2
    x3 = _bf16(1450, seed=14)
    y3 = mod.prefill_bf16_amx(x3, p.data, n, bias)
    assert y3.data_ptr() == ptr and y3.shape == (1450, n) and y3.is_contiguous()
    ref = ops.reference(x3, p, bias, "amx:bf16")
    assert (y3 - ref).abs().max() <= 2e-5 * ref.abs().max()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_q8_scratch_and_output_reuse(kind, threads):
    mod = _ext.get()
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(10))
    p = quantize_int8(w) if kind == "int8" else quantize_int4(w, group_size=128, symmetric=False)
    g = p.group_size if kind == "int4" else 0

    def run(x):
        return mod.prefill_q8_amx(x.float(), p.data, p.scales, p.offsets, g, None)

    x = _bf16(400, seed=11)
    first = run(x).clone()
    run(_bf16(900, seed=12))
    held = run(_bf16(400, seed=13))
    again = run(x)
    assert again.data_ptr() != held.data_ptr()
    assert torch.equal(first, again)
    ref = ops.reference(x, p, None, "amx:q8")
    assert (again - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("n,k,m", [(1024, 256, 512), (1536, 1024, 131), (100, 96, 65), (37, 1030, 17)])
def test_bf16_epilogues_give_the_cast_and_the_fused_gelu_bits(n, k, m, threads, monkeypatch):
    # Session 37: prefill_bf16_amx(out_bf16=True) is its fp32 result (bias added) rounded to bf16
    # (`.to(torch.bfloat16)`), and gelu=True with CODESHELL_GELU_FAST=0 is fused_gelu_tanh of that
    # rounding: the bits of the model's path without the epilogue (FastLinear.raw / raw_gelu).
    mod = _ext.get()
    p = prepack(torch.randn(n, k, generator=torch.Generator().manual_seed(n)) / k ** 0.5)
    bias = torch.randn(n)
    x = _bf16(m, k, seed=m)
    y = mod.prefill_bf16_amx(x, p.data, n, bias).clone()
    b16 = mod.prefill_bf16_amx(x, p.data, n, bias, False, True)
    assert b16.dtype == torch.bfloat16 and b16.shape == (m, n)
    assert torch.equal(b16, y.to(torch.bfloat16))
    monkeypatch.setenv("CODESHELL_GELU_FAST", "0")
    assert torch.equal(mod.prefill_bf16_amx(x, p.data, n, bias, True), mod.fused_gelu_tanh(y, None, True))
    monkeypatch.delenv("CODESHELL_GELU_FAST")
    fast = mod.prefill_bf16_amx(x, p.data, n, bias, True).float()
    exact = mod.fused_gelu_tanh(y, None, True).float()
    assert ((fast - exact).abs() <= exact.abs() * 2 ** -7 + 1e-6).all()  # gelu16_fast: within a bf16 ulp
    with pytest.raises(RuntimeError, match="M > 16"):
        mod.prefill_bf16_amx(x[:16], p.data, n, bias, False, True)


def test_packed_linear_epilogue_only_above_the_row_invariant_m(monkeypatch):
    # FastLinear.raw on amx:bf16: bf16 rows from the epilogue at prompt M (> ROW_INVARIANT_MAX_M),
    # fp32 at M <= 64 (decode's rows keep their bits); CODESHELL_AMX_EPI=0: fp32 everywhere.
    from codeshell.kernels.module import PackedLinear
    mod = _ext.get()
    lin = PackedLinear(prepack(torch.randn(96, 128)), torch.randn(96))
    x = torch.randn(100, 128).to(torch.bfloat16)
    assert lin.fast._path(100, torch.bfloat16) == "amx:bf16" == lin.fast._path(100, torch.bfloat16, "gelu")
    y = lin.forward_raw(x)
    assert y.dtype == torch.bfloat16
    monkeypatch.setenv("CODESHELL_AMX_EPI", "0")
    y32 = lin.forward_raw(x)
    assert y32.dtype == torch.float32 and torch.equal(y, y32.to(torch.bfloat16))
    # (session 41: a GELU linear's prompt call is its path's output then the fused GELU pass there)
    assert torch.equal(lin.forward_gelu(x), mod.fused_gelu_tanh(y32, None, True))
    monkeypatch.delenv("CODESHELL_AMX_EPI")
    assert lin.forward_raw(x[:ops.ROW_INVARIANT_MAX_M]).dtype == torch.float32
    assert lin.forward_gelu(x[:ops.ROW_INVARIANT_MAX_M]) is None
    assert lin.forward_gelu(x) is not None
