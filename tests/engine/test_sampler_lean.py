"""The lean sampler (CODESHELL_SAMPLE_LEAN, on by default; session 21): temperature-only rows
drawn natively from the model's bf16 logits as they are, seeded uniforms drawn UNIFORM_BLOCK at
a time. It gives the tokens of the earlier path (`off`: float32 widening, one `rand` call a
draw) for every kind of sampler, batch size and dtype, so seeded requests keep their text and
sampled ones their distribution (the earlier path's distribution is tested in
tests/kernels/test_kernels.py and tests/engine/test_sampling_rows.py)."""

from __future__ import annotations

import pytest
import torch

from codeshell.engine import SamplingParams
from codeshell.engine import sampling as smp
from codeshell.engine.sampling import UNIFORM_BLOCK, SequenceSampler, sample_rows
from codeshell.kernels import _ext

needs_native = pytest.mark.skipif(_ext.get() is None, reason="native kernels unavailable")

KINDS = [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=0),                       # greedy
    SamplingParams(temperature=1.2, top_p=0.9),
    SamplingParams(temperature=0.5, seed=3),
    SamplingParams(temperature=0.7, top_k=20, seed=1),  # lean: from its 20 largest logits (its own test below)
    SamplingParams(temperature=0.9, repetition_penalty=1.3),
    SamplingParams(temperature=1.5, min_p=0.05),
    SamplingParams(temperature=0.3),
    SamplingParams(temperature=0, presence_penalty=0.5),  # greedy with a penalty: not the argmax
]


def make(kinds, lean: bool, monkeypatch) -> list[SequenceSampler]:
    monkeypatch.setenv("CODESHELL_SAMPLE_LEAN", "on" if lean else "off")
    return [SequenceSampler(p, [1, 2, 3], seed=100 + i, device=torch.device("cpu")) for i, p in enumerate(kinds)]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**62 + 7, -5])
def test_block_uniforms_are_the_one_call_uniforms(seed, monkeypatch):
    """rand(UNIFORM_BLOCK) continues a generator's stream as UNIFORM_BLOCK calls of rand(1) do
    (torch's CPU uniform fill is serial): past several blocks, the same numbers in order."""
    n = 3 * UNIFORM_BLOCK + 5
    lean, off = make([SamplingParams(temperature=1.0)] * 2, True, monkeypatch)[0], \
        make([SamplingParams(temperature=1.0)], False, monkeypatch)[0]
    lean.gen.manual_seed(seed)
    off.gen.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    want = [float(torch.rand(1, generator=g)) for _ in range(n)]
    assert [lean.uniform() for _ in range(n)] == want
    assert [off.uniform() for _ in range(n)] == want


@needs_native
@pytest.mark.parametrize("V", [70144, 3001, 7, 1])
def test_native_bf16_draw_is_the_float32_draw(V):
    """The native draw on a bf16 row gives what it gives on the row's exact fp32 widening, for
    every u (edges too), temperature, -inf masks and widths off the vector width."""
    mod = _ext.get()
    g = torch.Generator().manual_seed(V)
    for rep in range(3):
        row = (torch.randn(V, generator=g) * (2 + 3 * rep)).bfloat16()
        if V > 8:
            row[rep::5] = float("-inf")
        wide = row.float()
        us = torch.rand(300, generator=g, dtype=torch.float64).tolist() + [0.0, 1 - 2**-53, 0.5]
        for t in (0.2, 0.8, 1.7):
            got = [mod.sample_temperature(row, t, u) for u in us]
            assert got == [mod.sample_temperature(wide, t, u) for u in us]
            assert torch.isfinite(wide[got]).all()
    with pytest.raises(RuntimeError, match="nothing to sample"):
        mod.sample_temperature(torch.full((10,), float("-inf"), dtype=torch.bfloat16), 1.0, 0.5)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        mod.sample_temperature(torch.zeros(10, dtype=torch.float16), 1.0, 0.5)


