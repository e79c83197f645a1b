"""Stage base classes, per-stage statistics and the stage registry.

A stage is either a *map* stage (looks at one document at a time: keep, drop or rewrite it)
or a *global* stage (needs the whole corpus: dedup, percentile filters, language totals).
Global stages run in three phases so they scale out like map stages:
`collect` per shard (in workers) -> `reduce` once (in the driver) -> `apply` per document.
This module holds no stage logic itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections import defaultdict
from typing import Any, ClassVar

from codeshell.data.io import PipelineError

Doc = dict  # {"id", "text", "size", "repo", "path", "license", "lang", ...}


class StageStats:
    """Documents and bytes in and out of one stage, overall and per language, plus counters."""

    def __init__(self) -> None:
        self.docs_in = self.docs_out = self.bytes_in = self.bytes_out = 0
        self.by_lang: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.counters: dict[str, int] = defaultdict(int)
        self.seconds = 0.0  # CPU time spent in this stage (summed over workers)

    def seen(self, doc: Doc) -> None:
        self.docs_in += 1
        self.bytes_in += doc["size"]
        row = self.by_lang[doc.get("lang") or "unknown"]
        row[0] += 1
        row[2] += doc["size"]

    def kept(self, doc: Doc) -> None:
        self.docs_out += 1
        self.bytes_out += doc["size"]
        row = self.by_lang[doc.get("lang") or "unknown"]
        row[1] += 1
        row[3] += doc["size"]

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def to_dict(self) -> dict:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "by_lang": dict(self.by_lang), "counters": dict(self.counters),
                "seconds": round(self.seconds, 4)}

    @classmethod
    def merge(cls, dicts: list[dict]) -> dict:
        out = cls().to_dict()
        for d in dicts:
            for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "seconds"):
                out[k] += d.get(k, 0)
            for lang, row in d["by_lang"].items():
                cur = out["by_lang"].setdefault(lang, [0, 0, 0, 0])
                for i, v in enumerate(row):
                    cur[i] += v
            for k, v in d["counters"].items():
                out["counters"][k] = out["counters"].get(k, 0) + v
        return out


class Stage:
    """Base of every stage. Subclasses set `name`, `kind` and a dataclass `Options`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "map"  # "map" | "global" | "ingest" | "sink"

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, options: Any) -> None:
        self.opts = options

    def setup(self) -> None:
        """Load heavy resources (models, tokenizers) once per worker process."""

    def is_global(self) -> bool:
        return self.kind == "global"

    # map stages
    def process(self, doc: Doc, stats: StageStats) -> Doc | None:
        raise NotImplementedError

    # global stages
    def prepare(self, input_shards: list, workdir) -> None:
        """Driver-side work before collect (for example training a model on a sample)."""

    def collect(self, docs: typing.Iterable[Doc]) -> Any:
        raise NotImplementedError

    def reduce(self, collected: list[Any]) -> Any:
        raise NotImplementedError

    def apply(self, doc: Doc, state: Any, stats: StageStats) -> Doc | None:
        raise NotImplementedError


REGISTRY: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    if not cls.name:
        raise ValueError(f"{cls} has no name")
    REGISTRY[cls.name] = cls
    return cls


def _check_type(stage: str, key: str, value: Any, hint: Any) -> Any:
    """Coerce YAML scalars to the option's declared type, or raise a clear error."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    bad = PipelineError(f"stage '{stage}': option '{key}' must be {getattr(hint, '__name__', hint)}, got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    return value


def resolve_stage_class(name: str) -> type[Stage]:
    """A registered name, or `package.module:Class` for a plug-in stage."""
    import codeshell.data.stages  # noqa: F401  (registers the built-in stages)

    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise PipelineError(f"plug-in stage '{name}' cannot be imported: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise PipelineError(f"plug-in stage '{name}' is not a Stage subclass")
        return cls
    known = ", ".join(sorted(REGISTRY))
    raise PipelineError(f"unknown stage '{name}' (known stages: {known}; or give module:Class)")


def build_stage(name: str, options: dict | None) -> Stage:
    """Instantiate a stage from its name and option mapping, rejecting unknown options."""
    cls = resolve_stage_class(name)
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise PipelineError(f"stage '{name}': unknown option(s) {', '.join(unknown)} "
                            f"(valid: {', '.join(sorted(fields)) or 'none'})")
    hints = typing.get_type_hints(cls.Options)
    values = {k: _check_type(name, k, v, hints[k]) for k, v in options.items()}
    try:
        opts = cls.Options(**values)
    except TypeError as e:
        raise PipelineError(f"stage '{name}': {e}") from e
    validate = getattr(opts, "validate", None)
    if validate:
        validate()
    return cls(opts)
