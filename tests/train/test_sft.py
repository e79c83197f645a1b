"""SFT data: the loss covers the assistant replies (with their end marker) of chats rendered in
the official format, the completion of prompt/completion rows and all of text rows; packed
examples do not see each other; a full fine-tune runs end to end (pack and bucket)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from codeshell.train.data import IGNORE, ExampleRows, Tokenized
from tests.train.helpers import losses, metrics, train_cli


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenized(tokenizer_dir, 0.0, 0.5, 0)


@pytest.fixture(scope="module")
def official(tokenizer_dir):
    return json.loads((tokenizer_dir / "prompts.json").read_text())["chat"]


def labelled_text(tok, e) -> str:
    return "".join(tok.tok.decode([int(i)], skip_special_tokens=False) for i, lab in zip(e.ids, e.labels) if lab)


def test_chat_labels_are_the_assistant_turns_of_the_official_string(tok, official):
    case = next(c for c in official if c["history"])
    (q1, r1), = case["history"]
    msgs = [{"role": "user", "content": q1}, {"role": "assistant", "content": r1},
            {"role": "user", "content": case["query"]}, {"role": "assistant", "content": "print('hi')"}]
    e, = tok.examples([("row", {"messages": msgs})])
    full = case["prompt"] + " print('hi')|<end>|"  # the official prompt, then the reply the model writes
    assert tok.tok.decode(e.ids.tolist()) == full
    assert e.ids[: len(case["ids"])].tolist() == case["ids"]  # the same tokens as the official prompt
    assert labelled_text(tok, e) == f" {r1}|<end>| print('hi')|<end>|"
    assert not e.labels[: len(case["ids"])][-5:].any()  # "## assistant:" itself is not learned

    sys_msgs = [{"role": "system", "content": "You are terse."}, *msgs[:2]]
    e, = tok.examples([("row", {"messages": sys_msgs})])
    from codeshell.prompts import chat_prompt_from_history

    assert tok.tok.decode(e.ids.tolist()) == chat_prompt_from_history(q1, [], "You are terse.") + f" {r1}|<end>|"
    assert labelled_text(tok, e) == f" {r1}|<end>|"


def test_prompt_completion_and_text_rows(tok):
    pc, text = tok.examples([("a", {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}),
                             ("b", {"text": "import os\nprint(os.sep)\n"})])
    assert labelled_text(tok, pc) == "    return a + b\n<|endoftext|>"
    assert tok.tok.decode(pc.ids.tolist(), skip_special_tokens=False) == "def add(a, b):\n    return a + b\n<|endoftext|>"
    assert text.labels.all() and tok.tok.decode(text.ids.tolist(), skip_special_tokens=False) == "import os\nprint(os.sep)\n<|endoftext|>"
    fim, = Tokenized(tok.pack.opts.tokenizer, 1.0, 0.0, 0).examples([("c", {"text": "def f():\n    return 1\n"})])
    s = tok.tok.decode(fim.ids.tolist(), skip_special_tokens=False)
    assert s.startswith("<fim_prefix>") and "<fim_suffix>" in s and "<fim_middle>" in s  # the pipeline's PSM


def test_targets_match_transformers_labels_and_packing_isolates_examples(tok, tiny_ckpt):
    from transformers import AutoModelForCausalLM

    from codeshell.train.build import LMLoss
    from codeshell.weights import load_model

    rows = [("a", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}),
            ("b", {"prompt": "x = ", "completion": "42\n"})]
    ex = tok.examples(rows)
    model, _, _ = load_model(tiny_ckpt)
    lm = LMLoss(model, model)
    hf = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    single = ExampleRows(ex, 64, "bucket", 0, 1, False, 0, 1, tok.eot)
    packed = ExampleRows(ex, 64, "pack", 0, 1, False, 0, 1, tok.eot)
    assert single.per_epoch == 2 and packed.per_epoch == 1
    sums = []
    with torch.no_grad():
        for k in range(2):
            row = single.row(0, k)  # bucket rows are sorted by length: look the example up
            e = ex[row[0]]
            b = single.collate([row])
            s, n = lm(b.input_ids, b.targets, b.position_ids, b.mask)
            labels = torch.where(torch.from_numpy(e.labels), torch.from_numpy(e.ids), IGNORE)[None]
            ref = hf(input_ids=b.input_ids, labels=labels).loss  # transformers shifts the labels itself
            assert n == int(e.labels[1:].sum())
            assert torch.allclose(s / n, ref, atol=1e-5)
            sums.append((s, n))
        b = packed.collate([packed.row(0, 0)])
        assert b.mask is not None and b.position_ids[0, len(ex[0].ids)] == 0  # positions restart
        s, n = lm(b.input_ids, b.targets, b.position_ids, b.mask)
    assert n == sum(x[1] for x in sums)
    assert torch.allclose(s, sum(x[0] for x in sums), atol=1e-4)  # as if each example were alone


@pytest.mark.parametrize("packing", ["pack", "bucket"])
def test_sft_runs_end_to_end(tiny_ckpt, tmp_path, packing, monkeypatch):
    from codeshell.train.loop import Trainer

    evaluate = Trainer.evaluate

    def slow_evaluate(self):  # a held-out pass that takes 2 s: it must not count as step time
        time.sleep(2.0)
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", slow_evaluate)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(12)]
    rows += [{"prompt": f"def f{i}():\n", "completion": f"    return {i}\n"} for i in range(4)]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    run = tmp_path / "run"
    r = train_cli("sft", data, "--model", tiny_ckpt, "-o", run, "--seq-len", "64", "--batch-tokens", "256",
                  "--micro-batch", "2", "--max-steps", "6", "--lr", "3e-3", "--packing", packing, "--threads", "1",
                  "--eval-data", data, "--eval-every", "3")
    assert r.exit_code == 0, r.output
    curve = losses(run)
    assert len(curve) == 6 and curve[-1] < curve[0]
    assert "held-out loss" in r.output
    rows = [x for x in metrics(run) if "loss" in x]
    at3 = next(x for x in rows if x["step"] == 3)  # the (slowed) evaluation after step 3 is timed apart
    at2 = next(x for x in rows if x["step"] == 2)
    # wall time between the two rows = the step + its evaluation (eval no longer in step_s)
    assert at3["eval_s"] >= 2.0 and abs(at3["time"] - at2["time"] - at3["step_s"] - at3["eval_s"]) < 1.0, at3
    assert "eval_s" not in rows[0] and rows[0]["step_s"] >= rows[0]["forward_s"]
    if packing == "pack":
        from codeshell import LLM, SamplingParams

        llm = LLM(str(run / "checkpoint"), dtype="float32")
        out = llm.chat([{"role": "user", "content": "What is 1 + 1?"}], SamplingParams(temperature=0, max_tokens=4))
        assert out[0].outputs[0].token_ids
