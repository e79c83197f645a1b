"""Continuous batching over HTTP: concurrent streams equal sequential ones, a client that
disconnects is aborted without hurting the others, a newer IDE completion supersedes an
older one from the same client, and the prefix cache hits without changing the output."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from codeshell.engine import SamplingParams


def stream_completion(url: str, model: str, prompt: str, max_tokens: int = 16) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for ln in r.iter_lines():
            if ln.startswith("data: ") and ln != "data: [DONE]":
                text += json.loads(ln[6:])["choices"][0]["text"]
    return text


PROMPTS = [f"def task_{i}(x):\n    # step {i}: " + "compute " * (i % 5) for i in range(16)]


def wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_16_concurrent_streams_equal_sequential(server, model_name, llm):
    one_by_one = [stream_completion(server.url, model_name, p) for p in PROMPTS]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: stream_completion(server.url, model_name, p), PROMPTS))
    assert together == one_by_one
    want = [o.outputs[0].text for o in llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=16))]
    assert one_by_one[:3] == want


def test_disconnected_client_is_aborted_others_unaffected(server, model_name):
    before = server.metric("codeshell_aborted_requests_total", 'reason="disconnect"')
    expected = [stream_completion(server.url, model_name, p) for p in PROMPTS[:3]]
    body = {"model": model_name, "prompt": "while True:", "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}

    def leaver() -> int:
        got = 0
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for ln in r.iter_lines():
                if ln.startswith("data: "):
                    got += 1
                    if got == 3:
                        break  # closing the stream here disconnects
        return got

    with ThreadPoolExecutor(4) as pool:
        left = pool.submit(leaver)
        others = list(pool.map(lambda p: stream_completion(server.url, model_name, p), PROMPTS[:3]))
        assert left.result() == 3
    assert others == expected
    assert wait_for(lambda: server.metric("codeshell_aborted_requests_total", 'reason="disconnect"') == before + 1)
    assert wait_for(lambda: httpx.get(server.url + "/health").json()["running"] == 0)


def test_new_fim_request_supersedes_older_one_from_same_client(server, client):
    before = server.metric("codeshell_superseded_requests_total")
    old = {"input_prefix": "def slow():\n", "input_suffix": "", "n_predict": 230, "temperature": 0,
           "ignore_eos": True}
    with httpx.stream("POST", server.url + "/infill", json=old, timeout=60) as r:
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data:"))
        assert json.loads(first[5:])["stop"] is False
        new = client.post("/infill", json={"input_prefix": "def fast():\n", "input_suffix": "", "n_predict": 4,
                                           "temperature": 0})
        assert new.status_code == 200
        rest = [json.loads(ln[5:]) for ln in lines if ln.startswith("data:")]
    final = rest[-1]
    assert final["stop"] is True and final["tokens_predicted"] < 230
    assert server.metric("codeshell_superseded_requests_total") == before + 1


def test_prefix_cache_hit_same_output(server, client, model_name, llm):
    base = "".join(f"    value_{i} = compute({i})\n" for i in range(16))
    hits = server.metric("codeshell_prefix_cache_hits_total")
    a = client.post("/v1/completions", json={"model": model_name, "prompt": base + "    a", "max_tokens": 8,
                                             "temperature": 0}).json()
    b = client.post("/v1/completions", json={"model": model_name, "prompt": base + "    return", "max_tokens": 8,
                                             "temperature": 0}).json()
    n_base = len(llm.encode(base))
    assert n_base > 100
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] >= n_base - 1
    assert server.metric("codeshell_prefix_cache_hits_total") >= hits + 1
    assert server.metric("codeshell_prefix_cache_hit_tokens_total") >= n_base - 1
    sp = SamplingParams(temperature=0, max_tokens=8)
    assert b["choices"][0]["text"] == llm.generate(base + "    return", sp)[0].outputs[0].text  # LLM: no cache
    assert a["choices"][0]["text"] == llm.generate(base + "    a", sp)[0].outputs[0].text


def test_metrics_and_log_line(server, client):
    text = client.get("/metrics").text
    for name in ("codeshell_requests_total", "codeshell_prompt_tokens_total", "codeshell_generation_tokens_total",
                 "codeshell_queue_depth", "codeshell_running_sequences",
                 "codeshell_time_to_first_token_seconds_bucket", "codeshell_time_per_output_token_seconds_bucket",
                 "codeshell_prefix_cache_hits_total"):
        assert name in text, name
    assert 'codeshell_requests_total{endpoint="/v1/completions",status="200"}' in text
    log = server.log.read_text()
    assert "endpoint=/v1/completions" in log and "ttft=" in log and "finish=" in log


def test_engine_step_counters_and_warm_up(server, client, model_name):
    """/metrics says how long the engine thread spent in steps (bench_serve's --engine-vs-served
    puts it against a request's wall time), and the server ran its warm-up request at load."""
    steps, busy = server.metric("codeshell_engine_steps"), server.metric("codeshell_engine_step_seconds")
    r = client.post("/v1/completions", json={"model": model_name, "prompt": "def f(x):", "max_tokens": 5,
                                             "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    assert server.metric("codeshell_engine_steps") >= steps + 5  # a prefill step and 4 decode steps at least
    assert server.metric("codeshell_engine_step_seconds") > busy
    assert "warm-up request:" in server.log.read_text()


def test_warm_up_leaves_the_engine_as_it_found_it(model_dir, llm):
    """The warm-up request runs to its end, frees its slot and changes no later output."""
    from codeshell import LLM
    from codeshell.serve.service import warm_up
    fresh = LLM(model_dir, max_batch=4, threads=1)
    fresh.engine.prefix_caching = True
    warm_up(fresh.engine)
    eng = fresh.engine
    assert not eng.has_unfinished() and not eng.running and sorted(eng.free_slots) == list(range(4))
    sp = SamplingParams(temperature=0, max_tokens=8)
    prompt = "def fibonacci(n):\n    "
    assert fresh.generate(prompt, sp)[0].outputs[0].text == llm.generate(prompt, sp)[0].outputs[0].text
