"""Executors run a list of independent shard tasks: locally in worker processes (default) or
on a Ray cluster as Ray tasks. Both call the same `codeshell.data.tasks.run_task`, so a
pipeline's output does not depend on the executor. Executors do not order or retry tasks
beyond what the pipeline asks; a failed task raises in the driver.

Nothing an executor starts outlives the driver: local workers ask the kernel to kill them
when the driver dies (Linux `PR_SET_PDEATHSIG`; elsewhere a thread watching the parent pid),
so even a SIGKILLed driver leaves none behind, and with them goes multiprocessing's resource
tracker (it exits when the last holder of its pipe does). On SIGTERM/SIGHUP the driver
itself stops its workers, or shuts down the Ray instance it started (`stop_on_signals`); a
watcher process (`codeshell.data.raywatch`) kills that instance if the driver dies unseen.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from codeshell.data.io import PipelineError
from codeshell.data.tasks import run_task

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: exit when the driver `parent_pid` does, however it dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # the driver died before prctl took effect
                os._exit(1)
            return

    def watch() -> None:  # other systems: poll the parent (reparenting changes getppid)
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="codeshell-parent-watch", daemon=True).start()


class Interrupted(SystemExit):
    """Raised in the driver's main thread by SIGTERM/SIGHUP so that cleanup runs; exits with
    128 + the signal number, as a process killed by it would."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into `Interrupted` in the main thread for the duration (only
    where they would otherwise kill the process outright); later ones are ignored while the
    cleanup runs. Elsewhere (another thread, handlers of the application) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None))
            if s is not None and signal.getsignal(s) == signal.SIG_DFL]
    old = {s: signal.getsignal(s) for s in sigs}

    def handler(signum, frame):
        for s in sigs:
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        raise Interrupted(128 + signum)

    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Executor:
    name = "base"

    def map(self, tasks: list[dict], on_done: Callable[[dict, dict], None]) -> None:
        raise NotImplementedError

    def close(self, abort: bool = False) -> None:
        """Release workers; `abort`: the run failed or was interrupted, do not wait for tasks."""


class LocalExecutor(Executor):
    """`workers` processes (spawned, not forked: tokenizers' and BLAS's threads do not survive
    fork); `workers <= 1` runs tasks in this process, which is simplest to debug."""

    name = "local"

    def __init__(self, workers: int = 2):
        self.workers = max(1, int(workers))
        self._pool: ProcessPoolExecutor | None = None

    def map(self, tasks, on_done):
        if self.workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                on_done(t, run_task(t))
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_die_with_parent, initargs=(os.getpid(),))
        futs = {self._pool.submit(run_task, t): t for t in tasks}
        pending = set(futs)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    on_done(futs[f], f.result())
        except BaseException:
            for f in pending:
                f.cancel()
            raise

    def close(self, abort: bool = False):
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if not abort:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        # Interrupted or failed: running tasks are not waited for (their partial output is in
        # .tmp, deleted by the next run). The pool has no public way to stop its processes.
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.kill()
        for p in procs:
            p.join(10)


class RayExecutor(Executor):
    """One Ray task per shard. Connects to `address` (or RAY_ADDRESS); without either it starts
    a local single-node Ray instance with `workers` CPUs (Ray 2.x removed `local_mode`). The
    output folder must be on storage every node sees."""

    name = "ray"

    def __init__(self, workers: int = 2, address: str | None = None):
        try:
            import ray
        except ImportError as e:
            raise PipelineError("--executor ray needs `pip install ray` (or the codeshell[data] extra)") from e
        self.ray = ray
        self._started = False
        self._watch: subprocess.Popen | None = None
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=max(1, int(workers)), object_store_memory=256 * 1024**2, **kw)
                self._watch = _start_ray_watch()
            self._started = True
        self._remote = ray.remote(run_task)

    def map(self, tasks, on_done):
        refs = {self._remote.remote(t): t for t in tasks}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for r in done:
                on_done(refs[r], self.ray.get(r))

    def close(self, abort: bool = False):
        # An instance this run started goes with it (its dashboard and runtime-env agents
        # ignore SIGTERM and outlived killed drivers); a cluster we only joined stays up.
        if self._started:
            try:
                self.ray.shutdown()
            finally:
                self._started = False
                if self._watch is not None:  # it reaps what shutdown left (nothing, normally) and exits
                    self._watch.stdin.close()
                    try:
                        self._watch.wait(20)
                    except subprocess.TimeoutExpired:
                        self._watch.kill()
                    self._watch = None


def _start_ray_watch() -> subprocess.Popen:
    """The process that kills our local Ray instance if this driver dies without `close()`
    (SIGKILL, OOM): see `codeshell.data.raywatch`."""
    return subprocess.Popen([sys.executable, "-m", "codeshell.data.raywatch", str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def make_executor(name: str, workers: int, address: str | None = None) -> Executor:
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(workers, address)
    raise PipelineError(f"unknown executor '{name}' (use 'local' or 'ray')")
