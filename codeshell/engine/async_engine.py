"""`AsyncEngine`: the engine driven by a background thread, its outputs fanned out to asyncio.

One daemon thread runs `engine.step()` while there is work and sleeps on an event when there
is none; each `RequestOutput` goes to the asyncio queue of its request through
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

from .engine import Engine
from .outputs import RequestOutput
from .sampling import SamplingParams

log = logging.getLogger("codeshell.engine")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or a step failed): the request cannot finish."""


HANDOFFS = ("overlap", "wait")


def handoff_mode() -> str:
    """CODESHELL_SERVE_HANDOFF: what the engine thread does after handing a step's outputs to the
    event loop. `overlap`: it starts the next step at once, so the event loop's work on the
    outputs (each request's detokenizing, SSE framing, socket write) runs beside that step on the
    same cores. `wait`: it first waits until the loop has taken one turn over them (at most
    `AsyncEngine.handoff_timeout`), so the step that follows has the cores to itself."""
    v = os.environ.get("CODESHELL_SERVE_HANDOFF", "overlap")
    if v not in HANDOFFS:
        raise ValueError(f"CODESHELL_SERVE_HANDOFF={v!r}: expected one of {', '.join(HANDOFFS)}")
    return v


class AsyncEngine:
    # With handoff `wait`: the longest the engine thread waits for the loop to take a step's
    # outputs (a loop busy elsewhere, a parsing a large request body, must not stall decoding).
    handoff_timeout = 0.05

    def __init__(self, engine: Engine, handoff: str | None = None):
        self.engine = engine
        self.handoff = handoff or handoff_mode()
        if self.handoff not in HANDOFFS:
            raise ValueError(f"handoff={self.handoff!r}: expected one of {', '.join(HANDOFFS)}")
        self._taken = threading.Event()  # handoff `wait`: the loop has had its turn at the outputs
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

    def _deliver_all(self, outs: list[RequestOutput], taken: threading.Event | None = None) -> None:
        for out in outs:
            self._deliver(out.request_id, out)
        if taken is not None:
            # Set after the callbacks the deliveries scheduled (each woken request's task runs its
            # turn: detokenize, frame, write to the socket), which call_soon queued ahead of this.
            self._loop.call_soon(taken.set)

    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            if not eng.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
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
            if outs:  # one wake-up of the event loop per step, not one per request (a syscall each)
                if self.handoff == "wait":
                    self._taken.clear()
                    self._loop.call_soon_threadsafe(self._deliver_all, outs, self._taken)
                    self._taken.wait(self.handoff_timeout)
                else:
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
