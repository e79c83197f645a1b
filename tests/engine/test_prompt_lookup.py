"""Prompt-lookup decoding: the n-gram proposer, the acceptance rule's distribution, and the
engine's verify step (greedy tokens equal plain decoding's whatever the drafts, the KV of
rejected drafts never leaks, the accepted count is what the drafts deserve)."""

from __future__ import annotations

import collections

import pytest
import torch

from codeshell import LLM
from codeshell.engine import SamplingParams
from codeshell.engine import lookup as lookup_mod
from codeshell.engine.lookup import NgramLookup, verify_token
from codeshell.engine.sampling import SamplingError, SequenceSampler
from tests.conftest import require_shared


# ---- the proposer --------------------------------------------------------------------------
def test_proposer_copies_what_followed_the_longest_most_recent_match():
    # "1 2 3" occurs twice, followed by 4 then by 9; "7 2 3" never: the 3-gram fails, the
    # 2-gram "2 3" matches, most recently followed by 9 9.
    lk = NgramLookup([1, 2, 3, 4, 5, 1, 2, 3, 9, 9, 7, 2, 3], max_ngram=3, min_ngram=1)
    assert lk.propose(2) == [9, 9]
    lk.extend([4])  # the suffix "2 3 4" matched at the start, where 5 1 2 followed
    assert lk.propose(3) == [5, 1, 2]
    # the suffix itself is never its own match, and no match gives no draft
    assert NgramLookup([5, 6, 7], 3, 1).propose(4) == []
    assert NgramLookup([5, 6, 5], 3, 2).propose(4) == []  # min_ngram 2: the 1-gram "5" is not used
    # k tokens whatever the match length (the budget, not the proposer, trims unlikely ones)
    base = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert NgramLookup(base + [7], 3, 1).propose(8) == [8, 9, 10, 11, 12, 7, 8, 9]  # 1-gram "7"
    assert NgramLookup(base + [5, 6, 7], 3, 1).propose(2) == [8, 9]                 # k caps


def test_proposer_continues_a_repeating_run_through_its_own_draft():
    """A continuation that runs into the end of the text goes on as the text repeats (period:
    how far back the match was): a loop drafts k tokens, not one period."""
    assert NgramLookup([5, 6, 5, 6], 3, 1).propose(5) == [5, 6, 5, 6, 5]  # period 2
    y = [31, 9, 31, 4]  # "y = y\n" as tokens, repeated: period 4
    assert NgramLookup([1, 2] + y * 2 + y[:1], 3, 1).propose(6) == [9, 31, 4, 31, 9, 31]
    assert NgramLookup([7, 7], 3, 1).propose(3) == [7, 7, 7]  # period 1
    # a match further back with enough text after it is copied as it is (no wrap needed)
    assert NgramLookup([1, 2, 3, 4, 5, 6, 1, 2], 3, 1).propose(3) == [3, 4, 5]
    # what the proposer drafts is what the text turns out to be when it keeps repeating
    text = [3, 1, 4, 1, 5] * 6
    for cut in range(6, 25):
        assert NgramLookup(text[:cut], 3, 1).propose(5) == text[cut:cut + 5]


def test_proposer_sync_indexes_only_new_output():
    lk = NgramLookup([1, 2, 3], 2, 1)
    lk.sync([1, 2, 3], [1, 2])
    lk.sync([1, 2, 3], [1, 2])  # nothing new
    assert lk.tokens == [1, 2, 3, 1, 2]
    assert lk.propose(3) == [3, 1, 2]


def test_bad_lookup_options_are_one_clear_error():
    for kw in ({"prompt_lookup_num_tokens": -1}, {"prompt_lookup_num_tokens": 1000},
               {"prompt_lookup_num_tokens": 2.5}, {"prompt_lookup_max_ngram": 0},
               {"prompt_lookup_min_ngram": 4, "prompt_lookup_max_ngram": 3}):
        with pytest.raises(SamplingError, match="prompt_lookup"):
            SamplingParams(**kw)


