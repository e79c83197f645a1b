"""The generation loop: JSONL written as it goes, resume after a kill -9 without regenerating,
the settings contract, token budgets."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from codeshell.eval.execution import ExecOptions
from codeshell.eval.generation import (GenerationSettings, SettingsMismatch, check_run_settings, fingerprint,
                                       generate_samples, load_samples, request_seed)
from codeshell.eval.runner import run_tasks
from codeshell.eval.tasks import get_task
from tests.eval.fakes import FakeBackend

REPO = Path(__file__).resolve().parents[2]
SETTINGS = GenerationSettings(n_samples=5, temperature=0.2, top_p=0.95, max_length=2048, seed=3)


def _problems(k: int = 6):
    task = get_task("humaneval")
    return task, task.problems()[:k]


def _refs(problems):
    return {p.prompt: p.as_generated(p.reference) for p in problems}


def test_samples_are_written_in_order_with_stop_words_applied(tmp_path):
    task, problems = _problems(3)
    be = FakeBackend(_refs(problems))
    rows = generate_samples(task, problems, be, SETTINGS, tmp_path / "s.jsonl", batch_size=2, chunk=2)
    assert [(r["task_id"], r["sample_index"]) for r in rows] == [(p.task_id, i) for p in problems for i in range(5)]
    assert all("def junk" not in r["completion"] for r in rows)
    assert any("def junk" in r["raw"] for r in rows)
    # 3 problems x ceil(5 / 2) requests, each with its own stable seed
    assert len(be.requests) == 9 and [r.n for r in be.requests[:3]] == [2, 2, 1]
    assert be.requests[0].seed == request_seed(3, problems[0].task_id, 0)
    assert load_samples(tmp_path / "s.jsonl") == rows


def test_resume_after_kill_gives_same_results_without_regenerating(tmp_path):
    task, problems = _problems(6)
    # Reference: one uninterrupted run.
    full = generate_samples(task, problems, FakeBackend(_refs(problems)), SETTINGS, tmp_path / "full.jsonl",
                            batch_size=2, chunk=2)
    # A run killed with SIGKILL after 4 batches, in another process.
    out = tmp_path / "killed.jsonl"
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from codeshell.eval.generation import GenerationSettings, generate_samples
        from codeshell.eval.tasks import get_task
        from tests.eval.fakes import FakeBackend
        task = get_task("humaneval"); problems = task.problems()[:6]
        be = FakeBackend({{p.prompt: p.as_generated(p.reference) for p in problems}}, kill_after_batches=4)
        generate_samples(task, problems, be, GenerationSettings(5, 0.2, 0.95, 2048, 3), Path({str(out)!r}),
                         batch_size=2, chunk=2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    half = load_samples(out)
    assert 0 < len(half) < len(full)
    with open(out, "a") as f:  # and a torn line, as if killed in the middle of a write
        f.write('{"task_id": "HumanEval/5", "sample_ind')
    be = FakeBackend(_refs(problems))
    resumed = generate_samples(task, problems, be, SETTINGS, out, batch_size=2, chunk=2)
    assert resumed == full
    assert sum(r.n for r in be.requests) == len(full) - len(half)  # nothing generated twice
    assert len(load_samples(out)) == len(full)


def test_resume_when_complete_generates_nothing(tmp_path):
    task, problems = _problems(2)
    generate_samples(task, problems, FakeBackend(), SETTINGS, tmp_path / "s.jsonl")
    be = FakeBackend()
    generate_samples(task, problems, be, SETTINGS, tmp_path / "s.jsonl")
    assert be.requests == []


def test_settings_contract(tmp_path):
    task = get_task("humaneval")
    run = tmp_path / "run.json"
    fp = fingerprint(task, "fake:v1", SETTINGS)
    check_run_settings(run, fp, resume=True)
    check_run_settings(run, fp, resume=True)  # same settings: fine
    other = fingerprint(task, "fake:v1", GenerationSettings(n_samples=10, seed=3))
    with pytest.raises(SettingsMismatch, match="n_samples"):
        check_run_settings(run, other, resume=True)
    check_run_settings(run, other, resume=False)  # explicit restart
    assert json.loads(run.read_text())["n_samples"] == 10


def test_run_tasks_resumes_and_refuses_other_settings(tmp_path):
    task, problems = _problems(2)
    opts = ExecOptions(workers=2, timeout_factor=3)
    s1 = run_tasks([task], FakeBackend(_refs(problems)), SETTINGS, tmp_path, opts, limit=2, show_progress=False)
    be = FakeBackend(_refs(problems))
    s2 = run_tasks([task], be, SETTINGS, tmp_path, opts, limit=2, show_progress=False)
    assert be.requests == [] and s1[0]["pass@1"] == s2[0]["pass@1"]
    results = [json.loads(x) for x in (tmp_path / "humaneval" / "results.jsonl").read_text().splitlines()]
    samples = load_samples(tmp_path / "humaneval" / "samples.jsonl")
    assert len(results) == len(samples) == 10
    # the fake answers correctly exactly when its hash says so
    expected = sum("def junk" in s["raw"] for s in samples) / 10
    assert s2[0]["pass@1"] == pytest.approx(expected)
    with pytest.raises(SettingsMismatch):
        run_tasks([task], be, GenerationSettings(n_samples=2), tmp_path, opts, limit=2, show_progress=False)


def test_token_budget_follows_max_length(tmp_path):
    task, problems = _problems(2)
    be = FakeBackend()
    n_tok = [be.prompt_tokens(p) for p in problems]
    s = GenerationSettings(n_samples=1, max_length=n_tok[0] + 7)
    rows = generate_samples(task, problems, be, s, tmp_path / "s.jsonl")
    assert be.requests[0].max_tokens == 7
    # a prompt longer than max_length gets an empty completion, not an error
    if n_tok[1] >= n_tok[0] + 7:
        assert rows[1]["completion"] == "" and rows[1]["finish_reason"] == "length"
    capped = GenerationSettings(n_samples=1, max_new_tokens=3)
    be2 = FakeBackend()
    generate_samples(task, problems, be2, capped, tmp_path / "t.jsonl")
    assert all(r.max_tokens == 3 for r in be2.requests)


def test_invalid_settings_are_rejected():
    for kw in ({"n_samples": 0}, {"temperature": -1}, {"top_p": 0}, {"max_length": 0}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            GenerationSettings(**kw)
