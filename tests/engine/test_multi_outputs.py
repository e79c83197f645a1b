"""LLM.generate's outputs whatever number of tokens a native call makes (CODESHELL_DECODE_MULTI: 64 by
default since session 40, 8 before, 1 = one token a step): the same tokens, text, finish and stop
reasons at batch 8, greedy with different lengths and an eos stop, sampled, and with prompt lookup
(a verify step's accepted drafts through `Sequence.append_many`); the streaming path's deltas joined."""

from __future__ import annotations

import pytest

from codeshell import LLM
from codeshell.engine import SamplingParams
from codeshell.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tokenizer_dir):
    return LLM(str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir)), max_batch=8)


def _results(outs, delta=True):
    return [(o.prompt_token_ids, o.finished, [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason,
                                               c.delta if delta else None) for c in o.outputs]) for o in outs]


def test_generate_is_the_same_whatever_tokens_a_call(llm, monkeypatch):
    prompts = ["def fib(n):", "import os\n", "class A:\n    def", "x = [1, 2", "# sum", "for i in", "a", "b = 3\n"]
    params = [[SamplingParams(temperature=0, max_tokens=5 + 3 * i, ignore_eos=i % 2 == 0) for i in range(8)],
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.8, max_tokens=20, seed=3),
              SamplingParams(temperature=0, max_tokens=24, prompt_lookup_num_tokens=3, ignore_eos=True)]
    got = {}
    for multi in ("64", "8", "1"):
        monkeypatch.setenv("CODESHELL_DECODE_MULTI", multi)
        # with prompt lookup how many tokens a step accepts (so the final delta, and the stream's steps)
        # follows the draft budget's timings (as in test_lean): the tokens and the text must agree
        got[multi] = [_results(llm.generate(prompts, sp), delta=not getattr(sp, "prompt_lookup_num_tokens", 0))
                      for sp in params]
        outs = list(llm.stream_outputs(prompts[0] * 3, params[-1]))
        got[multi].append((_results(outs[-1:], delta=False), "".join(o.outputs[0].delta for o in outs)))
        assert llm.engine.multi_step == int(multi)
    assert got["64"] == got["8"] == got["1"]
