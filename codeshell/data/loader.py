"""Reading packed shards back: memory-mapped fixed-length sequences for a training loop,
split across data-loader workers and nodes, plus document-level decoding for checks.

A shard is `NAME.bin` (uint32 tokens, [n_seq, seq_len]) with `NAME.idx.npz` (see
`codeshell.data.packing`). Sequence i of the global order goes to the reader whose
`rank * num_workers + worker_id == i % (world_size * num_workers)`, so every sequence is
read exactly once per epoch across the job. This module does not tokenize.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from codeshell.data.io import CorruptShardError, PipelineError


class PackedShard:
    """One packed shard: `tokens` is a read-only memmap [n_seq, seq_len]."""

    def __init__(self, prefix: str | Path):
        prefix = Path(str(prefix).removesuffix(".bin").removesuffix(".idx.npz"))
        self.prefix = prefix
        idx_path = prefix.with_name(prefix.name + ".idx.npz")
        bin_path = prefix.with_name(prefix.name + ".bin")
        if not idx_path.is_file() or not bin_path.is_file():
            raise CorruptShardError(f"packed shard {prefix}: missing {idx_path.name} or {bin_path.name}")
        try:
            with np.load(idx_path) as z:
                self.doc_offsets = z["doc_offsets"]
                self.doc_ids = z["doc_ids"]
                self.fim = z["fim"]
                self.seq_len, self.n_tokens, self.n_seq = (int(x) for x in z["meta"])
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise CorruptShardError(f"packed shard {prefix}: index {idx_path.name} unreadable ({e})") from e
        want = self.n_seq * self.seq_len * 4
        have = bin_path.stat().st_size
        if have != want:
            raise CorruptShardError(f"packed shard {prefix}: {bin_path.name} has {have} bytes, its index says "
                                    f"{want} ({self.n_seq} x {self.seq_len} uint32); the shard is corrupt")
        if len(self.doc_offsets) != len(self.doc_ids) + 1 or (len(self.doc_offsets) and self.doc_offsets[-1] != self.n_tokens):
            raise CorruptShardError(f"packed shard {prefix}: index offsets disagree with its token count")
        self.tokens = (np.memmap(bin_path, dtype=np.uint32, mode="r", shape=(self.n_seq, self.seq_len))
                       if self.n_seq else np.zeros((0, self.seq_len), dtype=np.uint32))

    def __len__(self) -> int:
        return self.n_seq

    def document_tokens(self, i: int) -> np.ndarray:
        """Token ids of document i, including its closing <|endoftext|>."""
        flat = self.tokens.reshape(-1)
        return np.asarray(flat[self.doc_offsets[i]: self.doc_offsets[i + 1]])


def find_shards(path: str | Path) -> list[PackedShard]:
    """All packed shards in a folder (sorted), or the one named."""
    p = Path(path)
    if p.is_dir():
        prefixes = sorted(q.with_name(q.name.removesuffix(".idx.npz")) for q in p.glob("*.idx.npz"))
        if not prefixes:
            raise PipelineError(f"no packed shards (*.idx.npz) in {p}")
        return [PackedShard(q) for q in prefixes]
    return [PackedShard(p)]


class PackedDataset:
    """Iterate sequences [seq_len] (uint32 numpy) of a set of shards for one reader.

    `rank`/`world_size` split across nodes or data-parallel ranks, `worker_id`/`num_workers`
    across data-loader workers of a rank (filled in from torch when used as `torch_dataset()`).
    With `shuffle`, the global order is a permutation seeded by `seed + epoch`.
    """

    def __init__(self, path: str | Path, rank: int = 0, world_size: int = 1, worker_id: int = 0,
                 num_workers: int = 1, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        if not (0 <= rank < world_size and 0 <= worker_id < num_workers):
            raise ValueError(f"bad reader position rank={rank}/{world_size} worker={worker_id}/{num_workers}")
        self.shards = find_shards(path)
        lens = {s.seq_len for s in self.shards}
        if len(lens) > 1:
            raise PipelineError(f"packed shards under {path} mix sequence lengths {sorted(lens)}")
        self.seq_len = lens.pop()
        self.rank, self.world_size, self.worker_id, self.num_workers = rank, world_size, worker_id, num_workers
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])

    @property
    def total(self) -> int:
        return int(self._starts[-1])

    def _order(self) -> np.ndarray:
        order = np.arange(self.total)
        if self.shuffle:
            np.random.default_rng(self.seed + self.epoch).shuffle(order)
        slot = self.rank * self.num_workers + self.worker_id
        return order[slot:: self.world_size * self.num_workers]

    def __len__(self) -> int:
        return len(self._order())

    def __iter__(self) -> Iterator[np.ndarray]:
        for g in self._order():
            s = int(np.searchsorted(self._starts, g, side="right") - 1)
            yield np.asarray(self.shards[s].tokens[g - self._starts[s]])

    def torch_dataset(self):
        """A torch IterableDataset yielding int64 tensors [seq_len]; it reads torch's worker
        info so each DataLoader worker takes its own slice."""
        import torch

        parent = self

        class _Torch(torch.utils.data.IterableDataset):
            def __iter__(self):
                info = torch.utils.data.get_worker_info()
                wid, nw = (info.id, info.num_workers) if info else (0, 1)
                ds = PackedDataset.__new__(PackedDataset)
                ds.__dict__.update(parent.__dict__)
                ds.worker_id, ds.num_workers = wid, nw
                for seq in ds:
                    yield torch.from_numpy(seq.astype(np.int64))

        return _Torch()
