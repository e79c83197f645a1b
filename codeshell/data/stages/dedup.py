"""Exact and near deduplication (global stages).

- `exact_dedup`: a 64-bit BLAKE2 hash of whitespace-normalized content; the first document
  (in shard order) of each hash is kept.
- `minhash_dedup`: MinHash signatures (datasketch) over word 5-gram shingles, LSH banding
  (datasketch's MinHashLSH with its optimal band/row split for the threshold), candidate pairs
  checked on their estimated Jaccard, union-find clusters, one document kept per cluster.
  Signatures are computed per shard in workers; only the LSH index runs in the driver, so
  the cost is linear in the corpus (one signature per document, one insert and query each).

Neither stage compares documents semantically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import zlib
from collections.abc import Iterable

import numpy as np

from codeshell.data.io import PipelineError
from codeshell.data.stages.base import Doc, Stage, StageStats, register

_WS_LINE = re.compile(r"[ \t\r\f\v]+$", re.M)
_BLANK = re.compile(r"\n\s*\n+")
NON_ALPHA = re.compile(r"[^A-Za-z_0-9]+")  # BigCode's shingle tokenizer


def normalize(text: str) -> str:
    """Line endings unified, trailing spaces and blank lines removed, ends stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _BLANK.sub("\n", _WS_LINE.sub("", text)).strip()


@register
class ExactDedup(Stage):
    """Keep the first of documents with the same whitespace-normalized content."""

    name = "exact_dedup"
    kind = "global"

    @dataclasses.dataclass
    class Options:
        normalize: bool = True

    def _key(self, text: str) -> bytes:
        if self.opts.normalize:
            text = normalize(text)
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()

    def collect(self, docs: Iterable[Doc]) -> list[tuple[bytes, str]]:
        return [(self._key(d["text"]), d["id"]) for d in docs]

    def reduce(self, collected: list[list[tuple[bytes, str]]]) -> set:
        seen: set[bytes] = set()
        drop: set[str] = set()
        for shard in collected:
            for key, doc_id in shard:
                if key in seen:
                    drop.add(doc_id)
                else:
                    seen.add(key)
        self.reduce_counters = {"documents_dropped": len(drop)}
        return drop

    def apply(self, doc: Doc, state: set, stats: StageStats) -> Doc | None:
        return None if doc["id"] in state else doc


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """uint32 hashes of the word n-grams of `text` (BigCode's tokenization, no lower-casing).

    Hand-written rather than hashing each shingle string with SHA-1 (datasketch's default):
    tokens get a CRC32 each and n-grams combine them with a polynomial in numpy, about 10x
    faster and deterministic across processes (unlike Python's salted `hash`).
    """
    toks = [t for t in NON_ALPHA.split(text) if t]
    if not toks:
        return np.zeros(0, dtype=np.uint32)
    h = np.fromiter((zlib.crc32(t.encode("utf-8", "surrogatepass")) for t in toks), dtype=np.uint64, count=len(toks))
    if len(toks) < ngram:
        ngram = len(toks)
    acc = np.zeros(len(toks) - ngram + 1, dtype=np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for j in range(ngram):  # acc = sum_j h[i+j] * mult^(ngram-1-j) mod 2^64
            acc = acc * mult + h[j: j + len(acc)]
    return np.unique((acc >> np.uint64(32)).astype(np.uint32))


@register
class MinHashDedup(Stage):
    """Keep one document per cluster of near-duplicates (MinHash + LSH, Jaccard threshold)."""

    name = "minhash_dedup"
    kind = "global"

    @dataclasses.dataclass
    class Options:
        ngram: int = 5
        num_perm: int = 256
        threshold: float = 0.7
        seed: int = 1
        verify: bool = True  # check LSH candidates on estimated Jaccard (fewer false positives)

        def validate(self) -> None:
            if not 0 < self.threshold < 1:
                raise PipelineError("stage 'minhash_dedup': threshold must be in (0, 1)")
            if self.ngram < 1 or self.num_perm < 2:
                raise PipelineError("stage 'minhash_dedup': ngram >= 1 and num_perm >= 2 required")

    def setup(self) -> None:
        from datasketch import MinHash

        self._template = MinHash(num_perm=self.opts.num_perm, seed=self.opts.seed, hashfunc=int)

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature [num_perm] (uint32, datasketch's affine32 scheme)."""
        from datasketch import MinHash

        if not hasattr(self, "_template"):
            self.setup()
        m = MinHash(num_perm=self.opts.num_perm, seed=self.opts.seed, hashfunc=int,
                    permutations=self._template.permutations, scheme=self._template.scheme)
        hv = shingle_hashes(text, self.opts.ngram)
        for i in range(0, len(hv), 4096):  # bound the [chunk, num_perm] temporary to ~8 MB
            m.update_batch(hv[i: i + 4096].tolist())
        return np.asarray(m.hashvalues)

    def collect(self, docs: Iterable[Doc]) -> tuple[list[str], np.ndarray]:
        ids, sigs = [], []
        for d in docs:
            ids.append(d["id"])
            sigs.append(self.signature(d["text"]))
        arr = np.stack(sigs) if sigs else np.zeros((0, self.opts.num_perm), dtype=np.uint32)
        return ids, arr

    def clusters(self, ids: list[str], sigs: np.ndarray) -> list[int]:
        """Union-find parent index of every document (root = earliest member)."""
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=self.opts.threshold, num_perm=self.opts.num_perm)
        parent = list(range(len(ids)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        self.candidate_pairs = self.verified_pairs = 0
        perms = self._template.permutations if hasattr(self, "_template") else None
        for i, sig in enumerate(sigs):
            m = MinHash(num_perm=self.opts.num_perm, seed=self.opts.seed, hashvalues=sig,
                        permutations=perms, scheme="affine32")
            for j in lsh.query(m):
                self.candidate_pairs += 1
                if self.opts.verify and np.mean(sigs[j] == sig) < self.opts.threshold:
                    continue
                self.verified_pairs += 1
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            lsh.insert(i, m, check_duplication=False)
        return [find(i) for i in range(len(ids))]

    def reduce(self, collected: list[tuple[list[str], np.ndarray]]) -> set:
        self.setup()
        ids = [i for shard_ids, _ in collected for i in shard_ids]
        if not ids:
            return set()
        sigs = np.concatenate([s for _, s in collected])
        roots = self.clusters(ids, sigs)
        drop = {ids[i] for i, r in enumerate(roots) if r != i}
        self.reduce_counters = {"candidate_pairs": self.candidate_pairs, "verified_pairs": self.verified_pairs,
                                "clusters_with_duplicates": len({r for i, r in enumerate(roots) if r != i}),
                                "documents_dropped": len(drop)}
        return drop

    def apply(self, doc: Doc, state: set, stats: StageStats) -> Doc | None:
        return None if doc["id"] in state else doc
