"""Fixtures for the data-pipeline tests (helpers in datacorpus.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from datacorpus import build_corpus, run_stage


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    planted = build_corpus(root)
    return root / "src", planted


@pytest.fixture(scope="session")
def corpus_docs(corpus) -> list[dict]:
    """The corpus as ingested documents with languages (no filtering)."""
    from codeshell.data.stages.base import StageStats, build_stage

    src, _ = corpus
    ing = build_stage("ingest", {"sources": [{"type": "folder", "path": str(src), "repo": "src"}],
                                 "max_file_bytes": 500_000})
    docs = [d for shard in ing.plan() for d in ing.read(shard, StageStats())]
    out, _ = run_stage("langid", {"drop_unknown": False}, docs)
    return out
