"""Reading corpora for the tokenizer tools and the model trainers: files, folders (recursively)
and JSONL (a `text` or `content` field per line). Not a data pipeline: no filtering."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

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
    for f in iter_files(paths):
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        r = json.loads(line)
                        t = r.get("text") if isinstance(r.get("text"), str) else r.get("content")
                        if isinstance(t, str):
                            yield f"{f}:{i}", t
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
            yield str(f), data.decode("utf-8")
        except UnicodeDecodeError:
            continue
