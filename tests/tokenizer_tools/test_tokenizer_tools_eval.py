"""`codeshell tokenizer eval`: characters per token by category, checked against a direct
count and against the released CodeShell tokenizer's README figures."""

from __future__ import annotations

import json

from tokenizers import Tokenizer
from typer.testing import CliRunner

from codeshell.tokenizer_tools.cli import app
from codeshell.tokenizer_tools.evaluate import categorize, chars_per_token, format_table

README = {"chinese": 1.50, "english": 3.47, "code": 3.30}  # CodeShell's README, CodeShell row


def test_categories():
    assert categorize("a/b.py", "x = 1") == ["code", "code:python"]
    assert categorize("notes.md", "hello there") == ["english"]
    assert categorize("x.txt", "这是中文文本，用于测试。") == ["chinese"]


def test_released_tokenizer_figures(tokenizer_dir, code, zh, english, capsys):
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    zh_texts = [(f"zh{i}", t) for i, t in enumerate(zh[1][::3])]
    texts = zh_texts + code + english
    forced = {n: "english" for n, _ in english} | {n: "chinese" for n, _ in zh_texts}
    r = chars_per_token({"codeshell": tok}, texts, forced)["codeshell"]
    # the arithmetic: total characters over total tokens, per category
    py = [t for n, t in code if n.endswith(".py")]
    direct = sum(map(len, py)) / sum(len(tok.encode(t, add_special_tokens=False).ids) for t in py)
    assert abs(r["code"] - direct) < 1e-9 and r["code:python"] == r["code"]
    with capsys.disabled():
        print("\nreleased CodeShell tokenizer on this machine's corpus:", {k: round(v, 2) for k, v in r.items()},
              "README:", README)
    # Our corpus is not theirs (their English was not license texts, their code not only
    # Python): the same figures within 30%, and the same shape (Chinese far below the others).
    for k, v in README.items():
        assert abs(r[k] - v) / v < 0.30, (k, r[k], v)
    assert r["chinese"] < r["english"] / 2 and r["chinese"] < r["code"] / 2


def test_cli_eval_side_by_side(tmp_path, tokenizer_dir, code):
    d = tmp_path / "c"
    d.mkdir()
    for i, (_, t) in enumerate(code[:10]):
        (d / f"f{i}.py").write_text(t)
    (d / "zh.txt").write_text("这是一个用于测试的中文文本，其中包含一些常见的词语和句子。" * 20)
    (d / "README.md").write_text("This is an English paragraph about the project and its tests. " * 20)
    r = CliRunner().invoke(app, ["eval", str(tokenizer_dir), str(tokenizer_dir / "tokenizer.json"),
                                 "--corpus", str(d), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    a, b = res.values() if len(res) == 2 else (res[next(iter(res))],) * 2
    assert set(a) == {"chinese", "english", "code", "code:python"} and a == b
    table = format_table(res)
    assert table.splitlines()[0] == "| tokenizer | chinese | english | code | code:python |"
    r = CliRunner().invoke(app, ["eval", str(tokenizer_dir)])
    assert r.exit_code == 2 and "--corpus" in r.output


def test_cli_eval_on_pipeline_shards_uses_each_records_language(tmp_path, tokenizer_dir, code):
    """The data pipeline's JSONL shards mix languages: each record counts under its own
    language (its `lang`, else its `path`), never `code:json` from the shard's file name."""
    from codeshell.data import run_pipeline

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text(code[0][1])
    (src / "b.c").write_text("#include <stdio.h>\n\nint main(void) {\n    printf(\"hi\\n\");\n    return 0;\n}\n")
    (src / "notes.md").write_text("# Notes\n\nThis is an English paragraph about the project. " * 5)
    out = tmp_path / "out"
    stats = run_pipeline({"workers": 1, "stages": [{"ingest": {"sources": [{"type": "folder", "path": str(src)}]}},
                                                   "langid"]}, out, quiet=True, report=False)
    shards = [out / s for s in stats["_final_shards"]]
    assert len(shards) == 1 and shards[0].name.endswith(".jsonl")
    extra = tmp_path / "stack.jsonl"  # The Stack's shape: a path but no language column
    extra.write_text(json.dumps({"content": "fn main() { println!(\"hi\"); }\n", "max_stars_repo_path": "src/m.rs"})
                     + "\n" + json.dumps({"content": "Just some plain words in a sentence here."}) + "\n")
    r = CliRunner().invoke(app, ["eval", str(tokenizer_dir), "--corpus", str(shards[0]), "--corpus", str(extra),
                                 "--json"])
    assert r.exit_code == 0, r.output
    cats = set(next(iter(json.loads(r.output).values())))
    assert cats == {"english", "code", "code:python", "code:c", "code:rust"}, cats
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    r = CliRunner().invoke(app, ["eval", str(tokenizer_dir), "--corpus", str(bad)])
    assert r.exit_code == 2 and "line 2" in r.output and "Traceback" not in r.output
