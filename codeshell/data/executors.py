"""Executors run a list of independent shard tasks: locally in worker processes (default) or
on a Ray cluster as Ray tasks. Both call the same `codeshell.data.tasks.run_task`, so a
pipeline's output does not depend on the executor. Executors do not order or retry tasks
beyond what the pipeline asks; a failed task raises in the driver.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from codeshell.data.io import PipelineError
from codeshell.data.tasks import run_task


class Executor:
    name = "base"

    def map(self, tasks: list[dict], on_done: Callable[[dict, dict], None]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


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
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
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

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


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
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=max(1, int(workers)), object_store_memory=256 * 1024**2, **kw)
            self._started = True
        self._remote = ray.remote(run_task)

    def map(self, tasks, on_done):
        refs = {self._remote.remote(t): t for t in tasks}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for r in done:
                on_done(refs[r], self.ray.get(r))

    def close(self):
        if self._started:
            self.ray.shutdown()
            self._started = False


def make_executor(name: str, workers: int, address: str | None = None) -> Executor:
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(workers, address)
    raise PipelineError(f"unknown executor '{name}' (use 'local' or 'ray')")
