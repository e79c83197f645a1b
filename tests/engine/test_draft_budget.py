"""The draft budget (engine/lookup.py `DraftBudget`): which drafted tokens a verify step runs,
by each sequence's acceptance rate and the measured cost of the step's rows; and the engine
with it (greedy text unchanged, drafts trimmed when rows are dear, seeded sampled drafts kept)."""

from __future__ import annotations

import pytest

from codeshell import LLM
from codeshell.engine import SamplingParams
from codeshell.engine.lookup import AcceptRate, DraftBudget, NgramLookup
from tests.conftest import require_shared


def budget(costs: dict[int, float]) -> DraftBudget:
    b = DraftBudget()
    for m, c in costs.items():
        b.observe(m, c)
    return b


def test_every_draft_until_two_row_counts_are_measured():
    drafts = [[1] * 8, [2] * 3, [], [3] * 8]
    rates = [0.1, 0.1, 0.1, 0.1]
    assert DraftBudget().choose(drafts, rates, [False] * 4, 64) == [8, 3, 0, 8]
    assert budget({4: 1.0}).choose(drafts, rates, [False] * 4, 64) == [8, 3, 0, 8]
    assert DraftBudget().choose(drafts, rates, [False] * 4, 16) == [4, 3, 0, 5]  # the row cap


def test_cost_is_measured_interpolated_and_extrapolated():
    b = budget({2: 1.0, 10: 2.0})
    assert b.cost(2) == 1.0 and b.cost(10) == 2.0
    assert b.cost(6) == pytest.approx(1.5)                 # between known row counts
    assert b.cost(18) == pytest.approx(3.0)                # past them: the fitted slope
    assert b.cost(1) == pytest.approx(0.875)
    b.observe(10, 100.0)                                   # an outlier: counted as 3x the average,
    assert b.cost(10) == pytest.approx((2.0 + 6.0) / 2)    # the first timings averaged
    b.observe(2, 0.5)
    assert b.cost(2) == pytest.approx(0.75)
    for _ in range(60):                                    # then a moving average
        b.observe(2, 0.5)
    b.observe(2, 1.5)
    assert b.cost(2) == pytest.approx(0.5 + DraftBudget.ALPHA * 1.0, rel=1e-3)


def test_free_rows_keep_every_draft_and_dear_rows_keep_only_likely_tokens():
    drafts = [[1] * 8, [2] * 8]
    free = budget({2: 1.0, 18: 1.0})
    assert free.choose(drafts, [0.9, 0.2], [False] * 2, 64) == [8, 8]
    # each row costs 20% of a 2-row step: a token pays if its odds beat 20% of the step's
    # tokens per unit of cost (~0.57 here); the sequence accepted at 0.9 keeps 5 (0.9**5 =
    # 0.59), the one at 0.2 none
    dear = budget({2: 1.0, 12: 3.0})
    assert dear.choose(drafts, [0.9, 0.2], [False] * 2, 64) == [5, 0]
    # rows dearer still: no draft at all is best
    assert budget({2: 1.0, 3: 3.0}).choose(drafts, [0.5, 0.5], [False] * 2, 64) == [0, 0]


def test_the_kept_tokens_maximise_expected_tokens_per_second():
    """Brute force over every pair of kept lengths, with the same odds model."""
    import itertools
    costs = {3: 2.0, 8: 2.4, 16: 3.0, 17: 4.0, 30: 5.5}
    b = budget(costs)
    drafts, rates = [[1] * 7, [2] * 7, [3] * 7], [0.9, 0.6, 0.3]

    def value(keep):
        e = len(drafts) + sum(sum(a ** (j + 1) for j in range(n)) for n, a in zip(keep, rates))
        return e / b.cost(len(drafts) + sum(keep))

    best = max(itertools.product(range(8), repeat=3), key=value)
    got = b.choose(drafts, rates, [False] * 3, 64)
    assert value(got) == pytest.approx(value(best))
    assert got[0] >= got[1] >= got[2]  # more of the drafts that fare better


def test_fixed_drafts_stay_whole_and_the_cap_holds():
    b = budget({2: 1.0, 3: 3.0})  # rows so dear that a free choice drafts nothing
    assert b.choose([[1] * 5, [2] * 5], [0.5, 0.5], [True, False], 64) == [5, 0]
    assert b.choose([[1] * 9, [2] * 9], [0.5, 0.5], [True, True], 12) == [5, 5]  # cap: longest first
    cheap = budget({2: 1.0, 64: 1.0})
    for cap in (3, 5, 9, 40):
        keep = cheap.choose([[1] * 9, [2] * 30, [3] * 4], [0.9, 0.9, 0.9], [True, False, False], cap)
        assert 3 + sum(keep) == min(cap, 3 + 9 + 30 + 4), (cap, keep)
    assert cheap.choose([[1] * 9, [2] * 3], [0.9, 0.9], [True, False], 1) == [0, 0]  # fewer rows than sequences


