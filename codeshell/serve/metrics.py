"""Prometheus metrics of the server (one registry per app, so tests can run several).

Requests by endpoint and status, tokens in and out, queue depth and running batch size
(read live from the engine), time to first token and per-token latency histograms,
prefix-cache hits, and aborted requests by reason (client disconnect, superseded IDE
completion, shutdown). Rendering only; the service decides what to count.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the route)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "codeshell"
        self.requests = Counter(f"{p}_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge(f"{p}_running_sequences", "Sequences in the running batch", registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TOKEN, registry=r)
        self.e2e = Histogram(f"{p}_request_duration_seconds", "Whole generation time", buckets=_LATENCY,
                             registry=r)
        self.prefix_hits = Counter(f"{p}_prefix_cache_hits", "Requests that reused cached prompt KV", registry=r)
        self.prefix_queries = Counter(f"{p}_prefix_cache_queries", "Requests looked up in the prefix cache",
                                      registry=r)
        self.prefix_hit_tokens = Counter(f"{p}_prefix_cache_hit_tokens", "Prompt tokens served from the cache",
                                         registry=r)
        self.aborted = Counter(f"{p}_aborted_requests", "Generations stopped early, by reason", ["reason"],
                               registry=r)
        self.superseded = Counter(f"{p}_superseded_requests",
                                  "IDE completions finished early because a newer one came from the same client",
                                  registry=r)
        self.rejected = Counter(f"{p}_rejected_requests", "Requests refused before any work, by reason",
                                ["reason"], registry=r)
        self.step_seconds = Gauge(f"{p}_engine_step_seconds", "Wall seconds the engine thread spent in steps",
                                  registry=r)
        self.steps = Gauge(f"{p}_engine_steps", "Engine steps run", registry=r)

    def bind_engine(self, waiting: Callable[[], int], running: Callable[[], int],
                    step_seconds: Callable[[], float] | None = None, steps: Callable[[], int] | None = None) -> None:
        self.queue_depth.set_function(waiting)
        self.running.set_function(running)
        if step_seconds is not None:
            self.step_seconds.set_function(step_seconds)
        if steps is not None:
            self.steps.set_function(steps)

    def render(self) -> bytes:
        return generate_latest(self.registry)
