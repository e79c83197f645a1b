"""`codeshell tokenizer extend`: pruning and merge learning keep vocab and merges consistent,
keep the encoding of untouched text, and compress the new corpus."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from tokenizers import Tokenizer
from typer.testing import CliRunner

from codeshell.tokenizer_tools.cli import app
from codeshell.tokenizer_tools.extend import extend_tokenizer, learn_merges
from codeshell.tokenizer_tools.train import SPECIAL_TOKENS, byte_tokens, decode_bytes

ADD = 400


@pytest.fixture(scope="module")
def extended(tokenizer_dir, code, zh):
    zh_train = zh[0][::2]
    codes = [t for _, t in code]
    text, info = extend_tokenizer(tokenizer_dir, zh_train, ADD, prune_below=2, prune_corpus=codes[::2] + zh_train)
    return Tokenizer.from_str(text), json.loads(text), info


def check_consistent(data: dict) -> None:
    vocab = data["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    assert sorted(vocab.values()) == list(range(len(vocab))), "ids are not compact"
    specials = data["added_tokens"]
    assert [t["content"] for t in specials] == SPECIAL_TOKENS
    assert [t["id"] for t in specials] == list(range(len(vocab), len(vocab) + 20))
    assert byte_tokens() <= set(vocab)
    produced = {}
    for a, b in merges:
        assert a in vocab and b in vocab and a + b in vocab, (a, b)
        produced.setdefault(a + b, (a, b))
    unreachable = [t for t in vocab if t not in byte_tokens() and t not in produced]
    assert not unreachable, unreachable[:5]
    assert len(set(merges)) == len(merges)


def test_vocab_and_merges_consistent(extended):
    tok, data, info = extended
    check_consistent(data)
    assert info["added_tokens"] == ADD and info["added_byte_tokens"] == 42
    assert info["pruned_low_frequency"] > 0 and info["kept"] < info["base_tokens"]
    assert tok.get_vocab_size() == info["vocab_size"]


def test_untouched_text_encodes_the_same(extended, tokenizer_dir, code):
    tok, data, _ = extended
    base = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    kept = set(data["model"]["vocab"])
    new_pairs = {tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"][-ADD:]}
    held_out = [t for _, t in code][1::2][:40]  # not used for the pruning counts
    same = touched = differ = 0
    for text in held_out:
        for word, _ in base.pre_tokenizer.pre_tokenize_str(text):
            b = base.model.tokenize(word)
            bt = [t.value for t in b]
            if not set(bt) <= kept:
                continue  # uses a pruned token: not untouched
            et = [t.value for t in tok.model.tokenize(word)]
            if any(p in new_pairs for p in zip(bt, bt[1:])):
                touched += 1
            elif et == bt:
                same += 1
            else:
                differ += 1
    assert same > 5_000 and differ == 0, (same, touched, differ)
    # and as whole texts (token strings; ids differ after re-numbering)
    for text in held_out[:30]:
        bt = base.encode(text).tokens
        if set(bt) <= kept and not any(p in new_pairs for p in zip(bt, bt[1:])):
            assert tok.encode(text).tokens == bt


def test_new_tokens_compress_the_new_corpus(extended, tokenizer_dir, zh):
    tok, data, _ = extended
    held = zh[1][::3]
    base = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = "\n".join(held)
    cpt_base = len(text) / len(base.encode(text).ids)
    cpt_ext = len(text) / len(tok.encode(text).ids)
    assert cpt_ext > cpt_base * 1.05, (cpt_base, cpt_ext)
    new = {tok.token_to_id(a + b) for a, b in (m.split(" ") if isinstance(m, str) else m
                                               for m in data["model"]["merges"][-ADD:])}
    used = Counter(i for i in tok.encode(text).ids if i in new)
    assert len(used) > ADD // 2


def test_extended_round_trips_every_byte(extended):
    tok, _, _ = extended
    s = "".join(chr(b) for b in range(128)) + "中文\U0001F600ÿ"
    ids = tok.encode(s).ids
    assert tok.decode(ids) == s and decode_bytes(tok, ids) == s.encode()


def test_learn_merges_counts_exactly():
    words = Counter({"abab": 3, "ab": 2, "ba": 1})
    merges = learn_merges(words, list, set("ab"), 10, min_count=1)
    # ab: 3*2 + 2 = 8 (most frequent), then "ab ab": 3, then "ba": only 1 left
    assert merges[0] == ("a", "b") and merges[1] == ("ab", "ab")
    assert ("b", "a") in merges  # count 1 (from "ba"), reached with min_count=1
    assert learn_merges(words, list, set("ab") | {"ab"}, 1, min_count=1) != [("a", "b")]


def test_no_pruning_keeps_code_encoding(tokenizer_dir, code, zh):
    text, info = extend_tokenizer(tokenizer_dir, zh[0][:1000], 20)
    tok = Tokenizer.from_str(text)
    base = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert info["pruned_low_frequency"] == 0 and info["pruned_unreachable"] == 700  # released vocab entries no merge chain builds
    for _, t in code[:6]:
        assert tok.encode(t).tokens == base.encode(t).tokens


def test_cli_extend(tmp_path, tokenizer_dir, zh):
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(zh[0][:3000]))
    r = CliRunner().invoke(app, ["extend", str(tokenizer_dir), "--corpus", str(corpus), "--add", "30",
                                 "--prune-below", "1", "-o", str(tmp_path / "ext")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "ext" / "tokenizer.json").read_text())
    check_consistent(data)
    r = CliRunner().invoke(app, ["extend", str(tmp_path / "nope"), "--corpus", str(corpus), "--add", "3",
                                 "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not found" in r.output
