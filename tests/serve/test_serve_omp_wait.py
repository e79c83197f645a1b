"""`codeshell serve`, `generate`, `infill` and `chat` set OMP_WAIT_POLICY=passive before torch
loads libgomp (codeshell/omp.py `wait_policy`), unless told to keep the environment
(CODESHELL_OMP_WAIT=keep), the user set the policy, or the decode team is not on; and the CLI
modules import no torch before the command runs (else libgomp would have read its settings already)."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("env", [{"CODESHELL_OMP_WAIT": "keep"}, {"OMP_WAIT_POLICY": "active"},
                                 {"CODESHELL_DECODE_TEAM": "off"}, {"CODESHELL_DECODE_TEAM": "auto"}])
def test_leaves_the_environment(env):
    before = dict(env)
    assert omp_wait_policy(env) is None and env == before


def test_bad_switch_value():
    with pytest.raises(typer.BadParameter, match="CODESHELL_OMP_WAIT"):
        omp_wait_policy({"CODESHELL_OMP_WAIT": "sometimes"})


def test_cli_imports_no_torch():
    code = "import sys, codeshell.cli, codeshell.serve.cli, codeshell.serve.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def clean_env(monkeypatch):
    # setenv first so that teardown removes what the code under test sets
    for k in ("OMP_WAIT_POLICY", "CODESHELL_OMP_WAIT", "CODESHELL_DECODE_TEAM"):
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)
    return monkeypatch


def test_generate_infill_chat_load_sets_passive(clean_env, tmp_path):
    from codeshell import cli

    with pytest.raises(typer.Exit):  # a folder that is not a checkpoint: after the policy is set
        cli._load(str(tmp_path), "auto", "cpu")
    assert os.environ["OMP_WAIT_POLICY"] == "passive"


def test_cli_bad_switch_is_one_line(clean_env, tmp_path, capsys):
    from codeshell import cli

    clean_env.setenv("CODESHELL_OMP_WAIT", "sometimes")
    with pytest.raises(typer.Exit) as e:
        cli._load(str(tmp_path), "auto", "cpu")
    assert e.value.exit_code == 2 and "OMP_WAIT_POLICY" not in os.environ
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: CODESHELL_OMP_WAIT='sometimes'") and "\n" not in err
