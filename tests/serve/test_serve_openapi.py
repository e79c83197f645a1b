"""The published OpenAPI schema, a schemathesis fuzz run of every route in it, llama.cpp's
timings on a non-streamed /completion, and the quiet, immediate shutdown of an idle server.

The fuzzed server has an API key (so the schema and /docs are checked behind it) and a
64-token window (so every generation the fuzzer asks for stays short). Traffic goes only to
127.0.0.1 and is bounded in count (`--max-examples`) and time (`--max-time`, per-request
timeout, and a hard timeout on the whole run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve._server import start_server

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROUTES = {("get", "/v1/models"), ("post", "/v1/completions"), ("post", "/v1/chat/completions"),
          ("post", "/infill"), ("post", "/completion"), ("post", "/tokenize"), ("post", "/detokenize"),
          ("post", "/generate"), ("post", "/generate_stream"), ("get", "/health"), ("get", "/metrics"),
          ("get", "/")}


@pytest.fixture(scope="module")
def fuzzed(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "fuzzed.log"
    s = start_server(model_dir, log, "--max-model-len", "64", "--max-batch", "4", "--api-key", KEY,
                     "--shutdown-timeout", "10")
    # The first generation may wait for the native kernels to build: not the fuzzer's business.
    r = httpx.post(s.url + "/completion", json={"prompt": "def", "n_predict": 2}, headers=AUTH, timeout=600)
    assert r.status_code == 200, r.text
    yield s
    s.stop()


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/components/schemas/"), ref
    name = ref.rsplit("/", 1)[1]
    assert name in schema["components"]["schemas"], f"{ref} is not in the components"
    return schema["components"]["schemas"][name]


def test_openapi_and_docs_are_behind_the_key(fuzzed):
    assert httpx.get(fuzzed.url + "/openapi.json").status_code == 401
    assert httpx.get(fuzzed.url + "/docs").status_code == 401
    docs = httpx.get(fuzzed.url + "/docs", headers=AUTH)
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert httpx.get(fuzzed.url + "/health").status_code == 200  # still public


def test_openapi_describes_every_route(fuzzed):
    r = httpx.get(fuzzed.url + "/openapi.json", headers=AUTH)
    assert r.status_code == 200
    schema = r.json()
    assert schema["openapi"].startswith("3.")
    ops = {(m, p): op for p, item in schema["paths"].items() for m, op in item.items()}
    assert set(ops) == ROUTES
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for (method, path), op in ops.items():
        ok = op["responses"]["200"]
        assert ok.get("content"), f"{method} {path}: the 200 answer has no content type"
        for media in ok["content"].values():
            if "$ref" in media["schema"]:
                _resolve(schema, media["schema"])
            if "x-event-schema" in media:
                _resolve(schema, media["x-event-schema"])
        if method == "post":
            body = _resolve(schema, op["requestBody"]["content"]["application/json"]["schema"])
            assert body["properties"], f"{path}: empty request model"
            errors = [s for s in op["responses"] if s.startswith("4")]
            assert errors, f"{path}: no error answers described"
            assert op["security"] == [{"bearer": []}]
    # The request models are the ones the routes validate with: check a few exact fields.
    comp = schema["components"]["schemas"]
    assert {"input_prefix", "input_suffix", "n_predict"} <= set(comp["InfillBody"]["properties"])
    assert comp["CompletionRequest"]["additionalProperties"] is False  # OpenAI bodies are strict
    served = httpx.get(fuzzed.url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
    assert comp["CompletionRequest"]["properties"]["model"]["examples"] == [served]
    assert {"prompt_ms", "predicted_ms", "predicted_per_second"} <= set(comp["Timings"]["properties"])
    assert "/health" in schema["paths"] and "security" not in schema["paths"]["/health"]["get"]


def test_fuzz_every_route(fuzzed, tmp_path):
    """schemathesis generates valid and invalid requests for every operation of the schema:
    none may get a 5xx or time out, and the server still answers normally afterwards."""
    pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e '.[test]')")
    env = {**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", fuzzed.url + "/openapi.json", "-H", f"Authorization: Bearer {KEY}",
           "--checks", "not_a_server_error", "--max-examples", "6", "--max-time", "25",
           "--request-timeout", "20", "--workers", "1", "--seed", "1", "--no-shrink",
           "--phases", "examples,coverage,fuzzing"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:] + "\n--- server log ---\n" + fuzzed.log.read_text()[-3000:]
    summary = [ln.strip() for ln in out.splitlines() if "generated" in ln and "passed" in ln]
    assert summary, out[-2000:]
    print("schemathesis:", summary[-1])
    assert time.monotonic() - t0 < 110
    assert "internal error" not in fuzzed.log.read_text()
    # still serving
    r = httpx.post(fuzzed.url + "/infill", json={"input_prefix": "def add(a, b):\n", "n_predict": 3},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.text.rstrip().endswith("}")


def test_completion_timings_have_both_phases(fuzzed):
    """llama.cpp's server splits a request's time into the prompt phase (until the first token)
    and the prediction phase (the rest): both positive, adding up to the request's time."""
    body = {"prompt": "def fibonacci(n):", "n_predict": 8, "ignore_eos": True, "temperature": 0}
    # The fuzzer's timed-out requests may still be generating: the phases start at admission,
    # so a request queued behind them would spend its wait outside both.
    fuzzed.wait_idle()
    t0 = time.monotonic()
    r = httpx.post(fuzzed.url + "/completion", json=body, headers=AUTH, timeout=60)
    wall_ms = (time.monotonic() - t0) * 1e3
    assert r.status_code == 200, r.text
    res = r.json()
    t = res["timings"]
    assert res["tokens_predicted"] == t["predicted_n"] == 8
    assert t["prompt_n"] >= 1 and t["prompt_ms"] > 0 and t["predicted_ms"] > 0
    assert t["predicted_per_second"] == pytest.approx(8 / (t["predicted_ms"] / 1e3))
    assert t["prompt_per_second"] == pytest.approx(t["prompt_n"] / (t["prompt_ms"] / 1e3))
    assert t["predicted_per_token_ms"] == pytest.approx(t["predicted_ms"] / 8)
    # Measured inside the request. (No lower bound: how much of the wall time the HTTP round
    # trip takes depends on the machine's load, and a timed assertion is a flaky test.)
    assert t["prompt_ms"] + t["predicted_ms"] <= wall_ms
    # the streamed form's final event carries the same fields
    with httpx.stream("POST", fuzzed.url + "/completion", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as s:
        events = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    import json
    last = json.loads(events[-1][6:])["timings"]
    assert last["predicted_n"] == 8 and last["prompt_ms"] > 0 and last["predicted_ms"] > 0


def test_idle_shutdown_is_immediate_and_quiet(fuzzed):
    """SIGTERM with nothing in flight: exit 0 at once, with no word of aborting requests."""
    fuzzed.wait_idle()
    t0 = time.monotonic()
    code = fuzzed.stop(timeout=30)
    took = time.monotonic() - t0
    log = fuzzed.log.read_text()
    assert code == 0, log[-2000:]
    assert "aborting" not in log.lower(), log[-2000:]
    assert took < 5, f"an idle server took {took:.1f}s to stop (the grace period is 10 s)"


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("POSIX signals")
