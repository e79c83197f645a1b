"""The completion service: the one object every API family calls to generate.

It owns the loaded `LLM` and the `AsyncEngine`, and is the single place that decides
- whether a request may start (model loaded, waiting queue not full: else 503 + Retry-After),
- the context budget (OpenAI endpoints: a too-long prompt is a 400 with the token counts;
  IDE endpoints: left-truncation, FIM keeping the end of the prefix and the start of the suffix),
- superseding: a new FIM request from a client finishes that client's older FIM request,
- what is counted in the metrics and the one log line per request.
It builds prompts only through `codeshell.prompts`. It does not know HTTP bodies or framing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.async_engine import AsyncEngine, EngineDeadError
from ..engine.engine import RequestError
from ..engine.outputs import RequestOutput
from ..engine.sampling import SamplingError, SamplingParams
from ..prompts import FIM
from .errors import ApiError, busy
from .metrics import Metrics

log = logging.getLogger("codeshell.serve")


@dataclass
class ServeSettings:
    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str | None = None
    tokenizer: str | None = None
    api_keys: list[str] = field(default_factory=list)
    max_batch: int = 8
    max_queue: int = 64
    max_model_len: int | None = None
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    served_model_name: str | None = None
    prefix_caching: bool = True
    prompt_lookup: int = 0  # engine default of SamplingParams.prompt_lookup_num_tokens
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 8
    shutdown_timeout: float = 10.0
    threads: int | None = None
    warmup: bool = True  # one short request through the engine before /health says ready

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name or self.model


@dataclass
class GenRequest:
    ids: list[int]
    params: SamplingParams
    endpoint: str
    prompt: str | None = None
    client: str | None = None  # client address, for superseding FIM requests
    fim: bool = False
    truncated: bool = False


class CompletionService:
    def __init__(self, settings: ServeSettings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.state = "loading"
        self.load_error: str | None = None
        self.llm = None
        self.aengine: AsyncEngine | None = None
        self.started = time.time()
        self._fim_by_client: dict[str, str] = {}
        self._superseded: set[str] = set()
        self._ids = itertools.count()
        self._draining = False

    # ---- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        """Load the model (blocking; run in a thread so /health can answer `loading`)."""
        from ..llm import LLM
        s = self.settings
        done = threading.Event()
        t0 = time.monotonic()

        def progress() -> None:  # a large checkpoint takes minutes: say that it is moving
            import psutil
            proc = psutil.Process()
            while not done.wait(5.0):
                log.info("still loading %s: %.0fs, %.1f GiB in memory", s.model_name, time.monotonic() - t0,
                         proc.memory_info().rss / 2**30)

        threading.Thread(target=progress, name="codeshell-load-progress", daemon=True).start()
        try:
            llm = LLM(s.model, dtype=s.dtype, device=s.device, tokenizer=s.tokenizer, max_batch=s.max_batch,
                      quantization=s.quantization,
                      max_model_len=s.max_model_len, threads=s.threads)
            if llm.tokenizer is None:
                raise RuntimeError(f"{s.model} has no tokenizer.json: the server needs one (pass --tokenizer)")
            llm.engine.prefix_caching = s.prefix_caching
            llm.engine.prompt_lookup = s.prompt_lookup
            log.info("model %s loaded in %.1fs (context %d tokens, max batch %d)", s.model_name,
                     time.monotonic() - t0, llm.max_model_len, s.max_batch)
            if s.warmup:
                t1 = time.monotonic()
                warm_up(llm.engine)
                log.info("warm-up request: %.2fs", time.monotonic() - t1)
            # the prefill grouping's cost table, before any client waits on it (engine/prefill_plan.py)
            t1 = time.monotonic()
            cost = llm.engine.measure_prefill_cost()
            if cost is not None:
                far = "" if cost.knee is None else \
                    f"; past {cost.knee} rows {cost.far_fixed_s * 1e3:.2f} ms + {cost.far_row_s * 1e3:.3f} ms a row"
                log.info("prefill cost: %.2f ms a forward + %.3f ms a row%s (measured in %.2fs)",
                         cost.fixed_s * 1e3, cost.row_s * 1e3, far, time.monotonic() - t1)
            self.llm = llm
        except Exception as e:  # the server stays up and says why in /health
            log.exception("loading %s failed", s.model)
            self.load_error = f"{type(e).__name__}: {e}"
            self.state = "failed"
        finally:
            done.set()

    async def start(self, load_in_thread: bool = True) -> None:
        loop = asyncio.get_running_loop()

        def _load_and_start() -> None:
            self.load()
            if self.llm is not None:
                loop.call_soon_threadsafe(self._ready)

        if load_in_thread:
            threading.Thread(target=_load_and_start, name="codeshell-load", daemon=True).start()
        else:
            self.load()
            if self.llm is not None:
                self._ready()

    def _ready(self) -> None:
        # The loaded model and tokenizer are millions of long-lived objects: keep the cyclic GC
        # from walking them again and again (its full passes and the final one at exit, which
        # took seconds on a busy machine, made an idle server slow to stop).
        gc.collect()
        gc.freeze()
        self.aengine = AsyncEngine(self.llm.engine)
        self.aengine.start()
        ae = self.aengine
        self.metrics.bind_engine(ae.num_waiting, ae.num_running, lambda: ae.step_seconds, lambda: ae.steps)
        self.state = "ready"

    def in_flight(self) -> int:
        """Generations queued or running in the engine."""
        if self.aengine is None:
            return 0
        return self.aengine.num_waiting() + self.aengine.num_running()

    async def shutdown(self) -> None:
        """Stop the engine: at once and quietly when idle; else abort what is left (the grace
        period for in-flight requests is over by the time this runs)."""
        self._draining = True
        if self.aengine is None:
            return
        left = self.in_flight()
        if left:
            log.info("shutting down: aborting %d request%s still in flight", left, "" if left == 1 else "s")
            await asyncio.to_thread(self.aengine.shutdown, self.settings.shutdown_timeout)
        else:
            self.aengine.shutdown(0.5)  # nothing to abort: the loop thread only has to stop

    # ---- tokens and budgets ------------------------------------------------------------------
    def ready(self) -> None:
        if self._draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.state == "loading":
            raise ApiError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "2"})
        if self.state == "failed":
            raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.llm.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, tid: int) -> str:
        return self.llm.tokenizer.decode([tid])

    def check_ids(self, ids: list[int], param: str = "prompt") -> None:
        vocab = self.llm.config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ApiError(400, f"{param}: token id {t!r} is outside the vocabulary (0..{vocab - 1})",
                               param=param)

    def fit_strict(self, ids: list[int], max_tokens: int | None, param: str = "prompt") -> int | None:
        """OpenAI rule: a prompt that does not fit is an error; returns max_tokens clamped to the room left."""
        if not ids:
            raise ApiError(400, f"{param}: the prompt is empty", param=param)
        window = self.max_model_len
        if len(ids) >= window:
            raise ApiError(400, f"{param}: the prompt has {len(ids)} tokens, but this model's context window is "
                           f"{window} tokens (the prompt may use at most {window - 1})", param=param,
                           code="context_length_exceeded")
        room = window - len(ids)
        return room if max_tokens is None else min(max_tokens, room)

    def _ide_budget(self, max_tokens: int | None) -> tuple[int, int]:
        """(prompt budget, max new tokens) for IDE requests: keep at least half the window for
        the prompt, the rest for the answer at most."""
        window = self.max_model_len
        want = max_tokens if max_tokens and max_tokens > 0 else window // 2
        reserve = max(1, min(want, window // 2))
        return window - reserve, want

    def fit_ide(self, ids: list[int], max_tokens: int | None) -> tuple[list[int], int, bool]:
        """IDE rule: left-truncate (the plugins cannot show errors). Returns (ids, max_tokens, truncated)."""
        if not ids:
            raise ApiError(400, "the prompt is empty")
        budget, want = self._ide_budget(max_tokens)
        truncated = len(ids) > budget
        ids = ids[-budget:]
        return ids, min(want, self.max_model_len - len(ids)), truncated

    def fim_ids(self, prefix: str, suffix: str, max_tokens: int | None) -> tuple[list[int], int, bool]:
        """`<fim_prefix>P<fim_suffix>S<fim_middle>` as ids, keeping the end of P and the start of S."""
        tok = self.llm.tokenizer
        p_ids, s_ids = self.encode(prefix), self.encode(suffix)
        marks = [tok.token_to_id(FIM.prefix), tok.token_to_id(FIM.suffix), tok.token_to_id(FIM.middle)]
        budget, want = self._ide_budget(max_tokens)
        room = budget - 3
        truncated = len(p_ids) + len(s_ids) > room
        if truncated:  # the suffix gets up to a quarter of the room; the prefix the rest
            keep_s = min(len(s_ids), max(room // 4, room - len(p_ids)))
            s_ids = s_ids[:keep_s]
            p_ids = p_ids[-(room - keep_s):] if room - keep_s > 0 else []
        ids = [marks[0], *p_ids, marks[1], *s_ids, marks[2]]
        return ids, min(want, self.max_model_len - len(ids)), truncated

    def params(self, **kw) -> SamplingParams:
        seed = kw.get("seed")
        # torch seeds a generator with at most 64 bits; one out-of-range seed would fail the whole
        # engine step, and with it every request in flight.
        if seed is not None and not -(2**63) <= seed < 2**63:
            raise ApiError(400, f"seed must be a 64-bit signed integer, got {seed}", param="seed")
        try:
            return SamplingParams(**kw)
        except SamplingError as e:
            raise ApiError(400, str(e), param=str(e).split()[0]) from None

    # ---- generation --------------------------------------------------------------------------
    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"

    def admit(self, extra: int = 0) -> None:
        """Refuse before any work when the waiting queue is full."""
        self.ready()
        waiting = self.aengine.num_waiting() + extra
        if waiting >= self.settings.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise busy(f"the server is busy: {waiting} requests are already waiting "
                       f"(limit {self.settings.max_queue}); retry shortly")

    def run(self, req: GenRequest, request_id: str | None = None,
            check_queue: bool = True) -> AsyncIterator[RequestOutput]:
        """Start one generation now (errors raise here, as `ApiError`, before any output) and
        return the iterator of its outputs; leaving it early aborts the generation."""
        if check_queue:
            self.admit()
        self.ready()
        rid = request_id or self.new_id(req.endpoint.strip("/").replace("/", "-") or "req")
        t0 = time.monotonic()
        try:
            gen = self.aengine.generate(rid, req.ids, req.params, req.prompt)
        except RequestError as e:
            raise ApiError(400, str(e)) from None
        except EngineDeadError as e:
            raise ApiError(503, str(e)) from None
        if req.fim and req.client:
            old = self._fim_by_client.get(req.client)
            if old is not None:
                self._superseded.add(old)
                self.aengine.abort(old)
            self._fim_by_client[req.client] = rid
        self.metrics.prompt_tokens.inc(len(req.ids))
        return Generation(self, req, rid, self._follow(req, rid, gen, t0))

    async def _follow(self, req: GenRequest, rid: str, gen: AsyncIterator[RequestOutput],
                      t0: float) -> AsyncIterator[RequestOutput]:
        m = self.metrics
        ttft = last = None
        ntok = cached = 0
        finish = "error"
        try:
            async with aclosing(gen) as it:
                async for out in it:
                    now = time.monotonic()
                    n = sum(len(o.token_ids) for o in out.outputs)
                    if n > ntok:
                        if ttft is None:
                            ttft = now - t0
                            m.ttft.observe(ttft)
                            m.prefix_queries.inc()
                            cached = out.num_cached_tokens
                            if cached:
                                m.prefix_hits.inc()
                                m.prefix_hit_tokens.inc(cached)
                        elif last is not None:
                            m.tpot.observe((now - last) / (n - ntok))
                        m.generation_tokens.inc(n - ntok)
                        ntok, last = n, now
                    if out.finished:
                        finish = ",".join(sorted({o.finish_reason or "abort" for o in out.outputs}))
                        if rid in self._superseded:
                            finish = "superseded"
                            m.superseded.inc()
                            m.aborted.labels("superseded").inc()
                        elif self._draining and finish == "abort":
                            finish = "shutdown"
                            m.aborted.labels("shutdown").inc()
                    yield out
        except (asyncio.CancelledError, GeneratorExit):
            finish = "disconnect"
            m.aborted.labels("disconnect").inc()
            raise
        except EngineDeadError:
            finish = "shutdown" if self._draining else "engine_error"
            m.aborted.labels(finish).inc()
            raise ApiError(503, "the server stopped this request (shutting down)") from None
        finally:
            self._superseded.discard(rid)
            if req.client and self._fim_by_client.get(req.client) == rid:
                del self._fim_by_client[req.client]
            total = time.monotonic() - t0
            m.e2e.observe(total)
            log.info("request id=%s endpoint=%s prompt_tokens=%d cached_tokens=%d output_tokens=%d "
                     "ttft=%s total=%.3fs finish=%s%s", rid, req.endpoint, len(req.ids), cached, ntok,
                     f"{ttft:.3f}s" if ttft is not None else "-", total, finish,
                     " truncated=1" if req.truncated else "")

    async def collect(self, outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
        """The final output of a started generation (non-streaming)."""
        final = None
        async with aclosing(outputs) as it:
            async for out in it:
                final = out
        return final


def warm_up(engine, prompt_tokens: int = 96, new_tokens: int = 3) -> None:
    """One short sampled request straight through `engine` (before its loop thread starts),
    as llama-server warms up before it listens: the first prefill and decode steps pay one-time
    costs (the native decode step's build, the KV cache's growth to its first 256-position
    block, first touches of scratch buffers and of the sampler's code paths) that the first
    client would otherwise wait for. ~96 prompt tokens: the size of the bench's prompts, so
    the prefill kernels run at a typical M. Its slot keeps the (arbitrary) prompt as a cached
    prefix, which no real prompt shares and the LRU gives up first."""
    vocab = engine.cfg.vocab_size
    n = max(1, min(prompt_tokens, engine.max_model_len - new_tokens - 1))
    ids = [(17 + 7919 * i) % vocab for i in range(n)]
    engine.add_request("warm-up", ids, SamplingParams(temperature=1.0, seed=0, max_tokens=new_tokens,
                                                      ignore_eos=True))
    while engine.has_unfinished():
        engine.step()


class Generation:
    """A started generation: async-iterate its outputs. `aclose()` aborts it even when it was
    never iterated (a response that failed before its body started must not leave a sequence
    running in the engine)."""

    def __init__(self, svc: CompletionService, req: GenRequest, rid: str, it: AsyncIterator[RequestOutput]):
        self.svc, self.req, self.rid, self._it = svc, req, rid, it
        self._started = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> RequestOutput:
        self._started = True
        return await self._it.__anext__()

    async def aclose(self) -> None:
        if not self._started:
            self.svc.aengine.discard(self.rid)
            if self.req.client and self.svc._fim_by_client.get(self.req.client) == self.rid:
                del self.svc._fim_by_client[self.req.client]
        await self._it.aclose()


def with_stops(params: SamplingParams, stops) -> SamplingParams:
    merged = list(dict.fromkeys([*(params.stop or []), *stops]))
    return dataclasses.replace(params, stop=merged)