# ---- the acceptance rule's distribution ----------------------------------------------------
LOGITS = torch.tensor([2.0, 1.2, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def emitted_counts(params: SamplingParams, draft: int, draws: int, verify=verify_token) -> torch.Tensor:
    s = SequenceSampler(params, [0], seed=1234, device=torch.device("cpu"))
    c = torch.zeros(len(LOGITS))
    for _ in range(draws):
        tok, ok = verify(s, LOGITS.clone(), draft)
        assert ok == (tok == draft)
        c[tok] += 1
    return c


def target(params: SamplingParams) -> torch.Tensor:
    s = SequenceSampler(params, [0], seed=0, device=torch.device("cpu"))
    return torch.softmax(s.process(LOGITS.clone()), -1)


def chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    exp = p[keep] * counts.sum()
    return float(((counts[keep] - exp) ** 2 / exp).sum())


# chi-square critical value for 7 degrees of freedom at p = 0.001 is 24.3
CRIT = 24.3


@pytest.mark.parametrize("params,draft", [
    (SamplingParams(temperature=1.0), 1),               # draft of mid probability
    (SamplingParams(temperature=0.7), 0),               # the likeliest token
    (SamplingParams(temperature=1.3), 6),               # an unlikely one
    (SamplingParams(temperature=1.0, top_k=3), 5),      # a draft truncated away: p(draft) = 0
    (SamplingParams(temperature=0.8, top_p=0.8, repetition_penalty=1.5), 2),
])
def test_emitted_tokens_follow_the_target_distribution(params, draft):
    p = target(params)
    counts = emitted_counts(params, draft, 6000)
    assert chi2(counts, p) < CRIT, (counts / counts.sum(), p)


def test_the_test_catches_a_wrong_acceptance_scheme():
    """Redrawing from the full distribution on rejection (instead of the residual) inflates
    the draft's probability from p to p(2 - p): the same statistic must reject it."""
    def wrong(s, logits, draft):
        x = torch.softmax(s.process(logits), -1)
        if s.uniform() < float(x[draft]):
            return draft, True
        tok = int(torch.multinomial(x, 1, generator=s.gen))
        return tok, tok == draft

    params = SamplingParams(temperature=1.0)
    counts = emitted_counts(params, 1, 6000, verify=wrong)
    assert chi2(counts, target(params)) > 5 * CRIT


def test_greedy_accepts_exactly_the_argmax():
    s = SequenceSampler(SamplingParams(temperature=0), [0], seed=None, device=torch.device("cpu"))
    assert verify_token(s, LOGITS.clone(), 0) == (0, True)
    assert verify_token(s, LOGITS.clone(), 3) == (0, False)


# ---- the engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    return LLM(str(require_shared("golden/rope-gqa")), dtype="float32", max_batch=4)


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 500, (24,), generator=g).tolist()
    return [base + base[:6], base * 2 + base[:3], torch.randint(0, 500, (7,), generator=g).tolist(), base[:9]]


def run(llm, ps, params):
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in ps], params)]


def test_greedy_with_real_drafts_equals_plain_decode(llm):
    ps = prompts()
    plain = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    mixed = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, prompt_lookup_num_tokens=k)
             for m, k in ((32, 6), (32, 3), (32, 0), (17, 8))]
    want = [o.token_ids for o in run(llm, ps, plain)]
    eng = llm.engine
    before = eng.spec_steps
    got = run(llm, ps, mixed)
    assert [o.token_ids for o in got] == [w[:len(o.token_ids)] for w, o in zip(want, got)]
    assert [len(o.token_ids) for o in got] == [32, 32, 32, 17]
    assert eng.spec_steps > before


def oracle(monkeypatch, refs: dict[tuple, list[int]], corrupt_every: int):
    """Drafts are the true continuation (from a plain run) with every `corrupt_every`-th
    drafted token replaced: the engine must accept exactly the tokens before the first bad one."""
    expected = collections.Counter()

    class Oracle(NgramLookup):
        def __init__(self, prompt_ids, *a):
            super().__init__(prompt_ids, *a)
            self.ref, self.n_prompt, self.calls = refs[tuple(prompt_ids)], len(prompt_ids), 0

        def propose(self, k):
            done = len(self.tokens) - self.n_prompt
            d = list(self.ref[done:done + k])
            self.calls += 1
            if corrupt_every and len(d) > 1 and self.calls % corrupt_every == 0:
                bad = self.calls % len(d)
                d[bad] = (d[bad] + 1) % 500
                expected["accepted"] += bad
            else:
                expected["accepted"] += len(d)
            return d

    monkeypatch.setattr("codeshell.engine.engine.NgramLookup", Oracle)
    return expected


