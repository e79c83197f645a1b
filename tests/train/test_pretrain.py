"""Pretraining on packed shards: a tiny model overfits a small set, the run folder holds the
metrics and the plot, and the checkpoint loads as it is through LLM and transformers."""

from __future__ import annotations

import json

import torch

from tests.train.helpers import STDLIB, losses, make_shards, metrics, train_cli


def test_tiny_model_overfits_and_its_checkpoint_loads(tmp_path, tokenizer_dir):
    data = make_shards(tmp_path / "small", tokenizer_dir, files="json/__init__.py", max_chars=600)  # 3 rows
    run = tmp_path / "run"
    r = train_cli("pretrain", data, "-o", run, "--preset", "tiny", "--batch-tokens", "192", "--micro-batch", "3",
                  "--max-steps", "30", "--lr", "3e-2", "--warmup-steps", "2", "--save-every", "0",
                  "--tokenizer", tokenizer_dir, "--threads", "1")
    assert r.exit_code == 0, r.output
    curve = losses(run)
    assert len(curve) == 30
    assert curve[0] > 10.5 and curve[-1] < 3.0, curve  # ln(70144) = 11.2 at the start
    rows = metrics(run)
    for key in ("step", "loss", "lr", "tok_per_s", "mfu", "grad_norm", "data_s", "forward_s", "backward_s",
                "optimizer_s"):
        assert key in rows[-1], key
    assert 0 < rows[-1]["mfu"] < 1
    assert "done: 30 steps" in r.output

    ck = run / "checkpoint"
    assert ck.resolve().name == "step-000030"
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["model_type"] == "codeshell"
    from transformers import AutoModelForCausalLM

    from codeshell import LLM, SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    llm = LLM(str(ck), dtype="float32")
    ids = torch.tensor([llm.tokenizer.encode('"""JSON (JavaScript Object Notation)')])
    with torch.no_grad():
        ours = llm.model(ids)
        theirs = hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    out = llm.generate(['r"""JSON (JavaScript'], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert out  # a memorised continuation of the training text
    r = train_cli("plot", run)
    assert r.exit_code == 0, r.output
    png = run / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_presets_are_listed_with_sizes():
    r = train_cli("presets")
    assert r.exit_code == 0
    assert "125m" in r.output and "7b" in r.output and "7688.0M" in r.output


def test_continued_pretraining_from_a_checkpoint_with_a_token_budget(shards, tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    r = train_cli("pretrain", shards, "--model", tiny_ckpt, "-o", run, "--batch-tokens", "256", "--micro-batch", "2",
                  "--tokens", "300", "--threads", "1")  # ceil(300 / 256) = 2 steps
    assert r.exit_code == 0, r.output
    assert len(losses(run)) == 2
    assert (run / "checkpoint" / "tokenizer.json").is_file()  # taken from the model folder
    assert losses(run)[0] > 11.5  # the random tiny checkpoint's own loss (std 0.2 weights), not a fresh init's


def test_a_new_model_takes_its_tokenizers_end_of_text(tmp_path, tokenizer_dir):
    released = tokenizer_dir
    # A tokenizer of our own (`<|endoftext|>` is id 0 there, not the released 70000): the new
    # model's bos/eos become that id, so generation stops where the packed documents end.
    from codeshell.tokenizer import eot_id
    from codeshell.tokenizer_tools.train import save_tokenizer, train_tokenizer

    texts = [f.read_text() for f in sorted((STDLIB / "json").glob("*.py"))]
    tok = tmp_path / "tok"
    save_tokenizer(train_tokenizer(texts, 400), tok, model_max_length=256)
    eot = eot_id(tok)
    assert eot is not None and eot != 70000
    data = make_shards(tmp_path / "data", tok, files="json/__init__.py", max_chars=600)
    run = tmp_path / "run"
    r = train_cli("pretrain", data, "-o", run, "--preset", "tiny", "--batch-tokens", "128", "--micro-batch", "2",
                  "--max-steps", "1", "--save-every", "0", "--tokenizer", tok, "--threads", "1")
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "checkpoint" / "config.json").read_text())
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == eot

    # A vocabulary that does not hold the tokenizer's eot (the released one's 70000): one line.
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**cfg, "vocab_size": 512}))
    r = train_cli("pretrain", data, "-o", tmp_path / "run2", "--model-config", small, "--max-steps", "1",
                  "--batch-tokens", "128", "--micro-batch", "2", "--tokenizer", released, "--threads", "1")
    assert r.exit_code == 2 and "<|endoftext|> id 70000 is outside the model's vocabulary of 512" in r.output, r.output
