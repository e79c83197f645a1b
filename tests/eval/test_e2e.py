"""End to end on our runtime: `codeshell eval run` in process on a tiny random checkpoint.
(The scores of a random model are not the point: the pipeline is.) The same run through
`--api-base` against a real `codeshell serve` is added when the server lands."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from codeshell.eval.cli import app
from codeshell.eval.generation import load_samples


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir):
    testing = pytest.importorskip("codeshell.testing")
    return testing.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir=tokenizer_dir)


def test_run_in_process_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ["run", "humaneval", "humaneval-chat", "--model", str(tiny_checkpoint), "--dtype", "float32",
            "--device", "cpu", "--limit", "2", "--n-samples", "1", "--max-new-tokens", "8", "--output", str(out),
            "--no-progress"]
    r = CliRunner().invoke(app, args, terminal_width=200)
    assert r.exit_code == 0, (r.output, r.exception)
    for task in ("humaneval", "humaneval-chat"):
        rows = load_samples(out / task / "samples.jsonl")
        assert [x["task_id"] for x in rows] == ["HumanEval/0", "HumanEval/1"]
        assert all(x["finish_reason"] in ("stop", "length") for x in rows)
        scores = json.loads((out / task / "scores.json").read_text())
        assert scores["n_problems"] == 2 and scores["n_samples"] == 1 and 0.0 <= scores["pass@1"] <= 1.0
        assert scores["settings"]["backend"].startswith("codeshell:")
        results = (out / task / "results.jsonl").read_text().splitlines()
        assert len(results) == 2
    assert "humaneval-chat" in r.output
    before = (out / "humaneval" / "samples.jsonl").read_bytes()
    r = CliRunner().invoke(app, args, terminal_width=200)  # resume: nothing left to generate
    assert r.exit_code == 0, r.output
    assert (out / "humaneval" / "samples.jsonl").read_bytes() == before
