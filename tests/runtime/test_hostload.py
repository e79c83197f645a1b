"""HostLoad (codeshell/bench.py): CPU used outside this process tree during a window.

Each test burns a fixed amount of CPU time (not wall time) in a process that is or is not ours,
so the checks hold however loaded the machine is."""

import os
import subprocess
import sys
import time

import pytest

from codeshell.bench import HostLoad

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc only")

BURN = "import time\nwhile time.process_time() < 0.5: pass\n"


def test_own_child_is_not_other_load():
    t0 = HostLoad._tree()
    with HostLoad() as h:
        subprocess.run([sys.executable, "-c", BURN], check=True)
    own = (HostLoad._tree() - t0) / os.sysconf("SC_CLK_TCK")
    assert own >= 0.45                       # the child's CPU counted as this tree's
    assert h.other is not None and h.steal is not None and h.wall > 0
    assert "other processes" in str(h)


def test_orphan_process_is_other_load(tmp_path):
    done = tmp_path / "done"
    # `sh` exits at once, so the burner is reparented away from this process: not ours.
    code = BURN + f"open({str(done)!r}, 'w').close()\n"
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" >/dev/null 2>&1 &', code], check=True)
    with HostLoad() as h:
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert done.exists()
    assert h.other * h.wall >= 0.4           # its 0.5 s of CPU seen as the others'


def test_wait_quiet_returns_after_one_window_when_the_limit_is_loose():
    from codeshell.bench import wait_quiet
    t0 = time.monotonic()
    waited, other = wait_quiet(max_cores=1e9, window_s=0.05, timeout_s=10.0)
    assert other is not None and other >= 0.0
    assert 0.04 <= waited < 5.0 and time.monotonic() - t0 < 5.0   # one window, not the timeout


def test_wait_quiet_gives_up_at_its_timeout():
    from codeshell.bench import wait_quiet
    # a limit no window can meet (other cores are >= 0): it waits windows until the timeout
    waited, other = wait_quiet(max_cores=-1.0, window_s=0.05, timeout_s=0.2)
    assert 0.2 <= waited < 5.0
    assert other is not None
