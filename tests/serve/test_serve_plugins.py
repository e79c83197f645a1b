"""The official IDE plugins' requests, byte for byte as in shared/protocols/ide-plugins.md,
parsed the way each plugin parses the answer; greedy output equals `codeshell.LLM`'s."""

from __future__ import annotations

import json
import re

import httpx

from codeshell.engine import SamplingParams
from codeshell.prompts import fim_prompt

VSC_STOP = ["<|endoftext|>", "|<end>|", "|<end", "|end|", "## human"]
IJ_GPU_STOP = ["|<end>|", "<end>", "<|endoftext|>", "## human", "|end|", "|end>|", "<end|"]
PREFIX = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:"
SUFFIX = "\n\nprint(fibonacci(10))"


def vscode_infill_parse(body: str) -> str:
    """codeshell-vscode: split on \\n\\n, keep `data:` chunks, JSON.parse(chunk.substring(5)), join .content."""
    text = "".join(json.loads(c[5:])["content"] for c in body.split("\n\n") if c.startswith("data:"))
    return text.replace("<|endoftext|>", "", 1)


def intellij_infill_parse(body: str) -> str:
    """codeshell-intellij: regex data:\\s?(.*?)\\n over the body, concatenate `content`."""
    parts = [json.loads(m)["content"] for m in re.findall(r"data:\s?(.*?)\n", body)]
    return "".join(p for p in parts if p not in ("", "<|endoftext|>")).replace("<|endoftext|>", "")


def sse_events(resp: httpx.Response) -> list[dict]:
    return [json.loads(ln.split(":", 1)[1]) for ln in resp.iter_lines() if ln.startswith("data:")]


def fim_greedy(llm, prefix, suffix, n, stop=()) -> str:
    return llm.infill(prefix, suffix, SamplingParams(temperature=0, max_tokens=n, stop=list(stop))).outputs[0].text


