"""The --api-base backend through the official openai SDK, against a tiny local
OpenAI-compatible HTTP server started by the test (a real `codeshell serve` end-to-end test
comes with the server)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from codeshell.eval.execution import ExecOptions  # noqa: E402
from codeshell.eval.generation import GenerationSettings, OpenAIBackend  # noqa: E402
from codeshell.eval.runner import run_tasks  # noqa: E402
from codeshell.eval.tasks import get_task  # noqa: E402


class _Server:
    def __init__(self, answers: dict[str, str], honour_n: bool = True):
        self.answers, self.honour_n, self.bodies = answers, honour_n, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _send(self, obj, code=200):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    return self._send({"object": "list", "data": [
                        {"id": "tiny", "object": "model", "created": 0, "owned_by": "test"}]})
                self._send({"error": {"message": "not found"}}, 404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append((self.path, body))
                n = body.get("n", 1) if outer.honour_n else 1
                usage = {"completion_tokens": 1, "total_tokens": 1}
                if self.path.endswith("/chat/completions"):
                    q = body["messages"][-1]["content"]
                    text = outer.answers.get("chat", "no code")
                    usage["prompt_tokens"] = len(q.split()) + 4
                    return self._send({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                       "choices": [{"index": i, "finish_reason": "stop", "message": {
                                           "role": "assistant", "content": text}} for i in range(n)],
                                       "usage": usage})
                prompt = body["prompt"]
                usage["prompt_tokens"] = len(prompt.split())
                text = outer.answers.get(prompt, "\n    return None\n")
                self._send({"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                            "choices": [{"index": i, "text": text, "finish_reason": "stop", "logprobs": None}
                                        for i in range(n)], "usage": usage})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("honour_n", [True, False])
def test_completions_through_the_sdk(tmp_path, honour_n):
    task = get_task("humaneval")
    problems = task.problems()[:3]
    answers = {p.prompt: p.as_generated(p.reference) for p in problems[:2]}
    with _Server(answers, honour_n) as srv:
        be = OpenAIBackend(srv.url, api_key="k")
        assert be.model == "tiny"
        s = run_tasks([task], be, GenerationSettings(n_samples=2, max_length=400), tmp_path,
                      ExecOptions(timeout_factor=3), limit=3, show_progress=False)
    assert s[0]["pass@1"] == pytest.approx(2 / 3)
    gen = [b for p, b in srv.bodies if p.endswith("/completions") and b["max_tokens"] > 1]
    assert all(b["stop"] and b["temperature"] == 0.2 and b["top_p"] == 0.95 for b in gen)
    # max_length counts prompt + completion, with the prompt counted by the server
    b0 = next(b for b in gen if b["prompt"] == problems[0].prompt)
    assert b0["max_tokens"] == 400 - len(problems[0].prompt.split())
    # a server that ignores `n` gets asked again for the missing samples
    assert len(gen) == (3 if honour_n else 6)


def test_chat_task_through_the_sdk(tmp_path):
    task = get_task("humaneval-chat")
    p = task.problems()[0]
    reply = f"Here you go:\n```python\n{p.scored_prompt}{p.reference}\n```\nDone."
    with _Server({"chat": reply}) as srv:
        s = run_tasks([task], OpenAIBackend(srv.url, model="tiny"), GenerationSettings(n_samples=1), tmp_path,
                      ExecOptions(timeout_factor=3), limit=1, show_progress=False)
    assert s[0]["pass@1"] == 1.0
    assert any(path.endswith("/chat/completions") for path, _ in srv.bodies)
