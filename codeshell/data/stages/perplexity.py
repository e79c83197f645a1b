"""Perplexity filter (global stage): an n-gram LM scores every document and the tails of the
score distribution are dropped by percentile, per language when a language has enough files.

The model is a KenLM model (`.arpa` or KenLM binary) given by `model`, scored with the `kenlm`
package when installed; without `model`, an interpolated modified Kneser-Ney model is
trained here on a sample of the corpus itself (`codeshell.data.ngram_lm`). Low perplexity
tails catch boilerplate and repetition, high tails catch gibberish; this stage does not
judge code quality beyond that.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from codeshell.data.io import PipelineError, read_jsonl
from codeshell.data.ngram_lm import doc_perplexity, load_lm, sentences, train_arpa
from codeshell.data.stages.base import Doc, Stage, StageStats, register


@register
class Perplexity(Stage):
    """Drop the perplexity tails (by percentile) under an n-gram LM, trained here if not given."""

    name = "perplexity"
    kind = "global"

    @dataclasses.dataclass
    class Options:
        model: str | None = None
        order: int = 4
        train_bytes: int = 4_000_000
        low_percentile: float = 0.0
        high_percentile: float = 99.0
        per_language: bool = True
        min_docs_per_language: int = 50
        max_chars: int = 100_000

        def validate(self) -> None:
            if not 0 <= self.low_percentile < self.high_percentile <= 100:
                raise PipelineError("stage 'perplexity': need 0 <= low_percentile < high_percentile <= 100")
            if self.model and not Path(self.model).is_file():
                raise PipelineError(f"stage 'perplexity': model file {self.model} not found")
            if self.order < 2:
                raise PipelineError("stage 'perplexity': order must be >= 2")

    def prepare(self, input_shards: list, workdir: Path) -> None:
        """Train a model on a round-robin sample of the input shards when none is given."""
        if self.opts.model:
            return
        out = Path(workdir) / "lm.arpa"
        if not out.exists():
            budget = self.opts.train_bytes
            readers = [read_jsonl(p) for p in input_shards]

            def sample():
                nonlocal budget
                for doc in itertools.chain.from_iterable(itertools.zip_longest(*readers)):
                    if doc is None:
                        continue
                    if budget <= 0:
                        return
                    budget -= doc["size"]
                    yield from sentences(doc["text"], self.opts.max_chars)

            train_arpa(sample(), self.opts.order, out)
        self.opts.model = str(out)

    def setup(self) -> None:
        self._lm = load_lm(self.opts.model)

    def collect(self, docs: Iterable[Doc]) -> list[tuple[str, str, float]]:
        if not hasattr(self, "_lm"):
            self.setup()
        return [(d["id"], d.get("lang") or "unknown", doc_perplexity(self._lm, d["text"], self.opts.max_chars))
                for d in docs]

    def reduce(self, collected: list[list[tuple[str, str, float]]]) -> set:
        rows = [r for shard in collected for r in shard]
        groups: dict[str, list] = {}
        for r in rows:
            key = r[1] if self.opts.per_language else "all"
            groups.setdefault(key, []).append(r)
        small = [r for k, g in groups.items() if len(g) < self.opts.min_docs_per_language for r in g]
        groups = {k: g for k, g in groups.items() if len(g) >= self.opts.min_docs_per_language}
        if len(small) >= self.opts.min_docs_per_language:
            groups["_pooled"] = small  # languages too small for their own percentiles share one
        # (a pool still too small for a percentile to mean anything is left unfiltered)
        drop: set[str] = set()
        self.reduce_counters = {}
        for key, g in groups.items():
            ppl = np.array([r[2] for r in g], dtype=np.float64)
            finite = ppl[np.isfinite(ppl)]
            if len(finite) == 0:
                continue
            lo = np.percentile(finite, self.opts.low_percentile) if self.opts.low_percentile > 0 else -np.inf
            hi = np.percentile(finite, self.opts.high_percentile) if self.opts.high_percentile < 100 else np.inf
            for r, p in zip(g, ppl):
                if not np.isfinite(p) or p < lo or p > hi:
                    drop.add(r[0])
            self.reduce_counters[f"threshold_high:{key}"] = float(hi)
        return drop

    def apply(self, doc: Doc, state: set, stats: StageStats) -> Doc | None:
        return None if doc["id"] in state else doc
