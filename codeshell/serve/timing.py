"""Client-side timing of one streamed `/v1/completions` request against a running server:
time to the first token, completion tokens (from the stream's usage chunk) and total time.
Used by `codeshell mini measure` and `benchmarks/bench_serve.py`; not a client library.
"""

from __future__ import annotations

import json
import time


def time_streamed_completion(client, url: str, body: dict,
                             headers: dict | None = None) -> tuple[float | None, int | None, float]:
    """(seconds to the first token or None, completion tokens or None, total seconds) of one
    streamed completion POSTed with the httpx `client` to `url`/v1/completions."""
    t0 = time.perf_counter()
    ttft = usage = None
    with client.stream("POST", url + "/v1/completions", headers=headers,
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            j = json.loads(line[6:])
            if j.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if j.get("usage"):
                usage = j["usage"]
    return ttft, (int(usage["completion_tokens"]) if usage else None), time.perf_counter() - t0
