"""`codeshell serve --quantization int8`: the server runs the quantized model, answering what
`LLM(..., quantization="int8")` answers."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import require_shared


def test_serve_with_quantization_matches_llm(tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from codeshell import LLM, SamplingParams
    from tests.serve._server import start_server
    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(require_shared("golden/rope-gqa") / f, d / f)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(require_shared("codeshell-tokenizer") / f, d / f)
    server = start_server(d, tmp_path / "server.log", "--quantization", "int8")
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "m", "prompt": "def fib(n):", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
    finally:
        assert server.stop() == 0
    llm = LLM(str(d), quantization="int8")
    expected = llm.generate("def fib(n):", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert text == expected
