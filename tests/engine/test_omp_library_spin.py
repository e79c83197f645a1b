"""`codeshell.LLM`'s OpenMP setting (codeshell/omp.py `library_spin`): importing codeshell.llm
before torch sets GOMP_SPINCOUNT (a short libgomp spin, so a prompt's worker does not spin through
the next decode steps), unless torch is loaded already, the user set OMP_WAIT_POLICY or
GOMP_SPINCOUNT, CODESHELL_OMP_WAIT=keep, or the decode team is not on; the CLI's passive policy
(`wait_policy`) comes first and wins."""

from __future__ import annotations

import subprocess
import sys

import pytest

from codeshell.omp import LIBRARY_SPINS, library_spin, wait_policy
from tests.conftest import REPO


def test_sets_the_short_spin():
    env = {}
    assert library_spin(env, loaded=False) == LIBRARY_SPINS and env == {"GOMP_SPINCOUNT": LIBRARY_SPINS}


@pytest.mark.parametrize("env", [{"CODESHELL_OMP_WAIT": "keep"}, {"OMP_WAIT_POLICY": "active"},
                                 {"GOMP_SPINCOUNT": "300000"}, {"CODESHELL_DECODE_TEAM": "off"},
                                 {"CODESHELL_DECODE_TEAM": "auto"}])
def test_leaves_the_environment(env):
    before = dict(env)
    assert library_spin(env, loaded=False) is None and env == before


def test_not_after_torch_loaded():
    env = {}
    assert library_spin(env, loaded=True) is None and env == {}


def test_cli_policy_wins():
    env = {}
    assert wait_policy(env) == "passive" and library_spin(env, loaded=False) is None
    assert env == {"OMP_WAIT_POLICY": "passive"}


def test_bad_switch_value():
    with pytest.raises(ValueError, match="CODESHELL_OMP_WAIT"):
        library_spin({"CODESHELL_OMP_WAIT": "sometimes"}, loaded=False)


def _run(code: str, **env) -> str:
    import os
    e = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "CODESHELL_OMP_WAIT",
                                                           "CODESHELL_DECODE_TEAM")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_order():
    # codeshell.llm first: set before torch (libgomp) loads; torch first: nothing set
    assert _run("import os; from codeshell import LLM; print(os.environ.get('GOMP_SPINCOUNT'))") == LIBRARY_SPINS
    assert _run("import os, torch; from codeshell import LLM; print(os.environ.get('GOMP_SPINCOUNT'))") == "None"
    assert _run("import os; from codeshell import LLM; print(os.environ.get('GOMP_SPINCOUNT'))",
                CODESHELL_OMP_WAIT="keep") == "None"
