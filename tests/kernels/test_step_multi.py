"""Session 27 helper C: several batch-1 greedy tokens in one native call (csrc/decode_step.cpp
`decode_greedy`, kernels/step.py `decode_greedy`, Engine._decode_many; CODESHELL_DECODE_MULTI).
LLM.generate's steps (final_only) of one plain-greedy sequence run up to CODESHELL_DECODE_MULTI
tokens a call; the tokens, finish reasons and the whole KV cache are bit for bit one token a step's
(CODESHELL_DECODE_MULTI=1) and the Python path's, whatever the limit that ends the sequence (its
max_tokens, a stop token id the native loop stops at, the context window); the calls run where meant
(batch 1, final_only, greedy, no drafts) and nowhere else (batch 2, streaming steps, sampling).
Session 28, lead: several plain-greedy sequences a call (`decode_greedy_rows`, Engine._decode_many_rows;
CODESHELL_DECODE_MULTI_ROWS): the same, row by row, with rows leaving the call as they stop."""

from __future__ import annotations

import pytest
import torch

from codeshell.engine.engine import Engine
from codeshell.engine.sampling import SamplingParams
from codeshell.kernels import available
from codeshell.kernels import step as step_mod

pytestmark = pytest.mark.skipif(not available(), reason="native kernels unavailable")

from test_decode_step import VOCAB, packed, prompts  # noqa: E402


def varied(kind: str):
    """test_decode_step's tiny model shape (2 layers, C = 128, GQA 4 / 2) with its block linears' weights
    20x larger, so that greedy decoding changes token from step to step (the tiny model's repeats one
    token: a token fed back wrongly would not show); the block linears packed bf16 or quantized int8 /
    int4 (asymmetric groups of 64)."""
    from torch import nn

    from codeshell.config import CodeShellConfig
    from codeshell.model import CodeShellForCausalLM
    kw = dict(n_embd=128, n_layer=2, n_head=4, num_query_groups=2, n_inner=256, vocab_size=VOCAB, n_positions=256)
    torch.manual_seed(0)
    m = CodeShellForCausalLM(CodeShellConfig(**kw)).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Linear) and mod.weight.shape[0] != VOCAB:
                mod.weight.mul_(20.0)
    return packed(m, kind)


def counted_calls(monkeypatch, name, size):
    """Each call of kernels.step's `name`: size(its result), or None where the native step did not run."""
    calls = []
    orig = getattr(step_mod, name)

    def counted(*a):
        out = orig(*a)
        calls.append(None if out is None else size(out))
        return out

    monkeypatch.setattr(step_mod, name, counted)
    return calls


@pytest.fixture
def greedy_calls(monkeypatch):
    """The tokens each decode_greedy call returned (None: the native step did not run)."""
    return counted_calls(monkeypatch, "decode_greedy", len)


def run(m, monkeypatch, multi, ps, params, final_only=True, native=True, max_model_len=None):
    """The engine's outputs for prompts `ps` (params: one SamplingParams, or one per prompt) and the engine."""
    if not isinstance(params, list):
        params = [params] * len(ps)
    monkeypatch.setenv("CODESHELL_DECODE_MULTI", str(multi))
    monkeypatch.setenv("CODESHELL_DECODE_STEP", "on" if native else "off")
    eng = Engine(m, m.cfg, max_batch=4, max_model_len=max_model_len)
    eng.set_lean(True)  # reads CODESHELL_DECODE_MULTI
    for i, (p, sp) in enumerate(zip(ps, params)):
        eng.add_request(f"r{i}", p, sp)
    out = {}
    with torch.inference_mode():
        while eng.has_unfinished():
            for o in eng.step(final_only):
                if o.finished:
                    c = o.outputs[0]
                    out[o.request_id] = (c.token_ids, c.finish_reason, c.stop_reason)
    return out, eng


def assert_same(a, b):
    (out_a, ea), (out_b, eb) = a, b
    assert out_a == out_b
    assert torch.equal(ea.cache.k, eb.cache.k) and torch.equal(ea.cache.v, eb.cache.v)


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_multi_bitwise_one_a_step(kind, monkeypatch, greedy_calls):
    m = varied(kind)
    ps = prompts(1)
    params = SamplingParams(temperature=0, max_tokens=21, ignore_eos=True)
    want = run(m, monkeypatch, 1, ps, params)
    assert len(set(want[0]["r0"][0])) > 5  # the greedy text changes token (a wrong feed-back would show)
    assert greedy_calls == []  # CODESHELL_DECODE_MULTI=1: one token a step, as before
    python = run(m, monkeypatch, 8, ps, params, native=False)
    assert greedy_calls == [None] * len(greedy_calls)  # the Python path: the native step never ran
    assert_same(python, want)
    for multi in (2, 3, 8, 64):
        greedy_calls.clear()
        got = run(m, monkeypatch, multi, ps, params)
        assert_same(got, want)
        # 20 tokens after the prompt's: calls of `multi` (the last one shorter), none of one token
        assert greedy_calls and all(c is not None and 2 <= c <= multi for c in greedy_calls)
        assert sum(greedy_calls) == 20