def test_vscode_infill_exact_body(client, llm):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 64, "temperature": 0.2,
            "repetition_penalty": 1.0, "top_k": 10, "top_p": 0.95, "stop": VSC_STOP}
    r = client.post("/infill", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "\r\n" not in r.text and "[DONE]" not in r.text and r.text.endswith("\n\n")
    chunks = [c for c in r.text.split("\n\n") if c]
    assert all(c.startswith("data: ") for c in chunks)
    last = json.loads(chunks[-1][5:])
    assert last["stop"] is True and last["content"] == ""
    assert all(json.loads(c[5:])["stop"] is False for c in chunks[:-1])
    assert isinstance(vscode_infill_parse(r.text), str)
    # Greedy: the same request with temperature 0 gives LLM.infill's text, stop words cut.
    r = client.post("/infill", json={**body, "temperature": 0})
    assert vscode_infill_parse(r.text) == fim_greedy(llm, PREFIX, SUFFIX, 64, VSC_STOP)
    for s in VSC_STOP:
        assert s not in vscode_infill_parse(r.text)


def test_intellij_infill_no_stop_no_stream(client, llm):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX[:256], "n_predict": 64, "temperature": 0.2,
            "repetition_penalty": 1.0, "top_k": 10, "top_p": 0.95}
    r = client.post("/infill", json=body, headers={"Content-Type": "application/json; charset=UTF-8"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    r = client.post("/infill", json={**body, "temperature": 0})
    assert intellij_infill_parse(r.text) == fim_greedy(llm, PREFIX, SUFFIX[:256], 64)


def test_vscode_chat_completion_stream(client, llm):
    prompt = "|<end>|## human:Explain recursion|<end>|## assistant:"
    body = {"prompt": prompt, "n_predict": 24, "temperature": 0, "repetition_penalty": 1.2, "top_k": 40,
            "top_p": 0.95, "stream": True, "stop": VSC_STOP}
    with client.stream("POST", "/completion", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = [bytes(c) for c in r.iter_raw()]
    text = b"".join(raw).decode()
    events = [json.loads(c[5:]) for c in text.split("\n\n") if c.startswith("data:")]
    answer = "".join(e["content"] for e in events if e.get("content"))
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, stop=VSC_STOP))[0].outputs[0].text
    assert answer == want  # repetition_penalty is not a llama.cpp field: ignored, as the reference does
    assert events[-1]["stop"] is True and "tokens_predicted" in events[-1]


def test_intellij_chat_completion_stop_flag(client, llm):
    prompt = "|<end>|## human:请解释以下JAVA代码: \n```JAVA\nint x = 1;\n```\n|<end>|## assistant:"
    body = {"frequency_penalty": 1.2, "n_predict": 16, "prompt": prompt, "temperature": 0.2, "stream": True,
            "stop": ["|<end>|"]}
    with client.stream("POST", "/completion", json=body, headers={"Origin": "http://codeshell",
                                                                  "Accept": "text/event-stream"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["access-control-allow-origin"] == "*"
        events = sse_events(r)
    assert events[-1]["stop"] is True
    assert all(e["stop"] is False for e in events[:-1])


def test_completion_not_streamed_is_one_json(client, llm):
    r = client.post("/completion", json={"prompt": "int main() {", "n_predict": 8, "temperature": 0})
    assert r.headers["content-type"].startswith("application/json")
    want = llm.generate("int main() {", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert r.json()["content"] == want and r.json()["stop"] is True


def test_vscode_tgi_generate(client, llm):
    inputs = fim_prompt(PREFIX, SUFFIX)
    body = {"inputs": inputs, "parameters": {"max_new_tokens": 64, "temperature": 0.2, "repetition_penalty": 1.2,
                                             "top_p": 0.99, "do_sample": True, "stop": VSC_STOP}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200 and isinstance(r.json()["generated_text"], str)


def test_intellij_tgi_generate_greedy(client, llm):
    inputs = fim_prompt(PREFIX, SUFFIX)
    r = client.post("/generate", content=json.dumps({"inputs": inputs, "parameters": {"max_new_tokens": 64}}),
                    headers={"Content-Type": "application/json; charset=UTF-8"})
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    text = json.loads(r.content.decode("utf-8"))["generated_text"]
    assert text == fim_greedy(llm, PREFIX, SUFFIX, 64)  # new text only, never the prompt
    assert "<|endoftext|>" not in text


def intellij_tgi_stream_parse(events: list[dict]) -> str | None:
    """The IntelliJ chat page: append token.text; finish only on an event with token.text and generated_text."""
    answer = ""
    for e in events:
        t = (e.get("token") or {}).get("text")
        if not t:
            continue
        answer += t
        if e.get("generated_text") is not None:
            return re.sub(r"[|<]+end[>|]+|<\|endoftext\|>|## human", "", e["generated_text"])
    return None


def test_tgi_generate_stream_both_plugins(client, llm):
    inputs = "##human:写一个快速排序|<end>|##assistant:"
    body = {"inputs": inputs, "parameters": {"max_new_tokens": 20, "temperature": 0.2, "top_p": 0.95,
                                             "do_sample": False, "repetition_penalty": 1, "stop": IJ_GPU_STOP}}
    with client.stream("POST", "/generate_stream", json=body, headers={"Origin": "http://codeshell"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    want = llm.generate(inputs, SamplingParams(temperature=0, max_tokens=20, stop=IJ_GPU_STOP))[0].outputs[0].text
    assert intellij_tgi_stream_parse(events) == want
    vscode = "".join(e["token"]["text"] for e in events).replace("<|endoftext|>", "", 1)
    assert vscode == want
    assert events[-1]["generated_text"] == want and events[-1]["token"]["text"]
    assert all(e["generated_text"] is None for e in events[:-1])
    assert all(set(e["token"]) == {"id", "text", "logprob", "special"} for e in events)


def test_cors_preflight_and_headers(client):
    r = client.options("/generate_stream", headers={"Origin": "http://codeshell",
                                                    "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "content-type" in r.headers["access-control-allow-headers"]
    assert client.options("/anything/at/all").status_code == 200
    assert client.get("/health").headers["access-control-allow-origin"] == "*"


def test_each_sse_event_holds_whole_utf8(client):
    """Every event is valid UTF-8 on its own (VS Code decodes each network chunk separately)."""
    body = {"prompt": "中文注释：计算斐波那契数列 🐍", "n_predict": 32, "temperature": 0, "stream": True}
    with client.stream("POST", "/completion", json=body) as r:
        for chunk in r.iter_raw():
            bytes(chunk).decode("utf-8")  # raises on a split character
    r = client.post("/infill", json={"input_prefix": "# 中文 🐍\n", "input_suffix": "", "n_predict": 32,
                                     "temperature": 0})
    for part in r.content.split(b"\n\n"):
        part.decode("utf-8")


def test_ide_prompts_too_long_are_left_truncated(client, llm):
    long_prefix = "x = 1\n" * 300  # far over the 256-token window
    r = client.post("/infill", json={"input_prefix": long_prefix + "def f():", "input_suffix": "return 1\n" * 100,
                                     "n_predict": 16, "temperature": 0})
    assert r.status_code == 200
    final = json.loads([c for c in r.text.split("\n\n") if c][-1][5:])
    assert final["truncated"] is True and final["tokens_evaluated"] <= 256 - 16
    assert final["prompt"].startswith("<fim_prefix>") and final["prompt"].endswith("<fim_middle>")
    assert "def f():<fim_suffix>return 1" in final["prompt"]  # prefix end and suffix start kept
    r = client.post("/generate", json={"inputs": "y = 2\n" * 400, "parameters": {"max_new_tokens": 8}})
    assert r.status_code == 200


def test_tokenize_detokenize(client, llm):
    ids = client.post("/tokenize", json={"content": "def f(x): return x"}).json()["tokens"]
    assert ids == llm.encode("def f(x): return x")
    assert client.post("/detokenize", json={"tokens": ids}).json()["content"] == "def f(x): return x"
