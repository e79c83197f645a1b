"""Prompts admitted in the same step share padded prefill forwards: their first tokens and
log-probabilities equal those of one-at-a-time prefills, with and without reused prefixes, and
the grouping keeps to its token budget, never batches a request with one whose KV it can
reuse, and splits by the forward's cost (`Engine.prefill_cost`, engine/prefill_plan.py): pinned
here, one forward while the fixed cost outweighs the padding, a mostly cached prompt alone where
its padding costs more; the measured cost (`measure_prefill_cost`) changes no tokens. Where a
prompt's rows outweigh a forward's fixed cost, prompts that arrive together are admitted a group a
step (`prefill_plan.first_group`): the first prompt's output leaves after its own forward, the
tokens are the same."""

from __future__ import annotations

import pytest
import torch

from codeshell import LLM
from codeshell.engine import SamplingParams
from codeshell.engine.prefill_plan import PrefillCost
from tests.conftest import require_shared

FIRST = SamplingParams(temperature=0, max_tokens=1, logprobs=3, ignore_eos=True)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


# a forward's fixed cost worth 1000 rows: one forward while the prompts fit (what a tiny model measures)
ONE = PrefillCost(fixed_s=1.0, row_s=1e-3)


@pytest.fixture(scope="module")
def llm():
    llm = LLM(str(require_shared("golden/rope-gqa")), dtype="float32", max_batch=8)
    llm.engine.prefill_cost = ONE
    return llm


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (n,), generator=g).tolist() for n in lengths]


def spy_groups(monkeypatch, eng):
    sizes: list[list[int]] = []
    real = eng._prefill_group

    def spy(group):
        sizes.append([len(r.prompt_ids) - u for r, u in group])
        return real(group)

    monkeypatch.setattr(eng, "_prefill_group", spy)
    return sizes


def run_one_step(llm, ids_list, params):
    """Submit all, then one engine step: every request is admitted and prefilled together."""
    eng = llm.engine
    for i, ids in enumerate(ids_list):
        eng.add_request(f"r{i}", ids, params)
    outs = {o.request_id: o for o in eng.step()}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    return [outs[f"r{i}"].outputs[0] for i in range(len(ids_list))]


def test_batched_prefill_equals_one_at_a_time(llm, monkeypatch):
    ps = prompts([3, 40, 1, 17, 9])
    groups = spy_groups(monkeypatch, llm.engine)
    together = run_one_step(llm, ps, FIRST)
    assert groups == [[3, 40, 1, 17, 9]]  # one forward for all five
    for p, got in zip(ps, together):
        alone = run_one_step(llm, [p], FIRST)[0]
        assert got.token_ids == alone.token_ids
        assert abs(got.logprobs[0].logprob - alone.logprobs[0].logprob) < 1e-4
        assert got.logprobs[0].top.keys() == alone.logprobs[0].top.keys()
    # and whole greedy continuations, decoded in a batch afterwards
    want = [run_one_step(llm, [p], GREEDY)[0].token_ids for p in ps]
    assert [o.token_ids for o in run_one_step(llm, ps, GREEDY)] == want


def test_rows_with_different_reused_prefixes(llm, monkeypatch):
    """One row continues a cached prompt (starts at position > 0), the others start at 0."""
    eng = llm.engine
    base, a, b = prompts([30, 6, 12], seed=1)
    want = [run_one_step(llm, [p], GREEDY)[0].token_ids for p in (base + a, b, a)]
    monkeypatch.setattr(eng, "prefix_caching", True)
    run_one_step(llm, [base], GREEDY)  # leaves `base` (and its output) in a free slot
    groups = spy_groups(monkeypatch, eng)
    got = run_one_step(llm, [base + a, b, a], GREEDY)
    assert [o.token_ids for o in got] == want
    assert len(groups) == 1 and groups[0][0] <= len(a)  # row 0 ran only its new tokens


