"""Compare tokenizers' compression: characters per token by category (Chinese, English, code,
and each code language), side by side, like the table in CodeShell's README
(StarCoder 1.22 / 3.47 / 3.30, CodeShell 1.50 / 3.47 / 3.30 for Chinese / English / code).

Texts are put in categories automatically (a text that is at least 30% CJK characters is
Chinese, a file the language table places is code, anything else is English) or explicitly.
It measures compression only, not downstream quality.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")
PROSE = {"text", "markdown", "restructuredtext", None}


def categorize(name: str, text: str, lang: str | None = None) -> list[str]:
    """Categories a text counts in: 'chinese', 'english', or 'code' plus 'code:<language>'.
    `lang`: the text's own language where its source says it (a JSONL record's `lang`);
    "" when the source says nothing (then its content decides, never the name of the file
    holding it); None: judge by `name` as a file name."""
    from codeshell.data.languages import language_of

    if text and len(CJK.findall(text)) / len(text) >= 0.3:
        return ["chinese"]
    if lang == "":
        lang = language_of(None, text)
    elif lang is None:
        lang = language_of(name.split(":", 1)[0] if not Path(name).exists() else name, "")
    if lang in PROSE:
        return ["english"]
    return ["code", f"code:{lang}"]


def load_tokenizer_any(spec: str | Path):
    """A tokenizers.Tokenizer from a tokenizer.json, its folder, or a Hub name (online)."""
    from tokenizers import Tokenizer

    p = Path(spec)
    if p.is_dir():
        p = p / "tokenizer.json"
    if p.is_file():
        return Tokenizer.from_file(str(p))
    if Path(spec).exists() or str(spec).startswith((".", "/")):
        raise FileNotFoundError(f"no tokenizer.json at {spec}")
    return Tokenizer.from_pretrained(str(spec))


def chars_per_token(tokenizers: dict[str, object], texts: Iterable[tuple],
                    categories: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """{tokenizer: {category: chars per token}} over `(name, text)` or `(name, text, language)`
    items (see `categorize`); `categories` forces one category per name."""
    chars: dict[str, int] = defaultdict(int)
    toks: dict[str, dict[str, int]] = {k: defaultdict(int) for k in tokenizers}
    batch: list[tuple[list[str], str]] = []

    def flush():
        for name, tok in tokenizers.items():
            encs = tok.encode_batch([t for _, t in batch], add_special_tokens=False)
            for (cats, _), e in zip(batch, encs):
                for c in cats:
                    toks[name][c] += len(e.ids)
        batch.clear()

    for name, text, *lang in texts:
        if not text:
            continue
        cats = [categories[name]] if categories and name in categories else categorize(name, text, *lang)
        for c in cats:
            chars[c] += len(text)
        batch.append((cats, text))
        if len(batch) >= 128:
            flush()
    if batch:
        flush()
    return {n: {c: chars[c] / t[c] for c in sorted(chars) if t[c]} for n, t in toks.items()}


def format_table(result: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per tokenizer, main categories first."""
    cats = sorted({c for r in result.values() for c in r},
                  key=lambda c: ({"chinese": 0, "english": 1, "code": 2}.get(c, 3), c))
    lines = ["| tokenizer | " + " | ".join(cats) + " |", "| --- |" + " ---: |" * len(cats)]
    for name, r in result.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.2f}" if c in r else "-" for c in cats) + " |")
    return "\n".join(lines)
