"""Shared fixtures: where the reference data lives, and the rule for when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Rich wraps CLI messages at the terminal width, which is 80 without a terminal (CI): give
# every test, and the commands it runs, the same wide width wherever it runs.
os.environ["COLUMNS"] = "200"


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


@pytest.fixture(scope="session")
def shared() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return require_shared("codeshell-tokenizer")


GOLDEN_CASES = ["rope-gqa", "rope-mqa", "rope-mha", "rope-linear"]