def test_groups_keep_the_token_budget(llm, monkeypatch):
    eng = llm.engine
    monkeypatch.setattr(eng, "prefill_chunk", 32)
    groups = spy_groups(monkeypatch, eng)
    ps = prompts([10, 10, 10, 20, 5, 40])
    want = [run_one_step(llm, [p], GREEDY)[0].token_ids for p in ps]
    groups.clear()
    got = run_one_step(llm, ps, GREEDY)
    assert [o.token_ids for o in got] == want
    # 3 x 10 fit in 32 tokens; 20 and 5 pad to 2 x 20 > 32; the 40-token prompt runs alone in chunks
    assert groups == [[10, 10, 10], [20], [5]]


def test_a_request_sharing_a_prefix_waits_for_the_group(llm, monkeypatch):
    eng = llm.engine
    monkeypatch.setattr(eng, "prefix_caching", True)
    base, other = prompts([40, 8], seed=2)
    groups = spy_groups(monkeypatch, eng)
    outs = run_one_step(llm, [base + [1, 2], other, base + [3]], GREEDY)
    assert len(groups) == 2 and groups[1][0] <= 2  # the third reused the first's 40 tokens
    assert [o.token_ids for o in outs] == [run_one_step(llm, [p], GREEDY)[0].token_ids
                                           for p in (base + [1, 2], other, base + [3])]


def test_a_step_admits_up_to_the_token_budget(llm, monkeypatch):
    # Prompts arriving together are prefilled a budget's worth a step (at least one request), so
    # the first ones stream their first token while the rest wait: step 1 takes 10 + 10 + 10 of a
    # 32-token budget, step 2 the 20 and the 5 (with a decode step of the first three), step 3 the
    # 40-token prompt alone (over the budget: in chunks). The tokens are those of one-at-a-time runs.
    eng = llm.engine
    monkeypatch.setattr(eng, "prefill_chunk", 32)
    ps = prompts([10, 10, 10, 20, 5, 40], seed=3)
    want = [run_one_step(llm, [p], GREEDY)[0].token_ids for p in ps]
    # no decode step timed: the admission split takes a one-row forward of the module's cost table
    # (1 s, the same world as its 1 s forwards) as the decode step between two steps
    monkeypatch.setattr(eng, "_decode_s", 0.0)
    for i, ids in enumerate(ps):
        eng.add_request(f"r{i}", ids, GREEDY)
    firsts = [sorted(o.request_id for o in eng.step() if len(o.outputs[0].token_ids) == 1) for _ in range(3)]
    assert firsts == [["r0", "r1", "r2"], ["r3", "r4"], ["r5"]]
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert [outs[f"r{i}"].outputs[0].token_ids for i in range(len(ps))] == want


@pytest.mark.parametrize("fixed_rows, want", [(5, [[2], [20, 20]]), (50, [[2, 20, 20]])])
def test_a_cached_prompt_gets_its_own_forward(llm, monkeypatch, fixed_rows, want):
    """4 clients after a 1-client round, in small: the first prompt is cached but for 2 tokens.
    One forward pads it to 20 rows (60 in all); alone it costs a forward's fixed cost more and
    18 rows less. The cost table decides; the tokens are those of one-at-a-time runs either way."""
    eng = llm.engine
    base, a, b, c = prompts([30, 2, 20, 20], seed=fixed_rows)  # prompts no earlier test cached
    ps = [base + a, b, c]
    want_tokens = [run_one_step(llm, [p], GREEDY)[0].token_ids for p in ps]
    monkeypatch.setattr(eng, "prefix_caching", True)
    monkeypatch.setattr(eng, "prefill_cost", PrefillCost(fixed_s=fixed_rows * 1e-3, row_s=1e-3))
    monkeypatch.setenv("CODESHELL_PREFILL_ADMIT", "budget")  # all three admitted in one step, as before session 41
    run_one_step(llm, [base], GREEDY)  # leaves `base` (and its output) in a free slot
    groups = spy_groups(monkeypatch, eng)
    got = run_one_step(llm, ps, GREEDY)
    assert groups == want
    assert [o.token_ids for o in got] == want_tokens


