"""Session 18's batch-decode paths (docs/kernels-log.md, "Session 18, helper B") give the bits of the
paths they replace, each named by the switch that selects it:

* `ln16`: the LayerNorm (fused.cpp add_ln_row16, 16 lanes) against the 8-lane add_ln_row
  (`CODESHELL_LN16=0`) and torch's LayerNorm;
* `gelu_x2`: the 16-lane GELU two vectors a step against one (`CODESHELL_GELU_X2=0`) and the
  8-lane GELU (`CODESHELL_KERNEL_ISA=avx2`);
* `bf16_pf2` / `q8r_pf0`: software prefetch only (`CODESHELL_BF16_PF2`, `CODESHELL_Q8R_PF0`),
  and `q8r_epi`, q8_rows.h's vector epilogue (`CODESHELL_Q8R_EPI=0`: the scalar one): the bf16
  and int8 linears at M = 3..16 equal the same call without them, and each row the M = 1 call;
  `q8r_asm`: the int8 rows' vpdpbusd through inline asm (`CODESHELL_Q8R_ASM=0`: the intrinsic);
* `attn_tree`: decode attention's 4-head score blocks by one transposing tree against one hsum8
  per score (`CODESHELL_ATTN_TREE=0`), on both entry points; `attn_v16`: the packed path's
  weighted values in 16-lane registers (`CODESHELL_ATTN_V16=0`: 8 lanes);
* `bf16_far`: the native step's far-prefetch hint for a cache-resident model (codeshell-mini).
On a CPU without AVX-512 the 16-lane paths do not run, and the tests say so in their skips."""

from __future__ import annotations

import pytest
import torch

from codeshell import kernels
from codeshell.kernels import _ext, ops

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")


def wide() -> bool:
    return ops.isa_level() >= ops.ISA_LEVELS.index("avx512_vnni")


def need_wide(path: str) -> None:
    if not wide():
        pytest.skip(f"no AVX-512 here: the {path} path does not run")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def same(a, b) -> bool:
    return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("C", [1, 7, 8, 9, 16, 24, 40, 100, 256, 1000, 1024, 1536])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("xdt,wdt", [("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "bf16"), ("fp32", "fp32")])
def test_ln16_is_the_8_lane_layer_norm(monkeypatch, C, rows, xdt, wdt):
    need_wide("ln16")
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}
    g = torch.Generator().manual_seed(C * 31 + rows)
    x = (torch.randn(rows, C, generator=g) * 3 + 0.5).to(dt[xdt])
    w = torch.randn(C, generator=g).to(dt[wdt])
    b = torch.randn(C, generator=g).to(dt[wdt])
    mod = _ext.get()
    for r in (None, torch.randn(rows, C, generator=g), torch.randn(rows, C, generator=g).to(dt[xdt])):
        for ww, bb in ((w, b), (None, None), (w, None), (None, b)):
            monkeypatch.setenv("CODESHELL_LN16", "1")
            got = mod.fused_add_layer_norm(x, r, ww, bb, 1e-5)
            monkeypatch.setenv("CODESHELL_LN16", "0")
            want = mod.fused_add_layer_norm(x, r, ww, bb, 1e-5)
            assert same(got, want), f"ln16 vs 8 lanes: C={C} rows={rows} r={r is not None} w={ww is not None} b={bb is not None}"
    # and the reference (the no-residual case; torch normalises in fp32)
    monkeypatch.setenv("CODESHELL_LN16", "1")
    y = mod.fused_add_layer_norm(x, None, w, b, 1e-5)[1]
    ref = torch.nn.functional.layer_norm(x.float(), (C,), w.float(), b.float(), 1e-5)
    tol = 2e-2 if x.dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y.float(), ref, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("rows,N", [(1, 7), (1, 1024), (8, 1024), (8, 4096), (3, 48), (5, 1000), (2, 33)])
@pytest.mark.parametrize("kind", ["fp32", "fp32->bf16", "bf16"])
def test_gelu_x2_is_the_one_vector_loop_and_8_lanes(monkeypatch, rows, N, kind):
    need_wide("gelu_x2")
    g = torch.Generator().manual_seed(rows * 13 + N)
    v = torch.randn(rows, N, generator=g) * 6
    v.view(-1)[:5] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])[: v.numel()]
    if kind == "bf16":
        v = v.to(torch.bfloat16)
    bias = torch.randn(N, generator=g) if kind == "fp32" else None
    out_bf16 = kind != "fp32"
    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_GELU_X2", "1")
    x2 = mod.fused_gelu_tanh(v, bias, out_bf16)
    monkeypatch.setenv("CODESHELL_GELU_X2", "0")
    x1 = mod.fused_gelu_tanh(v, bias, out_bf16)
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    narrow = mod.fused_gelu_tanh(v, bias, out_bf16)
    assert torch.equal(bits(x2), bits(x1)), "gelu_x2 vs one vector a step"
    assert torch.equal(bits(x2), bits(narrow)), "gelu_x2 vs 8 lanes"
    ref = torch.nn.functional.gelu((v.float() + (bias if bias is not None else 0)), approximate="tanh")
    fin = torch.isfinite(ref)
    torch.testing.assert_close(x2.float()[fin], ref[fin], atol=2e-2 if out_bf16 else 1e-5, rtol=1e-2 if out_bf16 else 1e-5)


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("N,K", [(384, 256), (1024, 256), (256, 1024), (37, 128), (100, 384), (72, 640), (24, 2048)])
def test_batch_switches_keep_the_bits(monkeypatch, kind, N, K):
    """bf16_pf2 (bf16 at M >= 4: a prefetch), and int8 at M = 3..16 on q8_rows.h: q8r_pf0 (a
    prefetch; default 4 blocks since session 20, 2 before), q8r_epi (the vector epilogue, the tree without its +0 slots)
    and q8r_asm (vpdpbusd through inline asm) against CODESHELL_Q8R_EPI=0 / CODESHELL_Q8R_ASM=0 and each row at M = 1 (row invariance)."""
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g) * 0.05
    lin = kernels.prepack(w.to(torch.bfloat16)) if kind == "bf16" else kernels.quantize_int8(w)
    bias = torch.randn(N, generator=g)
    if kind == "bf16":
        variants = [("CODESHELL_BF16_PF2", "256"), ("CODESHELL_BF16_PF2", "1024")]
    else:
        variants = [("CODESHELL_Q8R_PF0", "0"), ("CODESHELL_Q8R_PF0", "1"), ("CODESHELL_Q8R_EPI", "0"), ("CODESHELL_Q8R_ASM", "0")]
    for M in (3, 4, 8, 16):
        x = torch.randn(M, K, generator=g).to(torch.bfloat16)
        for b in (None, bias):
            for var, _ in variants:
                monkeypatch.delenv(var, raising=False)
            want = kernels.linear(x, lin, b)
            for i in range(M):  # every row as the M = 1 call gives it
                assert torch.equal(kernels.linear(x[i:i + 1], lin, b)[0], want[i]), f"row {i} of M={M}"
            for var, v in variants:
                monkeypatch.setenv(var, v)
                assert torch.equal(kernels.linear(x, lin, b), want), f"{var}={v} at M={M}"
                monkeypatch.delenv(var)


