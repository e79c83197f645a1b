"""A small deterministic generation backend for testing the generation loop, resume and
scoring logic without a model. Samples depend only on (prompt, seed, sample index), like a
runtime that honours per-request seeds."""

from __future__ import annotations

import hashlib
import os
import signal
from typing import Sequence

from codeshell.eval.generation import Generation, Request
from codeshell.eval.tasks import Problem


class FakeBackend:
    description = "fake:v1"
    context_length = None

    def __init__(self, references: dict[str, str] | None = None, kill_after_batches: int | None = None):
        self.references = references or {}  # prompt -> a correct completion
        self.kill_after_batches = kill_after_batches
        self.batches = 0
        self.requests: list[Request] = []

    def prompt_tokens(self, problem: Problem) -> int:
        return len((problem.prompt or "").split())

    def _text(self, r: Request, j: int) -> Generation:
        h = int(hashlib.sha256(f"{r.prompt}|{r.seed}|{j}".encode()).hexdigest(), 16)
        ref = self.references.get(r.prompt or "")
        if ref is not None and h % 3 == 0:
            # a correct answer followed by junk the stop words must cut off
            return Generation(ref + "\ndef junk():\n    pass\n", "stop")
        return Generation(f"\n    return {h % 1000}\n", "stop")

    def generate(self, requests: Sequence[Request], temperature: float, top_p: float) -> list[list[Generation]]:
        if self.kill_after_batches is not None and self.batches >= self.kill_after_batches:
            os.kill(os.getpid(), signal.SIGKILL)  # like `kill -9`: no cleanup, no flush
        self.batches += 1
        self.requests += list(requests)
        return [[self._text(r, r.start + j) for j in range(r.n)] for r in requests]
