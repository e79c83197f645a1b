"""Reading corpora for the tokenizer tools and the model trainers: files, folders (recursively)
and JSONL (a `text` or `content` field per line). Not a data pipeline: no filtering."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from codeshell.data.io import json_object

SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv"}


def iter_files(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
                for fn in sorted(filenames):
                    yield Path(dirpath) / fn
        elif p.is_file():
            yield p
        else:
            raise FileNotFoundError(f"corpus path {p} does not exist")


def iter_texts(paths: Iterable[str | os.PathLike], max_file_bytes: int = 2_000_000) -> Iterator[tuple[str, str]]:
    """(name, text) for every UTF-8 text file, or every JSONL record's `text`/`content`."""
    for name, text, _ in iter_records(paths, max_file_bytes):
        yield name, text


def _record_language(r: dict) -> str | None:
    """A JSONL record's own language: its `lang`/`language` field (the data pipeline's and The
    Stack's), else what its `path` says; None when it says neither."""
    from codeshell.data.languages import canonical, language_of

    for k in ("lang", "language"):
        if isinstance(r.get(k), str) and r[k].strip():
            return canonical(r[k])
    for k in ("path", "max_stars_repo_path", "file_path"):
        if isinstance(r.get(k), str) and r[k]:
            return language_of(r[k], "")
    return None


def iter_records(paths: Iterable[str | os.PathLike],
                 max_file_bytes: int = 2_000_000) -> Iterator[tuple[str, str, str | None]]:
    """(name, text, language) for every UTF-8 text file (language None: judge by the name) and
    every JSONL record, whose language is its own (`lang`, `language` or `path` field), never
    the shard file's: a pipeline shard `shard-00000.jsonl` holds Python, C, Markdown, ..."""
    for f in iter_files(paths):
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        r = json_object(line, f"{f}, line {i + 1}", ValueError, "a JSON object")
                        t = r.get("text") if isinstance(r.get("text"), str) else r.get("content")
                        if isinstance(t, str):
                            yield f"{f}:{i}", t, _record_language(r) or ""
            continue
        try:
            if f.stat().st_size > max_file_bytes:
                continue
            data = f.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8000]:
            continue
        try:
            yield str(f), data.decode("utf-8"), None
        except UnicodeDecodeError:
            continue
