"""A real `python -m codeshell.serve` process per test session, on the golden rope-gqa weights
with the real tokenizer copied beside them, plus the in-process `LLM` that its greedy output
must equal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import require_shared

httpx = pytest.importorskip("httpx")

from tests.serve._server import start_server


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    golden = require_shared("golden/rope-gqa")
    tok = require_shared("codeshell-tokenizer")
    d = tmp_path_factory.mktemp("rope-gqa")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(golden / f, d / f)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok / f, d / f)
    return d


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    s = start_server(model_dir, log, "--max-batch", "16", "--max-queue", "64")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def llm(model_dir):
    from codeshell import LLM
    return LLM(model_dir, max_batch=4, threads=1)


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


MODEL = "model"  # the fixture folder's name is not fixed; tests read it from /v1/models


@pytest.fixture(scope="session")
def model_name(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
