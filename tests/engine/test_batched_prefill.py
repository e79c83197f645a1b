"""Prompts admitted in the same step share one padded prefill forward: their first tokens and
log-probabilities equal those of one-at-a-time prefills, with and without reused prefixes, and
the grouping keeps to its token budget and never batches a request with one whose KV it can
reuse."""

from __future__ import annotations

import pytest
import torch

from codeshell import LLM
from codeshell.engine import SamplingParams
from tests.conftest import require_shared

FIRST = SamplingParams(temperature=0, max_tokens=1, logprobs=3, ignore_eos=True)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(str(require_shared("golden/rope-gqa")), dtype="float32", max_batch=8)


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
    for i, ids in enumerate(ps):
        eng.add_request(f"r{i}", ids, GREEDY)
    firsts = [sorted(o.request_id for o in eng.step() if len(o.outputs[0].token_ids) == 1) for _ in range(3)]
    assert firsts == [["r0", "r1", "r2"], ["r3", "r4"], ["r5"]]
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert [outs[f"r{i}"].outputs[0].token_ids for i in range(len(ps))] == want
