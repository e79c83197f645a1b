"""`codeshell eval run|score|doctor` through typer's CliRunner, and the layering rule."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from codeshell.eval import generation
from codeshell.eval.cli import app
from codeshell.eval.tasks import get_task
from tests.eval.fakes import FakeBackend

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_humaneval_format(tmp_path):
    problems = get_task("humaneval").problems()[:4]
    rows = []
    for i, p in enumerate(problems):
        rows.append({"task_id": p.task_id, "completion": p.reference})
        rows.append({"task_id": p.task_id, "completion": p.reference if i % 2 else "\n    return None\n"})
    samples = _write(tmp_path / "samples.jsonl", rows)
    r = runner.invoke(app, ["score", "humaneval", "--samples", str(samples), "--json", str(tmp_path / "out.json"),
                            "--timeout-factor", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["task"] == "humaneval" and out["n_problems"] == 4 and out["n_samples"] == 2
    assert out["pass@1"] == pytest.approx(0.75) and out["pass@10"] is None
    results = [json.loads(x) for x in (tmp_path / "samples.results.jsonl").read_text().splitlines()]
    assert len(results) == 8
    assert {r["status"] for r in results} == {"passed", "failed"}
    failed = next(r for r in results if not r["passed"])
    assert "AssertionError" in failed["stderr"] and failed["reason"]


@pytest.mark.parametrize("content,message", [
    ("not json\n", "not valid JSON"),
    ('{"task_id": "HumanEval/0"}\n', "completion"),
    ('{"task_id": "Nope/1", "completion": ""}\n', "not in humaneval"),
    ("", "no samples"),
])
def test_score_bad_samples_file(tmp_path, content, message):
    (tmp_path / "s.jsonl").write_text(content)
    r = runner.invoke(app, ["score", "humaneval", "--samples", str(tmp_path / "s.jsonl"), "--no-progress"])
    assert r.exit_code == 2 and message in r.output


def test_score_bad_flags(tmp_path):
    r = runner.invoke(app, ["score", "humanevil", "--samples", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "unknown task" in r.output
    r = runner.invoke(app, ["score", "humaneval", "--samples", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["score", "humaneval", "--samples", "x", "--timeout-factor", "0"])
    assert r.exit_code == 2 and "timeout_factor" in r.output


def test_run_needs_exactly_one_backend(tmp_path, monkeypatch):
    # Neither: the built-in model, here missing (so nothing runs): one line naming --model.
    monkeypatch.setattr("codeshell.mini.package.MODEL_DIR", tmp_path / "no-model")
    r = runner.invoke(app, ["run", "humaneval", "--output", str(tmp_path)])
    assert r.exit_code == 2 and "--model" in r.output and "built-in codeshell-mini" in r.output
    r = runner.invoke(app, ["run", "humaneval", "--output", str(tmp_path), "--model", "m", "--api-base", "u"])
    assert r.exit_code == 2


def test_run_with_a_fake_backend_then_resume_and_mismatch(tmp_path, monkeypatch):
    made = []

    def fake(*a, **kw):
        be = FakeBackend({p.prompt: p.as_generated(p.reference) for p in get_task("humaneval").problems()[:2]})
        made.append(be)
        return be

    monkeypatch.setattr(generation, "InProcessBackend", fake)
    args = ["run", "humaneval", "--model", "fake", "--limit", "2", "--n-samples", "3", "--output", str(tmp_path),
            "--timeout-factor", "3", "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "humaneval" in r.output and "34.32" in r.output  # the published figure beside ours
    first = json.loads((tmp_path / "humaneval" / "scores.json").read_text())
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and made[1].requests == []
    assert json.loads((tmp_path / "humaneval" / "scores.json").read_text())["pass@1"] == first["pass@1"]
    r = runner.invoke(app, [*args, "--temperature", "0.8"])
    assert r.exit_code == 2 and "different settings" in r.output and "temperature" in r.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["task"] for s in summary] == ["humaneval"]


def test_doctor_lists_every_language():
    r = runner.invoke(app, ["doctor"], terminal_width=200)
    assert r.exit_code == 0, r.output
    for name in ("Python", "JavaScript", "C++", "Java", "PHP", "Lua", "R", "Racket", "D", "Rust", "Julia", "Swift"):
        assert name in r.output
    assert "sandbox:" in r.output


def test_eval_never_imports_serve():
    """Layering: codeshell.eval must not depend on codeshell.serve (statically or at import)."""
    for path in (REPO / "codeshell" / "eval").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
                if node.level:  # relative: from .. import serve
                    names += [a.name for a in node.names]
            bad = [n for n in names if n == "codeshell.serve" or n.startswith("codeshell.serve.") or n == "serve"]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"
        assert "codeshell.serve" not in path.read_text(), f"{path.relative_to(REPO)} names codeshell.serve"



def test_run_with_a_missing_model_is_a_clear_error(tmp_path):
    r = runner.invoke(app, ["run", "humaneval", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert r.exit_code == 2 and "could not set up generation" in r.output and "nope" in r.output


# ---- no sandbox: refuse, or run loudly with --unsafe-no-sandbox ----------------------------------
@pytest.fixture
def no_bwrap(monkeypatch):
    from codeshell.eval.sandbox import probe_isolation

    monkeypatch.setenv("CODESHELL_BWRAP", "/nonexistent/bwrap")  # as if bubblewrap were not installed
    probe_isolation.cache_clear()
    yield
    probe_isolation.cache_clear()


def _he_samples(tmp_path: Path) -> Path:
    problems = get_task("humaneval").problems()[:2]
    rows = [{"task_id": p.task_id, "completion": c} for p in problems for c in (p.reference, "    return None\n")]
    return _write(tmp_path / "samples.jsonl", rows)


def test_score_and_run_refuse_without_a_sandbox(tmp_path, monkeypatch, no_bwrap):
    samples = _he_samples(tmp_path)
    r = runner.invoke(app, ["score", "humaneval", "--samples", str(samples), "--json", str(tmp_path / "s.json"),
                            "--no-progress"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "bubblewrap" in r.output and "apt-get install bubblewrap" in r.output and "--unsafe-no-sandbox" in r.output
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "samples.results.jsonl").exists()

    made = []
    monkeypatch.setattr(generation, "InProcessBackend", lambda *a, **kw: made.append(FakeBackend()) or made[-1])
    r = runner.invoke(app, ["run", "humaneval", "--model", "fake", "--limit", "1", "--n-samples", "1",
                            "--output", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 2 and "apt-get install bubblewrap" in r.output
    assert made == [] and not (tmp_path / "out").exists()  # refused before any generation

    r = runner.invoke(app, ["doctor"], terminal_width=200)
    assert r.exit_code == 1 and "sandbox: NONE" in r.output and "apt-get install bubblewrap" in r.output


def test_unsafe_no_sandbox_runs_anyway_loudly(tmp_path, no_bwrap):
    samples = _he_samples(tmp_path)
    r = runner.invoke(app, ["score", "humaneval", "--samples", str(samples), "--json", str(tmp_path / "s.json"),
                            "--unsafe-no-sandbox", "--timeout-factor", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert r.output.count("WARNING: --unsafe-no-sandbox") >= 2 and "WITHOUT isolation" in r.output
    out = json.loads((tmp_path / "s.json").read_text())
    assert out["sandbox"] == "none (--unsafe-no-sandbox)" and out["pass@1"] == pytest.approx(0.5)


def test_scores_record_the_sandbox(tmp_path):
    from codeshell.eval.sandbox import probe_isolation

    if not probe_isolation().isolated:
        pytest.skip(probe_isolation().message)
    samples = _he_samples(tmp_path)
    r = runner.invoke(app, ["score", "humaneval", "--samples", str(samples), "--json", str(tmp_path / "s.json"),
                            "--timeout-factor", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.json").read_text())["sandbox"] == "bwrap"
