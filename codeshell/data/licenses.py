"""Licenses of ingested code as SPDX expressions: normalizing what sources say ("mit",
"GPL-3.0", The Stack's lists), deciding whether an expression is covered by an allow-list,
and recognizing a repository's license file or a file's `SPDX-License-Identifier` header.

SPDX ids and expressions are parsed by `license-expression` (the SPDX license index it ships).
Recognizing a LICENSE file is a small table of each license's fixed sentences, not a license
scanner: ScanCode would do it thoroughly but is hundreds of MB and seconds per repository,
while the common licenses are told apart by a sentence or two of their text. A file this
table does not know gives no license (the `license` stage then drops or keeps it by option).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from codeshell.data.io import PipelineError

UNKNOWN = "unknown"
# The Stack's notion of permissive, in SPDX ids: the default allow-list of the `license` stage.
PERMISSIVE = ["MIT", "MIT-0", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "0BSD", "ISC", "Unlicense", "CC0-1.0",
              "Zlib", "BSL-1.0", "Python-2.0", "PSF-2.0", "X11", "NCSA", "PostgreSQL", "WTFPL", "Artistic-2.0"]
_NOASSERTION = {"", "none", "noassertion", "other", "unknown", "unlicensed", "proprietary", "null"}


@functools.lru_cache(maxsize=1)
def _licensing():
    try:
        from license_expression import get_spdx_licensing
    except ImportError as e:
        raise PipelineError("license handling needs `pip install license-expression` "
                            "(in the codeshell[data] extra)") from e
    return get_spdx_licensing()


@functools.lru_cache(maxsize=4096)
def normalize(raw: str | None) -> str | None:
    """The canonical SPDX expression of what a source says, or None when it names no known
    license. A comma-separated list (The Stack's several detected licenses of one repository)
    means all of them apply: `MIT,Apache-2.0` -> `MIT AND Apache-2.0`."""
    if raw is None:
        return None
    parts = [p.strip() for p in str(raw).split(",")]
    parts = [p for p in parts if p.lower() not in _NOASSERTION]
    if not parts:
        return None
    lic = _licensing()
    out = []
    for p in parts:
        try:
            expr = lic.parse(p, validate=True, strict=False)
        except Exception:  # ExpressionError and its kin: not an SPDX license
            return None
        if expr is None:
            return None
        out.append(str(expr))
    if len(out) == 1:
        return out[0]
    return str(lic.parse(" AND ".join(f"({e})" if " " in e else e for e in out)))


def check_ids(ids: list) -> list[str]:
    """Validate an allow-list: each entry one SPDX license id (any case); returns the canonical ids."""
    lic = _licensing()
    out = []
    for x in ids:
        if not isinstance(x, str):
            raise PipelineError(f"stage 'license': allow-list entries are SPDX ids (strings), got {x!r}")
        try:
            expr = lic.parse(x, validate=True, strict=True)
        except Exception:
            raise PipelineError(f"stage 'license': {x!r} is not an SPDX license id "
                                "(see https://spdx.org/licenses/, e.g. MIT, Apache-2.0, BSD-3-Clause)") from None
        keys = [s.key for s in lic.license_symbols(expr)]
        if len(keys) != 1:
            raise PipelineError(f"stage 'license': {x!r} is an expression; list single SPDX ids")
        out.append(keys[0])
    return out


@functools.lru_cache(maxsize=4096)
def allowed(expression: str, allow: frozenset[str]) -> bool:
    """Whether code under `expression` may be used when the licenses in `allow` may:
    `A OR B` needs one of them, `A AND B` both, `A WITH exception` A."""
    lic = _licensing()
    expr = lic.parse(expression)

    def ok(node) -> bool:
        op = type(node).__name__
        if op == "OR":
            return any(ok(a) for a in node.args)
        if op == "AND":
            return all(ok(a) for a in node.args)
        sym = getattr(node, "license_symbol", node)  # `X WITH exception` -> X
        return getattr(sym, "key", None) in allow

    return ok(expr)


_SPDX_HEADER = re.compile(r"SPDX-License-Identifier:\s*([^\n*]+?)\s*(?:\*/|-->|$)", re.M)


def spdx_header(text: str) -> str | None:
    """The license a file declares in an `SPDX-License-Identifier:` line near its top."""
    m = _SPDX_HEADER.search(text[:4096])
    return normalize(m.group(1).strip()) if m else None


# (SPDX id, sentences that must all be present), most specific first. Whitespace is collapsed
# and case ignored before matching, so reflowed copies match too.
_TEXTS: list[tuple[str, tuple[str, ...]]] = [
    ("AGPL-3.0-only", ("gnu affero general public license", "version 3, 19 november 2007")),
    ("LGPL-3.0-only", ("gnu lesser general public license", "version 3, 29 june 2007")),
    ("LGPL-2.1-only", ("gnu lesser general public license", "version 2.1, february 1999")),
    ("GPL-3.0-only", ("gnu general public license", "version 3, 29 june 2007")),
    ("GPL-2.0-only", ("gnu general public license", "version 2, june 1991")),
    ("MPL-2.0", ("mozilla public license", "2.0")),
    ("Apache-2.0", ("apache license", "version 2.0")),
    ("BSL-1.0", ("boost software license - version 1.0",)),
    ("Unlicense", ("this is free and unencumbered software released into the public domain",)),
    ("CC0-1.0", ("cc0 1.0 universal",)),
    ("ISC", ("permission to use, copy, modify, and/or distribute this software for any purpose with or without fee",)),
    ("MIT", ("permission is hereby granted, free of charge, to any person obtaining a copy",
             "the above copyright notice and this permission notice shall be included")),
    ("BSD-3-Clause", ("redistribution and use in source and binary forms", "neither the name")),
    ("BSD-2-Clause", ("redistribution and use in source and binary forms",
                      "redistributions in binary form must reproduce")),
    ("Zlib", ("this software is provided 'as-is', without any express or implied warranty",
              "altered source versions must be plainly marked")),
]
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENSE.rst", "LICENCE", "LICENCE.txt", "LICENCE.md",
                 "COPYING", "COPYING.txt", "COPYING.md", "UNLICENSE")


def identify_text(text: str) -> str | None:
    """The SPDX id of a license text, or None when the table does not know it."""
    declared = spdx_header(text)
    if declared:
        return declared
    flat = " ".join(text.lower().split())
    # A license's title or first sentence opens it, while its body may name other licenses
    # (the GPL's last paragraph names the LGPL): the match whose first sentence comes first wins.
    best: tuple[int, int, str] | None = None
    for rank, (spdx, sentences) in enumerate(_TEXTS):
        pos = flat.find(sentences[0], 0, 1500)
        if pos < 0 or not all(s in flat for s in sentences[1:]):
            continue
        if spdx == "BSD-2-Clause" and "neither the name" in flat:
            continue
        if best is None or (pos, rank) < best[:2]:
            best = (pos, rank, spdx)
    return best[2] if best else None


def detect_repo_license(root: Path) -> str | None:
    """The license of a source folder or repository from its top-level license file."""
    for name in LICENSE_FILES:
        f = root / name
        if f.is_file():
            try:
                text = f.read_text(encoding="utf-8", errors="replace")[:64_000]
            except OSError:
                continue
            found = identify_text(text)
            if found:
                return found
    return None
