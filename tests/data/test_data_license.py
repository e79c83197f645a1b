"""The `license` stage: licenses from the source, the repository's LICENSE file, The Stack's
license lists and SPDX headers; the allow-list, the unknown-license option, and the counts
in the report."""

from __future__ import annotations

import json

import pytest
from datacorpus import run_stage

from codeshell.data import PipelineError, run_pipeline
from codeshell.data.io import read_jsonl
from codeshell.data.licenses import allowed, identify_text, normalize

MIT = """MIT License

Copyright (c) 2024 Somebody

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
"""
GPL3 = """                    GNU GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007

 Copyright (C) 2007 Free Software Foundation, Inc. <https://fsf.org/>
 Everyone is permitted to copy and distribute verbatim copies
 of this license document, but changing it is not allowed.
 ...
  The GNU General Public License does not permit incorporating your program
into proprietary programs.  If your program is a subroutine library, you
may consider it more useful to permit linking proprietary applications with
the library.  If this is what you want to do, use the GNU Lesser General
Public License instead of this License.
"""
CODE = "def f(x):\n    return x + 1\n"


@pytest.fixture()
def sources(tmp_path):
    for repo, lic in (("mit-repo", MIT), ("gpl-repo", GPL3), ("bare-repo", None)):
        d = tmp_path / repo
        d.mkdir()
        (d / "main.py").write_text(CODE + f"# {repo}\n")
        if lic:
            (d / "LICENSE").write_text(lic)
    (tmp_path / "bare-repo" / "spdx.py").write_text("# SPDX-License-Identifier: Apache-2.0\n" + CODE)
    rows = [{"content": CODE + "# a\n", "path": "a.py", "repo_name": "s/a", "max_stars_repo_licenses": ["MIT", "Apache-2.0"]},
            {"content": CODE + "# b\n", "path": "b.py", "repo_name": "s/b", "max_stars_repo_licenses": ["MIT", "GPL-3.0"]},
            {"content": CODE + "# c\n", "path": "c.py", "repo_name": "s/c", "license": "mit OR GPL-3.0-or-later"},
            {"content": CODE + "# d\n", "path": "d.py", "repo_name": "s/d"}]
    (tmp_path / "stack.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    srcs = [{"type": "folder", "path": str(tmp_path / r), "repo": r, "include": ["*.py"]} for r in ("mit-repo", "gpl-repo", "bare-repo")]
    return srcs + [{"type": "jsonl", "path": str(tmp_path / "stack.jsonl")}]


def test_license_stage_in_a_run_with_report(sources, tmp_path):
    out = tmp_path / "out"
    stats = run_pipeline({"workers": 1, "stages": [{"ingest": {"sources": sources}}, "license"]}, out, quiet=True)
    kept = {d["id"]: d["license"] for s in stats["_final_shards"] for d in read_jsonl(out / s)}
    assert kept == {"mit-repo/main.py": "MIT",  # from the LICENSE file
                    "bare-repo/spdx.py": "Apache-2.0",  # from its SPDX header
                    "s/a/a.py": "MIT AND Apache-2.0",  # The Stack's list: all of them apply
                    "s/c/c.py": "MIT OR GPL-3.0-or-later"}  # one permissive choice is enough
    report = (out / "report.md").read_text()
    assert "## Licenses" in report
    assert "| GPL-3.0-only | 1 | 0 | 1 |" in report
    assert "| unknown | 2 | 0 | 2 |" in report  # bare-repo/main.py and s/d/d.py
    assert "| MIT | 1 | 1 | 0 |" in report
    lic = json.loads((out / "report.json").read_text())["licenses"]
    assert lic["MIT AND GPL-3.0-only"] == {"kept": 0, "dropped": 1}
    assert sum(v["kept"] for v in lic.values()) == 4 and sum(v["dropped"] for v in lic.values()) == 4


def test_unknown_licenses_kept_by_option_and_custom_allow_list():
    docs = [{"id": i, "text": CODE, "size": len(CODE), "license": lic}
            for i, lic in (("a", None), ("b", "GPL-3.0"), ("c", "NOASSERTION"), ("d", "MIT"))]
    out, st = run_stage("license", {"unknown": "keep"}, docs)
    assert {d["id"] for d in out} == {"a", "c", "d"}
    assert st.counters["license:unknown:kept"] == 2
    out, _ = run_stage("license", {"allow": ["gpl-3.0-only"], "unknown": "drop"}, docs)
    assert {d["id"] for d in out} == {"b"}  # ids are matched as SPDX, in any case


def test_bad_allow_list_is_one_clear_error():
    with pytest.raises(PipelineError, match="'Apache 2' is not an SPDX license id"):
        run_stage("license", {"allow": ["MIT", "Apache 2"]}, [])
    with pytest.raises(PipelineError, match="unknown must be 'drop' or 'keep'"):
        run_stage("license", {"unknown": "maybe"}, [])


def test_license_texts_and_expressions():
    assert identify_text(MIT) == "MIT"
    assert identify_text(GPL3) == "GPL-3.0-only"  # it names the LGPL at its end: still the GPL
    assert identify_text("Copyright me. All rights reserved.") is None
    assert normalize("Apache-2.0,mit") == "Apache-2.0 AND MIT"
    assert normalize("other") is None and normalize("Not A License") is None
    allow = frozenset({"MIT"})
    assert allowed("MIT OR GPL-3.0-only", allow) and not allowed("MIT AND GPL-3.0-only", allow)
    assert allowed("GPL-2.0-or-later WITH Classpath-exception-2.0", frozenset({"GPL-2.0-or-later"}))
