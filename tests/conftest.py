"""Shared fixtures and the rules for what a test may skip.

- Reference data (`../shared` or $CODESHELL_SHARED): `require_shared` skips without it, fails
  under CODESHELL_REQUIRE_SHARED=1 (CI).
- Optional toolchains, jars and programs (a JDK, the javatuples jar, chromium, bubblewrap...):
  every test checks with `require_tool`, which skips saying how to install the missing piece,
  and fails instead for the names listed in CODESHELL_REQUIRE_TOOLS (comma-separated; CI lists
  those its required install scripts provide).
- Native kernels: under CODESHELL_REQUIRE_NATIVE=1 (CI) a kernel build that fails ends the run
  at its start instead of letting kernel tests skip and the runtime fall back to torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Rich wraps CLI messages at the terminal width, which is 80 without a terminal (CI): give
# every test, and the commands it runs, the same wide width wherever it runs.
os.environ["COLUMNS"] = "200"
# Kernel choices measured by an earlier run stay out of the tests (each test process measures
# its own, as the tests of the measurement expect); tests/kernels/test_choices.py sets a file.
os.environ.setdefault("CODESHELL_KERNEL_CHOICES", "off")


def shared_dir() -> Path | None:
    env = os.environ.get("CODESHELL_SHARED")
    p = Path(env) if env else REPO.parent / "shared"
    return p if p.is_dir() else None


def require_shared(sub: str = "") -> Path:
    """The path under ../shared, or skip (fail when CODESHELL_REQUIRE_SHARED=1)."""
    root = shared_dir()
    path = root / sub if root else None
    if path is None or not path.exists():
        msg = f"reference data {sub or 'shared/'} not found (set CODESHELL_SHARED or place it at ../shared)"
        if os.environ.get("CODESHELL_REQUIRE_SHARED") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def required_tools() -> set[str]:
    return {t.strip() for t in os.environ.get("CODESHELL_REQUIRE_TOOLS", "").split(",") if t.strip()}


def require_tool(name: str, found: bool, why: str) -> None:
    """The one check for an optional toolchain, jar or program: nothing when `found`; else skip
    with `why` (which says how to install it), or fail when CI requires `name`. Works in a test,
    a fixture or at module level (the whole module then skips or fails)."""
    if found:
        return
    msg = f"{name} is missing: {why}"
    if name in required_tools():
        pytest.fail(f"{msg} (required here: CODESHELL_REQUIRE_TOOLS={os.environ['CODESHELL_REQUIRE_TOOLS']})")
    pytest.skip(msg, allow_module_level=True)


def pytest_sessionstart(session) -> None:
    if os.environ.get("CODESHELL_REQUIRE_NATIVE") != "1":
        return
    from codeshell.kernels import _ext
    if _ext.get() is None:
        pytest.exit(f"CODESHELL_REQUIRE_NATIVE=1 but the native kernels are unavailable: {_ext.unavailable_reason()}",
                    returncode=1)


@pytest.fixture(scope="session")
def shared() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return require_shared("codeshell-tokenizer")


GOLDEN_CASES = ["rope-gqa", "rope-mqa", "rope-mha", "rope-linear"]
