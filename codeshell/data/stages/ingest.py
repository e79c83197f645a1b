"""Ingest: turn local folders, git repositories, JSONL/Parquet files in The Stack's shape,
or (online) Hugging Face datasets into documents with provenance.

Planning (listing files, grouping them into shards) runs once in the driver and is saved, so
a rerun reads exactly the same shards; reading runs per shard in workers. Binaries (a NUL
byte in the first 8 KB, git's rule, or not UTF-8) and files over the size limit are skipped
and counted. A folder or git source without `license:` takes the SPDX id of its top-level
LICENSE/COPYING file when that text is recognized (`codeshell.data.licenses`). This stage
does not guess languages (see `langid`) nor filter by license (see `license`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from codeshell.data.io import CorruptShardError, PipelineError
from codeshell.data.languages import canonical
from codeshell.data.stages.base import Doc, Stage, StageStats, register

SOURCE_TYPES = ("folder", "git", "jsonl", "parquet", "hf")
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".tox", ".venv", ".mypy_cache"}
# The Stack's column names (v1 "max_stars_*" and v2 flat names) -> our provenance fields.
STACK_FIELDS = {
    "repo": ("repo", "repo_name", "max_stars_repo_name", "repository_name"),
    "path": ("path", "max_stars_repo_path", "file_path"),
    "license": ("license", "licenses", "max_stars_repo_licenses", "detected_licenses"),
    "lang": ("lang", "language"),
}


def _first(row: dict, keys: tuple) -> object:
    for k in keys:
        v = row.get(k)
        if v is not None:
            return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return None


def _repo_license(root: Path) -> str | None:
    """A folder's or repository's license from its top-level LICENSE/COPYING file (SPDX id)."""
    from codeshell.data.licenses import detect_repo_license

    try:
        return detect_repo_license(root)
    except PipelineError:  # license-expression missing: the license stays unknown
        return None


@register
class Ingest(Stage):
    """Read folders, git repositories, JSONL/Parquet or HF datasets into documents (first stage)."""

    name = "ingest"
    kind = "ingest"

    @dataclasses.dataclass
    class Options:
        sources: list = dataclasses.field(default_factory=list)
        max_file_bytes: int = 1_000_000
        shard_bytes: int = 32_000_000
        text_field: str = "content"

        def validate(self) -> None:
            if not self.sources:
                raise PipelineError("stage 'ingest': 'sources' is empty; give at least one source")
            for i, s in enumerate(self.sources):
                if not isinstance(s, dict) or s.get("type") not in SOURCE_TYPES:
                    raise PipelineError(f"stage 'ingest': source #{i + 1} needs 'type' in {SOURCE_TYPES}, got {s!r}")
                allowed = {"type", "path", "include", "exclude", "repo", "license",
                           "dataset", "config", "split", "data_dir", "limit"}
                extra = set(s) - allowed
                if extra:
                    raise PipelineError(f"stage 'ingest': source #{i + 1}: unknown key(s) {sorted(extra)}")
                if s["type"] != "hf" and not s.get("path"):
                    raise PipelineError(f"stage 'ingest': source #{i + 1} ({s['type']}) needs 'path'")
            if self.max_file_bytes <= 0 or self.shard_bytes <= 0:
                raise PipelineError("stage 'ingest': max_file_bytes and shard_bytes must be positive")

    # -- planning (driver) ---------------------------------------------------------------
    def plan(self, base_dir: Path | None = None) -> list[list[dict]]:
        """Group the sources' units into shards of about `shard_bytes`; each unit is a dict."""
        units: list[tuple[int, dict]] = []
        for s in self.opts.sources:
            units.extend(self._units(s, base_dir))
        shards: list[list[dict]] = []
        cur: list[dict] = []
        size = 0
        for n, u in units:
            if cur and size + n > self.opts.shard_bytes:
                shards.append(cur)
                cur, size = [], 0
            cur.append(u)
            size += n
        if cur:
            shards.append(cur)
        return shards

    def _units(self, s: dict, base_dir: Path | None) -> list[tuple[int, dict]]:
        kind = s["type"]
        if kind == "hf":
            if not s.get("dataset"):
                raise PipelineError("stage 'ingest': an 'hf' source needs 'dataset'")
            return [(1, {"type": "hf", **s})]
        path = Path(os.path.expanduser(s["path"]))
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        path = path.resolve()  # workers may run elsewhere (Ray) with another working directory
        if not path.exists():
            raise PipelineError(f"stage 'ingest': {kind} source path {path} does not exist")
        if not os.access(path, os.R_OK):
            raise PipelineError(f"stage 'ingest': {kind} source path {path} is not readable")
        if kind == "folder":
            if not path.is_dir():
                raise PipelineError(f"stage 'ingest': folder source {path} is not a directory")
            files = self._walk(path)
            repo = s.get("repo") or path.name
        elif kind == "git":
            files = self._git_files(path)
            repo = s.get("repo") or self._git_repo_name(path)
        else:
            pattern = "*.jsonl" if kind == "jsonl" else "*.parquet"
            files = sorted(path.rglob(pattern)) if path.is_dir() else [path]
            if not files:
                raise PipelineError(f"stage 'ingest': no {pattern} files under {path}")
            extra = {k: s[k] for k in ("license",) if k in s}
            return [u for f in files for u in self._split(kind, f, extra)]
        inc, exc = s.get("include"), s.get("exclude") or []
        license = s.get("license") or _repo_license(path)
        out = []
        for f in files:
            rel = f.relative_to(path).as_posix()
            if inc and not any(fnmatch.fnmatch(rel, g) for g in inc):
                continue
            if any(fnmatch.fnmatch(rel, g) for g in exc):
                continue
            try:
                size = f.stat().st_size
            except OSError:
                size = 0
            out.append((min(size, self.opts.max_file_bytes),
                        {"type": "file", "file": str(f), "path": rel, "repo": repo, "license": license}))
        return out

    def _split(self, kind: str, f: Path, extra: dict) -> list[tuple[int, dict]]:
        """Large inputs become several units so one big file still spreads over workers:
        JSONL by byte ranges (cut at line starts when read), Parquet by row groups."""
        size = f.stat().st_size
        if kind == "jsonl":
            step = self.opts.shard_bytes
            return [(min(step, size - a), {"type": "jsonl", "file": str(f), "start": a, "end": min(a + step, size), **extra})
                    for a in range(0, max(size, 1), step)]
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as e:  # pyarrow raises several types for a bad file
            raise PipelineError(f"stage 'ingest': cannot read parquet file {f}: {e}") from e
        units, cur, cur_size = [], [], 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).total_byte_size
            if cur and cur_size + n > self.opts.shard_bytes:
                units.append((cur_size, {"type": "parquet", "file": str(f), "row_groups": cur, **extra}))
                cur, cur_size = [], 0
            cur.append(g)
            cur_size += n
        if cur or not units:
            units.append((cur_size, {"type": "parquet", "file": str(f), "row_groups": cur, **extra}))
        return units

    @staticmethod
    def _walk(root: Path) -> list[Path]:
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                if p.is_file() and not p.is_symlink():
                    out.append(p)
        return out

    @staticmethod
    def _git_files(root: Path) -> list[Path]:
        try:
            r = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True)
        except FileNotFoundError as e:
            raise PipelineError("stage 'ingest': a git source needs the `git` command") from e
        except subprocess.CalledProcessError as e:
            raise PipelineError(f"stage 'ingest': {root} is not a git repository "
                                f"({e.stderr.decode(errors='replace').strip()})") from e
        files = [root / p for p in r.stdout.decode("utf-8", "surrogateescape").split("\0") if p]
        return [f for f in files if f.is_file() and not f.is_symlink()]

    @staticmethod
    def _git_repo_name(root: Path) -> str:
        r = subprocess.run(["git", "-C", str(root), "config", "--get", "remote.origin.url"],
                           capture_output=True, text=True)
        url = r.stdout.strip()
        if url:
            name = url.rstrip("/").removesuffix(".git")
            parts = name.replace(":", "/").split("/")
            return "/".join(parts[-2:])
        return root.resolve().name

    # -- reading (workers) ---------------------------------------------------------------
    def read(self, units: list[dict], stats: StageStats) -> Iterator[Doc]:
        for u in units:
            kind = u["type"]
            if kind == "file":
                doc = self._read_file(u, stats)
                if doc is not None:
                    yield doc
            elif kind in ("jsonl", "parquet"):
                rows = (self._jsonl_rows(u["file"], u.get("start", 0), u.get("end")) if kind == "jsonl"
                        else self._parquet_rows(u["file"], u.get("row_groups")))
                for key, row in rows:
                    doc = self._from_row(row, f"{Path(u['file']).name}:{key}", u.get("license"), stats)
                    if doc is not None:
                        yield doc
            elif kind == "hf":
                yield from self._read_hf(u, stats)

    def _admit(self, text: str | bytes | None, stats: StageStats) -> str | None:
        out = self._decode(text, stats)
        if out is None:
            stats.docs_in += 1  # skipped inputs count as seen (no bytes: they were never text)
        return out

    def _decode(self, text: str | bytes | None, stats: StageStats) -> str | None:
        if text is None:
            stats.count("no_text")
            return None
        if isinstance(text, bytes):
            data = text
        else:
            data = None
        if data is not None:
            if len(data) > self.opts.max_file_bytes:
                stats.count("too_large")
                return None
            if b"\0" in data[:8000]:
                stats.count("binary")
                return None
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                stats.count("not_utf8")
                return None
        if len(text) > self.opts.max_file_bytes or len(text.encode("utf-8", "surrogatepass")) > self.opts.max_file_bytes:
            stats.count("too_large")
            return None
        if "\0" in text[:8000]:
            stats.count("binary")
            return None
        return text

    def _account(self, doc: Doc, stats: StageStats) -> Doc:
        doc["size"] = len(doc["text"].encode("utf-8", "surrogatepass"))
        stats.seen(doc)
        stats.kept(doc)
        return doc

    def _read_file(self, u: dict, stats: StageStats) -> Doc | None:
        p = Path(u["file"])
        try:
            if p.stat().st_size > self.opts.max_file_bytes:
                stats.count("too_large")
                stats.docs_in += 1
                return None
            data = p.read_bytes()
        except OSError as e:
            # A file that vanished or is unreadable inside a readable source is skipped, not fatal.
            stats.count("unreadable")
            stats.docs_in += 1
            stats.count(f"unreadable:{type(e).__name__}")
            return None
        text = self._admit(data, stats)
        if text is None:
            return None
        doc = {"id": f"{u['repo']}/{u['path']}", "text": text, "repo": u["repo"], "path": u["path"],
               "license": u.get("license")}
        return self._account(doc, stats)

    def _from_row(self, row: dict, fallback_id: str, license: str | None, stats: StageStats) -> Doc | None:
        text = self._admit(row.get(self.opts.text_field), stats)
        if text is None:
            return None
        doc = {k: _first(row, keys) for k, keys in STACK_FIELDS.items()}
        if doc["license"] is None:
            doc["license"] = license
        doc["lang"] = canonical(doc["lang"]) if isinstance(doc["lang"], str) else None
        rid = row.get("id") or row.get("hexsha") or row.get("blob_id")
        doc["id"] = str(rid) if rid is not None else (
            f"{doc['repo']}/{doc['path']}" if doc["repo"] and doc["path"] else fallback_id)
        doc["text"] = text
        if doc["lang"] is None:
            del doc["lang"]
        return self._account(doc, stats)

    @staticmethod
    def _jsonl_rows(file: str, start: int, end: int | None) -> Iterator[tuple[int, dict]]:
        """(byte offset, row) of the lines that *start* in [start, end): a line cut by the
        range boundary belongs to the range where it starts."""
        try:
            f = open(file, "rb")
        except OSError as e:
            raise PipelineError(f"cannot read {file}: {e.strerror}") from e
        with f:
            if start:
                f.seek(start - 1)
                f.readline()  # finish the line running into `start` (it belongs to the range before)
            while True:
                pos = f.tell()
                if end is not None and pos >= end:
                    return
                line = f.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise CorruptShardError(f"{file}: byte {pos}: not a valid JSON line ({e})") from None
                if not isinstance(row, dict):
                    raise CorruptShardError(f"{file}: byte {pos}: expected a JSON object per line")
                yield pos, row

    @staticmethod
    def _parquet_rows(file: str, row_groups: list | None) -> Iterator[tuple[str, dict]]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(file)
            batches = pf.iter_batches(batch_size=1024, row_groups=row_groups)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise PipelineError(f"cannot read parquet file {file}: {e}") from e
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{row_groups[0] if row_groups else 0}-{i}", row
                i += 1

    def _read_hf(self, u: dict, stats: StageStats) -> Iterator[Doc]:
        try:
            import datasets
        except ImportError as e:
            raise PipelineError("an 'hf' source needs `pip install datasets` (and network access)") from e
        ds = datasets.load_dataset(u["dataset"], u.get("config"), split=u.get("split", "train"),
                                   data_dir=u.get("data_dir"), streaming=True)
        limit = u.get("limit")
        for i, row in enumerate(ds):
            if limit is not None and i >= limit:
                break
            doc = self._from_row(dict(row), f"{u['dataset']}:{i}", u.get("license"), stats)
            if doc is not None:
                yield doc
