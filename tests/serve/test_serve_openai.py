"""The OpenAI API through the official `openai` SDK against a real server: completions (with
`suffix` for FIM), chat, streamed and not; greedy text equals `codeshell.LLM`'s."""

from __future__ import annotations

import json

import pytest

from codeshell.engine import SamplingParams

openai = pytest.importorskip("openai")


@pytest.fixture()
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n)


def test_models(oai, model_name):
    ids = [m.id for m in oai.models.list().data]
    assert ids == [model_name]


def test_completion_greedy_matches_llm(oai, llm, model_name):
    prompt = "def quicksort(arr):\n    "
    r = oai.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0)
    want = llm.generate(prompt, greedy())[0].outputs[0]
    assert r.choices[0].text == want.text
    assert r.usage.prompt_tokens == len(llm.encode(prompt))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completion_stream_matches_llm(oai, llm, model_name):
    prompt = "import numpy as np\n"
    chunks = list(oai.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == llm.generate(prompt, greedy())[0].outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_completion_with_suffix_is_fim(oai, llm, model_name):
    r = oai.completions.create(model=model_name, prompt="def add(a, b):\n", suffix="\nprint(add(1, 2))",
                               max_tokens=10, temperature=0)
    want = llm.infill("def add(a, b):\n", "\nprint(add(1, 2))", greedy(10)).outputs[0].text
    assert r.choices[0].text == want


def test_completion_token_ids_list_of_prompts_n_and_seed(oai, llm, model_name):
    ids = llm.encode("class Stack:\n")
    r = oai.completions.create(model=model_name, prompt=[ids, llm.encode("x = 1")], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == llm.generate({"prompt_token_ids": ids}, greedy(6))[0].outputs[0].text
    a = oai.completions.create(model=model_name, prompt="for i in", max_tokens=6, n=2, seed=3, temperature=0.9)
    b = oai.completions.create(model=model_name, prompt="for i in", max_tokens=6, n=2, seed=3, temperature=0.9)
    assert len(a.choices) == 2 and [c.text for c in a.choices] == [c.text for c in b.choices]


def test_completion_logprobs_and_echo(oai, model_name):
    r = oai.completions.create(model=model_name, prompt="x =", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    e = oai.completions.create(model=model_name, prompt="x =", max_tokens=4, temperature=0, echo=True)
    assert e.choices[0].text.startswith("x =")


def test_chat_greedy_matches_llm(oai, llm, model_name):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write hello world in C"}]
    r = oai.chat.completions.create(model=model_name, messages=msgs, max_tokens=12, temperature=0)
    want = llm.chat(msgs, greedy())[0].outputs[0].text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want


def test_chat_stream_role_first_finish_last_done(server, oai, llm, model_name):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "sort a list in python"}]
    chunks = list(oai.chat.completions.create(model=model_name, messages=msgs, max_tokens=10, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == llm.chat(msgs, greedy(10))[0].outputs[0].text
    # The raw stream ends with [DONE].
    import httpx
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": model_name, "messages": msgs, "max_tokens": 3, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    json.loads(events[-2][6:])


def test_errors_have_openai_shape(oai, model_name):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model_name, prompt="word " * 400, max_tokens=2)
    assert "context window is 256" in e.value.body["message"] and "401 tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}], temperature=3)
    assert e.value.body["param"] == "temperature"
