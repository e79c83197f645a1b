"""`AsyncEngine`: the engine driven by a background thread, its outputs fanned out to asyncio.

One daemon thread runs `engine.step()` while there is work and sleeps on an event when there
is none. Woken from idle, it first gathers the requests arriving together (`gather`: until no new
one came for a few milliseconds, at most CODESHELL_ADMIT_GATHER_MS), so that concurrent clients'
prompts share one prefill instead of the first one's prefill running alone while the others
queue behind it. Each `RequestOutput` goes to the asyncio queue of its request through
`loop.call_soon_threadsafe`. `generate()` is an async iterator over one request's outputs:
leaving it early (a client that disconnects, a cancelled task) aborts the request, so its
sequence stops using compute at the next step. This module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator

import torch

from .engine import Engine
from .outputs import RequestOutput
from .sampling import SamplingParams

log = logging.getLogger("codeshell.engine")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or a step failed): the request cannot finish."""


# Woken from idle, wait for more requests until none came for GATHER_QUIET_S (at most the
# gather window). Measured arrivals (bench_serve's streaming clients, a fresh thread pool each
# round, on the 2-core Xeon): 0.5-6 ms apart, 23 ms between the first two of a process's first
# round; one step of a 1.7B prefill takes seconds. A lone request pays GATHER_QUIET_S once.
GATHER_QUIET_S = 0.015


def gather_window(environ=os.environ) -> float:
    """CODESHELL_ADMIT_GATHER_MS (default 50): the most milliseconds an idle engine waits for
    requests arriving together before its first step; 0 restores the immediate start (the
    behaviour before session 24). Measured (docs/kernels-log.md, session 24 helper D): 4 streaming
    clients on the 1.7B bf16 model, the first request's 90-token prefill ran alone (3.2 s on
    the Ice Lake-class Xeon) and the other three after it, time to first token p50 7.4 s against
    4.8 s when the four shared one forward."""
    v = environ.get("CODESHELL_ADMIT_GATHER_MS", "50").strip()
    try:
        ms = float(v)
    except ValueError:
        raise ValueError(f"CODESHELL_ADMIT_GATHER_MS={v!r}: expected milliseconds (0: off)") from None
    if not 0 <= ms <= 1000:
        raise ValueError(f"CODESHELL_ADMIT_GATHER_MS={v!r}: expected 0..1000 milliseconds")
    return ms / 1000


class AsyncEngine:
    def __init__(self, engine: Engine, gather_s: float | None = None):
        self.engine = engine
        # the idle engine's wait for requests arriving together (seconds; 0: step at once)
        self.gather_s = gather_window() if gather_s is None else gather_s
        self._adds = 0  # requests added so far (the gather wait watches it move)
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # Wall seconds inside `engine.step()` and the steps run: against a request's wall time
        # they split the server's cost into the steps themselves and what lies between them.
        self.step_seconds = 0.0
        self.steps = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="codeshell-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything still queued or running, stop the loop thread and wait for it."""
        for rid in list(self._queues):
            self.engine.abort(rid)
        self._wake.set()
        deadline = timeout
        # Let the loop apply the aborts (so clients get their final outputs) before stopping.
        if self._thread is not None:
            for _ in range(20):
                if not self.engine.has_unfinished():
                    break
                self._thread.join(timeout=0.05)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=deadline)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    # ---- requests ----------------------------------------------------------------------------
    def num_waiting(self) -> int:
        return len(self.engine.waiting)

    def num_running(self) -> int:
        return self.engine.num_running()

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
            prompt: str | None = None) -> asyncio.Queue:
        """Queue a request; its outputs arrive on the returned queue (an exception ends it)."""
        if not self.running:
            raise EngineDeadError("the engine is not running")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        try:
            self.engine.add_request(request_id, prompt_ids, params, prompt=prompt)
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        self._adds += 1
        self._wake.set()
        return q

    def discard(self, request_id: str) -> None:
        """Abort a request whose outputs will never be read."""
        self.abort(request_id)
        self._queues.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        if request_id in self._queues:
            self.engine.abort(request_id)
            self._wake.set()

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request now (errors raise here, before any output) and return the async
        iterator of its outputs; closing the iterator early aborts the request."""
        q = self.add(request_id, prompt_ids, params, prompt)
        return self._follow(request_id, q)

    async def _follow(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise EngineDeadError(f"the engine stopped: {out}") from out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)
            self._queues.pop(request_id, None)

    # ---- the loop thread ---------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait(item)

    def _deliver_all(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            self._deliver(out.request_id, out)

    def _run(self) -> None:
        # One inference_mode around the loop (thread-local, so this thread's only), not one a
        # step: a lean engine then skips its own enter / exit (`Engine.step`).
        with torch.inference_mode():
            self._loop_steps()

    def _gather(self) -> None:
        """Before the first step after idle: wait while requests keep arriving (each within
        GATHER_QUIET_S of the last), at most `gather_s`, or until they fill the free slots."""
        eng, end = self.engine, time.perf_counter() + self.gather_s
        seen = self._adds
        while not self._stop.is_set() and len(eng.waiting) < len(eng.free_slots):
            left = end - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            self._wake.wait(min(GATHER_QUIET_S, left))
            if self._adds == seen:  # quiet: nobody else is coming now
                return
            seen = self._adds

    def _loop_steps(self) -> None:
        eng = self.engine
        idle = True
        while not self._stop.is_set():
            if not eng.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                idle = True
                continue
            if idle and self.gather_s > 0 and not eng.running and eng.waiting:
                self._gather()
            idle = False
            t0 = time.perf_counter()
            try:
                outs = eng.step()
            except BaseException as e:  # a failed step must not leave clients waiting forever
                log.exception("engine step failed; failing the requests in flight")
                self.error = e
                self._fail_all(e)
                continue
            self.step_seconds += time.perf_counter() - t0
            self.steps += 1
            # One wake-up of the event loop per step, not one per request (a syscall each); the
            # next step starts at once, beside the loop's work on these outputs (~1% of a core at
            # one client; making the step wait for the loop's turn measured no gain, session 20).
            if outs:
                self._loop.call_soon_threadsafe(self._deliver_all, outs)
        self._fail_all(EngineDeadError("the server is shutting down"))

    def _fail_all(self, err: BaseException) -> None:
        eng = self.engine
        with eng._lock:
            eng.waiting.clear()
        # Release every running request's slots so the engine is usable again.
        for req in list(eng.running.values()):
            for s in req.seqs:
                if not s.finished:
                    s.finish("abort")
            eng._release(req)
        eng._aborts.clear()
        for rid in list(self._queues):
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._deliver, rid, err)