def test_accept_rate_is_the_per_token_odds_and_ages_when_idle():
    r = AcceptRate()
    assert r.rate == pytest.approx(AcceptRate.PRIOR)
    r.update(5, True)  # 5 accepted, then a rejection: 5 successes in 6 trials (the share was 5/8)
    assert r.rate == pytest.approx((5 + AcceptRate.PRIOR) / (6 + 1))
    r.update(3, False)  # a whole 3-token draft accepted (or the sequence stopped): no failure
    h, t = 5 * AcceptRate.DECAY + 3, 6 * AcceptRate.DECAY + 3
    assert r.rate == pytest.approx((h + AcceptRate.PRIOR) / (t + 1))
    low = AcceptRate()
    low.update(0, True)
    low.update(0, True)
    before = low.rate
    assert before < 0.3
    for _ in range(30):  # dropped drafts: the old evidence fades back to the prior
        low.idle()
        assert low.rate >= before
        before = low.rate
    if AcceptRate.IDLE_DECAY < 1:
        assert low.rate == pytest.approx(AcceptRate.PRIOR, abs=0.01)


def test_engine_keeps_the_per_token_odds(llm, monkeypatch):
    """After lookup steps each sequence's odds are hits / trials (AcceptRate), not the share."""
    seen = []
    real = DraftBudget.choose

    def spy(self, drafts, rates, fixed, cap):
        seen.append(list(rates))
        return real(self, drafts, rates, fixed, cap)

    monkeypatch.setattr(DraftBudget, "choose", spy)
    ps = repetitive_prompts()
    look = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_lookup_num_tokens=8)
    llm.generate(ps, look)
    assert seen and any(r != AcceptRate.PRIOR for rates in seen for r in rates)
    assert all(0.0 < r <= 1.0 for rates in seen for r in rates)


# ---- in the engine -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    return LLM(str(require_shared("golden/rope-gqa")), dtype="float32", max_batch=4)


def repetitive_prompts():
    import torch
    g = torch.Generator().manual_seed(11)
    base = torch.randint(0, 500, (16,), generator=g).tolist()
    return [{"prompt_token_ids": p} for p in (base * 3, base[:5] * 6, base[4:] * 2, base[:9] * 3)]


def test_engine_trims_drafts_when_rows_are_dear_and_the_greedy_text_stays(llm):
    eng = llm.engine
    ps = repetitive_prompts()
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    look = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_lookup_num_tokens=8)
    want = [o.outputs[0].token_ids for o in llm.generate(ps, plain)]
    runs = {}
    try:
        for name, b in (("all", None), ("dear", budget({4: 1.0, 5: 2.0})), ("measured", DraftBudget())):
            eng.draft_budget = b
            d0 = eng.spec_drafted
            if name == "dear":  # frozen: the engine's timings do not reach it
                b.observe = lambda rows, secs: None
            got = [o.outputs[0].token_ids for o in llm.generate(ps, look)]
            assert got == want, name
            runs[name] = eng.spec_drafted - d0
            if name == "measured":
                assert len(b.cost_s) >= 2  # the engine timed its verify steps by row count
    finally:
        eng.draft_budget = DraftBudget()
    assert runs["all"] > 0 and runs["dear"] < runs["all"] / 2, runs


def test_engine_keeps_seeded_sampled_drafts_whole(llm, monkeypatch):
    seen = []
    real = DraftBudget.choose

    def spy(self, drafts, rates, fixed, cap):
        seen.append(fixed)
        return real(self, drafts, rates, fixed, cap)

    monkeypatch.setattr(DraftBudget, "choose", spy)
    monkeypatch.setattr(NgramLookup, "propose", lambda self, k: self.tokens[-4:][:k])  # a draft every step
    ps = repetitive_prompts()[:3]
    sps = [SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True, prompt_lookup_num_tokens=4),
           SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True, prompt_lookup_num_tokens=4),
           SamplingParams(temperature=0, seed=3, max_tokens=12, ignore_eos=True, prompt_lookup_num_tokens=4)]
    llm.generate(ps, sps)
    assert any(len(f) == 3 for f in seen) and all(f == [True, False, False] for f in seen if len(f) == 3)
