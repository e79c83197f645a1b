"""Instruction pairs for codeshell-mini's chat fine-tune, made from the corpus itself: a Python
function with a docstring becomes a request (its signature and the docstring's first
paragraph, phrased as a user would ask) answered by the function in a code block.

Output rows are `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`, the shape
`codeshell train sft` reads (it renders them in the official chat format). Only functions that
parse, are 3-60 lines long and have a one-paragraph summary of 20-400 characters are used.
Optionally, only functions that compute a value in a few lines are used (`max_body_lines`),
and `{"text": ...}` rows of plain pretraining text are mixed in (replay).
This module does not train.
"""

from __future__ import annotations

import ast
import json
import random
import textwrap
from pathlib import Path

from codeshell.data.io import read_jsonl

TEMPLATES = (
    "Write a Python function `{sig}` that does the following: {doc}",
    "Implement `{sig}` in Python. {doc}",
    "{doc}\nWrite this as a Python function named `{name}`.",
    "Can you write a Python function `{sig}`? It should do this: {doc}",
)


def _summary(doc: str) -> str | None:
    para = textwrap.dedent(doc).strip().split("\n\n")[0]
    para = " ".join(line.strip() for line in para.splitlines())
    if not 20 <= len(para) <= 400 or para.startswith((":", ">>>", "..")):
        return None
    return para


def _computes(node: ast.FunctionDef | ast.AsyncFunctionDef, max_body_lines: int) -> bool:
    """Whether a function's body (after its docstring) is at most `max_body_lines` lines, returns
    a value and raises nothing: the shape of a function that computes something, not of
    argument checking or a wrapper."""
    body = node.body[1:]
    if not body or body[-1].end_lineno - body[0].lineno + 1 > max_body_lines:
        return False
    nodes = [n for s in body for n in ast.walk(s)]
    return (not any(isinstance(n, ast.Raise) for n in nodes)
            and any(isinstance(n, ast.Return) and n.value is not None for n in nodes))


def pairs_from_source(text: str, max_body_lines: int | None = None) -> list[tuple[str, str, str, str]]:
    """(name, signature, summary, function source) for each usable function in a module; with
    `max_body_lines`, only functions that compute a value in at most that many lines."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        summary = _summary(doc) if doc else None
        if summary is None or node.end_lineno is None:
            continue
        if max_body_lines is not None and not _computes(node, max_body_lines):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        src = textwrap.dedent("\n".join(lines[start - 1:node.end_lineno]))
        if not 3 <= src.count("\n") + 1 <= 60:
            continue
        sig = f"{node.name}({ast.unparse(node.args)})"
        out.append((node.name, sig, summary, src))
    return out


def _chunk(text: str, rng: random.Random, chars: int) -> str:
    """A random run of whole lines of `text`, about `chars` long (the whole text if shorter)."""
    if len(text) <= chars:
        return text
    lines = text.splitlines(keepends=True)
    i = rng.randrange(len(lines))
    j, n = i, 0
    while j < len(lines) and n < chars:
        n += len(lines[j])
        j += 1
    return "".join(lines[i:j])


def write_instruction_pairs(shards: list[Path], out: Path, seed: int = 0, limit: int = 20000,
                            max_body_lines: int | None = None,
                            replay: float = 0.0, replay_chars: int = 1500) -> int:
    """Pairs from the Python documents of the pipeline's JSONL `shards`, shuffled with `seed`;
    returns how many pairs were written.

    `max_body_lines` keeps only functions that compute a value in at most that many lines
    (see `_computes`).

    `replay` > 0 adds `{"text": ...}` rows of pretraining text (runs of whole lines of random
    training documents, ~`replay_chars` each, so that they fit the fine-tune's sequence) until
    they are that share of all characters: the fine-tune keeps seeing the pretraining
    distribution, so the chat model does not forget plain code (its held-out loss)."""
    rng = random.Random(seed)
    rows, docs = [], []
    for f in shards:
        for doc in read_jsonl(f):
            if replay > 0:
                docs.append(doc["text"])
            if doc.get("lang") not in ("python", "Python") and not str(doc.get("path", "")).endswith(".py"):
                continue
            for name, sig, summary, src in pairs_from_source(doc["text"], max_body_lines):
                ask = rng.choice(TEMPLATES).format(sig=sig, doc=summary, name=name)
                rows.append({"messages": [{"role": "user", "content": ask},
                                          {"role": "assistant", "content": f"```python\n{src}\n```"}]})
    rng.shuffle(rows)
    rows = rows[:limit]
    pairs = len(rows)
    if replay > 0 and docs:
        want = replay / (1 - replay) * sum(len(m["content"]) for r in rows for m in r["messages"])
        have = 0
        while have < want:
            text = _chunk(rng.choice(docs), rng, replay_chars)
            if text.strip():
                rows.append({"text": text})
                have += len(text)
        rng.shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return pairs
