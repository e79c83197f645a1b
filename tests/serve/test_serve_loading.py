"""Before the model is loaded: /health says `loading` (503) and generation endpoints answer 503
with Retry-After in their own API's error shape. In-process app, no model and no lifespan."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from codeshell.serve.app import build_app  # noqa: E402
from codeshell.serve.service import ServeSettings  # noqa: E402


@pytest.fixture()
def loading_client():
    app = build_app(ServeSettings(model="/nowhere/model"))
    return TestClient(app)  # not entered as a context manager: startup (loading) never finishes


def test_health_says_loading(loading_client):
    r = loading_client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"


def test_generation_waits_for_the_model(loading_client):
    r = loading_client.post("/v1/completions", json={"model": "model", "prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "model_loading"
    r = loading_client.post("/generate", json={"inputs": "x"})
    assert r.status_code == 503 and "loading" in r.json()["error"]
    r = loading_client.post("/infill", json={"input_prefix": "x"})
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]


def test_failed_load_is_reported(tmp_path):
    app = build_app(ServeSettings(model=str(tmp_path)))  # a folder with no config.json
    svc = app.state.service
    svc.load()
    assert svc.state == "failed"
    r = TestClient(app).get("/health")
    assert r.status_code == 503 and r.json()["status"] == "failed" and "config.json" in r.json()["error"]
