"""The measured kernel choices of `ops.plan`, kept on disk between processes (like FFTW's
wisdom), so only the first process on a machine pays for measuring them.

What this is: a small JSON file beside the compiled extension (`_ext.cache_dir()`, itself
keyed by CPU model, CPU flags, torch version and source folder), mapping a choice key
(weight kind and shape, M bucket, ISA level, x dtype, torch's thread count, and a hash of
the kernel sources) to the winning path and the times behind it. `ops._choose` asks it
before measuring and tells it what it measured.

Why: each choice costs ~6 calls per candidate per (weight shape, M bucket); on a 1.7B model
the first prompts of a fresh server paid ~1.5 s for it (bench_serve.py: time to first token
2.4 s in the first round against 0.8 s in the next), and llama.cpp pays nothing of the kind.

What this is not: a tuning database shipped with the package (figures differ per machine and
load; nothing here is a table of numbers in the code) or a lock-protected store: writers
merge what is on disk with their own entries and replace the file atomically, so two
processes at once can lose one another's new entries, never corrupt the file (a lost entry
is measured again next time).

Trust (session 22): `measure.measure` (ops._choose) stores only a measurement it trusts (steady repeats, a second
look where the first was unsteady or close, a quiet host) and the entry records those checks
(`checks`); an entry without them (written before session 22, when one loaded minute could stick
a wrong path for good) is not used: the first process to need it measures again.

`CODESHELL_KERNEL_CHOICES=off` turns it off; `=PATH` uses that file instead (a folder there is a
ValueError that says so: before session 33 such a value measured in every process, silently).

Session 33: the entries of the quick measurement (`measure.measure`, the default) record in their
checks the rows of the weight measured (`rows`, N where the whole weight ran) and whether the
measurement was another weight's of the same slice shape (`shared`); `seconds` are per row of x
for the whole weight (the slice's scaled by N / rows). `CODESHELL_KERNEL_MEASURE=full` (the
measurement before) uses only entries measured on the whole weight.

Session 36: an entry records the host's level it was measured at (`checks["level"]`, `measure.relook`):
a later process that reads the host faster by more than `measure.MEASURE_LEVEL_GAIN` measures it
again, merges its looks with the entry's times (each candidate's least) and stores the merged winner
(the same path: confirmed; another: overturned) when its measurement passes the trust checks.
A measurement that does not pass them is kept as a provisional entry (`stored` false) where no trusted
one is: no process takes its path without measuring, but the next measurement of the key merges its
times, so processes on a loaded host converge on one path set instead of each taking its own.

Session 41: a GELU linear (c_fc) has its own entry (the choice key ends in "gelu"), its candidates
timed with the GELU; keys end in `|timed=epilogue` (`MEASURED`), so the entries of older files are
left unread (measured again once) rather than misread.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()
_memo: dict[str, object] = {}


def path() -> Path | None:
    """The choices file, or None when persistence is off (or the extension cache is unknown)."""
    env = os.environ.get("CODESHELL_KERNEL_CHOICES", "").strip()
    if env.lower() in ("off", "0", "none"):
        return None
    if env:
        p = Path(env)
        if p.is_dir():
            raise ValueError(f"CODESHELL_KERNEL_CHOICES={env!r} is a folder: give a file path "
                             "(it is created), or off")
        return p
    from . import _ext
    return _ext.cache_dir() / "kernel-choices.json"


def _sources_hash() -> str:
    # A change to any kernel source can change which path wins: its entries are then stale.
    if "src" not in _memo:
        from . import _ext
        h = hashlib.sha1()
        for p in _ext._SRCS + sorted(_ext._SRCS[0].parent.glob("*.h")):
            try:
                h.update(p.read_bytes())
            except OSError:
                pass
        _memo["src"] = h.hexdigest()[:12]
    return _memo["src"]  # type: ignore[return-value]


MEASURED = "epilogue"
"""What an entry's times are of (the file's keys end in `|timed=` this): since session 41 each
candidate timed with the epilogue the model runs after it (`measure._time_call`: the GEMMs' bf16 /
GELU epilogues, the others' cast / separate GELU pass) and a GELU linear's choice keyed apart
(`ops._choose`: the key ends in "gelu"). Entries written before (the candidates timed bare, no
such mark) are not read: the first process to need one measures again."""


def entry_key(key: tuple) -> str:
    """The file's key for an `ops` choice key: the key itself, torch's threads, the sources' hash,
    what the times are of (`MEASURED`)."""
    import torch
    return "|".join(map(str, key)) + f"|threads={torch.get_num_threads()}|src={_sources_hash()}|timed={MEASURED}"


def _read(p: Path) -> dict:
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}  # absent, unreadable or damaged: measure again (and rewrite it whole)
    return data if isinstance(data, dict) else {}


def lookup(key: tuple, cands: list[str] | None = None, whole: bool = False) -> str | None:
    """The stored winner for this choice key, or None (`entry`'s path)."""
    hit = entry(key, cands, whole)
    return None if hit is None else hit.get("path")


def entry(key: tuple, cands: list[str] | None = None, whole: bool = False,
          provisional: bool = False) -> dict | None:
    """The stored winner for this choice key, or None; with cands, only a winner measured against
    exactly those candidates (session 30: a process with a candidate switched off, e.g.
    CODESHELL_Q8_GEMM_AVX2=0, stored `sgemm:fp32` for a shape, and the next process, which offers
    the AVX2 integer GEMM too, took it without measuring the GEMM). whole: only a winner measured
    on the whole weight (checks' `rows` absent or N = key[1]; the full measurement's A/B).
    Returns the whole entry (path, seconds, checks: session 36's `measure.relook` reads its level).
    provisional (session 36): an untrusted measurement's entry too (checks' `stored` false: what a
    process measured on a loaded host; no process takes its path without measuring, the next
    measurement merges its times)."""
    p = path()
    if p is None:
        return None
    with _lock:
        if _memo.get("file") != str(p):
            _memo["file"], _memo["data"] = str(p), _read(p)
        hit = _memo["data"].get(entry_key(key))  # type: ignore[union-attr]
    if not isinstance(hit, dict) or not isinstance(hit.get("checks"), dict) or \
            not (provisional or hit["checks"].get("stored")):
        return None  # no record of a trusted measurement (an older entry): measure again
    if cands is not None and set(hit.get("seconds") or {}) != set(cands):
        return None  # measured among other candidates: measure again
    if whole and hit["checks"].get("rows", key[1]) != key[1]:
        return None  # measured on a slice of the weight (quick), the full measurement asked for
    return hit


def store(key: tuple, winner: str, times: dict[str, float], checks: dict) -> None:
    """Record a measured choice (merged into the file, which is replaced atomically) with the
    checks that made it one to trust (`ops.CHOICE_CHECKS` entry from `measure.measure`, `stored` true),
    or (session 36) an untrusted one as a provisional entry (`stored` false; `ops._choose` writes one
    only where no trusted entry is stored)."""
    p = path()
    if p is None:
        return
    # 4 significant digits (was round(v, 7): 0.1 us, 3% of codeshell-mini's ~3 us a row; session 36's
    # re-looks take each candidate's least of the stored and new times)
    entry = {"path": winner, "seconds": {k: float(f"{v:.4g}") for k, v in times.items()}, "checks": dict(checks)}
    with _lock:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            data = _read(p)
            data[entry_key(key)] = entry
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".kernel-choices.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, p)
            _memo["file"], _memo["data"] = str(p), data
        except OSError:
            pass  # a read-only cache folder: the choice still holds for this process


def forget() -> None:
    """Drop the in-process copy of the file (tests, or after the file was changed by hand)."""
    with _lock:
        _memo.pop("file", None)
        _memo.pop("data", None)