@needs_native
def test_native_rows_bf16_strided_and_one_row():
    """sample_temperature_rows on bf16 rows, on a row-strided view and on one row: the one-row
    draws of each row's fp32 widening."""
    mod = _ext.get()
    g = torch.Generator().manual_seed(7)
    base = (torch.randn(12, 1003, generator=g) * 4).bfloat16()
    base[3, ::2] = float("-inf")
    for rows in (base, base[::2], base[5:6], base[:, :999]):
        B = rows.shape[0]
        t = torch.tensor([0.2 + 0.15 * i for i in range(B)], dtype=torch.float64)
        u = torch.rand(B, generator=g, dtype=torch.float64)
        want = [mod.sample_temperature(rows[i].float().contiguous(), float(t[i]), float(u[i])) for i in range(B)]
        assert mod.sample_temperature_rows(rows, t, u).tolist() == want
        assert mod.sample_temperature_rows(rows.float(), t, u).tolist() == want


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [1, 2, len(KINDS)])
def test_sample_rows_lean_equals_earlier_path(dtype, width, monkeypatch):
    """sample_rows over steps, lean against off, with and without the native step's argmax: the
    same tokens for every kind of sampler (each generator advancing as alone), logits unchanged.
    (Top-k rows: the same but at rounding boundaries, test_top_k_rows_from_k_largest.)"""
    from codeshell.engine.sampling import first_argmax
    g = torch.Generator().manual_seed(width)
    monkeypatch.setattr(smp, "TOP_K_MAX", 0)  # top-k rows on the whole-row path here
    for start in range(0, len(KINDS), width):
        kinds = KINDS[start:start + width]
        lean, off = make(kinds, True, monkeypatch), make(kinds, False, monkeypatch)
        for step in range(2 * UNIFORM_BLOCK + 3):  # past a block of uniforms
            logits = (torch.randn(len(kinds), 2053, generator=g) * 3).to(dtype)
            keep = logits.clone()
            argmax = first_argmax(logits).tolist() if step % 2 else None
            got, want = sample_rows(lean, logits, argmax), sample_rows(off, logits, argmax)
            assert got == want
            assert torch.equal(logits, keep)
            for s, t in zip(lean + off, got + want):
                s.observe(t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_top_k_rows_from_k_largest(dtype):
    """`_draw_top_k` (a lean top-k row from its k largest logits) against the whole-row path
    (`process` + the inverse CDF) for the same u: a token of the whole row's survivors always,
    the same token but at rounding boundaries (>= 99.5%), the same probabilities (so the same
    distribution), and the whole-row path's own answer where the k-th logit ties the next."""
    g = torch.Generator().manual_seed(0)
    agree = total = 0
    for V, k, top_p, t in [(70144, 10, 0.95, 0.2), (70144, 40, 1.0, 0.8), (5000, 2, 0.5, 1.0),
                           (3001, 1024, 0.9, 1.3), (999, 20, 0.3, 0.7)]:
        sp = SamplingParams(temperature=t, top_k=k, top_p=top_p)
        ref = SequenceSampler(sp, [1], seed=1, device=torch.device("cpu"))
        for _ in range(4):
            row = (torch.randn(V, generator=g) * 3).to(dtype)
            x = ref.process(row.float())
            probs = torch.softmax(x, -1)
            cdf = probs.cumsum(-1)
            us = torch.rand(400, generator=g, dtype=torch.float64).tolist()
            want = torch.searchsorted(cdf, torch.tensor(us, dtype=cdf.dtype) * cdf[-1], right=True).clamp_(max=V - 1)
            got = torch.tensor([smp._draw_top_k(row, t, k, top_p, u) for u in us])
            assert torch.isfinite(x[got]).all()
            agree += int((got == want).sum())
            total += len(us)
            # the same probabilities over the same survivors: the k largest and their ties, top-p applied
            keep = (row >= torch.topk(row, k).values[-1]).nonzero().squeeze(1)
            assert torch.equal(torch.isfinite(x).nonzero().squeeze(1), keep[torch.isfinite(x[keep])])
            y = row[keep].float() / t
            if top_p < 1.0:
                sy, order = torch.sort(y, descending=True, stable=True)
                pr = torch.softmax(sy, -1)
                y = torch.empty_like(y).scatter_(0, order, sy.masked_fill(pr.cumsum(-1) - pr >= top_p, float("-inf")))
            a, b = torch.softmax(y, -1), probs[keep]
            # top-p's cut may fall one token apart where the two paths' sums round differently
            cut = (a == 0) != (b == 0)
            assert int(cut.sum()) <= 1
            if not cut.any():
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert agree >= 0.995 * total, (agree, total)
    row = torch.tensor([0.0, 3.0, 1.0, 3.0, 2.0, 3.0, 2.0, 1.0])  # the 2nd largest ties the 3rd
    for u, tok in ((0.1, 1), (0.5, 3), (0.9, 5)):  # every tie kept (a third each), as the whole-row path does
        assert smp._draw_top_k(row, 1.0, 2, 1.0, u) == tok
    row = torch.full((3000,), 1.0).bfloat16()  # ties past several doublings of the topk
    assert smp._draw_top_k(row, 1.0, 3, 1.0, 0.99999) == 2999


def test_fallback_without_native_kernels(monkeypatch):
    """Without the extension the lean sampler takes the torch path: the same tokens."""
    monkeypatch.setattr(smp, "_EXT", [None])
    kinds = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.4)]
    g = torch.Generator().manual_seed(9)
    for width in (1, 2):
        lean, off = make(kinds[:width], True, monkeypatch), make(kinds[:width], False, monkeypatch)
        for _ in range(10):
            logits = (torch.randn(width, 999, generator=g) * 3).bfloat16()
            assert sample_rows(lean, logits) == sample_rows(off, logits)


def test_switch(monkeypatch):
    monkeypatch.setenv("CODESHELL_SAMPLE_LEAN", "maybe")
    with pytest.raises(ValueError, match="CODESHELL_SAMPLE_LEAN"):
        smp.sampler_lean()


@needs_native
def test_generate_same_text_lean_or_not(monkeypatch):
    """LLM.generate on codeshell-mini (bf16: the native decode step's bf16 logits), seeded sampled
    requests (temperature only, n = 2, top-p, logprobs, prompt lookup) and one alone (the 1-row
    path): the same tokens and text with the switch on and off."""
    from codeshell import LLM
    llm = LLM(max_batch=4)
    prompts = ["def add(a, b):\n", "class Stack:\n    def push", "# sort a list\n"]
    sps = [SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=80, ignore_eos=True),
           SamplingParams(temperature=1.1, top_p=0.9, seed=6, max_tokens=20, ignore_eos=True, logprobs=2),
           SamplingParams(temperature=0.7, seed=7, max_tokens=20, ignore_eos=True, prompt_lookup_num_tokens=3)]
    got = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("CODESHELL_SAMPLE_LEAN", mode)
        outs = llm.generate(prompts, sps) + [llm.generate(prompts[0], SamplingParams(temperature=0.8, seed=5,
                                                                                      max_tokens=70))[0]]
        got[mode] = [(c.text, c.token_ids, c.finish_reason) for o in outs for c in o.outputs]
        got[mode + "lp"] = [[(lp.token_id, round(lp.logprob, 5)) for lp in c.logprobs or []]
                            for o in outs for c in o.outputs]
    assert got["on"] == got["off"]
    assert got["onlp"] == got["offlp"]