def test_multi_stops_where_one_a_step_stops(monkeypatch, greedy_calls):
    m = varied("int8")
    ps = prompts(1)
    free = run(m, monkeypatch, 1, ps, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]["r0"][0]
    # a token the greedy text first reaches well into a call: the native loop stops after it
    stop = next(t for i, t in enumerate(free) if i >= 6 and t not in free[:i])
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop])
    want = run(m, monkeypatch, 1, ps, params)
    assert want[0]["r0"][1] == "stop" and want[0]["r0"][0][-1] == stop
    greedy_calls.clear()
    assert_same(run(m, monkeypatch, 8, ps, params), want)
    assert greedy_calls and greedy_calls[-1] <= 8
    # the context window ends it (its limit, not max_tokens)
    n = len(ps[0]) + 13
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    want = run(m, monkeypatch, 1, ps, params, max_model_len=n)
    assert want[0]["r0"][1] == "length" and len(want[0]["r0"][0]) == 13
    assert_same(run(m, monkeypatch, 5, ps, params, max_model_len=n), want)


def test_multi_only_where_meant(monkeypatch, greedy_calls):
    monkeypatch.setenv("CODESHELL_DECODE_MULTI_ROWS", "0")  # several rows a call: test_multi_rows_* below
    m = varied("int8")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert_same(run(m, monkeypatch, 8, prompts(2), params), run(m, monkeypatch, 1, prompts(2), params))
    # batch 2 until the shorter prompt's request... both run 12 tokens: never one sequence alone
    assert greedy_calls == []
    assert_same(run(m, monkeypatch, 8, prompts(1), params, final_only=False),
                run(m, monkeypatch, 1, prompts(1), params, final_only=False))
    assert greedy_calls == []  # streaming steps: one token each
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)
    assert run(m, monkeypatch, 8, prompts(1), sampled)[0] == run(m, monkeypatch, 1, prompts(1), sampled)[0]
    assert greedy_calls == []  # sampling: one token a step
    # batch 3 -> 1 as requests finish: the last one alone runs several tokens a call
    mixed = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 5, 17)]
    assert_same(run_mixed(m, monkeypatch, 8, mixed), run_mixed(m, monkeypatch, 1, mixed))
    assert greedy_calls and sum(greedy_calls) == 17 - 5


def test_greedy_call_side_jobs_and_picks(monkeypatch):
    """decode_greedy directly: its picks are n decode calls' (each fed back), and with the prefetch
    side jobs on it posts 3 a layer a token but the end-of-step job (the next token's first c_attn,
    meant for the engine's Python) only after its last token."""
    from codeshell.engine.kv_cache import KVCache
    from codeshell.kernels import _ext

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setenv("CODESHELL_DECODE_TEAM", "on")
        monkeypatch.setenv("CODESHELL_STEP_PF", "1")
        m = varied("int4")
        layers = m.cfg.n_layer
        c1, c2 = KVCache(m.cfg, 2, 64, torch.bfloat16), KVCache(m.cfg, 2, 64, torch.bfloat16)
        with torch.inference_mode():
            want, tok = [], 17
            for i in range(7):
                _, picks = step_mod.decode(m, c1, [tok], [3 + i], [1], False)
                tok = picks[0]
                want.append(tok)
            posts0, _ = _ext.get().team_side_jobs()
            got = step_mod.decode_greedy(m, c2, 17, 3, 1, 7, [])
            posts, _ = _ext.get().team_side_jobs()
            stopped = step_mod.decode_greedy(m, c2, 17, 3, 1, 7, [want[2]])
        assert got == want and len(set(want)) > 2
        assert stopped == want[:want.index(want[2]) + 1]
        assert torch.equal(c1.k[:, 1, :, :10], c2.k[:, 1, :, :10]) and torch.equal(c1.v[:, 1, :, :10], c2.v[:, 1, :, :10])
        if torch.get_num_threads() > 1 and step_mod._DECODERS[m].step.uses_team:
            assert posts - posts0 == 7 * 3 * layers + 1
    finally:
        torch.set_num_threads(before)


