"""benchmarks/bench_loaded.py's competing load (`--load N`): its busy-loop processes run at the
benchmark's niceness while the measurement runs and are gone after it, however it ended (the block's
end, an error, SIGINT / SIGTERM, the benchmark killed outright). No timings: only the processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_loaded  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl: Linux only")


def _running(pid: int) -> bool:
    """pid exists and is not a zombie (a killed child not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pids: list[int], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(_running(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("own_group", [True, False])
def test_load_runs_at_our_niceness_and_stops(own_group):
    with bench_loaded.Load(2, own_group) as load:
        pids = load.pids
        assert len(pids) == 2 and all(_running(p) for p in pids)
        assert all(os.getpriority(os.PRIO_PROCESS, p) == os.getpriority(os.PRIO_PROCESS, 0) for p in pids)
        # own_group: a session (so a scheduler autogroup) of its own each, as another application
        assert all((os.getsid(p) == p) if own_group else (os.getsid(p) == os.getsid(0)) for p in pids)
    assert load.pids == []
    assert _gone(pids)


def test_load_zero_starts_nothing():
    with bench_loaded.Load(0) as load:
        assert load.pids == []


def test_load_stops_on_error():
    pids: list[int] = []
    with pytest.raises(RuntimeError):
        with bench_loaded.Load(1) as load:
            pids = load.pids
            raise RuntimeError("a failed measurement")
    assert len(pids) == 1 and _gone(pids)


def _hold(n: int, nice: int = 0):
    """bench_loaded.py --hold-load n in a child (at `nice` more niceness): (the child, its niceness and
    its load processes' pids)."""
    p = subprocess.Popen(["nice", "-n", str(nice), sys.executable, str(BENCH / "bench_loaded.py"), "--hold-load", str(n)],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    assert len(line) == n + 1, line
    return p, int(line[0]), [int(x) for x in line[1:]]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_load_stops_with_the_benchmark(sig):
    p, nice, pids = _hold(2, nice=3)
    try:
        assert all(_running(x) for x in pids)
        assert all(os.getpriority(os.PRIO_PROCESS, x) == nice for x in pids)  # the benchmark's niceness, inherited
        p.send_signal(sig)
        p.wait(timeout=20)
        assert _gone(pids)  # SIGKILL: through PR_SET_PDEATHSIG
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---- the decode team's idle policy (csrc/parallel.h Team::serve: ~1 ms of spin, then sleep) ------

def test_team_helper_wakes_after_its_idle_spin():
    """The helper spins ~1 ms out of a call, then sleeps: every later call finds it (woken from its
    sleep where it slept) and the team's loops give the bits of the call outside a team. Every
    other call is spaced by more than the spin so that the helper really is asleep at the next
    begin(). (Session 20's CODESHELL_TEAM_IDLE_US variants of this test went with the switch.)"""
    import torch

    from codeshell import kernels
    from codeshell.kernels import _ext

    if not kernels.available():
        pytest.skip("native kernels unavailable")
    mod = _ext.get()
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the team needs 2 threads
    try:
        g = torch.Generator().manual_seed(7)
        x, r = torch.randn(8, 1024, generator=g), torch.randn(8, 1024, generator=g)
        w, b = torch.randn(1024, generator=g), torch.randn(1024, generator=g)
        want = mod.fused_add_layer_norm(x, r, w, b, 1e-5)
        for k in range(12):
            out = mod.run_in_team(lambda: mod.fused_add_layer_norm(x, r, w, b, 1e-5))
            assert out is not False, "no thread team (another thread holds it?)"
            got, loops = out
            assert loops >= 1  # the rows went to the team (8 x 1024 values: split)
            assert all(torch.equal(a, c) for a, c in zip(got, want)) if isinstance(got, (list, tuple)) \
                else torch.equal(got, want)
            time.sleep(0.003 if k % 2 else 0)  # past a 2 ms spin every other call; back to back else
    finally:
        torch.set_num_threads(before)
