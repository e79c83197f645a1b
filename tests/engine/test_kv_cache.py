"""The engine's KV cache grows once for a long first request (prompt and reply), by whole
blocks, keeping what it stores; output is the same as with a cache sized up front."""

from __future__ import annotations

import torch

from codeshell import LLM
from codeshell.engine import SamplingParams
from codeshell.testing import make_tiny_checkpoint
from tests.conftest import require_shared


def test_long_first_request_grows_the_cache_once(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "tiny", require_shared("codeshell-tokenizer"))
    torch.manual_seed(0)
    llm = LLM(path, max_batch=2)
    sized = LLM(path, max_batch=2)
    sized.engine.cache.ensure(2, 512)  # big enough from the start: never grows
    cache = llm.engine.cache
    grown = []
    ensure = cache.ensure

    def counting(slots, max_len):
        before = (cache.slots, cache.max_len)
        ensure(slots, max_len)
        if (cache.slots, cache.max_len) != before:
            grown.append(cache.max_len)

    cache.ensure = counting
    prompt = "def f(x):\n    return x\n" * 30  # ~300 tokens, past the initial 64 positions
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    out = llm.generate(prompt, params)[0]
    assert len(out.outputs[0].token_ids) == 40
    n = len(out.prompt_token_ids)
    assert len(grown) == 1 and grown[0] >= n + 40 and grown[0] % 256 == 0, (grown, n)
    assert out.outputs[0].token_ids == sized.generate(prompt, params)[0].outputs[0].token_ids
    assert sized.engine.cache.max_len == 512
