"""benchmarks/bench_serve.py's per-thread CPU reading of our server (`thread_cpu`, `cpu_split`):
every thread of a process is listed, and a thread that burned CPU between two readings is named
with its seconds (the process's first thread as `main`). No timings are asserted beyond > 0."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
bench_serve = pytest.importorskip("bench_serve")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux only")


def test_thread_cpu_and_split():
    pid = os.getpid()
    before = bench_serve.thread_cpu(pid)
    assert pid in before and all(cpu >= 0 and nv >= 0 for _, cpu, nv in before.values())

    def burn():
        end = time.thread_time() + 0.1
        while time.thread_time() < end:
            pass
    t = threading.Thread(target=burn, name="burner")
    t.start()
    t.join()
    burn()  # on the main thread too
    after = bench_serve.thread_cpu(pid)
    line = bench_serve.cpu_split(pid, before, after)
    assert "main:" in line
