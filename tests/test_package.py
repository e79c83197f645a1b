"""Package-level guarantees: the transformers registration whatever the import order, a fast
`import codeshell`, and the layering rules between areas."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_shared


@pytest.mark.parametrize("order", ["import codeshell\nimport transformers",
                                   "import transformers\nimport codeshell",
                                   "import codeshell\nfrom codeshell import LLM"])
def test_auto_classes_know_codeshell_in_any_import_order(order):
    d = require_shared("golden/rope-mqa")
    code = f"""{order}
from transformers import AutoConfig, AutoModelForCausalLM
c = AutoConfig.from_pretrained({str(d)!r})
m = AutoModelForCausalLM.from_pretrained({str(d)!r})
print(type(c).__name__, type(m).__name__)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["KCLGPTConfig", "KCLGPTForCausalLM"]


def test_import_codeshell_does_not_import_torch_or_transformers():
    r = subprocess.run([sys.executable, "-c", "import sys, codeshell; print('torch' in sys.modules, "
                        "'transformers' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"], r.stderr


def imports_of(package: str) -> dict[Path, set[str]]:
    out = {}
    for f in (REPO / "codeshell" / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:  # relative: resolve against the file's package
                    parts = f.relative_to(REPO).with_suffix("").parts[:-node.level]
                    mod = ".".join(parts + ((mod,) if mod else ()))
                names.add(mod)
        out[f] = names
    return out


@pytest.mark.parametrize("package", ["engine", "eval", "data", "train", "quant", "kernels"])
def test_layering_no_http_below_the_servers(package):
    """eval, data and train never import the servers; the engine imports nothing of HTTP."""
    if not (REPO / "codeshell" / package).is_dir():
        pytest.skip(f"codeshell/{package} does not exist yet")
    forbidden = ("codeshell.serve", "fastapi", "uvicorn", "starlette")
    if package == "engine":
        forbidden += ("aiohttp", "http.server", "httpx")
    for f, names in imports_of(package).items():
        bad = [n for n in names if n.startswith(forbidden)]
        assert not bad, f"{f.relative_to(REPO)} imports {bad}"


def test_docs_install_the_way_the_readme_does():
    """One way to install: from the clone (`pip install -e .` / `-e ".[extra]"`), as the README
    says; never `pip install codeshell` or `'codeshell[extra]'` from an index."""
    import re
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert 'pip install -e ".[test]"' in docs[0].read_text()
    for f in docs:
        for line in f.read_text().splitlines():
            m = re.search(r"pip install\s+(?:-\S+\s+)*['\"]?codeshell\b", line)
            assert m is None, f"{f.relative_to(REPO)}: {line.strip()}"
