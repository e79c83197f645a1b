"""Training data: packed pipeline shards (pretrain) and JSONL examples (sft, lora) turned into
fixed batches of token ids and next-token targets, split across data-parallel ranks.

Every source is a list of *rows* per epoch in a seeded order; rank r takes rows r, r+W,
r+2W, ... (the loader's split), so the global batch of step s is the same rows whatever the
world size, and the data position of a run is just the number of rows each rank consumed
(step x rows per step per rank). An epoch's tail that does not divide among the ranks is
dropped (as DistributedSampler(drop_last=True)).

SFT rows are tokenized once, up front: chats are rendered with `codeshell.prompts` (the one
chat format) and the loss covers the assistant replies with their end marker; text rows go
through the pipeline's own `Pack` stage (same `<|endoftext|>` and FIM scheme). Examples are
packed into sequences with a block-diagonal mask and positions restarting per example, or
batched by length (bucket), never padded to the context for nothing. This module does not
build models or step optimizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codeshell.data.io import json_object

from .config import TrainError

IGNORE = -100


@dataclass
class Batch:
    """One micro-batch: ids and targets [b, T] (targets[i, t] is the token after t, or IGNORE)."""
    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor | None  # bool [b, 1, T, T] (True = attend) for packed examples, else causal
    n_targets: int

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        mv = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.targets), mv(self.position_ids), mv(self.mask), self.n_targets)


# ---- packed shards (pretrain) -------------------------------------------------------------

class ShardRows:
    """Rows of packed shards, read through `codeshell.data.loader.PackedDataset`."""

    def __init__(self, path: str | Path, rank: int, world: int, shuffle: bool, seed: int):
        from codeshell.data.io import PipelineError
        from codeshell.data.loader import PackedDataset

        check_path(path)
        try:
            self.ds = PackedDataset(path, rank=rank, world_size=world, shuffle=shuffle, seed=seed)
        except (PipelineError, ValueError, OSError) as e:
            raise TrainError(f"data {path}: {e}") from None
        self.seq_len = self.ds.seq_len
        self.per_epoch = self.ds.total // world
        if self.per_epoch == 0:
            raise TrainError(f"data {path} holds {self.ds.total} sequence(s), fewer than the {world} processes")
        self._epoch, self._order = -1, None

    def check(self, vocab_size: int, n_positions: int, path: str) -> None:
        if self.seq_len > n_positions:
            raise TrainError(f"data {path}: shards hold sequences of {self.seq_len} tokens, more than the model's "
                             f"n_positions={n_positions}")
        for s in self.ds.shards:
            flat = s.tokens.reshape(-1)
            step = 1 << 24  # scan in 64 MB pieces: shards are memory-mapped and may be large
            hi = max((int(flat[i: i + step].max()) for i in range(0, flat.size, step)), default=0)
            if hi >= vocab_size:
                raise TrainError(f"data {path}: shard {s.prefix.name} holds token id {hi}, outside the model's "
                                 f"vocabulary of {vocab_size} (was it packed with another tokenizer?)")

    def row(self, epoch: int, k: int) -> np.ndarray:
        if epoch != self._epoch:
            # The loader's own global order and rank split (`PackedDataset._order`), indexed
            # directly so that resuming at row k does not read the k rows before it.
            self.ds.epoch = epoch
            self._order, self._epoch = self.ds._order(), epoch
        g = int(self._order[k])
        starts = self.ds._starts
        s = int(np.searchsorted(starts, g, side="right") - 1)
        return np.asarray(self.ds.shards[s].tokens[g - starts[s]], dtype=np.int64)

    def collate(self, rows: list[np.ndarray]) -> Batch:
        ids = torch.from_numpy(np.stack(rows))  # [b, L]
        tgt = torch.full_like(ids, IGNORE)
        tgt[:, :-1] = ids[:, 1:]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        return Batch(ids, tgt, pos, None, int(tgt.shape[0] * (tgt.shape[1] - 1)))


# ---- JSONL examples (sft, lora) -----------------------------------------------------------

@dataclass
class Example:
    ids: np.ndarray     # int64 [n]
    labels: np.ndarray  # bool [n]: token i is a target (predicted from the tokens before it)


def check_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise TrainError(f"data path {p} does not exist")
    if p.is_file() and p.stat().st_size == 0 or p.is_dir() and not any(p.iterdir()):
        raise TrainError(f"data path {p} is empty")
    return p


def jsonl_files(path: str | Path) -> list[Path]:
    p = check_path(path)
    files = [p] if p.is_file() else sorted(list(p.rglob("*.jsonl")) + list(p.rglob("*.json")))
    if not files:
        raise TrainError(f"data path {p} holds no .jsonl files")
    return files


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """(where, row) for each JSONL line; `where` is `file:line` for error messages."""
    rows = []
    for f in jsonl_files(path):
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f.name}:{n}"
                rows.append((where, json_object(line, where, TrainError,
                                                "an object with messages, prompt/completion or text")))
    if not rows:
        raise TrainError(f"data path {path} is empty (no JSONL rows)")
    return rows


def chat_spans(messages: list, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered in the official chat format and the character spans of the
    assistant replies (each ` {reply}|<end>|`, what the model writes after `## assistant:`).

    Rendering goes through `codeshell.prompts.chat_prompt` only: the prompt before reply i is
    `chat_prompt(messages[:i])`, so this module holds no copy of the format.
    """
    from codeshell.prompts import CHAT, PromptError, chat_prompt

    if not isinstance(messages, list) or not messages:
        raise TrainError(f"{where}: `messages` must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise TrainError(f"{where}: message {i} must be an object with `role` and `content`")
        if m["role"] not in ("system", "user", "assistant"):
            raise TrainError(f"{where}: message {i} has unknown role {m['role']!r} (expected system, user or assistant)")
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        raise TrainError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    text, spans = "", []
    for i in replies:
        reply = messages[i].get("content")
        if not isinstance(reply, str):
            raise TrainError(f"{where}: message {i} (assistant) has no text `content`")
        try:
            prefix = chat_prompt(messages[:i])
        except PromptError as e:
            raise TrainError(f"{where}: {e}") from None
        if not prefix.startswith(text):
            raise TrainError(f"{where}: message {i}: system messages must come before the first turn")
        turn = CHAT.reply_sep + reply + CHAT.end
        spans.append((len(prefix), len(prefix) + len(turn)))
        text = prefix + turn
    return text, spans


class Tokenized:
    """Turn rows into `Example`s with one tokenizer (the released CodeShell one, or any in its layout)."""

    def __init__(self, tokenizer_dir: str | Path, fim_rate: float, fim_spm_rate: float, seed: int):
        from codeshell.data.packing import EOT, Pack, load_tokenizer
        from codeshell.data.io import PipelineError

        try:
            self.tok = load_tokenizer(tokenizer_dir)
            # Text rows go through the pipeline's own packer: same <|endoftext|>, same FIM.
            self.pack = Pack(Pack.Options(tokenizer=str(tokenizer_dir), fim_rate=fim_rate,
                                          fim_spm_rate=fim_spm_rate, seed=seed))
            self.pack.setup()
        except PipelineError as e:
            raise TrainError(str(e)) from None
        self.eot = self.tok.token_to_id(EOT)

    def _labelled(self, text: str, spans: list[tuple[int, int]]) -> Example:
        """Tokens of the whole string; a token is a target when it starts inside a span (the
        chat format puts a space, which starts a new pre-token, at each reply's start)."""
        enc = self.tok.encode(text, add_special_tokens=False)
        lab = [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
        return Example(np.asarray(enc.ids, dtype=np.int64), np.asarray(lab, dtype=bool))

    def examples(self, rows: list[tuple[str, dict]]) -> list[Example]:
        out: list[Example | None] = [None] * len(rows)
        texts = []
        for n, (where, row) in enumerate(rows):
            if "messages" in row:
                text, spans = chat_spans(row["messages"], where)
                out[n] = self._labelled(text, spans)
            elif "prompt" in row or "completion" in row:
                p, c = row.get("prompt"), row.get("completion")
                if not isinstance(p, str) or not isinstance(c, str) or not c:
                    raise TrainError(f"{where}: `prompt` and `completion` must both be text (completion non-empty)")
                # Tokenized apart, as at inference where the prompt is encoded alone (a
                # token across the boundary, e.g. "\n" + indent, would never be seen there).
                pi = self.tok.encode(p, add_special_tokens=False).ids if p else []
                ci = self.tok.encode(c, add_special_tokens=False).ids + [self.eot]
                out[n] = Example(np.asarray(pi + ci, dtype=np.int64),
                                 np.asarray([False] * len(pi) + [True] * len(ci), dtype=bool))
            elif "text" in row:
                if not isinstance(row["text"], str) or not row["text"]:
                    raise TrainError(f"{where}: `text` must be non-empty text")
                texts.append((n, {"id": where, "text": row["text"]}))
            else:
                raise TrainError(f"{where}: a row needs `messages`, `prompt` + `completion`, or `text` "
                                 f"(got keys {sorted(row)})")
        if texts:
            encoded = self.pack.encode_docs([d for _, d in texts])
            for (n, _), (ids, _mode) in zip(texts, encoded):
                out[n] = Example(np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool))
        return out  # type: ignore[return-value]


class ExampleRows:
    """SFT rows: examples packed into sequences of seq_len, or one example per row (bucket)."""

    def __init__(self, examples: list[Example], seq_len: int, packing: str, rank: int, world: int,
                 shuffle: bool, seed: int, micro_batch: int, eos_id: int):
        self.truncated = sum(len(e.ids) > seq_len for e in examples)
        self.examples = [Example(e.ids[:seq_len], e.labels[:seq_len]) for e in examples]
        self.seq_len, self.packing, self.rank, self.world = seq_len, packing, rank, world
        self.shuffle, self.seed, self.micro_batch, self.eos_id = shuffle, seed, micro_batch, eos_id
        self._epoch, self._rows, self._packed = -1, None, None
        self.per_epoch = len(self._plan(0)) // world
        if self.per_epoch == 0:
            raise TrainError(f"the data makes {len(self._plan(0))} sequence(s), fewer than the {world} processes")

    def _plan(self, epoch: int) -> list[list[int]]:
        """All rows of an epoch (lists of example indices), before the rank split."""
        rng = np.random.default_rng(self.seed + epoch)
        order = np.arange(len(self.examples))
        if self.shuffle:
            rng.shuffle(order)
        if self.packing == "bucket":
            # Sort windows of the shuffled order by length so a micro-batch pads little; the
            # rank split keeps neighbours on the same rank (rows r, r+W, ...).
            win = 64 * self.micro_batch * self.world
            rows = []
            for i in range(0, len(order), win):
                w = sorted(order[i: i + win], key=lambda j: len(self.examples[j].ids))
                rows += [[int(j)] for j in w]
            return rows
        # Packed once (greedily, in the seed's order) so every epoch has the same number of
        # rows; each epoch then shuffles the rows.
        if self._packed is None:
            first = np.arange(len(self.examples))
            if self.shuffle:
                np.random.default_rng(self.seed).shuffle(first)
            self._packed, cur, used = [], [], 0
            for j in first:
                n = len(self.examples[j].ids)
                if cur and used + n > self.seq_len:
                    self._packed.append(cur)
                    cur, used = [], 0
                cur.append(int(j))
                used += n
            if cur:
                self._packed.append(cur)
        rows = list(self._packed)
        if self.shuffle and epoch:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        return rows

    def row(self, epoch: int, k: int) -> list[int]:
        if epoch != self._epoch:
            self._rows, self._epoch = self._plan(epoch)[self.rank:: self.world], epoch
        return self._rows[k]

    def collate(self, rows: list[list[int]]) -> Batch:
        T = max(sum(len(self.examples[j].ids) for j in r) for r in rows)
        b = len(rows)
        ids = torch.full((b, T), self.eos_id, dtype=torch.long)
        tgt = torch.full((b, T), IGNORE, dtype=torch.long)
        pos = torch.zeros((b, T), dtype=torch.long)
        seg = torch.full((b, T), -1, dtype=torch.long)  # padding is its own segment
        for i, r in enumerate(rows):
            at = 0
            for s, j in enumerate(r):
                e = self.examples[j]
                n = len(e.ids)
                x = torch.from_numpy(e.ids)
                ids[i, at: at + n] = x
                # target of position t is token t+1 when that token is labelled
                lab = torch.from_numpy(e.labels[1:])
                tgt[i, at: at + n - 1] = torch.where(lab, x[1:], torch.full_like(x[1:], IGNORE))
                pos[i, at: at + n] = torch.arange(n)
                seg[i, at: at + n] = s
                at += n
            pos[i, at:] = torch.arange(T - at)
        mask = None
        if self.packing == "pack" and any(len(r) > 1 for r in rows):
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            mask = (seg[:, :, None] == seg[:, None, :]) & causal  # [b, T, T]
            mask = mask[:, None]
        return Batch(ids, tgt, pos, mask, int((tgt != IGNORE).sum()))
