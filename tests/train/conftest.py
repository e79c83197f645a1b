"""Fixtures for the training tests (helpers in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.helpers import make_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory, tokenizer_dir) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tokenizer_dir) -> Path:
    from codeshell.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir=tokenizer_dir)
