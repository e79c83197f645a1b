"""LoRA: only the adapters train; the merged model's logits equal the adapter model's; the
merged folder (the run's last checkpoint, or `codeshell train merge`) loads through LLM and
generates."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.helpers import losses, train_cli, weights

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory):
    f = tmp_path_factory.mktemp("lora-data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Name the number {i}."},
                          {"role": "assistant", "content": f"The number is {i}."}]} for i in range(16)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    return f


ARGS = ["--seq-len", "64", "--batch-tokens", "256", "--micro-batch", "2", "--lr", "1e-2", "--lora-r", "4",
        "--lora-alpha", "8", "--lora-dropout", "0", "--base-dtype", "float32", "--precision", "fp32", "--threads", "1"]


def test_only_adapters_change_in_the_loop(tiny_ckpt, chat_jsonl, tmp_path):
    from codeshell.train.config import make_config
    from codeshell.train.loop import Trainer, prepare
    from codeshell.train.metrics import Meter

    cfg = make_config("lora", None, data=str(chat_jsonl), model=str(tiny_ckpt), output=str(tmp_path / "run"),
                      max_steps=3, seq_len=64, batch_tokens=256, micro_batch=2, lr=1e-2, lora_r=4, lora_dropout=0.0,
                      base_dtype="float32", precision="fp32")
    t = Trainer(prepare(cfg))
    before = {n: p.detach().clone() for n, p in t.module.named_parameters()}
    assert {n for n, _ in t.trainable} == {n for n in before if "lora_" in n}
    meter = Meter(tmp_path, cfg, t.plan, 1e12, 1.0, 0, False, torch.device("cpu"))
    for _ in range(3):
        meter.begin()
        t.train_step(meter)
    t.close()
    changed = {n for n, p in t.module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_lora_run_merge_and_generate(tiny_ckpt, chat_jsonl, tmp_path):
    run = tmp_path / "run"
    r = train_cli("lora", chat_jsonl, "--model", tiny_ckpt, "-o", run, "--max-steps", "4", "--save-every", "2", *ARGS)
    assert r.exit_code == 0, r.output
    curve = losses(run)
    assert curve[-1] < curve[0]
    mid, last = run / "step-000002", run / "checkpoint"
    assert (mid / "adapter_model.safetensors").is_file() and not (mid / "model.safetensors").exists()
    assert (last / "adapter_model.safetensors").is_file() and (last / "model.safetensors").is_file()

    from peft import PeftModel

    from codeshell import LLM, SamplingParams
    from codeshell.weights import load_model

    base, _, _ = load_model(tiny_ckpt)
    adapted = PeftModel.from_pretrained(base, str(last))
    merged, _, _ = load_model(last)
    ids = torch.randint(0, 70000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, m = adapted(ids), merged(ids)
    # W + s*BA against W x + s*B(A x): fp32 rounding only (a wrong merge is off by ~1e-2);
    # relative too, as the logits reach ~5 (an absolute 1e-5 failed by chance at 1.4e-5)
    torch.testing.assert_close(a, m, rtol=1e-5, atol=1e-5)

    # Only the adapted matrices moved: everything else equals the base checkpoint exactly.
    w0, w1 = weights(tiny_ckpt), weights(last)
    for k in w0:
        same = torch.equal(w0[k], w1[k])
        assert same == (not any(t in k for t in ("c_attn.weight", "c_proj.weight", "c_fc.weight"))), k

    out = tmp_path / "merged"
    r = train_cli("merge", tiny_ckpt, mid, out)
    assert r.exit_code == 0, r.output
    llm = LLM(str(out), dtype="float32")
    gen = llm.generate(["Name the number 3."], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    assert len(gen.token_ids) == 4
    r = train_cli("merge", tiny_ckpt, mid, out)
    assert r.exit_code == 2 and "not empty" in r.output