def test_measured_cost_changes_no_tokens(llm, monkeypatch):
    """The load-time measurement runs forwards through a free slot: with prefix caching on, what
    later prompts reuse and produce is as before, and the cost it finds has a per-row cost > 0."""
    eng = llm.engine
    monkeypatch.setattr(eng, "prefix_caching", True)
    base, a, b = prompts([30, 3, 25], seed=5)
    want = [run_one_step(llm, [p], GREEDY)[0].token_ids for p in (base + a, b, a)]
    monkeypatch.setattr(eng, "prefill_cost", None)
    run_one_step(llm, [base], GREEDY)
    cost = eng.measure_prefill_cost()
    assert cost is eng.prefill_cost and cost.row_s > 0 and cost.fixed_s >= 0
    assert cost.knee == 72 and cost.far_row_s > 0  # the golden model's context takes the 216-row forward
    assert [o.token_ids for o in run_one_step(llm, [base + a, b, a], GREEDY)] == want
    assert eng.prefix_hits > 0


def test_not_measured_unasked(llm, monkeypatch):
    """Only `measure_prefill_cost` (the server at load) sets the cost: a batch through the engine
    runs the rule before session 32 and times nothing of its own."""
    eng = llm.engine
    monkeypatch.setattr(eng, "prefill_cost", None)
    groups = spy_groups(monkeypatch, eng)
    run_one_step(llm, prompts([5, 40, 9], seed=6), GREEDY)
    assert eng.prefill_cost is None and groups == [[5, 40, 9]]


def test_groups_switch(monkeypatch):
    """CODESHELL_PREFILL_GROUPS: `one` keeps the rule before session 32 (nothing measured); another
    value is a clear error where an engine is made, not an import failure."""
    monkeypatch.setenv("CODESHELL_PREFILL_GROUPS", "one")
    llm = LLM(str(require_shared("golden/rope-gqa")), dtype="float32", max_batch=2)
    assert llm.engine.measure_prefill_cost() is None and llm.engine.prefill_cost is None
    monkeypatch.setenv("CODESHELL_PREFILL_GROUPS", "some")
    with pytest.raises(ValueError, match="CODESHELL_PREFILL_GROUPS='some': expected 'cost' or 'one'"):
        LLM(str(require_shared("golden/rope-gqa")), dtype="float32", max_batch=2)


@pytest.mark.parametrize("rule", ["ttft", "budget"])
def test_admitted_a_prompt_a_step_where_rows_dominate(llm, monkeypatch, rule):
    """Three prompts arriving together on a cost table where a prompt's rows outweigh a forward's
    fixed cost (the 1.7B model's): one admitted a step, so the first request's first token comes
    out of the first step alone (CODESHELL_PREFILL_ADMIT=budget: all three in the first step, the
    rule before session 41); the tokens equal one-at-a-time runs either way."""
    eng = llm.engine
    ps = prompts([12, 9, 14], seed=11)
    want = [run_one_step(llm, [p], GREEDY)[0].token_ids for p in ps]
    monkeypatch.setattr(eng, "prefill_cost", PrefillCost(fixed_s=1e-4, row_s=1e-3))
    monkeypatch.setattr(eng, "_decode_s", 0.0)  # estimated as a one-row forward of this table
    if rule == "budget":
        monkeypatch.setenv("CODESHELL_PREFILL_ADMIT", "budget")
    for i, ids in enumerate(ps):
        eng.add_request(f"r{i}", ids, GREEDY)
    first = [o.request_id for o in eng.step()]
    assert first == (["r0"] if rule == "ttft" else ["r0", "r1", "r2"])
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert [outs[f"r{i}"].outputs[0].token_ids for i in range(3)] == want
