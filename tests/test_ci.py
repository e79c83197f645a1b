""".ci/setup-toolchains.sh: a required install script that fails (or is missing) fails the CI
run; an optional one that fails only warns. Run on stand-in scripts in a temporary folder."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO

SCRIPT = REPO / ".ci" / "setup-toolchains.sh"


def _required() -> list[str]:
    m = re.search(r"^REQUIRED=\(([^)]*)\)", SCRIPT.read_text(), re.M)
    return m.group(1).split()


def _run(folder, scripts: dict[str, int]):
    for name, rc in scripts.items():
        (folder / name).write_text(f"echo ran {name}\nexit {rc}\n")
    return subprocess.run(["bash", str(SCRIPT), str(folder)], capture_output=True, text=True, timeout=60)


def test_required_scripts_are_the_ones_ci_relies_on():
    req = _required()
    # install-eval.sh fails only for bubblewrap (the sandbox); it warns itself about MultiPL-E's toolchains
    assert {"install-kernels.sh", "install-serve.sh", "install-eval.sh", "install-llamacpp.sh"} <= set(req)
    for name in req:
        assert (REPO / ".ci" / name).exists(), f".ci/run requires {name}, which is not in .ci/"


def test_optional_failure_warns_required_failure_fails(tmp_path):
    ok = {name: 0 for name in _required()}
    r = _run(tmp_path, {**ok, "install-julia.sh": 1})
    assert r.returncode == 0, r.stderr
    assert "warning: install-julia.sh failed" in r.stderr and "ran install-kernels.sh" in r.stdout
    r = _run(tmp_path, {**ok, "install-julia.sh": 0, "install-serve.sh": 1})
    assert r.returncode == 1
    assert "error: required install scripts failed: install-serve.sh" in r.stderr
    (tmp_path / "install-serve.sh").unlink()
    r = _run(tmp_path, {})
    assert r.returncode == 1 and "install-serve.sh (missing)" in r.stderr
