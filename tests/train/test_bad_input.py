"""Each bad input gets one `error: ...` line naming the problem and exit code 2, before any work."""

from __future__ import annotations

import json

import pytest

from codeshell.config import SHAPES
from tests.train.helpers import train_cli

FAST = ["--batch-tokens", "128", "--micro-batch", "2", "--max-steps", "1", "--threads", "1"]


def check(r, run, *needles):
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in errors[0], errors[0]
    assert not (run / "metrics.jsonl").exists()  # nothing started


def config_file(tmp_path, **kw):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(SHAPES["tiny"].replace(**kw).to_dict()))
    return f


def chat(tmp_path, *rows):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    return f


def test_missing_and_empty_data(tmp_path, tiny_ckpt):
    run = tmp_path / "run"
    check(train_cli("pretrain", tmp_path / "nope", "--preset", "tiny", "-o", run), run, "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    check(train_cli("pretrain", tmp_path / "empty", "--preset", "tiny", "-o", run), run, "empty", "is empty")
    (tmp_path / "e.jsonl").write_text("")
    check(train_cli("sft", tmp_path / "e.jsonl", "--model", tiny_ckpt, "-o", run), run, "e.jsonl", "is empty")


def test_shards_outside_the_vocabulary_or_longer_than_the_context(shards, tmp_path):
    run = tmp_path / "run"
    r = train_cli("pretrain", shards, "--model-config", config_file(tmp_path, vocab_size=512), "-o", run, *FAST)
    check(r, run, "shard-00000", "token id", "vocabulary of 512")
    r = train_cli("pretrain", shards, "--model-config", config_file(tmp_path, n_positions=32), "-o", run, *FAST)
    check(r, run, "64 tokens", "n_positions=32")


def test_chat_rows_without_assistant_or_with_unknown_role(tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f = chat(tmp_path, ok, {"messages": [{"role": "user", "content": "only a question"}]})
    check(train_cli("sft", f, "--model", tiny_ckpt, "-o", run, *FAST), run, "d.jsonl:2", "no assistant turn")
    f = chat(tmp_path, ok, ok, {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})
    check(train_cli("sft", f, "--model", tiny_ckpt, "-o", run, *FAST), run, "d.jsonl:3", "unknown role 'bot'")


def test_lora_target_that_matches_nothing(tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    f = chat(tmp_path, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    r = train_cli("lora", f, "--model", tiny_ckpt, "-o", run, "--lora-targets", "c_attn,q_proj", *FAST)
    check(r, run, "'q_proj'", "matches no module")


def test_resume_without_checkpoint_or_from_another_shape(shards, tmp_path):
    run = tmp_path / "run"
    check(train_cli("pretrain", shards, "--preset", "tiny", "-o", run, "--resume", *FAST), run, "no checkpoint")
    first = tmp_path / "first"
    r = train_cli("pretrain", shards, "--preset", "tiny", "-o", first, *FAST)
    assert r.exit_code == 0, r.output
    other = config_file(tmp_path, n_layer=3)
    r = train_cli("pretrain", shards, "--model-config", other, "-o", run, "--resume-from", first / "checkpoint", *FAST)
    check(r, run, "another model shape", "n_layer 2 vs 3")
    r = train_cli("pretrain", shards, "--preset", "tiny", "-o", first, *FAST)  # a finished run, no --resume
    assert r.exit_code == 2 and "already holds checkpoints" in r.output


def test_world_size_that_does_not_divide_the_batch(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    run = tmp_path / "run"
    r = train_cli("pretrain", shards, "--preset", "tiny", "-o", run, "--batch-tokens", "384", "--micro-batch", "1")
    check(r, run, "world size 4", "does not divide the batch of 6 sequences")


@pytest.mark.parametrize("args,needle", [
    (["--lr", "-1"], "--lr must be > 0"),
    (["--dist", "zero3"], "--dist must be ddp or fsdp"),
    (["--batch-tokens", "100"], "not a multiple of the sequence length 64"),
    (["--preset", "13b"], "unknown preset '13b'"),
])
def test_bad_flags(shards, tmp_path, args, needle):
    run = tmp_path / "run"
    base = ["--preset", "tiny"] if "--preset" not in args else []
    check(train_cli("pretrain", shards, *base, "-o", run, *args), run, needle)


def test_yaml_config_with_the_same_keys(shards, tmp_path):
    run = tmp_path / "run"
    y = tmp_path / "t.yaml"
    y.write_text("preset: tiny\nbatch-tokens: 128\nmicro_batch: 2\nmax_steps: 1\nthreads: 1\nlr: 3e-4\n")
    r = train_cli("pretrain", shards, "-c", y, "-o", run, "--max-steps", "2")  # the flag wins
    assert r.exit_code == 0, r.output
    assert "done: 2 steps" in r.output
    y.write_text("preset: tiny\nlearning_rate: 3e-4\n")
    check(train_cli("pretrain", shards, "-c", y, "-o", tmp_path / "r2"), tmp_path / "r2", "unknown key 'learning_rate'")
