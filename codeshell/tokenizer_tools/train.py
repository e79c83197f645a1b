"""Train a byte-level BPE tokenizer the CodeShell way with the `tokenizers` library: digits
split one by one, then GPT-2's byte-level split; all 256 byte values kept as tokens (so every
string round-trips, unlike the released tokenizer, which lacks 42 control bytes); CodeShell's
20 special tokens appended after the learned vocabulary, as in the released tokenizer.

Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` (Hugging Face
layout). It does not prune or extend (see `extend.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>", "<|end|>",
]


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokens() -> set[str]:
    return set(bytes_to_unicode().values())


def decode_bytes(tok, ids: Iterable[int]) -> bytes:
    """The exact bytes a list of (non-special) ids stands for, valid UTF-8 or not."""
    inv = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(inv[ch] for i in ids for ch in tok.id_to_token(i))


def codeshell_pipeline(tok) -> None:
    """Set CodeShell's normalizer-free pre-tokenizer, decoder and post-processor on `tok`."""
    from tokenizers import decoders, pre_tokenizers, processors

    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    show_progress: bool = False, length: int | None = None):
    """Train on `texts`; `vocab_size` counts everything, the 20 special tokens included."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    n_regular = vocab_size - len(SPECIAL_TOKENS)
    if n_regular < 256:
        raise ValueError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + 20 specials)")
    tok = Tokenizer(models.BPE())
    codeshell_pipeline(tok)
    trainer = trainers.BpeTrainer(vocab_size=n_regular, min_frequency=min_frequency, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer, length=length)
    tok.add_special_tokens(SPECIAL_TOKENS)  # appended: ids n_regular .. n_regular + 19
    return tok


def save_tokenizer(tok, out_dir: str | Path, model_max_length: int = 8192) -> Path:
    """Write the Hugging Face files the released CodeShell tokenizer ships."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"add_prefix_space": False, "additional_special_tokens": SPECIAL_TOKENS, "bos_token": "<|endoftext|>",
           "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
           "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
           "tokenizer_class": "GPT2Tokenizer", "vocab_size": tok.get_vocab_size()}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": SPECIAL_TOKENS, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2))
    return out