@pytest.mark.parametrize("corrupt_every", [0, 2])
def test_accepted_drafts_and_rolled_back_kv(llm, monkeypatch, corrupt_every):
    """Long accepted runs and rejections at chosen places: the output stays the plain one
    (stale KV of a rejected draft would change later tokens) and the acceptance count is
    exactly the number of correct draft tokens before each corruption."""
    ps = prompts(1)
    plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = [o.token_ids for o in run(llm, ps, plain)]
    expected = oracle(monkeypatch, {tuple(p): w for p, w in zip(ps, want)}, corrupt_every)
    eng = llm.engine
    monkeypatch.setattr(eng, "draft_budget", None)  # every draft runs: exact counts
    acc0, steps0 = eng.spec_accepted, eng.spec_steps
    spec = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, prompt_lookup_num_tokens=5, logprobs=2)
    got = run(llm, ps, spec)
    assert [o.token_ids for o in got] == want
    assert eng.spec_accepted - acc0 == expected["accepted"]
    if not corrupt_every:  # every draft right: 1 + 5 tokens a step after the prefill's first
        assert eng.spec_steps - steps0 == 5
    ref_lp = [o.logprobs for o in run(llm, ps, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                              logprobs=2))]
    for o, r in zip(got, ref_lp):
        assert [x.token_id for x in o.logprobs] == [x.token_id for x in r]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(o.logprobs, r)) < 1e-4


def test_stop_inside_an_accepted_draft_and_prefix_cache_after(llm, monkeypatch):
    """A stop token met inside a run of accepted drafts ends the sequence there; the slot's
    cached tokens (reused by the next request through the prefix cache) are exact."""
    ps = prompts(2)[:2]
    plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = [o.token_ids for o in run(llm, ps, plain)]
    # a stop token met inside a step's drafts (steps emit tokens 1-6, 7-12, ...: 6k is a bonus)
    i = next(i for i in range(8, 30) if i % 6 and want[0][i] not in want[0][:i])
    stop, first = want[0][i], want[0][:i + 1]
    follow = ps[0] + first + [7, 8]
    plain_follow = run(llm, [follow], plain)[0].token_ids
    oracle(monkeypatch, {tuple(p): w for p, w in zip(ps, want)}, 0)
    monkeypatch.setattr(llm.engine, "draft_budget", None)  # every draft runs: steps of 6 tokens
    monkeypatch.setattr(llm.engine, "prefix_caching", True)
    sp = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop], ignore_eos=True,
                        prompt_lookup_num_tokens=5)
    got = run(llm, ps, sp)
    assert got[0].token_ids == first and got[0].finish_reason == "stop"
    # the next turn resends prompt + answer: served from the cache (the stop token's KV, a
    # verified draft, included), same tokens as plain
    again = llm.generate([{"prompt_token_ids": follow}], plain)[0]
    assert again.num_cached_tokens == len(ps[0]) + len(first)
    assert again.outputs[0].token_ids == plain_follow


@pytest.fixture(scope="module")
def wide():
    return LLM(str(require_shared("golden/rope-gqa")), dtype="float32", max_batch=16)


def test_sampled_engine_output_has_the_plain_distribution(wide, monkeypatch):
    """Seeded sampled requests, plain vs with a fixed draft at every step: the second token's
    distribution is the same (two-sample chi-square), although the seeds give other texts."""
    llm = wide
    p = prompts(3)[2]
    params = dict(temperature=0.12, max_tokens=3, ignore_eos=True, n=16)

    def second_tokens(lookup: int) -> list[int]:
        sps = [SamplingParams(**params, seed=16 * s, prompt_lookup_num_tokens=lookup) for s in range(15)]
        outs = llm.generate([{"prompt_token_ids": p}] * 15, sps)
        return [c.token_ids[1] for o in outs for c in o.outputs]

    plain = collections.Counter(second_tokens(0))
    draft = plain.most_common(2)[1][0]  # a token of middling probability
    monkeypatch.setattr(lookup_mod.NgramLookup, "propose", lambda self, k: [draft])
    drafted = llm.engine.spec_drafted
    spec = collections.Counter(second_tokens(1))
    assert llm.engine.spec_drafted - drafted == 240
    cats = [t for t, c in plain.items() if c >= 10]
    def row(cn):
        return [cn[t] for t in cats] + [sum(c for t, c in cn.items() if t not in cats)]
    a, b = torch.tensor(row(plain), dtype=torch.float), torch.tensor(row(spec), dtype=torch.float)
    tot = a + b
    keep = tot > 0
    ea, eb = tot[keep] * a.sum() / (a.sum() + b.sum()), tot[keep] * b.sum() / (a.sum() + b.sum())
    stat = float(((a[keep] - ea) ** 2 / ea + (b[keep] - eb) ** 2 / eb).sum())
    # chi-square at p = 0.001 for up to len(cats) degrees of freedom (<= 10: 29.6)
    assert len(cats) <= 10 and stat < 29.6, (plain, spec)
    # and the draft is emitted about as often as plainly sampled (a scheme that always kept
    # it, or redrew from the full distribution, would sit far above)
    assert abs(spec[draft] - plain[draft]) < 0.12 * 240, (plain[draft], spec[draft])


