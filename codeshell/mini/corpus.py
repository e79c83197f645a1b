"""codeshell-mini's corpus: permissively licensed source that exists offline on every machine
of this kind, gathered the same way everywhere, written in the data pipeline's input format.

Sources:
- CPython's standard library of the running interpreter (PSF-2.0), version recorded;
- the sdists of a pinned list of PyPI distributions (exact versions, fetched with `pip
  download`), each kept only when the license its own metadata declares is on the allow-list
  (MIT, BSD, Apache-2.0, PSF). The license in `PINNED` is what we expect; the metadata decides.

Output (in `out`): `train/*.jsonl` and `valid/*.jsonl` in The Stack's shape (`content`, `path`,
`repo` = distribution, `license` = SPDX id, `version`), and `manifest.json` with files and
bytes per source and per license. Whole distributions are held out for validation, never
random files, so held-out loss measures code the model has not seen from a project it has not
seen. This module does not filter, deduplicate or tokenize: that is `codeshell data run`'s job.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import platform
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

# (distribution, exact version, expected SPDX license). Mostly pure Python, so the sdists
# hold the code itself; ~50 MB of Python together with the standard library.
PINNED: tuple[tuple[str, str, str], ...] = (
    ("attrs", "23.2.0", "MIT"), ("six", "1.16.0", "MIT"), ("click", "8.1.7", "BSD-3-Clause"),
    ("flask", "3.0.3", "BSD-3-Clause"), ("werkzeug", "3.0.3", "BSD-3-Clause"),
    ("jinja2", "3.1.4", "BSD-3-Clause"), ("itsdangerous", "2.2.0", "BSD-3-Clause"),
    ("requests", "2.32.3", "Apache-2.0"), ("urllib3", "2.2.2", "MIT"), ("idna", "3.7", "BSD-3-Clause"),
    ("pyparsing", "3.1.2", "MIT"), ("more-itertools", "10.3.0", "MIT"),
    ("toolz", "0.12.1", "BSD-3-Clause"), ("rich", "13.7.1", "MIT"), ("typer", "0.12.3", "MIT"),
    ("pygments", "2.18.0", "BSD-2-Clause"), ("markdown", "3.6", "BSD-3-Clause"),
    ("mistune", "3.0.2", "BSD-3-Clause"), ("pytz", "2024.1", "MIT"), ("arrow", "1.3.0", "Apache-2.0"),
    ("marshmallow", "3.21.3", "MIT"), ("tomli", "2.0.1", "MIT"), ("pyyaml", "6.0.1", "MIT"),
    ("simplejson", "3.19.2", "MIT"), ("starlette", "0.37.2", "BSD-3-Clause"),
    ("fastapi", "0.111.0", "MIT"), ("httpx", "0.27.0", "BSD-3-Clause"), ("anyio", "4.4.0", "MIT"),
    ("h11", "0.14.0", "MIT"), ("tornado", "6.4.1", "Apache-2.0"), ("networkx", "3.3", "BSD-3-Clause"),
    ("sympy", "1.12.1", "BSD-3-Clause"), ("django", "5.0.6", "BSD-3-Clause"),
    ("sqlalchemy", "2.0.31", "MIT"), ("black", "24.4.2", "MIT"), ("isort", "5.13.2", "MIT"),
    ("pytest", "8.2.2", "MIT"), ("pluggy", "1.5.0", "MIT"), ("bottle", "0.12.25", "MIT"),
    ("boltons", "24.0.0", "BSD-3-Clause"), ("cachetools", "5.3.3", "MIT"),
    ("colorama", "0.4.6", "BSD-3-Clause"), ("jsonschema", "4.22.0", "MIT"),
    ("sortedcontainers", "2.4.0", "Apache-2.0"), ("pyflakes", "3.2.0", "MIT"),
    ("pycparser", "2.22", "BSD-3-Clause"), ("websockets", "12.0", "BSD-3-Clause"),
)
# Held out whole for validation: different domains (functional utils, web, markdown, misc).
HOLDOUT = ("toolz", "bottle", "mistune", "boltons")
ALLOWED = {"MIT", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0", "PSF-2.0"}
CODE_SUFFIXES = {".py", ".pyi", ".c", ".h", ".js", ".ts", ".sh", ".toml", ".cfg", ".md", ".rst"}
MAX_FILE_BYTES = 400_000
# Free-text license fields and classifiers, as distributions really write them -> SPDX.
_LICENSE_PATTERNS = (
    (r"apache", "Apache-2.0"), (r"\bmit\b|mit license|expat", "MIT"),
    (r"bsd.*(2|two|simplified|freebsd)", "BSD-2-Clause"), (r"bsd", "BSD-3-Clause"),
    (r"python software foundation|\bpsf\b", "PSF-2.0"),
)


class CorpusError(RuntimeError):
    """A corpus source that cannot be fetched or read (one line, for the CLI)."""


@dataclass
class Source:
    repo: str
    version: str
    license: str
    files: list[tuple[str, str]]  # (path inside the distribution, text)


def spdx_from_metadata(meta: dict[str, list[str]]) -> str | None:
    """The SPDX id a distribution's own metadata declares (License-Expression, then License,
    then the trove classifiers), or None when it names none we recognise."""
    cands = meta.get("License-Expression", []) + meta.get("License", [])
    cands += [c for c in meta.get("Classifier", []) if c.startswith("License ::")]
    for text in cands:
        t = text.strip().lower()
        if not t or t == "unknown":
            continue
        if t in {x.lower() for x in ALLOWED}:
            return next(x for x in ALLOWED if x.lower() == t)
        for pat, spdx in _LICENSE_PATTERNS:
            if re.search(pat, t[:400]):
                return spdx
    return None


def _parse_metadata(raw: str) -> dict[str, list[str]]:
    msg = email.parser.Parser().parsestr(raw, headersonly=True)
    out: dict[str, list[str]] = {}
    for k, v in msg.items():
        out.setdefault(k, []).append(str(v))
    return out


def fetch_sdist(name: str, version: str, cache: Path) -> Path:
    """The sdist archive of name==version, downloaded once into `cache` with pip."""
    cache.mkdir(parents=True, exist_ok=True)
    archive = re.compile(rf"(?i){re.sub(r'[-_.]+', '[-_.]', name)}-{re.escape(version)}\.(tar\.gz|zip)$")
    found = [p for p in cache.iterdir() if archive.match(p.name)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
           "-d", str(cache), f"{name}=={version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in cache.iterdir() if archive.match(p.name)]
    if r.returncode != 0 or not found:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no archive written"]
        raise CorpusError(f"cannot fetch the sdist of {name}=={version}: {tail[0]}")
    return found[0]


def read_sdist(archive: Path) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """(PKG-INFO fields, [(path, text)]) of an sdist; paths drop the top folder; binaries,
    non-UTF-8 and oversized files are skipped (the pipeline would drop them anyway)."""
    members: list[tuple[str, bytes]] = []
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir() and info.file_size <= MAX_FILE_BYTES:
                    members.append((info.filename, z.read(info)))
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and m.size <= MAX_FILE_BYTES:
                    f = t.extractfile(m)
                    if f is not None:
                        members.append((m.name, f.read()))
    meta: dict[str, list[str]] = {}
    files = []
    for name, data in sorted(members):
        rel = name.split("/", 1)[1] if "/" in name else name
        if rel == "PKG-INFO":
            meta = _parse_metadata(data.decode("utf-8", "replace"))
            continue
        if Path(rel).suffix.lower() not in CODE_SUFFIXES or b"\0" in data[:8192]:
            continue
        try:
            files.append((rel, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return meta, files


def stdlib_source(limit_files: int | None = None) -> Source:
    """The running interpreter's standard library (.py files; tests and site-packages out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        try:
            if p.stat().st_size > MAX_FILE_BYTES:
                continue
            files.append((rel, p.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
        if limit_files and len(files) >= limit_files:
            break
    return Source("cpython-stdlib", platform.python_version(), "PSF-2.0", files)


def gather(out: Path, cache: Path, pinned=PINNED, holdout=HOLDOUT, stdlib_files: int | None = None,
           progress=None) -> dict:
    """Write the corpus into `out` and return its manifest. Idempotent: an existing
    `manifest.json` whose pinned list matches is returned as it is."""
    out = Path(out)
    key = hashlib.sha256(json.dumps([list(pinned), list(holdout), stdlib_files]).encode()).hexdigest()[:16]
    mpath = out / "manifest.json"
    if mpath.is_file():
        m = json.loads(mpath.read_text())
        if m.get("key") == key:
            return m
    sources = [stdlib_source(stdlib_files)]
    rejected = []
    for i, (name, version, expected) in enumerate(pinned):
        if progress:
            progress(f"sdist {i + 1}/{len(pinned)}: {name}=={version}")
        meta, files = read_sdist(fetch_sdist(name, version, cache))
        spdx = spdx_from_metadata(meta)
        if spdx not in ALLOWED:
            rejected.append({"repo": name, "version": version, "license": spdx or "unknown"})
            continue
        if spdx != expected and progress:
            progress(f"note: {name} declares {spdx} (pinned list says {expected})")
        sources.append(Source(name, version, spdx, files))
    manifest = _write(out, sources, set(holdout))
    manifest.update(key=key, rejected=rejected, python=sys.version.split()[0])
    mpath.write_text(json.dumps(manifest, indent=1))
    return manifest


def _write(out: Path, sources: list[Source], holdout: set[str]) -> dict:
    for split in ("train", "valid"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for old in (out / split).glob("*.jsonl"):
            old.unlink()
    per_source, per_license = [], {}
    for s in sources:
        split = "valid" if s.repo in holdout else "train"
        n_bytes = 0
        with open(out / split / f"{s.repo}.jsonl", "w", encoding="utf-8") as f:
            for path, text in s.files:
                f.write(json.dumps({"content": text, "path": path, "repo": s.repo, "license": s.license,
                                    "version": s.version}) + "\n")
                n_bytes += len(text.encode("utf-8"))
        per_source.append({"repo": s.repo, "version": s.version, "license": s.license, "split": split,
                           "files": len(s.files), "bytes": n_bytes})
        lic = per_license.setdefault(s.license, {"sources": 0, "files": 0, "bytes": 0})
        lic["sources"] += 1
        lic["files"] += len(s.files)
        lic["bytes"] += n_bytes
    totals = {sp: {"files": sum(x["files"] for x in per_source if x["split"] == sp),
                   "bytes": sum(x["bytes"] for x in per_source if x["split"] == sp)} for sp in ("train", "valid")}
    return {"sources": per_source, "licenses": per_license, "totals": totals}
