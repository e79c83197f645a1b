"""A second server with --api-key, one batch slot and a one-request queue: 401 without the
key, 200 with it; a full queue answers 503 with Retry-After before doing any work; SIGTERM
stops it gracefully with exit code 0."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.serve._server import start_server

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def small(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "small.log"
    s = start_server(model_dir, log, "--max-batch", "1", "--max-queue", "1", "--api-key", KEY,
                     "--api-key", "other-key", "--shutdown-timeout", "3")
    yield s
    s.stop()


def test_api_key(small):
    c = httpx.Client(base_url=small.url, timeout=30)
    assert c.get("/health").status_code == 200  # health needs no key
    r = c.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.post("/infill", json={"input_prefix": "x"}).status_code == 401
    assert c.get("/metrics").status_code == 401
    assert c.get("/v1/models", headers=AUTH).status_code == 200
    assert c.get("/v1/models", headers={"Authorization": "Bearer other-key"}).status_code == 200
    assert c.options("/v1/models", headers={"Origin": "http://codeshell"}).status_code == 200  # preflight
    assert c.get("/").status_code == 200  # the web page itself; it asks for the key


def test_full_queue_gives_503_then_recovers(small):
    name = httpx.get(small.url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
    long = {"model": name, "prompt": "x", "max_tokens": 250, "temperature": 0, "stream": True, "ignore_eos": True}
    stop = threading.Event()

    def hold(started: threading.Event):  # occupy the only batch slot (running) or queue place (waiting)
        with httpx.stream("POST", small.url + "/v1/completions", json=long, headers=AUTH, timeout=60) as r:
            for _ in r.iter_lines():
                started.set()
                if stop.is_set():
                    return

    threads, refused = [], None
    for _attempt in range(3):  # a fast machine may finish the first request before the queue fills: retry
        first = threading.Event()
        threads += [threading.Thread(target=hold, args=(first,)),
                    threading.Thread(target=hold, args=(threading.Event(),))]
        threads[-2].start()
        assert first.wait(30)
        threads[-1].start()
        deadline = time.monotonic() + 5
        while httpx.get(small.url + "/health").json()["queue"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(small.url + "/v1/completions", json={**long, "stream": False}, headers=AUTH, timeout=30)
        r2 = httpx.post(small.url + "/infill", json={"input_prefix": "a"}, headers=AUTH, timeout=30)
        if r.status_code == 503:
            refused = (r, r2)
            break
    stop.set()
    for t in threads:
        t.join(60)
    assert refused is not None, "the queue never filled"
    r, r2 = refused
    assert r.headers["retry-after"].isdigit()
    assert r.json()["error"]["type"] == "server_busy"
    assert r2.status_code == 503
    small.wait_idle()
    r = httpx.post(small.url + "/v1/completions", json={"model": name, "prompt": "ok", "max_tokens": 2},
                   headers=AUTH, timeout=30)
    assert r.status_code == 200


def test_sigterm_is_graceful(small):
    name = httpx.get(small.url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
    body = {"model": name, "prompt": "y", "max_tokens": 250, "temperature": 0, "stream": True, "ignore_eos": True}
    events = []
    with httpx.stream("POST", small.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        it = r.iter_lines()
        events.append(next(ln for ln in it if ln.startswith("data: ")))
        code = small.stop(timeout=30)
        try:
            events += [ln for ln in it if ln.startswith("data: ")]
        except httpx.HTTPError:
            pass  # the stream was cut at the end of the grace period
    assert code == 0, small.log.read_text()
    log = small.log.read_text()
    assert "shutting down" in log.lower()
    json.loads(events[0][6:])
