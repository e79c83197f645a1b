"""codeshell-mini's corpus gathering: licenses from the distribution's own metadata, whole
distributions held out, manifest counts that match the files written."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from codeshell.mini import corpus


def _sdist(path, name, version, license_lines, files):
    with tarfile.open(path, "w:gz") as t:
        def add(rel, text):
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-{version}/{rel}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        add("PKG-INFO", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(l + "\n" for l in license_lines))
        for rel, text in files.items():
            add(rel, text)
    return path


@pytest.mark.parametrize("lines,want", [
    (["License: MIT"], "MIT"),
    (["License-Expression: Apache-2.0"], "Apache-2.0"),
    (["Classifier: License :: OSI Approved :: BSD License"], "BSD-3-Clause"),
    (["License: BSD 2-Clause License"], "BSD-2-Clause"),
    (["Classifier: License :: OSI Approved :: Python Software Foundation License"], "PSF-2.0"),
    (["License: GPL-3.0-or-later"], None),
    (["License: UNKNOWN"], None),
    ([], None),
])
def test_license_from_metadata(lines, want):
    meta = corpus._parse_metadata("Metadata-Version: 2.1\nName: x\n" + "".join(l + "\n" for l in lines))
    assert corpus.spdx_from_metadata(meta) == want


def test_gather_splits_by_distribution_and_drops_unlicensed(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    _sdist(cache / "alpha-1.0.tar.gz", "alpha", "1.0", ["License: MIT"],
           {"alpha/__init__.py": "def a():\n    return 1\n", "README.md": "# alpha\n", "logo.png": "\0PNG"})
    _sdist(cache / "beta-2.0.tar.gz", "beta", "2.0", ["Classifier: License :: OSI Approved :: Apache Software License"],
           {"beta/core.py": "class B:\n    pass\n"})
    _sdist(cache / "gamma-0.1.tar.gz", "gamma", "0.1", ["License: GPL-3.0"], {"gamma.py": "x = 1\n"})
    pinned = (("alpha", "1.0", "MIT"), ("beta", "2.0", "Apache-2.0"), ("gamma", "0.1", "MIT"))
    m = corpus.gather(tmp_path / "out", cache, pinned=pinned, holdout=("beta",), stdlib_files=5)
    by = {s["repo"]: s for s in m["sources"]}
    assert set(by) == {"cpython-stdlib", "alpha", "beta"}
    assert m["rejected"] == [{"repo": "gamma", "version": "0.1", "license": "unknown"}]
    assert by["beta"]["split"] == "valid" and by["alpha"]["split"] == "train"
    assert by["alpha"]["files"] == 2 and by["cpython-stdlib"]["files"] == 5  # the PNG is not code
    rows = [json.loads(l) for l in (tmp_path / "out" / "valid" / "beta.jsonl").read_text().splitlines()]
    assert rows == [{"content": "class B:\n    pass\n", "path": "beta/core.py", "repo": "beta",
                     "license": "Apache-2.0", "version": "2.0"}]
    train_bytes = sum(len(json.loads(l)["content"].encode()) for f in (tmp_path / "out" / "train").glob("*.jsonl")
                      for l in f.read_text().splitlines())
    assert train_bytes == m["totals"]["train"]["bytes"]
    assert m["licenses"]["Apache-2.0"]["files"] == 1
    # A second call with the same list reads the manifest instead of gathering again.
    (cache / "alpha-1.0.tar.gz").unlink()
    assert corpus.gather(tmp_path / "out", cache, pinned=pinned, holdout=("beta",), stdlib_files=5)["key"] == m["key"]
