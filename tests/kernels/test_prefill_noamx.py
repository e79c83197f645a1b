"""The prefill (M > 64) kernels of AVX-512 CPUs without AMX, against the reference.

What this tests: `avx512_bf16:gemm` (`prefill_bf16_dot`: vdpbf16ps on the bf16 panels) and
`avx512_vnni:q8` at M > 64 (`prefill_q8_vnni`: vpdpbusd on x rounded to int8 in the decode
kernels' blocks) against `ops.reference` for that path, at M = 65..600 (row tiles of 6 with
tails), N not a multiple of 16 / of a work item, K not a multiple of the k chunk (bf16: K
tails inside a k-pair and a 32-k tile; int8: blocks of 32 / 128; int4: groups 32..256,
symmetric and not), with and without bias; that a kept scratch buffer never changes a result;
that the dispatch offers both as measured candidates where the CPU has them (with AMX they are
checked under CODESHELL_KERNEL_ISA=avx512_bf16); and the vdpbf16ps peak micro-kernel the
benchmark's bf16 peak includes. Each test records the path it ran.
What this is not: a speed test (benchmarks/bench_kernels.py, /bench_quant.py, docs/kernels.md).
"""

from __future__ import annotations

import pytest
import torch

from codeshell import bench
from codeshell.kernels import _ext, available, linear, ops, prepack, quantize_int4, quantize_int8

LEVEL = ops.isa_level() if available() else -1
BF16 = ops.ISA_LEVELS.index("avx512_bf16")
VNNI = ops.ISA_LEVELS.index("avx512_vnni")
needs_bf16 = pytest.mark.skipif(LEVEL < BF16, reason="needs the native kernels on an AVX512-BF16 CPU")
needs_vnni = pytest.mark.skipif(LEVEL < VNNI, reason="needs the native kernels on an AVX512-VNNI CPU")
MS = [65, 66, 71, 100, 130, 513, 600]


def _check(path, pw, m, bias, seed=1, dtype=torch.bfloat16):
    x = torch.randn(m, pw.in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
    before = ops.PATHS_RUN[(pw.kind, path)]
    y = ops._compute(path, _ext.get(), x, pw, bias)
    assert ops.PATHS_RUN[(pw.kind, path)] == before + 1
    ref = ops.reference(x, pw, bias, path)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    # fp32 sums in another order than the reference's: 2e-5 of the largest output
    err = (y - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), f"{path} {pw.kind} M={m}: max abs err {err:.3g}"
    return y


@needs_bf16
@pytest.mark.parametrize("n,k", [(37, 100), (50, 384), (300, 1030), (1040, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_gemm_matches_reference(n, k, with_bias, record_property):
    record_property("isa_path", "avx512_bf16:gemm")
    pw = prepack(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)))
    bias = torch.randn(n) if with_bias else None
    for m in MS:
        _check("avx512_bf16:gemm", pw, m, bias)


def _quant(kind, n, k, group=128, symmetric=True):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k + group))
    return quantize_int8(w) if kind == "int8" else quantize_int4(w, group, symmetric)


QUANT = [("int8", 35, 384, 0, True), ("int8", 70, 416, 0, True), ("int8", 200, 1536, 0, True),
         ("int4", 35, 384, 32, True), ("int4", 19, 256, 64, False), ("int4", 150, 640, 128, False),
         ("int4", 130, 1024, 128, True), ("int4", 17, 512, 256, True)]


@needs_vnni
@pytest.mark.parametrize("kind,n,k,group,symmetric", QUANT,
                         ids=[f"{q[0]}-{q[1]}x{q[2]}-g{q[3]}-{'sym' if q[4] else 'asym'}" for q in QUANT])
@pytest.mark.parametrize("with_bias", [False, True])
def test_vnni_q8_prefill_matches_reference(kind, n, k, group, symmetric, with_bias, record_property):
    record_property("isa_path", "avx512_vnni:q8 (prefill_q8_vnni)")
    pw = _quant(kind, n, k, group or 128, symmetric)
    bias = torch.randn(n) if with_bias else None
    for m in MS:
        # bf16 x, as a bf16 model's prefill brings it (the path rounds it to int8 per block)
        _check("avx512_vnni:q8", pw, m, bias, seed=m)


