"""Language identification stage: assigns `lang` from the Linguist-style table in
`codeshell.data.languages` (file name, extension, shebang, content sniff).

With `min_language_bytes` set it becomes a global stage: it first totals bytes per language
over the whole corpus and then keeps only languages above the bound (CodeShell kept
languages with more than 100 MB). It does not judge file quality.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable

from codeshell.data.io import PipelineError
from codeshell.data.languages import LANGUAGES, language_of
from codeshell.data.stages.base import Doc, Stage, StageStats, register


@register
class LangId(Stage):
    """Set `lang` from file name, extension, shebang, content; optionally keep big languages only."""

    name = "langid"
    kind = "map"

    @dataclasses.dataclass
    class Options:
        languages: list | None = None  # keep only these (None: all known)
        drop_unknown: bool = True
        min_language_bytes: int = 0
        override: bool = False  # re-detect even when the input already names a language

        def validate(self) -> None:
            for lang in self.languages or []:
                if lang not in LANGUAGES:
                    raise PipelineError(f"stage 'langid': unknown language '{lang}' "
                                        f"(see codeshell.data.languages.LANGUAGES)")

    def is_global(self) -> bool:
        return self.opts.min_language_bytes > 0

    def _lang(self, doc: Doc) -> str | None:
        if doc.get("lang") and not self.opts.override:
            return doc["lang"]
        return language_of(doc.get("path"), doc["text"])

    def process(self, doc: Doc, stats: StageStats) -> Doc | None:
        return self._assign(doc, None, stats)

    def _assign(self, doc: Doc, keep: set | None, stats: StageStats) -> Doc | None:
        lang = self._lang(doc)
        if lang is None:
            stats.count("unknown_language")
            if self.opts.drop_unknown:
                return None
            lang = "unknown"
        doc["lang"] = lang
        if self.opts.languages is not None and lang not in self.opts.languages:
            stats.count("not_in_language_list")
            return None
        if keep is not None and lang not in keep:
            stats.count("language_below_min_bytes")
            return None
        return doc

    def collect(self, docs: Iterable[Doc]) -> Counter:
        totals: Counter = Counter()
        for doc in docs:
            totals[self._lang(doc) or "unknown"] += doc["size"]
        return totals

    def reduce(self, collected: list[Counter]) -> set:
        totals: Counter = Counter()
        for c in collected:
            totals.update(c)
        return {lang for lang, n in totals.items() if n >= self.opts.min_language_bytes}

    def apply(self, doc: Doc, state: set, stats: StageStats) -> Doc | None:
        return self._assign(doc, state, stats)
