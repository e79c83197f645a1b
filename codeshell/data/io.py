"""File plumbing for the data pipeline: atomic writes and JSONL shards with clear errors.

This is not a general storage layer: shards are plain UTF-8 JSONL files (one document per
line), written to a temporary name in the same folder and renamed into place, so a reader
never sees a half-written shard and a killed run leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_DIR = ".tmp"


class PipelineError(Exception):
    """A user-facing error: bad pipeline file, unreadable source, corrupt shard."""


class CorruptShardError(PipelineError):
    """A shard file that cannot be read back."""


def tmp_dir_for(path: Path) -> Path:
    """Temporary files live in a `.tmp` folder beside their target (same filesystem)."""
    d = path.parent / TMP_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path; on success rename it onto `path`, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=tmp_dir_for(path))
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")


def write_pickle_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def read_pickle(path: str | os.PathLike) -> Any:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise CorruptShardError(f"{path}: cannot be read back ({e}); delete it and rerun") from e


def write_jsonl_atomic(path: str | os.PathLike, docs: Iterable[dict]) -> int:
    """Write documents one per line; returns the number written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def json_object(line: str, where: str, error: type[Exception] = CorruptShardError,
                expected: str = "a JSON object per line") -> dict:
    """One JSONL line parsed as a JSON object; otherwise `error` naming `where` (file and line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected {expected}")
    return obj


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Read a JSONL file, naming the file and line of anything that is not a JSON object."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise PipelineError(f"cannot read {path}: {e.strerror}") from e
    with f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                yield json_object(line, f"{path}:{lineno}")
        except UnicodeDecodeError as e:
            raise CorruptShardError(f"{path}: not UTF-8 near line {lineno + 1} ({e.reason})") from None


def clean_tmp(root: str | os.PathLike) -> int:
    """Delete leftovers of killed runs (every `.tmp` folder under root); returns files removed."""
    n = 0
    for d in Path(root).rglob(TMP_DIR):
        if d.is_dir():
            for p in d.iterdir():
                p.unlink(missing_ok=True)
                n += 1
            d.rmdir()
    return n
