"""End to end through the `codeshell` command: `data run` packs a small corpus, `train pretrain`
trains on its shards, and `eval run humaneval --model RUN/checkpoint` takes the checkpoint."""

from __future__ import annotations

import json
import shutil

import yaml
from typer.testing import CliRunner

from codeshell.cli import app
from tests.train.helpers import STDLIB, losses


def test_pipeline_shards_to_pretrain_to_humaneval(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CODESHELL_NO_PROGRESS", "1")
    src = tmp_path / "src"
    shutil.copytree(STDLIB / "json", src / "json", ignore=shutil.ignore_patterns("__pycache__"))
    pipe = {"workers": 1, "stages": [
        {"ingest": {"sources": [{"type": "folder", "path": str(src), "repo": "me/json"}]}},
        "langid", "exact_dedup",
        {"pack": {"tokenizer": str(tokenizer_dir), "seq_len": 128, "fim_rate": 0.5}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipe))
    cli = CliRunner()
    r = cli.invoke(app, ["data", "run", str(tmp_path / "p.yaml"), "-o", str(tmp_path / "data"), "-q"])
    assert r.exit_code == 0, r.output

    run = tmp_path / "run"
    r = cli.invoke(app, ["train", "pretrain", str(tmp_path / "data" / "packed"), "--preset", "tiny", "-o", str(run),
                         "--tokenizer", str(tokenizer_dir), "--batch-tokens", "256", "--micro-batch", "2",
                         "--max-steps", "3", "--lr", "3e-3", "--threads", "1"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert len(losses(run)) == 3

    out = tmp_path / "eval"
    r = cli.invoke(app, ["eval", "run", "humaneval", "--model", str(run / "checkpoint"), "--limit", "2",
                         "--n-samples", "1", "--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu",
                         "--output", str(out), "--no-progress"], terminal_width=200)
    assert r.exit_code == 0, (r.output, r.exception)
    scores = json.loads((out / "humaneval" / "scores.json").read_text())
    assert scores["n_problems"] == 2 and scores["n_samples"] == 1
