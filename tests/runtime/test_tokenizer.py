"""The released tokenizer, the prompt formats in prompts.json, and streaming detokenization."""

from __future__ import annotations

import json

import pytest

from codeshell.prompts import PromptError, chat_prompt, chat_prompt_from_history, fim_prompt, left_truncate
from codeshell.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer_dir):
    return json.loads((tokenizer_dir / "prompts.json").read_text())


def test_specials_and_no_bos(tok):
    names = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
    assert [tok.token_to_id(n) for n in names] == [70000, 70001, 70002, 70003, 70004]
    assert tok.token_to_id("<|end|>") == 70019
    assert tok.encode("hello")[0] != 70000


def test_prompts_json_reproduced_exactly(tok, prompts):
    for c in prompts["chat"]:
        s = chat_prompt_from_history(c["query"], c["history"])
        assert s == c["prompt"] and tok.encode(s) == c["ids"]
        msgs = [m for q, r in c["history"] for m in ({"role": "user", "content": q},
                                                      {"role": "assistant", "content": r})]
        assert chat_prompt(msgs + [{"role": "user", "content": c["query"]}]) == c["prompt"]
    for c in prompts["fim"]:
        s = fim_prompt(c["prefix"], c["suffix"])
        assert s == c["prompt"] and tok.encode(s) == c["ids"]
    for c in prompts["encode"]:
        assert tok.encode(c["text"]) == c["ids"]
        assert tok.decode(c["ids"]) == c["decoded"]
    from codeshell.prompts import CHAT
    assert list(CHAT.stop) == prompts["stop_strings_chat"]


def test_transformers_autotokenizer_agrees(tok, tokenizer_dir, prompts):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for c in prompts["chat"] + prompts["fim"]:
        assert hf.encode(c["prompt"], add_special_tokens=False) == c["ids"]
        assert hf(c["prompt"])["input_ids"] == c["ids"]  # no BOS added


def test_system_message_goes_first_and_bad_chats(tok):
    p = chat_prompt([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}])
    assert p == "You are terse.\n## human:hi|<end>|## assistant:"
    with pytest.raises(PromptError, match="must end with a user message"):
        chat_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(PromptError, match="unknown role 'tool'"):
        chat_prompt([{"role": "tool", "content": "x"}])


def test_left_truncation_keeps_the_end():
    assert left_truncate(list(range(100)), n_positions=64, max_new_tokens=14) == list(range(50, 100))


@pytest.mark.parametrize("text", ["写一个快速排序函数，并解释它的时间复杂度。",
                                  "emoji 🎉🚀👩‍💻 mixed 中文 and code: print('ok') ✅",
                                  "def f():\n    return '日本語テキスト' # 🐍"])
def test_streaming_deltas_join_to_full_decode(tok, text):
    ids = tok.encode(text)
    dec = tok.decoder()
    deltas = [dec.add(i) for i in ids]
    deltas.append(dec.flush())
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_split_character_is_held_back_until_complete(tok):
    text = "𝔘"  # a rare character: its 4 UTF-8 bytes come as three byte-level tokens
    ids = tok.encode(text)
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])
    dec = tok.decoder()
    deltas = [dec.add(i) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == text
