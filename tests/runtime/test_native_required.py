"""CODESHELL_REQUIRE_NATIVE=1 (set by .ci/run): a broken kernel build fails the run, and a bf16
model loaded through `LLM` really runs on the native kernels (not on the torch fallback)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, require_tool


def test_kernels_are_in_use(tmp_path):
    from codeshell import LLM, SamplingParams
    from codeshell.kernels import _ext, available
    from codeshell.kernels.module import PackedLinear
    from codeshell.testing import make_tiny_checkpoint
    # Under CODESHELL_REQUIRE_NATIVE=1 the session has already ended if they were unavailable.
    require_tool("native kernels", available() or os.environ.get("CODESHELL_REQUIRE_NATIVE") == "1",
                 f"{_ext.unavailable_reason()} (needs g++, ninja and an AVX2+FMA CPU: .ci/install-kernels.sh)")
    assert available()
    llm = LLM(make_tiny_checkpoint(tmp_path / "m", dtype="bfloat16"), dtype="bfloat16")
    packed = [m for m in llm.model.modules() if isinstance(m, PackedLinear)]
    linears = [m for m in llm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert packed and not linears, (len(packed), len(linears))
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.outputs[0].token_ids) == 4


def test_a_failed_build_ends_the_run():
    """The conftest hook, through a real pytest run whose kernels cannot be had."""
    env = {**os.environ, "CODESHELL_REQUIRE_NATIVE": "1", "CODESHELL_KERNELS_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider",
                        "tests/test_package.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "CODESHELL_REQUIRE_NATIVE=1 but the native kernels are unavailable" in r.stdout + r.stderr
    env.pop("CODESHELL_REQUIRE_NATIVE")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider",
                        "tests/test_package.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_require_tool_skips_or_fails(monkeypatch):
    monkeypatch.delenv("CODESHELL_REQUIRE_TOOLS", raising=False)
    require_tool("x", True, "")
    with pytest.raises(pytest.skip.Exception, match="x is missing: apt-get install x"):
        require_tool("x", False, "apt-get install x")
    monkeypatch.setenv("CODESHELL_REQUIRE_TOOLS", "y, x")
    with pytest.raises(pytest.fail.Exception, match="required here"):
        require_tool("x", False, "apt-get install x")
    with pytest.raises(pytest.skip.Exception):
        require_tool("z", False, "")