@pytest.mark.parametrize("H,G,D", [(8, 2, 32), (8, 2, 128), (16, 4, 64), (4, 1, 24), (8, 4, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attn_tree_is_the_per_score_hsum(monkeypatch, H, G, D, dtype):
    """attn_tree: decode attention's 4-head score blocks reduced by one transposing tree
    (attention.cpp hsum8x8) against each score's own hsum8 (CODESHELL_ATTN_TREE=0), on both
    entry points, odd and even lengths (the last odd key keeps the per-score path), and the
    reference softmax attention."""
    from codeshell.kernels.attention import packed_attention
    g = torch.Generator().manual_seed(H * D + G)
    kc = torch.randn(8, G, 300, D, generator=g).to(dtype)
    vc = torch.randn(8, G, 300, D, generator=g).to(dtype)
    lens = torch.tensor([1, 2, 15, 16, 17, 129, 256, 300])
    slots = torch.tensor([3, 0, 7, 1, 5, 2, 6, 4])
    q = torch.randn(8, H, 1, D, generator=g).to(dtype)
    outs = {}
    for sw in ("1", "0"):
        monkeypatch.setenv("CODESHELL_ATTN_TREE", sw)
        outs[sw] = (kernels.decode_attention(q, kc, vc, slots, lens, 0.2),
                    [packed_attention(q, kc, vc, slots, lens, 0.2, isa=i) for i in ([0, 1] if wide() else [0])])
    assert torch.equal(outs["1"][0], outs["0"][0]), "attn_tree vs hsum8 per score (decode_attention)"
    for a, b in zip(outs["1"][1], outs["0"][1]):
        assert torch.equal(a, b), "attn_tree vs hsum8 per score (packed_attention)"
        assert torch.equal(a, outs["1"][0]), "packed_attention vs decode_attention"
    for i in range(8):  # the reference
        n = int(lens[i])
        k = kc[slots[i], :, :n].float().repeat_interleave(H // G, 0)
        v = vc[slots[i], :, :n].float().repeat_interleave(H // G, 0)
        ref = torch.softmax(q[i].float() @ k.transpose(1, 2) * 0.2, -1) @ v
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(outs["1"][0][i].float(), ref, atol=tol, rtol=tol)


def test_far_prefetch_hint_of_a_cache_resident_model(monkeypatch):
    """bf16_far (step_hints.h): the native step of codeshell-mini (16.6 MB of bf16 weights) sets the
    bf16 batched rows' L2 prefetch where the L3 holds 4/3 of that; its batch-8 greedy tokens equal
    those with the prefetch off (CODESHELL_BF16_PF2=0) and the Python path's (no step, no hint)."""
    from pathlib import Path

    from codeshell import LLM, SamplingParams
    from codeshell.kernels import step as step_mod
    from codeshell.mini import MODEL_DIR

    llm = LLM(str(MODEL_DIR), dtype="bfloat16", max_batch=8, max_model_len=64)
    g = torch.Generator().manual_seed(3)
    ps = [{"prompt_token_ids": torch.randint(0, 16000, (5 + i,), generator=g).tolist()} for i in range(8)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = {}
    for name, env in (("hint", {}), ("off", {"CODESHELL_BF16_PF2": "0"}), ("python", {"CODESHELL_DECODE_STEP": "off"})):
        for k in ("CODESHELL_BF16_PF2", "CODESHELL_DECODE_STEP"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        runs[name] = [o.outputs[0].token_ids for o in llm.generate(ps, sp)]
    assert runs["hint"] == runs["off"] == runs["python"]
    step = step_mod._DECODERS[llm.engine.model].step
    size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    l3 = 0
    if size.is_file():
        t = size.read_text().strip()
        l3 = int(t[:-1]) * (1 << 20 if t[-1] in "Mm" else 1 << 10) if t[-1] in "KkMm" else int(t) * 1024
    want = 1024 if l3 and 16_600_000 <= l3 * 3 // 4 else 0
    assert step.far_prefetch == want, f"L3 {l3} bytes"
    if want == 0:
        pytest.skip("no L3 size in sysfs, or an L3 too small for the mini: the hint stays off here")


@pytest.mark.parametrize("H,G,D", [(8, 2, 32), (8, 2, 128), (16, 4, 64), (6, 2, 48), (4, 4, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attn_v16_is_the_8_lane_values(monkeypatch, H, G, D, dtype):
    """attn_v16: the packed path's weighted values in 16-lane registers (attention.cpp values16; 32
    lanes a pass at D % 32 == 0, 16 otherwise) against the 8-lane loop (CODESHELL_ATTN_V16=0) and plain
    decode_attention, at lengths across the 256-key value chunks."""
    need_wide("attn_v16")
    from codeshell.kernels.attention import packed_attention
    g = torch.Generator().manual_seed(H + D)
    kc = torch.randn(8, G, 600, D, generator=g).to(dtype)
    vc = torch.randn(8, G, 600, D, generator=g).to(dtype)
    lens = torch.tensor([1, 3, 16, 255, 256, 257, 513, 600])
    slots = torch.tensor([3, 0, 7, 1, 5, 2, 6, 4])
    q = torch.randn(8, H, 1, D, generator=g).to(dtype)
    want = kernels.decode_attention(q, kc, vc, slots, lens, 0.2)
    for sw in ("1", "0"):
        monkeypatch.setenv("CODESHELL_ATTN_V16", sw)
        got = packed_attention(q, kc, vc, slots, lens, 0.2, isa=1)
        assert torch.equal(got, want), f"CODESHELL_ATTN_V16={sw} vs decode_attention"


@pytest.mark.parametrize("H,G,D", [(8, 2, 32), (6, 2, 48), (6, 2, 24), (4, 4, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attn_lean_items_are_the_old_items(monkeypatch, H, G, D, dtype):
    """attn_lean (session 28): a single query's item with 16-lane q / output copies and softmax_rows16
    against CODESHELL_ATTN_LEAN=0 (scalar copies, 8-lane softmax) and plain decode_attention, bit for
    bit (NaN payloads included: a NaN query row), at lengths with every softmax tail (1..17 keys past
    a multiple of 16), with runs of one slot (attend_run's softmax_row16) and D % 16 != 0 (the copies'
    scalar tail)."""
    need_wide("attn_lean")
    from codeshell.kernels.attention import packed_attention
    g = torch.Generator().manual_seed(H * D)
    lens = torch.tensor([1, 2, 7, 8, 9, 15, 16, 17, 23, 31, 33, 47, 48, 80, 81, 300])
    B = len(lens)
    kc = torch.randn(B, G, 300, D, generator=g).to(dtype)
    vc = torch.randn(B, G, 300, D, generator=g).to(dtype)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    q[5, 0, 0, 3] = float("nan")
    bits = (lambda t: t.view(torch.int16)) if dtype == torch.bfloat16 else (lambda t: t.view(torch.int32))
    for slots in (torch.randperm(B, generator=g), torch.tensor([2] * 4 + list(range(4, B)))):
        ln = lens.clone()
        if slots[0] == slots[1]:
            ln[:4] = torch.tensor([40, 41, 42, 43])  # one slot's queries: a run (attend_run)
        want = kernels.decode_attention(q, kc, vc, slots, ln, 0.2)
        for sw in ("1", "0"):
            monkeypatch.setenv("CODESHELL_ATTN_LEAN", sw)
            got = packed_attention(q, kc, vc, slots, ln, 0.2, isa=1)
            assert torch.equal(bits(got), bits(want)), f"CODESHELL_ATTN_LEAN={sw} vs decode_attention"
