"""Nothing a run starts outlives its driver: killing a local run (SIGKILL or SIGTERM) takes
its worker processes and multiprocessing's resource tracker with it; SIGTERM lets the driver
clean up and exit with 128 + 15; a Ray run shuts down the Ray instance it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from codeshell.data import executors

REPO = Path(__file__).resolve().parents[2]

SLOW_STAGE = '''
import dataclasses, os, time
from pathlib import Path
from codeshell.data.stages.base import Stage

class Slow(Stage):
    """Marks that a worker is busy, then sleeps (a stand-in for a long stage)."""
    name = "slow"

    @dataclasses.dataclass
    class Options:
        marks: str = ""
        seconds: float = 120.0

    def process(self, doc, stats):
        Path(self.opts.marks, f"busy-{os.getpid()}").touch()
        time.sleep(self.opts.seconds)
        return doc
'''

DRIVER = '''
import sys
from codeshell.data import run_pipeline
src, out, marks, executor = sys.argv[1:5]
run_pipeline({{"workers": 2, "stages": [
    {{"ingest": {{"sources": [{{"type": "folder", "path": src}}], "shard_bytes": 10}}}},
    {{"slowstage:Slow": {{"marks": marks}}}}]}}, out, executor=executor, quiet=True, report=False)
'''


def _start_run(tmp_path: Path, executor: str = "local") -> tuple[subprocess.Popen, Path]:
    src, marks = tmp_path / "src", tmp_path / "marks"
    src.mkdir()
    marks.mkdir()
    for i in range(4):  # one shard each (shard_bytes 10): both workers get one
        (src / f"f{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "slowstage.py").write_text(SLOW_STAGE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DRIVER.format()), str(src), str(tmp_path / "out"),
                             str(marks), executor], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, marks


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_a_local_run_leaves_no_process(tmp_path, sig):
    proc, marks = _start_run(tmp_path)
    kids: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        while len(list(marks.iterdir())) < 2:  # both workers inside the slow stage
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.1)
        kids = psutil.Process(proc.pid).children(recursive=True)
        names = [" ".join(k.cmdline()) for k in kids]
        assert len(kids) >= 3 and any("resource_tracker" in n for n in names), names  # 2 workers + tracker
        proc.send_signal(sig)
        code = proc.wait(30)
        gone, alive = psutil.wait_procs(kids, timeout=20)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM), code
    finally:
        if proc.poll() is None:
            proc.kill()
        for k in kids:  # never leave a stray behind a failed test (they were reparented away from us)
            try:
                k.kill()
            except psutil.Error:
                pass


def test_stop_on_signals_turns_sigterm_into_cleanup():
    cleaned = []
    with pytest.raises(executors.Interrupted) as e:
        with executors.stop_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
            finally:
                cleaned.append(signal.getsignal(signal.SIGTERM))
    assert e.value.code == 128 + signal.SIGTERM
    assert cleaned == [signal.SIG_IGN]  # a second SIGTERM cannot cut the cleanup short
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored afterwards


def test_a_run_that_fails_stops_its_ray_instance(monkeypatch):
    """The handler logic without starting Ray: close() shuts down only an instance we started."""
    calls = []

    class FakeRay:
        def is_initialized(self):
            return False

        def init(self, **kw):
            calls.append(("init", kw.get("address")))

        def remote(self, f):
            return f

        def shutdown(self):
            calls.append(("shutdown", None))

    monkeypatch.setitem(sys.modules, "ray", FakeRay())
    ex = executors.RayExecutor(workers=1)
    ex.close(abort=True)
    ex.close()
    assert calls == [("init", None), ("shutdown", None)]
    calls.clear()
    joined = FakeRay()
    joined.is_initialized = lambda: True  # a cluster the caller already connected to: not ours to stop
    monkeypatch.setitem(sys.modules, "ray", joined)
    executors.RayExecutor(workers=1).close(abort=True)
    assert calls == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGKILL", "SIGTERM"])
def test_killing_a_ray_run_takes_its_ray_instance_down(tmp_path, sig):
    """Ray's DashboardAgent and RuntimeEnvAgent ignore SIGTERM and outlived a killed driver."""
    pytest.importorskip("ray")
    proc, marks = _start_run(tmp_path, executor="ray")
    kids: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not list(marks.iterdir()):  # a Ray worker is inside the slow stage
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no Ray task started"
            time.sleep(0.2)
        time.sleep(1.5)  # the watcher refreshes its list of Ray processes every second
        kids = psutil.Process(proc.pid).children(recursive=True)
        names = [k.name() for k in kids]
        assert {"raylet", "gcs_server"} <= set(names) and any(n.startswith("ray::Dashboard") for n in names), names
        proc.send_signal(sig)
        code = proc.wait(60)
        gone, alive = psutil.wait_procs(kids, timeout=30)
        assert not alive, [p.name() for p in alive]  # DashboardAgent, RuntimeEnvAgent, the watcher, ...
        assert code != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass
