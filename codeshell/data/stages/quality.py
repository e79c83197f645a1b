"""Quality-model filter: a small, fast classifier scores every document and those below a
threshold are dropped.

The built-in model is logistic regression (scikit-learn) on hashed word 1-2-grams and
character-class features, trained from labelled good/bad examples with
`train_quality_model` or `codeshell data train-quality`. It is pluggable: `scorer:
"package.module:function"` names any callable mapping a list of texts to scores in [0, 1].
It is not a learned judge of correctness, only of "looks like the good examples".
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from codeshell.data.io import PipelineError
from codeshell.data.stages.base import Doc, Stage, StageStats, register

MODEL_KIND = "codeshell-hashed-logreg-v1"


class QualityModel:
    """Hashed n-gram features + logistic regression; `score(texts)` gives P(good)."""

    def __init__(self, n_features: int = 2**18, max_chars: int = 20_000, C: float = 4.0):
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.linear_model import LogisticRegression

        self.max_chars = max_chars
        # Tokens: identifiers, numbers, single symbols; symbols matter for code quality.
        self.vec = HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False,
                                     token_pattern=r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]", lowercase=False,
                                     norm="l2")
        self.clf = LogisticRegression(C=C, max_iter=1000)

    def _features(self, texts: Sequence[str]):
        return self.vec.transform([t[: self.max_chars] for t in texts])

    def fit(self, good: Sequence[str], bad: Sequence[str]) -> "QualityModel":
        if not good or not bad:
            raise PipelineError("quality model: need at least one good and one bad example")
        X = self._features(list(good) + list(bad))
        y = np.array([1] * len(good) + [0] * len(bad))
        self.clf.fit(X, y)
        return self

    def score(self, texts: Sequence[str]) -> np.ndarray:
        return self.clf.predict_proba(self._features(texts))[:, 1]

    def save(self, path: str | Path) -> None:
        from codeshell.data.io import write_pickle_atomic

        write_pickle_atomic(path, {"kind": MODEL_KIND, "model": self})

    @staticmethod
    def load(path: str | Path) -> "QualityModel":
        try:
            with open(path, "rb") as f:
                obj = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise PipelineError(f"quality model {path}: cannot be loaded ({e})") from e
        if not isinstance(obj, dict) or obj.get("kind") != MODEL_KIND:
            raise PipelineError(f"quality model {path}: not a {MODEL_KIND} file")
        return obj["model"]


def train_quality_model(good: Sequence[str], bad: Sequence[str], **kw) -> QualityModel:
    return QualityModel(**kw).fit(good, bad)


def _import_scorer(spec: str) -> Callable[[list[str]], Sequence[float]]:
    mod, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise PipelineError(f"stage 'quality': scorer '{spec}' cannot be imported ({e})") from e
    if not callable(fn):
        raise PipelineError(f"stage 'quality': scorer '{spec}' is not callable")
    return fn


@register
class Quality(Stage):
    """Drop documents a quality classifier scores below `threshold`."""

    name = "quality"

    @dataclasses.dataclass
    class Options:
        model: str | None = None
        scorer: str | None = None
        threshold: float = 0.5
        batch_size: int = 256

        def validate(self) -> None:
            if bool(self.model) == bool(self.scorer):
                raise PipelineError("stage 'quality': give exactly one of 'model' (a trained model "
                                    "file) or 'scorer' (module:function)")
            if self.model and not Path(self.model).is_file():
                raise PipelineError(f"stage 'quality': model file {self.model} not found")

    def setup(self) -> None:
        if self.opts.model:
            self._score = QualityModel.load(self.opts.model).score
        else:
            self._score = _import_scorer(self.opts.scorer)

    def process(self, doc: Doc, stats: StageStats) -> Doc | None:
        return self.process_batch([doc], stats)[0]

    def process_batch(self, docs: list[Doc], stats: StageStats) -> list[Doc | None]:
        """Score a batch at once (the vectorizer and classifier are much faster batched)."""
        scores = np.asarray(self._score([d["text"] for d in docs]), dtype=np.float64)
        out = []
        for d, s in zip(docs, scores):
            d["quality"] = round(float(s), 4)
            out.append(d if s >= self.opts.threshold else None)
        return out
