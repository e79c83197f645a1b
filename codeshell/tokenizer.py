"""The CodeShell tokenizer at run time: the released ``tokenizer.json`` through the
`tokenizers` library, plus streaming detokenization.

Byte-level BPE, digits split one by one, no BOS added, 20 special tokens at 70000-70019
parsed from text (``<fim_prefix>`` in a prompt string is one token). This module does not
train or edit tokenizers (that is ``codeshell.tokenizer_tools``).
"""

from __future__ import annotations

from pathlib import Path

from .prompts import EOS_TEXT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(RuntimeError):
    """A tokenizer that cannot be loaded (missing or unreadable); the message names the file."""


class TokenizerMissingError(TokenizerError):
    """Raised when a text prompt is given to a model folder with no tokenizer files."""


class Tokenizer:
    """Encode and decode text; wraps `tokenizers.Tokenizer`."""

    def __init__(self, tok, eos_token_id: int | None = None):
        self._tok = tok
        self.eos_token_id = eos_token_id if eos_token_id is not None else tok.token_to_id(EOS_TEXT)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._special_ids = {t.id if hasattr(t, "id") else tok.token_to_id(t.content)
                             for t in _added_tokens(tok) if t.special}

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_id: int | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        f = Path(path) / "tokenizer.json"
        if not f.exists():
            raise TokenizerMissingError(f"no tokenizer.json in {path}")
        try:
            tok = HFTokenizer.from_file(str(f))
        except Exception as e:  # the tokenizers library raises plain Exception on a bad file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerError(f"cannot read {f}: not a valid tokenizer.json ({first})") from None
        return cls(tok, eos_token_id)

    @classmethod
    def from_object(cls, tok, eos_token_id: int | None = None) -> "Tokenizer":
        return cls(tok, eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def is_special(self, i: int) -> bool:
        return i in self._special_ids

    def decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)


def eot_id(folder: str | Path) -> int | None:
    """The id of `<|endoftext|>` in the tokenizer of `folder` (None when it has none).

    A model's bos/eos must be this id: the data pipeline ends every document with it, and the
    engine stops at config.eos_token_id. CodeShellConfig's default (70000) is the released
    vocabulary's; a tokenizer trained by `codeshell tokenizer train` has its own."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(Path(folder) / "tokenizer.json")).token_to_id(EOS_TEXT)


def _added_tokens(tok):
    try:
        return list(tok.get_added_tokens_decoder().values())
    except AttributeError:  # older tokenizers
        return []


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that never split a UTF-8 character.

    Decodes a short window of recent tokens and emits only the text that is complete (does
    not end in U+FFFD, the mark of a partial multi-byte sequence). Joined deltas plus
    `flush()` equal a full decode of the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        new_text = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end of the stream (a dangling partial character decodes as U+FFFD)."""
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        new_text = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


def load_tokenizer(path: str | Path, eos_token_id: int | None = None) -> Tokenizer | None:
    """The tokenizer of a checkpoint folder, or None when the folder has none."""
    p = Path(path)
    if not (p / "tokenizer.json").exists():
        return None
    return Tokenizer.from_dir(p, eos_token_id)
