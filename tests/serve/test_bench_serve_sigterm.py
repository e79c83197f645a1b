"""bench_serve.py under `timeout`: a SIGTERM must run the `finally` blocks that stop the
servers it started (a killed run left llama-server running on the shared machine)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_sigterm_runs_finally(tmp_path):
    marker = tmp_path / "stopped"
    code = (
        "import sys, time; sys.path.insert(0, 'benchmarks'); import bench_serve as b\n"
        "b.stop_on_sigterm()\n"
        "try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
        f"finally:\n    open({str(marker)!r}, 'w').write('x')\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
    assert marker.read_text() == "x"
