"""Engine behaviour: batching, caching, stopping, sampling, streaming and bad requests."""

from __future__ import annotations

import re

import pytest
import torch

from codeshell import LLM, SamplingParams
from codeshell.engine.engine import RequestError
from codeshell.engine.sampling import SamplingError
from codeshell.testing import make_tiny_checkpoint
from tests.conftest import require_shared

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(str(require_shared("golden/rope-mqa")), dtype="float32", max_batch=4)


@pytest.fixture(scope="module")
def text_llm(tmp_path_factory, tokenizer_dir):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir)
    return LLM(str(path), max_batch=4)


def ids_prompts():
    g = torch.Generator().manual_seed(0)
    return [{"prompt_token_ids": torch.randint(0, 500, (n,), generator=g).tolist()} for n in (3, 17, 40, 9, 25, 1)]


def test_batched_equals_one_at_a_time(llm):
    prompts = ids_prompts()  # 6 prompts through 4 slots: requests join and leave the batch
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    single = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    assert batched == single


def test_cached_decode_equals_full_recompute(llm):
    p = ids_prompts()[2]["prompt_token_ids"]
    out = llm.generate([{"prompt_token_ids": p}], GREEDY)[0].outputs[0].token_ids
    seq = list(p)
    with torch.no_grad():
        for _ in range(len(out)):
            seq.append(int(llm.model(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[len(p):] == out


def test_decode_attention_kernel_matches_sdpa_path(llm, monkeypatch):
    """Decode steps read the KV cache through the native attention kernel when it is built; the
    logprobs equal those of the SDPA path (kernel switched off) for a batch whose slots are
    not consecutive after requests left."""
    import codeshell.kernels as kernels
    if not kernels.available():
        pytest.skip("native kernels unavailable")
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    prompts = ids_prompts()
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    from codeshell.kernels import attention  # decode steps call it (decode_attention's bits, per query)
    packed = attention.packed_attention
    monkeypatch.setattr(attention, "packed_attention", lambda *a: calls.append(1) or packed(*a))
    fast = llm.generate(prompts, sp)
    assert calls, "decode did not use the native attention kernel"
    monkeypatch.setattr(kernels, "decode_attention_ok", lambda q, k: False)
    slow = llm.generate(prompts, sp)
    for a, b in zip(fast, slow):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(la.logprob - lb.logprob) < 1e-4


def test_seed_makes_sampling_reproducible(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=123, ignore_eos=True)
    p = ids_prompts()[1]
    a = llm.generate([p], sp)[0].outputs[0].token_ids
    # Same seed, different batch company: same tokens.
    b = llm.generate([ids_prompts()[0], p], sp)[1].outputs[0].token_ids
    c = llm.generate([p], SamplingParams(temperature=1.0, max_tokens=16, seed=124, ignore_eos=True))[0]
    assert a == b
    assert c.outputs[0].token_ids != a


def test_n_samples_and_logprobs(llm):
    out = llm.generate([ids_prompts()[0]], SamplingParams(n=3, temperature=1.0, max_tokens=5, seed=1,
                                                          logprobs=2, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == 5
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 2
            assert max(lp.top.values()) >= lp.logprob - 1e-6


def test_stop_token_and_max_tokens(llm):
    p = ids_prompts()[1]
    free = llm.generate([p], GREEDY)[0].outputs[0].token_ids
    stop_at = free[5]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_at],
                                           ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == free[:free.index(stop_at) + 1]
    short = llm.generate([p], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert short.token_ids == free[:3] and short.finish_reason == "length"


def test_repetition_penalty_changes_greedy_choice(llm):
    from codeshell.engine.sampling import SequenceSampler
    logits = torch.tensor([2.0, 1.9, -1.0])
    s = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=1.2), [0], None, torch.device("cpu"))
    assert s.sample(logits.clone()) == 1  # 2.0 / 1.2 < 1.9
    s = SequenceSampler(SamplingParams(temperature=0, presence_penalty=0.5), [], None, torch.device("cpu"))
    s.observe(0)
    assert s.sample(logits.clone()) == 1
    s = SequenceSampler(SamplingParams(temperature=0, frequency_penalty=0.05), [], None, torch.device("cpu"))
    s.observe(0)
    assert s.sample(logits.clone()) == 0  # 2.0 - 0.05 > 1.9
    s.observe(0)
    s.observe(0)
    assert s.sample(logits.clone()) == 1  # 2.0 - 0.15 < 1.9


def test_top_k_top_p_min_p_restrict_choices():
    from codeshell.engine.sampling import SequenceSampler
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    for params, allowed in ((dict(top_k=2), {0, 1}), (dict(top_p=0.7), {0, 1}), (dict(min_p=0.5), {0, 1}),
                            (dict(top_p=0.5), {0})):
        s = SequenceSampler(SamplingParams(temperature=1.0, seed=0, **params), [], 0, torch.device("cpu"))
        seen = {s.sample(logits.clone()) for _ in range(200)}
        assert seen <= allowed and allowed & seen


def test_stop_string_spanning_tokens_is_cut(text_llm):
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = text_llm.generate(["def fib(n):"], sp)[0].outputs[0].text
    assert len(full) > 12
    stop = full[5:9]  # most likely spans a token boundary with random weights; cut either way
    out = text_llm.generate(["def fib(n):"], SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                             ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.index(stop)]
    streamed = "".join(text_llm.stream("def fib(n):", SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                                      ignore_eos=True)))
    assert streamed == out.text


def test_stream_equals_generate(text_llm):
    sp = SamplingParams(temperature=0.7, max_tokens=20, seed=5, ignore_eos=True)
    assert "".join(text_llm.stream("print(", sp)) == text_llm.generate("print(", sp)[0].outputs[0].text


def test_chat_and_infill_use_the_official_formats(text_llm):
    out = text_llm.chat([{"role": "user", "content": "你好"}], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.prompt == "## human:你好|<end>|## assistant:"
    inf = text_llm.infill("def add(a, b):\n    ", "\n", SamplingParams(temperature=0, max_tokens=4))
    assert inf.prompt == "<fim_prefix>def add(a, b):\n    <fim_suffix>\n<fim_middle>"
    assert inf.prompt_token_ids[0] == 70001 and inf.prompt_token_ids[-1] == 70002


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens must be a positive integer"),
    (dict(max_tokens=-3), "max_tokens must be a positive integer"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(seed=2**64), "seed must be an integer in [-2**63, 2**63 - 1]"),
    (dict(seed=-(2**63) - 1), "seed must be an integer in [-2**63, 2**63 - 1]"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(SamplingError, match=re.escape(message)):
        SamplingParams(**kwargs)


def test_bad_prompts(llm, text_llm):
    with pytest.raises(RequestError, match="the prompt is empty"):
        text_llm.generate([""])
    with pytest.raises(RequestError, match="the prompt is empty"):
        llm.generate([{"prompt_token_ids": []}])
    too_long = {"prompt_token_ids": [1] * (llm.max_model_len + 5)}
    with pytest.raises(RequestError, match=r"the prompt has 133 tokens but the context window is 128"):
        llm.generate([too_long])
    out = llm.generate([too_long], SamplingParams(max_tokens=4, truncate_prompt=True, temperature=0))[0]
    assert len(out.prompt_token_ids) == 124 and len(out.outputs[0].token_ids) == 4
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([{"prompt_token_ids": [10**6]}])


def test_context_end_finishes_with_length(llm):
    p = {"prompt_token_ids": [1] * (llm.max_model_len - 3)}
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_text_prompt_without_tokenizer_is_clear(llm):
    from codeshell.tokenizer import TokenizerMissingError
    with pytest.raises(TokenizerMissingError, match="text prompts need a tokenizer"):
        llm.generate(["def f():"])
