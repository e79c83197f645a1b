"""The codeshell-mini recipe at its smoke budget: corpus -> pipeline -> tokenizer -> sweep ->
pretrain -> chat fine-tune -> a bf16 checkpoint that `LLM` loads and generates from; a second
run resumes (every step already done) instead of starting over."""

from __future__ import annotations

import json

import pytest

from codeshell.mini.instructions import pairs_from_source, write_instruction_pairs
from codeshell.mini.recipe import build


def test_instruction_pairs_with_replayed_pretraining_text(tmp_path):
    fn = 'def add{i}(a, b):\n    """Add two numbers and return their sum as an integer."""\n    x = a\n    return x + b\n'
    docs = [{"text": "\n".join(fn.format(i=i) for i in range(j, j + 5)), "lang": "python"} for j in range(0, 40, 5)]
    docs += [{"text": "int main() {\n  return 0;\n}\n" * 40, "lang": "c"}]
    shard = tmp_path / "s.jsonl"
    shard.write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert write_instruction_pairs([shard], tmp_path / "plain.jsonl") == 40
    assert write_instruction_pairs([shard], tmp_path / "mix.jsonl", replay=0.5, replay_chars=200) == 40
    rows = [json.loads(x) for x in (tmp_path / "mix.jsonl").read_text().splitlines()]
    text = [r["text"] for r in rows if "text" in r]
    chat = sum(len(m["content"]) for r in rows if "messages" in r for m in r["messages"])
    assert len(rows) - len(text) == 40 and 0.45 < sum(map(len, text)) / (chat + sum(map(len, text))) < 0.6
    assert all(t.endswith("\n") and len(t) < 200 + 80 for t in text)  # whole lines, about the size asked
    assert any("int main" in t for t in text)  # any language is replayed, not only the pairs' Python


def test_instruction_pairs_from_a_module():
    src = ('def add(a, b=1):\n    """Add two numbers and return their sum as an integer."""\n'
           '    total = a + b\n    return total\n\n'
           'def _private(x):\n    """A private helper that nobody should ask for."""\n    return x\n\n'
           'def nodoc(x):\n    return x\n')
    pairs = pairs_from_source(src)
    assert [(n, s, d) for n, s, d, _ in pairs] == [("add", "add(a, b=1)", "Add two numbers and return their sum as an integer.")]
    assert pairs[0][3].startswith("def add(a, b=1):") and pairs[0][3].endswith("return total")
    assert pairs_from_source("def broken(:\n") == []


def test_instruction_pairs_can_keep_only_functions_that_compute():
    doc = '    """Say what this function is for, in one sentence or so."""\n'
    src = ("def total(xs):\n" + doc + "    s = 0\n    for x in xs:\n        s += x\n    return s\n\n"
           "def check(x):\n" + doc + "    if x < 0:\n        raise ValueError(x)\n    return x\n\n"
           "def show(x):\n" + doc + "    print(x)\n    return\n\n"
           "def long(x):\n" + doc + "    x += 1\n" * 20 + "    return x\n")
    assert [p[0] for p in pairs_from_source(src)] == ["total", "check", "show", "long"]
    assert [p[0] for p in pairs_from_source(src, max_body_lines=20)] == ["total"]  # raises, no value, 21 lines
    assert [p[0] for p in pairs_from_source(src, max_body_lines=21)] == ["total", "long"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    logs: list[str] = []
    ckpt = build(out, smoke=True, log=logs.append)
    return out, ckpt, logs


def test_smoke_build_gives_a_loadable_checkpoint(smoke):
    out, ckpt, logs = smoke
    from safetensors import safe_open

    from codeshell import LLM, SamplingParams

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    assert (ckpt / "tokenizer.json").is_file()
    manifest = json.loads((out / "1-corpus" / "manifest.json").read_text())
    assert manifest["sources"][0]["repo"] == "cpython-stdlib" and manifest["licenses"]["PSF-2.0"]["files"] == 60
    assert json.loads((out / "7-sft" / "step.json").read_text())["pairs"] > 0
    llm = LLM(str(ckpt), dtype="float32")
    o = llm.generate(["def add(a, b):"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    assert len(o.token_ids) == 8


def test_second_run_resumes_every_step(smoke):
    out, ckpt, _ = smoke
    logs: list[str] = []
    assert build(out, smoke=True, log=logs.append) == ckpt
    assert [l for l in logs if l.startswith("[")] == [f"[{s}] done earlier" for s in (
        "1-corpus", "2-filter", "3-tokenizer", "4-pack", "5-sweep", "6-pretrain", "7-sft", "8-final")]


def test_completes_function_needs_a_parsing_body():
    from codeshell.mini.measure import completes_function

    prompt = 'def f(x):\n    """Double x."""\n'
    assert completes_function(prompt + "    return 2 * x\n", "f")
    assert not completes_function(prompt, "f")                       # nothing added
    assert not completes_function(prompt + "    pass\n", "f")
    assert not completes_function(prompt + "    return 2 *\n", "f")  # syntax error
    assert not completes_function(prompt + "    return 2 * x\n", "g")


def test_bits_per_byte_of_model_and_ngram(smoke):
    from codeshell.mini.measure import held_out_docs, model_bits_per_byte, ngram_bits_per_byte

    out, ckpt, _ = smoke
    shards = sorted((out / "2-filter" / "train" / "work").glob("*/shard-*.jsonl"))[-1:]
    docs = held_out_docs(shards)
    m = model_bits_per_byte(ckpt, docs[:2], window=64)
    assert m["bytes"] == sum(len(d.encode()) for d in docs[:2]) and 0 < m["bits_per_byte"] < 16
    # Windows overlap: scoring with one long window and with short ones covers each token once.
    assert abs(model_bits_per_byte(ckpt, docs[:1], window=512)["nats_per_token"]
               - model_bits_per_byte(ckpt, docs[:1], window=64)["nats_per_token"]) < 1.0
    g = ngram_bits_per_byte(out / "3-tokenizer", docs[2:], docs[:2], work=out)
    assert g["bytes"] == m["bytes"] and 0 < g["bits_per_byte"] < 16
