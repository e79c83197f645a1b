"""The engine's trimmed per-step path (`Engine.lean`, CODESHELL_ENGINE_LEAN; session 20) gives
what the earlier path gives: lazy detokenization (`Sequence(lazy=True)`) the same text, deltas and
stream positions as decoding at every token, with outputs made or skipped (`skip_output`) at any
steps; `LLM.generate` (finished outputs only) and `LLM.stream` the same results on and off."""

from __future__ import annotations

import random

import pytest

from codeshell import LLM
from codeshell.engine import SamplingParams
from codeshell.engine.sequence import Sequence
from codeshell.testing import make_tiny_checkpoint


class _Pairs:
    """A decoder with state: a token t < 50 decodes to chr(97 + t), a token >= 50 is the first half
    of a two-token character (nothing until the next token), as a multi-byte UTF-8 split."""

    def decoder(self, skip_special_tokens):
        class D:
            def __init__(self):
                self.pending = None

            def add(self, t):
                if self.pending is not None:
                    c, self.pending = chr(0x400 + self.pending * 7 + t), None
                    return c
                if t >= 50:
                    self.pending = t
                    return ""
                return chr(97 + t)

            def flush(self):
                c, self.pending = ("?" if self.pending is not None else ""), None
                return c
        return D()


class _Counts:
    def observe(self, t):
        pass


def _run(lazy: bool, toks: list[int], plan: list[int], params: SamplingParams, end: str):
    """Appends toks one at a time; after each, plan says: 0 skip the output, 1 make it; `end`:
    how the sequence ends (length: max_tokens, stop: token 99 is a stop token, abort)."""
    s = Sequence("r", 0, [1], params, _Counts(), 0, _Pairs(), None, lazy)
    if end == "stop":
        s.stop_ids = {99}
    outs = []
    for t, p in zip(toks, plan):
        s.append(t, None, 10**6)
        if s.finished:
            break
        if p:
            o = s.output()
            outs.append((o.text, o.delta, o.token_ids, o.finish_reason))
        else:
            s.skip_output()
    if end == "abort" and not s.finished:
        s.finish("abort")
    o = s.output()
    outs.append((o.text, o.delta, o.token_ids, o.finish_reason, o.stop_reason))
    return outs, s.text, s.streamed


@pytest.mark.parametrize("end", ["length", "stop", "abort"])
def test_lazy_detokenization_gives_the_same_text_deltas_and_stream(end):
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 14)
        toks = [rng.choice([rng.randint(0, 49), rng.randint(50, 60)]) for _ in range(n)]
        if end == "stop" and rng.random() < 0.7:
            toks[rng.randrange(n)] = 99
        plan = [rng.randint(0, 1) for _ in range(n)]
        params = SamplingParams(max_tokens=n if end == "length" else None, ignore_eos=True)
        a = _run(False, toks, plan, params, end)
        b = _run(True, toks, plan, params, end)
        assert a == b, (toks, plan)


def test_stop_strings_keep_decoding_at_every_token():
    s = Sequence("r", 0, [1], SamplingParams(stop=["ab"]), _Counts(), 0, _Pairs(), None, True)
    assert not s._lazy  # a stop string needs the text at every token


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tokenizer_dir):
    return LLM(str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir)), max_batch=4)


def _results(outs, delta=True):
    return [(o.prompt_token_ids, o.finished, o.num_cached_tokens,
             [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.delta if delta else None,
               None if c.logprobs is None else [(lp.token_id, lp.logprob, lp.top) for lp in c.logprobs])
              for c in o.outputs]) for o in outs]


def test_generate_and_stream_are_the_same_lean_or_not(llm, monkeypatch):
    prompts = ["def fib(n):", "import os\n", "class A:\n    def", "x = [1, 2"]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=3, n=2),
              SamplingParams(temperature=0, max_tokens=30, stop=["\n\n", "return"], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=16, logprobs=2, repetition_penalty=1.2),
              SamplingParams(temperature=0, max_tokens=20, prompt_lookup_num_tokens=3, ignore_eos=True)]
    got = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("CODESHELL_ENGINE_LEAN", mode)
        res = []
        for sp in params:
            # with prompt lookup, how many tokens the last step accepted (the final delta) is a
            # speed detail that varied between runs (CI, session 23); tokens and text must agree
            whole = not sp.prompt_lookup_num_tokens
            res.append(_results(llm.generate(prompts, sp), delta=whole))
            res.append([_results([o]) for o in llm.stream_outputs(prompts[0], sp)])
        got[mode] = res
        assert llm.engine.lean == (mode == "on")
    assert got["on"] == got["off"]
    monkeypatch.setenv("CODESHELL_ENGINE_LEAN", "maybe")
    with pytest.raises(ValueError, match="CODESHELL_ENGINE_LEAN"):
        llm.generate(prompts[:1], params[0])
