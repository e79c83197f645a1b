"""A real `python -m codeshell.serve` process per test session, on the golden rope-gqa weights
with the real tokenizer copied beside them, plus the in-process `LLM` that its greedy output
must equal."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, require_shared

httpx = pytest.importorskip("httpx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def metric(self, name: str, labels: str = "", headers: dict | None = None) -> float:
        """The value of one sample of /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics", headers=headers or {}).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(model_dir: Path, log: Path, *args: str, wait_key: str | None = None) -> Server:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "codeshell.serve", "--model", str(model_dir), "--port", str(port),
           "--threads", "1", *args]
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not become ready:\n{log.read_text()}")


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