def test_greedy_call_time_budget(monkeypatch):
    """Session 28 helper C: decode_greedy's time cap (budget_ns; the engine's CODESHELL_DECODE_MULTI_MS):
    a budget shorter than a token returns after exactly one token (the pick the uncapped call gives
    first), a budget far longer changes nothing, and a call with the cap spends it and stops early while
    its tokens and KV rows are the uncapped call's; no cap (0) is the count alone."""
    from codeshell.engine.kv_cache import KVCache

    m = varied("int8")
    c1, c2 = KVCache(m.cfg, 2, 64, torch.bfloat16), KVCache(m.cfg, 2, 64, torch.bfloat16)
    with torch.inference_mode():
        want = step_mod.decode_greedy(m, c1, 17, 3, 1, 9, [])
        assert want is not None and len(want) == 9 and len(set(want)) > 2
        assert step_mod.decode_greedy(m, c2, 17, 3, 1, 9, [], 10**12) == want  # ~17 minutes: no effect
        got, pos, tok = [], 3, 17
        while len(got) < 9:  # 1 ns: one token a call, each fed back by the caller as the engine does
            out = step_mod.decode_greedy(m, c2, tok, pos, 1, 9 - len(got), [], 1)
            assert out is not None and len(out) == 1
            got += out
            tok, pos = out[0], pos + 1
    assert got == want
    assert torch.equal(c1.k[:, 1, :, :12], c2.k[:, 1, :, :12]) and torch.equal(c1.v[:, 1, :, :12], c2.v[:, 1, :, :12])


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_multi_time_cap_bitwise(kind, monkeypatch, greedy_calls):
    """The engine with CODESHELL_DECODE_MULTI_MS tiny (1e-6 ms): LLM.generate's batch-1 calls make one
    token each (the cap passed after the first), and the text, finish reasons and whole KV cache are one
    token a step's; with the cap off (0) the calls run the count (8) as in session 27."""
    m = varied(kind)
    ps = prompts(1)
    params = SamplingParams(temperature=0, max_tokens=21, ignore_eos=True)
    want = run(m, monkeypatch, 1, ps, params)
    monkeypatch.setenv("CODESHELL_DECODE_MULTI_MS", "0.000001")
    greedy_calls.clear()
    assert_same(run(m, monkeypatch, 8, ps, params), want)
    # 20 tokens after the prompt's: one a call, the last by an ordinary step (a call needs 2 left)
    assert greedy_calls and all(c == 1 for c in greedy_calls) and sum(greedy_calls) == 19
    monkeypatch.setenv("CODESHELL_DECODE_MULTI_MS", "0")
    greedy_calls.clear()
    assert_same(run(m, monkeypatch, 8, ps, params), want)
    assert greedy_calls == [8, 8, 4]
    monkeypatch.setenv("CODESHELL_DECODE_MULTI_MS", "soon")
    with pytest.raises(ValueError, match="CODESHELL_DECODE_MULTI_MS"):
        Engine(m, m.cfg, max_batch=1)


@pytest.fixture
def rows_calls(monkeypatch):
    """Each decode_greedy_rows call's tokens per row (None: the native step did not run)."""
    return counted_calls(monkeypatch, "decode_greedy_rows", lambda out: [len(t) for t in out])


def run_mixed(m, monkeypatch, multi, params, final_only=True):
    """Requests at once, one a SamplingParams of `params`."""
    return run(m, monkeypatch, multi, prompts(len(params)), params, final_only)


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_multi_rows_bitwise_one_a_step(kind, monkeypatch, greedy_calls, rows_calls):
    """Three plain-greedy sequences (max_tokens 4, 11, 23; the second also ended by a stop id its greedy
    text reaches mid-call) a native call: tokens, finish reasons and the whole KV cache bit for bit one
    token a step's, rows leaving the call as they stop."""
    m = varied(kind)
    free = run_mixed(m, monkeypatch, 1, [SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)] * 3)[0]
    t1 = free["r1"][0]
    stop = next(t for i, t in enumerate(t1) if i >= 5 and t not in t1[:i])
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=23, ignore_eos=True, stop_token_ids=[stop]),
              SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)]
    want = run_mixed(m, monkeypatch, 1, params)
    assert want[0]["r1"][1] == "stop" and want[0]["r0"][1] == want[0]["r2"][1] == "length"
    assert rows_calls == [] and greedy_calls == []
    for multi in (2, 8):
        rows_calls.clear()
        assert_same(run_mixed(m, monkeypatch, multi, params), want)
        assert rows_calls and all(c is not None and len(c) >= 2 and max(c) <= multi for c in rows_calls)
        assert any(len(set(c)) > 1 for c in rows_calls)  # a row left a call before the others
    monkeypatch.setenv("CODESHELL_DECODE_MULTI_ROWS", "0")
    rows_calls.clear()
    assert_same(run_mixed(m, monkeypatch, 8, params), want)
    assert rows_calls == []  # off: one token a step while several sequences decode


def test_multi_rows_time_cap_and_streaming(monkeypatch, rows_calls):
    """A tiny CODESHELL_DECODE_MULTI_MS: every rows call makes one token a row, the same bits; streaming
    steps (final_only False) and sampled requests never take the rows call."""
    m = varied("int8")
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 9, 13)]
    want = run_mixed(m, monkeypatch, 1, params)
    monkeypatch.setenv("CODESHELL_DECODE_MULTI_MS", "0.000001")
    assert_same(run_mixed(m, monkeypatch, 8, params), want)
    assert rows_calls and all(set(c) == {1} for c in rows_calls)
    monkeypatch.delenv("CODESHELL_DECODE_MULTI_MS")
    rows_calls.clear()
    assert_same(run_mixed(m, monkeypatch, 8, params, final_only=False), run_mixed(m, monkeypatch, 1, params, False))
    sampled = [SamplingParams(temperature=0.8, seed=3, max_tokens=9, ignore_eos=True)] + params[1:]
    assert run_mixed(m, monkeypatch, 8, sampled)[0] == run_mixed(m, monkeypatch, 1, sampled)[0]
    assert rows_calls == []