@needs_vnni
def test_vnni_q8_prefill_outliers_and_zero_blocks():
    # a row with a huge outlier (its block's other values round to 0) and an all-zero block
    # (d = 0): the same integers as the reference's rounding
    pw = _quant("int4", 64, 512, 128, False)
    x = torch.randn(80, 512)
    x[3, 7] = 1e4
    x[5, 128:256] = 0
    y = ops._compute("avx512_vnni:q8", _ext.get(), x, pw, None)
    ref = ops.reference(x, pw, None, "avx512_vnni:q8")
    assert (y - ref).abs().max() <= 2e-5 * ref.abs().max()


@needs_bf16
def test_scratch_reuse_keeps_bits():
    mod = _ext.get()
    pb = prepack(torch.randn(100, 384, generator=torch.Generator().manual_seed(3)))
    p8 = _quant("int8", 100, 384)
    x = torch.randn(300, 384, generator=torch.Generator().manual_seed(4))
    first_b = mod.prefill_bf16_dot(x.bfloat16(), pb.data, 100, None).clone()
    first_q = mod.prefill_q8_vnni(x, p8.data, p8.scales, None, 0, None).clone()
    # larger calls in between grow the kept x / sum / weight buffers and leave stale contents
    big = torch.randn(700, 1024)
    mod.prefill_bf16_dot(big.bfloat16(), prepack(torch.randn(200, 1024)).data, 200, None)
    q4 = _quant("int4", 200, 1024, 64, False)
    mod.prefill_q8_vnni(big, q4.data, q4.scales, q4.offsets, 64, None)
    assert torch.equal(first_b, mod.prefill_bf16_dot(x.bfloat16(), pb.data, 100, None))
    assert torch.equal(first_q, mod.prefill_q8_vnni(x, p8.data, p8.scales, None, 0, None))


@needs_bf16
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_prefill_candidates_without_amx(kind, monkeypatch, record_property):
    """Without AMX (or capped below it) a bf16-x prefill measures our kernels against torch's
    bf16 matmul, and the measured winner matches its own reference."""
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_bf16")
    # int4: measured only under CODESHELL_VNNI_Q4_MEASURE=1 (next test); the switch is read per call
    monkeypatch.setenv("CODESHELL_VNNI_Q4_MEASURE", "1")
    pw = prepack(torch.randn(70, 512)) if kind == "bf16" else _quant(kind, 70, 512, 128, False)
    cands = ops.prefill_candidates(pw, torch.bfloat16, BF16)
    ours = "avx512_bf16:gemm" if kind == "bf16" else "avx512_vnni:q8"
    assert ours in cands and "onednn:bf16" in cands
    x = torch.randn(80, 512).bfloat16()
    y = linear(x, pw, impl="native")
    key = (kind, 70, 512, "prefill", "avx512_bf16", "bfloat16")
    assert set(ops.CHOICE_TIMES[key]) == set(cands)
    path = ops.plan(pw, 80, torch.bfloat16)
    record_property("prefill_choice", f"{kind}: {path} of {ops.CHOICE_TIMES[key]}")
    ref = linear(x, pw, impl="reference")
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2 * ref.float().abs().max().item())
    # fp32 x keeps exact weight-only math at prefill for int8/int4
    if kind != "bf16":
        assert ops.prefill_candidates(pw, torch.float32, BF16) == ["sgemm:fp32"]


