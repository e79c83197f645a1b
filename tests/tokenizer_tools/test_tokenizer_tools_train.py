"""`codeshell tokenizer train`: CodeShell pre-tokenization, specials, every byte round-trips."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer
from typer.testing import CliRunner

from codeshell.tokenizer_tools.cli import app
from codeshell.tokenizer_tools.train import SPECIAL_TOKENS, byte_tokens, decode_bytes, train_tokenizer


@pytest.fixture(scope="module")
def trained(code, zh):
    return train_tokenizer([t for _, t in code] + zh[0][:2000], 1200)


def random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = [range(0, 128), range(0x80, 0x800), range(0x4E00, 0x9FFF), range(0x10000, 0x10FFF)]
    out = ["".join(chr(b) for b in range(128)), "a\x01b\x7fc\x00\x1b[0m"]
    for _ in range(n):
        out.append("".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(1, 60))))
    return out


def test_layout_matches_codeshell(trained, tokenizer_dir):
    assert trained.get_vocab_size() == 1200
    assert [trained.id_to_token(1180 + k) for k in range(20)] == SPECIAL_TOKENS
    released = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["additional_special_tokens"]
    assert released == SPECIAL_TOKENS
    ref = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = "x = 12345 + foo_bar(3.14)\n\tif a:\n        return '你好, world'  # 2024\n"
    assert trained.pre_tokenizer.pre_tokenize_str(text) == ref.pre_tokenizer.pre_tokenize_str(text)
    assert [t for t in trained.encode("year 2024").tokens if t.isdigit()] == ["2", "0", "2", "4"]
    assert trained.encode("<fim_prefix>a<fim_suffix>").ids[0] == 1181


def test_every_byte_round_trips(trained, tokenizer_dir):
    assert byte_tokens() <= set(trained.get_vocab())
    for s in random_strings(300):
        ids = trained.encode(s, add_special_tokens=False).ids
        assert trained.decode(ids) == s
        assert decode_bytes(trained, ids) == s.encode("utf-8")
    # the released tokenizer silently loses control bytes; ours must not
    ref = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert ref.decode(ref.encode("a\x01b\x7fc").ids) == "abc"
    assert trained.decode(trained.encode("a\x01b\x7fc").ids) == "a\x01b\x7fc"


def test_cli_train(tmp_path, code):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i, (_, t) in enumerate(code[:20]):
        (corpus / f"f{i}.py").write_text(t)
    r = CliRunner().invoke(app, ["train", str(corpus), "--vocab-size", "600", "-o", str(tmp_path / "tok")])
    assert r.exit_code == 0, r.output
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert tok.get_vocab_size() == 600 and tok.token_to_id("<|end|>") == 599
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>" and cfg["vocab_size"] == 600
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    assert hf.decode(hf("def f(x):\n\treturn x\x01")["input_ids"]) == "def f(x):\n\treturn x\x01"
    r = CliRunner().invoke(app, ["train", str(corpus), "--vocab-size", "100", "-o", str(tmp_path / "t2")])
    assert r.exit_code == 2 and "at least 276" in r.output
    r = CliRunner().invoke(app, ["train", str(tmp_path / "missing"), "-o", str(tmp_path / "t3")])
    assert r.exit_code == 2 and "does not exist" in r.output
