"""Tokenize and pack (the pipeline's sink stage): documents become one token stream per shard,
each document followed by `<|endoftext|>`, optionally preceded by `<reponame>`/`<filename>`
metadata and rewritten by fill-in-the-middle (StarCoder's scheme with CodeShell's FIM tokens,
PSM and SPM orders), cut into fixed-length sequences (default 8192) and written as a flat
uint32 binary (`shard-XXXXX.bin`, a numpy memmap [n_seq, seq_len]) plus an index
(`shard-XXXXX.idx.npz`: document offsets, ids, FIM mode, stream length).

Reading shards back for training is `codeshell.data.loader`. This module does not shuffle.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np

from codeshell.data.io import PipelineError, atomic_path
from codeshell.data.stages.base import Doc, Stage, StageStats, register
from codeshell.prompts import EOS_TEXT as EOT

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
REPONAME, FILENAME = "<reponame>", "<filename>"
FIM_NONE, FIM_PSM, FIM_SPM = 0, 1, 2
TOKEN_DTYPE = np.uint32  # CodeShell's vocabulary (70144) does not fit uint16


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a folder holding one."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise PipelineError(f"tokenizer file {p} not found")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise PipelineError(f"tokenizer {p} cannot be loaded: {e}") from e


def special_id(tok, name: str) -> int:
    i = tok.token_to_id(name)
    if i is None:
        raise PipelineError(f"tokenizer has no special token {name} (a CodeShell tokenizer has all 20)")
    return i


def doc_rng(seed: int, doc_id: str) -> np.random.Generator:
    """Per-document randomness: the same output whatever the sharding or executor."""
    return np.random.default_rng([seed, zlib.crc32(doc_id.encode("utf-8", "surrogatepass"))])


@register
class Pack(Stage):
    """Tokenize (with FIM and metadata), pack into fixed-length uint32 shards (last stage)."""

    name = "pack"
    kind = "sink"

    @dataclasses.dataclass
    class Options:
        tokenizer: str = ""
        seq_len: int = 8192
        fim_rate: float = 0.5
        fim_spm_rate: float = 0.5
        metadata_rate: float = 0.0
        seed: int = 0

        def validate(self) -> None:
            if not self.tokenizer:
                raise PipelineError("stage 'pack': option 'tokenizer' (tokenizer.json or its folder) is required")
            if self.seq_len < 2:
                raise PipelineError("stage 'pack': seq_len must be >= 2")
            for k in ("fim_rate", "fim_spm_rate", "metadata_rate"):
                if not 0 <= getattr(self, k) <= 1:
                    raise PipelineError(f"stage 'pack': {k} must be in [0, 1]")

    def setup(self) -> None:
        self.tok = load_tokenizer(self.opts.tokenizer)
        self.ids = {n: special_id(self.tok, n) for n in (EOT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, REPONAME, FILENAME)}

    def _enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def _plan(self, doc: Doc) -> tuple[list[str], list, int]:
        """The texts to tokenize for one document and how to assemble them: a layout of
        special-token ids (int) and piece numbers (str key "p<i>")."""
        rng = doc_rng(self.opts.seed, doc["id"])
        # Draw all random numbers up front in a fixed order so options don't shift each other.
        u_meta, u_fim, u_spm = rng.random(3)
        cuts = np.sort(rng.integers(0, len(doc["text"]) + 1, size=2))
        pieces: list[str] = []
        layout: list = []

        def piece(t: str) -> str:
            pieces.append(t)
            return f"p{len(pieces) - 1}"

        if u_meta < self.opts.metadata_rate and (doc.get("repo") or doc.get("path")):
            layout += [self.ids[REPONAME], piece(doc.get("repo") or ""), self.ids[FILENAME],
                       piece((doc.get("path") or "") + "\n")]
        text = doc["text"]
        mode = FIM_NONE
        if u_fim < self.opts.fim_rate:
            a, b = int(cuts[0]), int(cuts[1])
            pre, mid, suf = piece(text[:a]), piece(text[a:b]), piece(text[b:])
            P, M, S = self.ids[FIM_PREFIX], self.ids[FIM_MIDDLE], self.ids[FIM_SUFFIX]
            if u_spm < self.opts.fim_spm_rate:
                mode = FIM_SPM  # StarCoder's SPM variant: <pre><suf> suffix <mid> prefix middle
                layout += [P, S, suf, M, pre, mid]
            else:
                mode = FIM_PSM
                layout += [P, pre, S, suf, M, mid]
        else:
            layout.append(piece(text))
        layout.append(self.ids[EOT])
        return pieces, layout, mode

    def encode_docs(self, docs: list[Doc]) -> list[tuple[list[int], int]]:
        """Token ids of training documents (each ending with <|endoftext|>) and FIM modes;
        all pieces of a batch go through the Rust tokenizer in one call."""
        if not hasattr(self, "tok"):
            self.setup()
        plans = [self._plan(d) for d in docs]
        flat = [p for pieces, _, _ in plans for p in pieces]
        encs = self.tok.encode_batch(flat, add_special_tokens=False) if flat else []
        out, k = [], 0
        for pieces, layout, mode in plans:
            ids_of = {f"p{i}": encs[k + i].ids for i in range(len(pieces))}
            k += len(pieces)
            ids: list[int] = []
            for item in layout:
                if isinstance(item, str):
                    ids += ids_of[item]
                else:
                    ids.append(item)
            out.append((ids, mode))
        return out

    def encode_doc(self, doc: Doc) -> tuple[list[int], int]:
        return self.encode_docs([doc])[0]

    def _encoded(self, docs, batch: int = 64):
        buf: list[Doc] = []
        for d in docs:
            buf.append(d)
            if len(buf) == batch:
                yield from zip(buf, self.encode_docs(buf))
                buf = []
        if buf:
            yield from zip(buf, self.encode_docs(buf))

    def write_shard(self, docs, prefix: Path, stats: StageStats) -> dict:
        """Tokenize `docs` and write `prefix.bin` then `prefix.idx.npz` (the index last)."""
        chunks, offsets, ids, modes = [], [0], [], []
        for doc, (toks, mode) in self._encoded(docs):
            stats.seen(doc)
            chunks.append(np.asarray(toks, dtype=TOKEN_DTYPE))
            offsets.append(offsets[-1] + len(toks))
            ids.append(doc["id"])
            modes.append(mode)
            stats.kept(doc)
            stats.count("tokens", len(toks))
            stats.count(f"tokens:{doc.get('lang') or 'unknown'}", len(toks))
            stats.count(f"fim:{('none', 'psm', 'spm')[mode]}")
        stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=TOKEN_DTYPE)
        L = self.opts.seq_len
        n_seq = -(-len(stream) // L)
        padded = np.full(n_seq * L, self.ids[EOT], dtype=TOKEN_DTYPE)  # pad the tail with EOT
        padded[: len(stream)] = stream
        bin_path = prefix.with_name(prefix.name + ".bin")
        with atomic_path(bin_path) as tmp:
            padded.tofile(tmp)
        meta = {"seq_len": L, "n_tokens": int(len(stream)), "n_seq": int(n_seq), "dtype": "uint32"}
        with atomic_path(prefix.with_name(prefix.name + ".idx.npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, doc_offsets=np.asarray(offsets, dtype=np.int64),
                         doc_ids=np.asarray(ids, dtype=np.str_), fim=np.asarray(modes, dtype=np.uint8),
                         meta=np.asarray([L, len(stream), n_seq], dtype=np.int64))
        stats.count("sequences", n_seq)
        return meta
