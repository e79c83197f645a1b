"""`codeshell serve` sets OMP_WAIT_POLICY=passive before torch loads libgomp (serve/cli.py
`omp_wait_policy`), unless told to keep the environment, the user set the policy, or the decode
team is not on; and the CLI modules import no torch before the command runs (else libgomp would
have read its settings already)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from codeshell.serve.cli import omp_wait_policy
from tests.conftest import REPO


def test_sets_passive_by_default():
    env = {}
    assert omp_wait_policy(env) == "passive" and env == {"OMP_WAIT_POLICY": "passive"}
    env = {"CODESHELL_DECODE_TEAM": "on"}
    assert omp_wait_policy(env) == "passive" and env["OMP_WAIT_POLICY"] == "passive"


@pytest.mark.parametrize("env", [{"CODESHELL_SERVE_OMP_WAIT": "keep"}, {"OMP_WAIT_POLICY": "active"},
                                 {"CODESHELL_DECODE_TEAM": "off"}, {"CODESHELL_DECODE_TEAM": "auto"}])
def test_leaves_the_environment(env):
    before = dict(env)
    assert omp_wait_policy(env) is None and env == before


def test_bad_switch_value():
    with pytest.raises(typer.BadParameter, match="CODESHELL_SERVE_OMP_WAIT"):
        omp_wait_policy({"CODESHELL_SERVE_OMP_WAIT": "sometimes"})


def test_cli_imports_no_torch():
    code = "import sys, codeshell.cli, codeshell.serve.cli, codeshell.serve.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