# ---- bf16: the same tokens at any batch and with lookup (row-invariant kernels) ------------
def _edit_prompts() -> list[str]:
    """Code-editing completions whose answers copy the prompt (what lookup drafts): a
    standard-library function's source, then the start of its copy with one change."""
    import colorsys
    import fnmatch
    import html
    import inspect
    import shutil
    import statistics
    import string
    import textwrap

    fns = [colorsys.rgb_to_hsv, textwrap.indent, string.capwords, html.escape, fnmatch.filter,
           statistics.median, shutil.copyfileobj, colorsys.hls_to_rgb]
    return [f"# original\n{inspect.getsource(f)}\n# the same function, renamed to {f.__name__}_v2\n"
            for f in fns]


@pytest.fixture(scope="module")
def mini():
    from codeshell import kernels
    if not kernels.available():
        pytest.skip("native kernels unavailable: a bf16 model runs the torch fallback")
    return LLM(max_batch=8)  # codeshell-mini, shipped in the package: bf16


def test_bf16_greedy_tokens_do_not_depend_on_batch_or_lookup(mini):
    """The built-in bf16 model: greedy tokens at batch 1, at batch 8 and with prompt lookup at
    batch 1 and 8 are identical (kernels.ops.ROW_INVARIANT_MAX_M: a row's linear result does
    not depend on the other rows of the call; a verify step runs up to 8 x 9 rows here)."""
    llm = mini
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}
    ps = _edit_prompts()
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    look = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_lookup_num_tokens=8)
    b1 = [llm.generate(p, plain)[0].outputs[0].token_ids for p in ps]
    b8 = [o.outputs[0].token_ids for o in llm.generate(ps, plain)]
    steps = llm.engine.spec_steps
    l1 = [llm.generate(p, look)[0].outputs[0].token_ids for p in ps]
    l8 = [o.outputs[0].token_ids for o in llm.generate(ps, look)]
    assert llm.engine.spec_accepted > 0 and llm.engine.spec_steps > steps
    for i in range(len(ps)):
        assert b8[i] == b1[i], f"prompt {i}: batch 8 differs from batch 1"
        assert l1[i] == b1[i], f"prompt {i}: lookup at batch 1 differs from plain decode"
        assert l8[i] == b1[i], f"prompt {i}: lookup at batch 8 differs from plain decode"


def test_bf16_fast_path_stops_and_mixed_batches_equal_plain(mini):
    """The native greedy fast path (`Sequence.plain_greedy`: drafts compared with the native
    picks in one pass, `Sequence.append_many`) next to the per-token path (a request with
    logprobs) in the same verify steps: a stop token, a stop string and max_tokens met inside
    accepted drafts end each sequence where plain decoding ends it, with its text, reason and
    token ids; the logprobs request keeps its tokens."""
    llm = mini
    ps = _edit_prompts()[:4]
    base = dict(temperature=0, max_tokens=40, ignore_eos=True)
    ref = [o.outputs[0] for o in llm.generate(ps, SamplingParams(**base))]
    i = next(i for i in range(12, 40) if ref[0].token_ids[i] not in ref[0].token_ids[:i])
    stop_tok = ref[0].token_ids[i]
    text = ref[1].text
    stop_str = text[len(text) // 2:len(text) // 2 + 3]
    kinds = [dict(stop_token_ids=[stop_tok]), dict(stop=[stop_str]), dict(max_tokens=13), dict(logprobs=1)]
    acc = llm.engine.spec_accepted
    for look in (0, 8):
        params = [SamplingParams(**{**base, **k, "prompt_lookup_num_tokens": look}) for k in kinds]
        got = [o.outputs[0] for o in llm.generate(ps, params)]
        if look == 0:
            want = got
            continue
        for g, w in zip(got, want):
            assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == \
                (w.token_ids, w.text, w.finish_reason, w.stop_reason)
    assert want[0].token_ids == ref[0].token_ids[:i + 1] and want[0].finish_reason == "stop"
    assert want[1].finish_reason == "stop" and want[1].stop_reason == stop_str
    assert len(want[2].token_ids) == 13 and want[2].finish_reason == "length"
    assert want[3].token_ids == ref[3].token_ids and len(want[3].logprobs) == 40
    assert llm.engine.spec_accepted > acc
