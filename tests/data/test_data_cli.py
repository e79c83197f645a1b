"""`codeshell data train-lm` and `train-quality`: models that the pipeline stages then load."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from typer.testing import CliRunner

from codeshell.data.cli import app
from codeshell.data.ngram_lm import ArpaModel
from codeshell.data.stages.base import StageStats, build_stage

JSON_PKG = Path(sysconfig.get_paths()["stdlib"]) / "json"


def test_train_lm_then_perplexity_stage(tmp_path):
    r = CliRunner().invoke(app, ["train-lm", str(JSON_PKG), "-o", str(tmp_path / "lm.arpa"), "--order", "3"])
    assert r.exit_code == 0, r.output
    lm = ArpaModel(tmp_path / "lm.arpa")
    assert lm.order == 3
    assert lm.score("import json") > lm.score("json import zzz")
    st = build_stage("perplexity", {"model": str(tmp_path / "lm.arpa")})
    st.setup()
    assert len(st.collect([{"id": "a", "text": "import json\n", "size": 12}])) == 1
    r = CliRunner().invoke(app, ["train-lm", str(tmp_path / "none"), "-o", str(tmp_path / "x.arpa")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_train_quality_then_quality_stage(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    rng = random.Random(0)
    for i in range(6):
        (bad / f"b{i}.txt").write_text(" ".join("".join(rng.choice("qxzjvw") for _ in range(rng.randint(1, 9)))
                                                for _ in range(300)))
    r = CliRunner().invoke(app, ["train-quality", "--good", str(JSON_PKG), "--bad", str(bad), "-o", str(tmp_path / "q.pkl")])
    assert r.exit_code == 0, r.output
    st = build_stage("quality", {"model": str(tmp_path / "q.pkl")})
    st.setup()
    good_doc = {"id": "g", "text": (JSON_PKG / "tool.py").read_text(), "size": 1}
    bad_doc = {"id": "b", "text": (bad / "b0.txt").read_text(), "size": 1}
    out = st.process_batch([good_doc, bad_doc], StageStats())
    assert out[0] is not None and out[1] is None


def test_stages_lists_every_stage_with_options():
    from codeshell.data.stages.base import REGISTRY

    r = CliRunner().invoke(app, ["stages"])
    assert r.exit_code == 0
    for name in REGISTRY:
        assert f"\n{name} (" in "\n" + r.output
    assert "    threshold: 0.7" in r.output and "    seq_len: 8192" in r.output