@needs_vnni
@pytest.mark.parametrize("group,symmetric", [(32, True), (128, False)])
def test_int4_prompt_takes_the_vnni_gemm_unmeasured(group, symmetric, monkeypatch):
    # Session 41: int4 with bf16 x on AVX512-VNNI without AMX runs the vpdpbusd GEMM at every prompt M with no
    # measurement (the other candidates dequantise the whole weight per call: 3.9-8.8x slower at a serving
    # prompt's M = 90 on Zen 4, yet chosen by a loaded minute's measurement); CODESHELL_VNNI_Q4_MEASURE=1: the
    # measured candidates as before. int8 is unchanged (measured).
    if LEVEL >= ops.ISA_LEVELS.index("amx"):
        monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_bf16")
    level = min(LEVEL, BF16)
    pw = _quant("int4", 70, 512, group, symmetric)
    assert ops.prefill_candidates(pw, torch.bfloat16, level) == ["avx512_vnni:q8"]
    assert ops.prefill_candidates(pw, torch.float32, level) == ["sgemm:fp32"]  # fp32 x: exact, as before
    assert "onednn:bf16" in ops.prefill_candidates(_quant("int8", 70, 512), torch.bfloat16, level)
    monkeypatch.setenv("CODESHELL_VNNI_Q4_MEASURE", "1")
    assert ops.prefill_candidates(pw, torch.bfloat16, level)[0] == "avx512_vnni:q8"
    assert len(ops.prefill_candidates(pw, torch.bfloat16, level)) > 1
    monkeypatch.delenv("CODESHELL_VNNI_Q4_MEASURE")
    before = dict(ops.CHOICE_TIMES)
    x = torch.randn(90, 512).bfloat16()
    y = linear(x, pw, impl="native")
    assert ops.plan(pw, 90, torch.bfloat16) == "avx512_vnni:q8" and dict(ops.CHOICE_TIMES) == before  # nothing measured
    ref = ops.reference(x, pw, None, "avx512_vnni:q8")
    assert (y.float() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


@needs_bf16
@pytest.mark.parametrize("k", [1024, 1030])
def test_bf16_gemm_row_bits_do_not_depend_on_m(k):
    # x's pack copies full row tiles without bounds tests and the tail tile (rows past M) with
    # them; the K chunks, register block and prefetches are the same for every tile. So a row's
    # bits are the same whether it lands in a full tile (M = 600) or in the tail tile (M = 97:
    # rows 96.. alone in the last tile), with K a multiple of the pair (1024) or not (1030).
    mod = _ext.get()
    pb = prepack(torch.randn(300, k, generator=torch.Generator().manual_seed(k)))
    x = torch.randn(600, k, generator=torch.Generator().manual_seed(5)).bfloat16()
    full = mod.prefill_bf16_dot(x, pb.data, 300, None).clone()
    for m in (97, 130):
        part = mod.prefill_bf16_dot(x[:m].contiguous(), pb.data, 300, None)
        assert torch.equal(part, full[:m]), f"M={m}, K={k}"


@needs_bf16
def test_dot_peak_is_measured_and_in_the_bench_peak():
    mod = _ext.get()
    assert mod.bf16_dot_peak(10) == 10 * 128 * 4 * 6 * 64 * torch.get_num_threads()
    tf = bench.dot_tflops(repeats=1, reps=2000)
    assert tf is not None and tf > 0


@needs_bf16
@pytest.mark.parametrize("n,k", [(37, 100), (300, 1030), (1040, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_gemm_gelu_epilogue_is_the_unfused_bits(n, k, with_bias, monkeypatch):
    # prefill_bf16_dot(gelu=True) with CODESHELL_GELU_FAST=0: the GELU applied in the epilogue
    # (c_fc of a bf16 prefill) gives exactly the bits of the fp32 result followed by
    # fused_gelu_tanh(y, None, out_bf16=True), including N not a multiple of 16 (masked tail) and
    # rows past a tile of 6 (the default, gelu16_fast: test_bf16_gemm_fast_gelu_within_one_ulp)
    monkeypatch.setenv("CODESHELL_GELU_FAST", "0")
    mod = _ext.get()
    pw = prepack(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 4 if with_bias else None
    for m in (65, 71, 513):
        x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).to(torch.bfloat16)
        y = mod.prefill_bf16_dot(x, pw.data, n, bias)
        g = mod.prefill_bf16_dot(x, pw.data, n, bias, True)
        assert g.dtype == torch.bfloat16 and g.shape == (m, n) and g.is_contiguous()
        assert torch.equal(g.view(torch.int16), mod.fused_gelu_tanh(y, None, True).view(torch.int16)), (n, k, m)


@needs_bf16
def test_packed_linear_gelu_only_at_prompt_rows(monkeypatch):
    # forward_gelu: at prefill M (bf16 x) the GELU of the path planned for the weight as a GELU linear
    # (ops.plan(..., "gelu")): the GEMMs' epilogue, or the path's output then the fused GELU, the
    # bits of forward_raw on that path then the fused GELU (the exact GELU here, CODESHELL_GELU_FAST=0,
    # for a bitwise comparison); None at decode M and for fp32 x (the model's forward_raw + fused GELU)
    import os
    from codeshell.kernels.module import PackedLinear
    monkeypatch.setenv("CODESHELL_GELU_FAST", "0")
    lin = PackedLinear(prepack(torch.randn(96, 128)), torch.randn(96))
    x = torch.randn(100, 128).to(torch.bfloat16)
    g = lin.forward_gelu(x)
    path = lin.fast._path(100, torch.bfloat16, "gelu")
    key = (100, torch.bfloat16, os.environ.get("CODESHELL_KERNEL_ISA"), None)
    lin.fast._paths[key] = path  # forward_raw on the GELU plan's path
    assert torch.equal(g, _ext.get().fused_gelu_tanh(lin.forward_raw(x), None, True)), path
    assert lin.forward_gelu(x[:8]) is None
    assert lin.forward_gelu(x.float()) is None


@needs_bf16
@pytest.mark.parametrize("chosen", ["avx512_bf16:gemm", "onednn:bf16", "avx512_bf16:panel64"])
@pytest.mark.parametrize("fast", ["0", "1"])
def test_gelu_linear_runs_the_planned_path_with_its_gelu(chosen, fast, monkeypatch, record_property):
    # Session 41: whichever candidate the GELU plan holds for the weight, forward_gelu runs it with its
    # GELU (module.gelu_call): the GEMM's epilogue ("+gelu") or the path's output then the fused GELU
    # pass ("+gelu pass"), as the model ran a path without the epilogue; the bits of forward_raw on
    # that path then fused_gelu_tanh (exact GELU: CODESHELL_GELU_FAST=0), within one bf16 ulp with the
    # fast GELU, and close to the GELU of the fp32 reference. The plain path of the weight is apart.
    import os
    from codeshell.kernels.module import PackedLinear, gelu_call
    record_property("isa_path", chosen + " + GELU")
    if LEVEL >= ops.ISA_LEVELS.index("amx"):  # the candidates of a CPU without AMX
        monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_bf16")
    monkeypatch.setenv("CODESHELL_GELU_FAST", fast)
    bias = torch.randn(96)
    lin = PackedLinear(prepack(torch.randn(96, 128, generator=torch.Generator().manual_seed(7))), bias)
    x = (torch.randn(100, 128, generator=torch.Generator().manual_seed(8)) * 0.5).to(torch.bfloat16)
    isa = os.environ.get("CODESHELL_KERNEL_ISA")
    lin.fast._paths[(100, torch.bfloat16, isa, "gelu")] = chosen
    lin.fast._paths[(100, torch.bfloat16, isa, None)] = chosen
    mod = _ext.get()
    want = mod.fused_gelu_tanh(lin.forward_raw(x), None, True)
    run = ("bf16", chosen + ("+gelu" if chosen == "avx512_bf16:gemm" else "+gelu pass"))
    before = ops.PATHS_RUN[run]
    g = lin.forward_gelu(x)
    assert ops.PATHS_RUN[run] == before + 1
    assert g.dtype == torch.bfloat16 and g.shape == (100, 96)
    assert torch.equal(g, gelu_call(chosen, mod, x, lin.packed, lin.fast.bias))
    if fast == "0" or chosen != "avx512_bf16:gemm":
        assert torch.equal(g, want)
    else:  # the epilogue's gelu16_fast: within one bf16 ulp of the exact GELU
        assert ((g.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all()
    ref = torch.nn.functional.gelu(ops.reference(x, lin.packed, lin.fast.bias, chosen).float(), approximate="tanh")
    assert (g.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


@needs_bf16
def test_gelu_plan_times_each_candidate_with_its_gelu(monkeypatch):
    # ops.plan(..., "gelu") on the real kernels: a choice of its own among the same candidates, each
    # timed with its GELU (measure._time_call: the GEMM's GELU epilogue, oneDNN's / panel64's output then
    # the fused GELU pass: the calls PATHS_RUN counts), apart from the weight's plain choice
    from codeshell.kernels import measure
    if LEVEL >= ops.ISA_LEVELS.index("amx"):
        monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_bf16")
    pw = prepack(torch.randn(80, 256))
    key = ("bf16", 80, 256, "prefill", "avx512_bf16", "bfloat16", "gelu")
    for k in (key, key[:6]):
        ops._CHOICES.pop(k, None)
    measure._SLICE_LOOKS.clear()
    runs = [("bf16", "avx512_bf16:gemm+gelu"), ("bf16", "onednn:bf16+gelu pass"), ("bf16", "avx512_bf16:panel64+gelu pass")]
    before = [ops.PATHS_RUN[r] for r in runs]
    path = ops.plan(pw, 100, torch.bfloat16, "gelu")
    cands = ops.prefill_candidates(pw, torch.bfloat16, BF16)
    assert path in cands and set(ops.CHOICE_TIMES[key]) == set(cands)
    assert all(ops.PATHS_RUN[r] > b for r, b in zip(runs, before))
    assert key[:6] not in ops._CHOICES  # the plain choice is not made by the GELU one
    ops.plan(pw, 100, torch.bfloat16)
    assert key[:6] in ops._CHOICES


@needs_bf16
@pytest.mark.parametrize("n,k", [(384, 256), (256, 1030), (1040, 256)])
def test_bf16_gemm_work_item_does_not_change_bits(n, k, monkeypatch, record_property):
    # The GEMM's work item (panels a thread claims at once) is 4 where items of 8 would leave
    # fewer than 4 a thread (codeshell-mini's N = 256 / 384), else 8; CODESHELL_DOT_ITEM sets it.
    # Each output's sum runs over the K chunks in order whatever the item: the same bits.
    record_property("isa_path", "avx512_bf16:gemm")
    pw = prepack(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)))
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    bias = torch.randn(n)
    ys = {}
    for item in ("", "1", "2", "4", "8", "16"):
        monkeypatch.setenv("CODESHELL_DOT_ITEM", item)
        ys[item] = ops._compute("avx512_bf16:gemm", _ext.get(), x, pw, bias).clone()
        assert torch.equal(ys[item], ys[""]), f"item {item!r} changed the bits"
    ref = ops.reference(x, pw, bias, "avx512_bf16:gemm")
    assert (ys[""] - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
    print(f"avx512_bf16:gemm N={n} K={k}: items of 1, 2, 4, 8, 16 panels and the default give the same bits")


@needs_bf16
@pytest.mark.parametrize("n,k,m", [(384, 256, 256), (1040, 1024, 131), (37, 96, 65), (300, 512, 600)])
@pytest.mark.parametrize("gelu", [False, True])
def test_bf16_gemm_reads_x_rows_in_place_with_the_packed_bits(n, k, m, gelu, monkeypatch, record_property):
    # K a multiple of 32: prefill_dot reads x's rows in place (dot_block_rows, rows past M on a
    # row of zeros; by default where N <= 512, CODESHELL_DOT_XPACK=0 at every N) instead of
    # packing x (CODESHELL_DOT_XPACK=1, as before). The same bits.
    record_property("isa_path", "avx512_bf16:gemm (x rows in place)")
    pw = prepack(torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    bias = torch.randn(n)
    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_DOT_XPACK", "1")
    packed = mod.prefill_bf16_dot(x, pw.data, n, bias, gelu).clone()
    monkeypatch.setenv("CODESHELL_DOT_XPACK", "0")
    direct = mod.prefill_bf16_dot(x, pw.data, n, bias, gelu).clone()
    monkeypatch.delenv("CODESHELL_DOT_XPACK")
    default = mod.prefill_bf16_dot(x, pw.data, n, bias, gelu).clone()
    assert torch.equal(direct, packed) and torch.equal(default, packed)
    if not gelu:
        ref = ops.reference(x, pw, bias, "avx512_bf16:gemm")
        assert (direct - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
    print(f"avx512_bf16:gemm x rows in place N={n} K={k} M={m} gelu={gelu}: the packed path's bits")


@needs_bf16
@pytest.mark.parametrize("n,k,m", [(1024, 256, 256), (1040, 256, 70), (100, 96, 65)])
def test_bf16_gemm_gelu_four_vectors_a_step_keeps_bits(n, k, m, monkeypatch, record_property):
    # store_rows_gelu runs four vectors a step where 64 columns are left (CODESHELL_GELU_X4=0: one).
    record_property("isa_path", "avx512_bf16:gemm + GELU epilogue")
    pw = prepack(torch.randn(n, k, generator=torch.Generator().manual_seed(n)))
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3).to(torch.bfloat16)
    bias = torch.randn(n)
    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_GELU_X4", "0")
    one = mod.prefill_bf16_dot(x, pw.data, n, bias, True).clone()
    monkeypatch.delenv("CODESHELL_GELU_X4")
    assert torch.equal(mod.prefill_bf16_dot(x, pw.data, n, bias, True), one)


def _bf16_close(a: torch.Tensor, b: torch.Tensor, rare: float, bits: bool = False) -> float:
    """Equal up to one bf16 rounding step (tests/kernels/test_fused.py's criterion for the fused
    GELU against torch's: differences over 1e-6 in fewer than `rare` of the values); bits: any
    differing bit counts. Returns that fraction."""
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
    diff = (a.float() - b.float()).abs()
    ulp = b.float().abs().clamp(min=1e-30) * 2.0 ** -7
    assert bool((diff <= ulp + 1e-6).all()), f"max diff {diff.max()}"  # 1e-6: torch rounds the far tail of GELU to 0
    frac = ((a.view(torch.int16) != b.view(torch.int16)) if bits else (diff > 1e-6)).float().mean().item()
    assert frac < rare, f"{frac:.2e} of the values differ"
    return frac


@needs_bf16
@pytest.mark.parametrize("n,k,m", [(1024, 256, 256), (1040, 256, 70), (300, 1030, 513), (100, 96, 65)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_gemm_fast_gelu_within_one_ulp(n, k, m, with_bias, monkeypatch, record_property):
    # The GELU epilogue's default gelu16_fast (simd512.h: vrcp14ps + one Newton step for the
    # divide, vscalefps for exp's scale) against (a) torch's exact F.gelu(approximate="tanh") of
    # the same bf16-rounded pre-activations, as the fused GELU's own test (test_fused.py), and
    # (b) the exact epilogue (CODESHELL_GELU_FAST=0, gelu16): within one bf16 ulp of both, and
    # the same bits as gelu16 but for rare values on a rounding boundary (a few fp32 ulps apart).
    record_property("isa_path", "avx512_bf16:gemm + fast GELU epilogue")
    import torch.nn.functional as F
    pw = prepack(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) / k ** 0.5)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)) if with_bias else None
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).to(torch.bfloat16)
    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_GELU_FAST", "0")
    exact = mod.prefill_bf16_dot(x, pw.data, n, bias, True).clone()
    monkeypatch.delenv("CODESHELL_GELU_FAST")
    fast = mod.prefill_bf16_dot(x, pw.data, n, bias, True)
    pre = mod.prefill_bf16_dot(x, pw.data, n, bias).to(torch.bfloat16)  # the rounded pre-activation
    _bf16_close(fast, F.gelu(pre.float(), approximate="tanh").to(torch.bfloat16), 0.01)
    frac = _bf16_close(fast, exact, 1e-3, bits=True)
    print(f"fast GELU epilogue N={n} K={k} M={m}: {frac:.1e} of values 1 bf16 ulp from gelu16's")


@needs_bf16
def test_fast_gelu_lanes_over_the_range(monkeypatch, record_property):
    # gelu16_fast value by value over the range the model meets and past it (|v| up to 80: a > 88
    # gives v * 0, the exp's overflow and underflow ends; v^3 past fp32's range, denormals),
    # through the epilogue with an identity weight (y = x exactly; no infinities: inf * 0 in the
    # sums is NaN): within one bf16 ulp of torch's exact GELU and of gelu16.
    record_property("isa_path", "avx512_bf16:gemm + fast GELU epilogue")
    import torch.nn.functional as F
    vals = torch.cat([torch.linspace(-80, 80, 64 * 1000), torch.linspace(-6, 6, 64 * 1000),
                      torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.9, -87.9, 1e13, -1e13, 1e30, -1e30,
                                    3e38, -3e38, 1e38, 2.0, 1e-39, -1e-39] * 4)]).to(torch.bfloat16)
    k = 64
    pw = prepack(torch.eye(k))
    x = vals.view(-1, k).contiguous()
    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_GELU_FAST", "0")
    exact = mod.prefill_bf16_dot(x, pw.data, k, None, True).clone()
    monkeypatch.delenv("CODESHELL_GELU_FAST")
    fast = mod.prefill_bf16_dot(x, pw.data, k, None, True)
    assert not torch.isnan(fast.float()).any()
    big = x.float().abs() > 1e12  # gelu(v) = v (or -0) there; F.gelu's own tanh form overflows to NaN
    assert torch.equal(fast[big].view(torch.int16), exact[big].view(torch.int16))
    _bf16_close(fast[~big], F.gelu(x[~big].float(), approximate="tanh").to(torch.bfloat16), 0.01)
    _bf16_close(fast, exact, 1e-3, bits=True)
    # a NaN pre-activation gives NaN (0x7fc0), as the exact epilogue
    xn = x[:2].clone()
    xn[1, 3] = float("nan")
    out = mod.prefill_bf16_dot(xn, pw.data, k, None, True)
    assert int(out.view(torch.int16)[1, 3]) == 0x7fc0 and not torch.isnan(out[0].float()).any()


@needs_bf16
@pytest.mark.parametrize("n,k", [(37, 100), (300, 1030), (1040, 256), (1536, 1024)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_gemm_bf16_epilogue_is_the_cast_bits(n, k, with_bias, record_property):
    # prefill_bf16_dot(out_bf16=True): the fp32 result (bias added) rounded to bf16 in the
    # epilogue gives exactly torch's `.to(torch.bfloat16)` of the fp32 result, N tails (masked
    # and two-vector steps), M tile tails, both x layouts (in place at N <= 512, packed above),
    # values at and past bf16's largest (rounded to inf), and a NaN row: NaN there, as 0x7fc0
    # (torch's scalar conversion and the fused ops' bf16_bits / store8, which every bf16 result
    # of the model's inference path goes through: its vectorised `.to` writes 0xffff).
    record_property("isa_path", "avx512_bf16:gemm + bf16 epilogue")
    mod = _ext.get()
    pw = prepack(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 4 if with_bias else None
    for m in (65, 71, 513):
        x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).to(torch.bfloat16)
        x[3, 5] = float("nan")
        x[7] *= 2.0 ** 124  # sums past bf16's largest finite value
        y = mod.prefill_bf16_dot(x, pw.data, n, bias).clone()
        b = mod.prefill_bf16_dot(x, pw.data, n, bias, False, True)
        assert b.dtype == torch.bfloat16 and b.shape == (m, n) and b.is_contiguous()
        nan = torch.isnan(y)
        assert bool(nan[3].all()) and int(nan.sum()) == n and torch.isinf(y[7]).any()
        assert bool((b.view(torch.int16)[nan] == 0x7fc0).all())
        want = y.to(torch.bfloat16).view(torch.int16)
        assert torch.equal(b.view(torch.int16)[~nan], want[~nan]), (n, k, m)


@needs_bf16
def test_packed_linear_raw_is_bf16_on_the_gemm_path(monkeypatch):
    # FastLinear.raw on the GEMM with bf16 x returns the epilogue's bf16 (CODESHELL_DOT_BF16OUT=0:
    # fp32 as before); the values are the fp32 result's cast, and __call__ is unchanged.
    from codeshell.kernels.module import PackedLinear
    monkeypatch.setattr(ops, "prefill_candidates", lambda *a: ["avx512_bf16:gemm"])
    lin = PackedLinear(prepack(torch.randn(96, 128)), torch.randn(96))
    x = torch.randn(100, 128).to(torch.bfloat16)
    before = ops.PATHS_RUN[("bf16", "avx512_bf16:gemm+bf16")]
    b = lin.forward_raw(x)
    assert b.dtype == torch.bfloat16 and ops.PATHS_RUN[("bf16", "avx512_bf16:gemm+bf16")] == before + 1
    monkeypatch.setenv("CODESHELL_DOT_BF16OUT", "0")
    f = lin.forward_raw(x)
    assert f.dtype == torch.float32
    assert torch.equal(b, f.to(torch.bfloat16)) and torch.equal(lin(x), b)
    assert lin.forward_raw(x[:8]).dtype == torch.float32  # decode M: the panel kernel, fp32


def _tiny_bf16_logits(ids, monkeypatch, env):
    from codeshell.config import CodeShellConfig
    from codeshell.kernels import prepare_model
    from codeshell.model import CodeShellForCausalLM
    torch.manual_seed(0)
    cfg = CodeShellConfig(n_embd=256, n_layer=2, n_head=4, num_query_groups=2, n_inner=640, vocab_size=300,
                          n_positions=512)
    m = CodeShellForCausalLM(cfg).eval().to(torch.bfloat16)
    prepare_model(m)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        with torch.no_grad():
            return m(ids)
    finally:
        for name in env:
            monkeypatch.delenv(name)


@needs_bf16
def test_model_prefill_bf16_epilogues(monkeypatch, record_property):
    # The model's prefill (M = 2 x 100 rows > 64) on the vdpbf16ps GEMM: c_attn's rows in bf16
    # (RoPE then in place), attn.c_proj / mlp.c_proj's into the residual add in bf16: the same
    # logits, bit for bit, as the fp32 results cast by the next op (CODESHELL_DOT_BF16OUT=0).
    # The fast GELU epilogue: within the bf16 model's own rounding of the exact one's logits.
    record_property("isa_path", "avx512_bf16:gemm (model prefill, bf16 epilogues)")
    monkeypatch.setattr(ops, "prefill_candidates", lambda *a: ["avx512_bf16:gemm"])
    ids = torch.randint(0, 300, (2, 100), generator=torch.Generator().manual_seed(4))
    before = ops.PATHS_RUN[("bf16", "avx512_bf16:gemm+bf16")]
    new = _tiny_bf16_logits(ids, monkeypatch, {"CODESHELL_GELU_FAST": "0"})
    # 3 linears a layer (c_fc has the GELU epilogue), and the tied head's call at M = 200
    assert ops.PATHS_RUN[("bf16", "avx512_bf16:gemm+bf16")] == before + 2 * 3 + 1
    old = _tiny_bf16_logits(ids, monkeypatch, {"CODESHELL_GELU_FAST": "0", "CODESHELL_DOT_BF16OUT": "0"})
    assert torch.equal(new.view(torch.int16), old.view(torch.int16))
    fast = _tiny_bf16_logits(ids, monkeypatch, {})
    err = (fast.float() - new.float()).abs().max().item()
    assert err <= 0.05 * new.float().abs().max().item(), err


Q4_NIB = [(35, 384, 32, True), (19, 256, 64, False), (150, 640, 128, False), (17, 576, 32, True),
          (40, 576, 64, False), (130, 1024, 128, True), (17, 512, 256, True), (33, 4160, 32, True)]


@needs_vnni
@pytest.mark.parametrize("n,k,group,symmetric", Q4_NIB, ids=[f"{q[0]}x{q[1]}-g{q[2]}-{'sym' if q[3] else 'asym'}"
                                                              for q in Q4_NIB])
def test_vnni_q4_nibble_form_keeps_bits(n, k, group, symmetric, monkeypatch, record_property):
    # Session 41: prefill_q8_vnni's int4 runs on the nibbles as stored (vpdpbusd's unsigned operand; x's int8
    # the signed one; the block's correction -8 * its xq sum per row of x; the repack a 16 x 16 dword transpose)
    # where it ran on nib - 8 against xq + 128 (CODESHELL_VNNI_Q4_NIB=0: the scalar repack with -128 * the
    # weight's block sums). The same int32 sums, so the same bits: N past a panel / item, K with a 64-k run past
    # the 512-k chunk (576, 4160), groups 32..256, offsets and not, bias and not, M tails of the 6-row tiles.
    record_property("isa_path", "avx512_vnni:q8 (prefill_q8_vnni, int4 nibbles)")
    mod = _ext.get()
    pw = _quant("int4", n, k, group, symmetric)
    for m, with_bias in ((65, False), (71, True), (90, True), (130, False), (513, True)):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 2
        bias = torch.randn(n, generator=torch.Generator().manual_seed(n)) if with_bias else None
        monkeypatch.setenv("CODESHELL_VNNI_Q4_NIB", "0")
        old = mod.prefill_q8_vnni(x, pw.data, pw.scales, pw.offsets, group, bias).clone()
        monkeypatch.delenv("CODESHELL_VNNI_Q4_NIB")
        new = mod.prefill_q8_vnni(x, pw.data, pw.scales, pw.offsets, group, bias)
        assert torch.equal(new.view(torch.int32), old.view(torch.int32)), (n, k, group, symmetric, m)
    ref = ops.reference(x, pw, bias, "avx512_vnni:q8")
    assert (new - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
