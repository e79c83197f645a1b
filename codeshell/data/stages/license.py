"""The `license` stage: keep a file only when its license is on an allow-list of SPDX ids.

A document's license is what its source said (`license:` of a folder/git source, The Stack's
license columns), else its repository's LICENSE file as recognized at ingest, else an
`SPDX-License-Identifier:` line at the top of the file. An SPDX expression is allowed when
`A OR B` has one allowed side and `A AND B` (or The Stack's list of several licenses of one
repository) has both. A document with no known license is dropped or kept by `unknown`.
Counts per license (kept and dropped) go to the report. This stage does not read license
texts inside files beyond that header line.
"""

from __future__ import annotations

import dataclasses

from codeshell.data import licenses
from codeshell.data.io import PipelineError
from codeshell.data.stages.base import Doc, Stage, StageStats, register


@register
class License(Stage):
    """Keep files whose license is on the SPDX allow-list; `unknown: drop|keep` for the rest."""

    name = "license"

    @dataclasses.dataclass
    class Options:
        allow: list = dataclasses.field(default_factory=lambda: list(licenses.PERMISSIVE))
        unknown: str = "drop"  # a file/repository with no known license: "drop" or "keep"
        spdx_headers: bool = True  # use a file's `SPDX-License-Identifier:` when the source says nothing

        def validate(self) -> None:
            if self.unknown not in ("drop", "keep"):
                raise PipelineError(f"stage 'license': unknown must be 'drop' or 'keep', got {self.unknown!r}")
            if not self.allow:
                raise PipelineError("stage 'license': the allow-list is empty (every file would be dropped)")
            licenses.check_ids(self.allow)

    def setup(self) -> None:
        self._allow = frozenset(licenses.check_ids(self.opts.allow))

    def process(self, doc: Doc, stats: StageStats) -> Doc | None:
        if not hasattr(self, "_allow"):
            self.setup()
        expr = licenses.normalize(doc.get("license"))
        if expr is None and self.opts.spdx_headers:
            expr = licenses.spdx_header(doc["text"])
        if expr is None:
            stats.count(f"license:{licenses.UNKNOWN}:" + ("kept" if self.opts.unknown == "keep" else "dropped"))
            return doc if self.opts.unknown == "keep" else None
        doc["license"] = expr
        if licenses.allowed(expr, self._allow):
            stats.count(f"license:{expr}:kept")
            return doc
        stats.count(f"license:{expr}:dropped")
        return None
