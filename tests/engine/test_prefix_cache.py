"""Prefix caching in the engine: reused KV gives the same tokens as a full prefill, and hits
are counted; a cache from a running sequence and from a freed slot both work."""

from __future__ import annotations

import pytest
import torch

from codeshell import LLM
from codeshell.engine import SamplingParams
from codeshell.testing import make_tiny_checkpoint
from tests.conftest import require_shared


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    tok = require_shared("codeshell-tokenizer")
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tok)
    torch.manual_seed(0)
    plain = LLM(path, max_batch=4)
    cached = LLM(path, max_batch=4)
    cached.engine.prefix_caching = True
    return plain, cached


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
BASE = "def fibonacci(n):\n    " + "# compute the numbers one by one\n    " * 6


def test_freed_slot_prefix_is_reused_and_output_unchanged(llms):
    plain, cached = llms
    first = cached.generate(BASE + "a = 1", GREEDY)[0]
    assert first.num_cached_tokens == 0
    hits0 = cached.engine.prefix_hits
    second = cached.generate(BASE + "b = 2\n", GREEDY)[0]
    n_base = len(cached.encode(BASE))
    assert second.num_cached_tokens >= n_base - 2
    assert cached.engine.prefix_hits == hits0 + 1
    want = plain.generate(BASE + "b = 2\n", GREEDY)[0]
    assert second.outputs[0].token_ids == want.outputs[0].token_ids
    assert first.outputs[0].token_ids == plain.generate(BASE + "a = 1", GREEDY)[0].outputs[0].token_ids


def test_identical_prompts_in_one_batch_share_the_prefill(llms):
    plain, cached = llms
    prompts = [BASE + "x = [i for i in range(10)]"] * 3
    outs = cached.generate(prompts, GREEDY)
    want = plain.generate(prompts[0], GREEDY)[0].outputs[0].token_ids
    assert all(o.outputs[0].token_ids == want for o in outs)
    assert sum(o.num_cached_tokens > 0 for o in outs) >= 2


def test_generated_tokens_are_cached_too(llms):
    """A chat's next turn resends the previous answer: those positions come from the cache."""
    plain, cached = llms
    out = cached.generate(BASE, GREEDY)[0]
    follow = cached.decode(cached.encode(BASE) + out.outputs[0].token_ids) + "\n# next"
    again = cached.generate(follow, GREEDY)[0]
    assert again.num_cached_tokens > len(cached.encode(BASE))
    assert again.outputs[0].token_ids == plain.generate(follow, GREEDY)[0].outputs[0].token_ids


def test_sampled_outputs_with_n_and_seed_match(llms):
    plain, cached = llms
    sp = SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=10)
    cached.generate(BASE + "y", GREEDY)
    a = cached.generate(BASE + "y = 3", sp)[0]
    b = plain.generate(BASE + "y = 3", sp)[0]
    assert a.num_cached_tokens > 0
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
