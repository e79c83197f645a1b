"""A preallocated KV cache of fixed slots, owned by the engine and handed to the model.

Storage is one tensor for keys and one for values, [layers, slots, groups, max_len, head_dim],
allocated once (grown only when a longer sequence needs it); each step writes its new keys
in place at the sequence's positions: no concatenation per token. This module knows nothing
of scheduling or sampling.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..config import CodeShellConfig


class KVCache:
    def __init__(self, cfg: CodeShellConfig, slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.slots = 0
        self.max_len = 0
        self.k = self.v = torch.empty(0)
        self.ensure(slots, max_len)

    def ensure(self, slots: int, max_len: int) -> None:
        """Grow to at least `slots` x `max_len`, keeping what is stored."""
        if slots <= self.slots and max_len <= self.max_len:
            return
        slots, max_len = max(slots, self.slots), max(max_len, self.max_len)
        c = self.cfg
        shape = (c.n_layer, slots, c.num_query_groups, max_len, c.head_dim)
        # torch.zeros, not kernels/hugepages.py: a mapping is faulted in by the first requests
        # that write it, and in a VM a fresh huge page costs the host's backing then (~1.4 s a
        # GiB): the 1.7B server's first request waited 1.2 s for its first token (0.5 s with
        # zeros, which touch every page at load). Attention reads a slot's used prefix only.
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.slots:
            k[:, :self.slots, :, :self.max_len] = self.k
            v[:, :self.slots, :, :self.max_len] = self.v
        self.k, self.v, self.slots, self.max_len = k, v, slots, max_len

    def nbytes_per_token(self) -> int:
        c = self.cfg
        return 2 * c.n_layer * c.num_query_groups * c.head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def copy_prefix(self, src_slot: int, dst_slot: int, n: int) -> None:
        """Copy the first n cached positions of one slot into another (prefix reuse)."""
        self.k[:, dst_slot, :, :n] = self.k[:, src_slot, :, :n]
        self.v[:, dst_slot, :, :n] = self.v[:, src_slot, :, :n]

    def view(self, slot_ids: list[int], positions: torch.Tensor) -> "CacheView":
        """The cache as seen by one forward over rows `slot_ids`, writing at `positions` [B, T]."""
        return CacheView(self, slot_ids, positions)

    def packed_view(self, slot_ids: list[int], positions: list[int]) -> "PackedView":
        """The cache as seen by one forward over single tokens of any sequences packed into
        one row: token i is at `positions[i]` of slot `slot_ids[i]` (decode, or a sequence's
        last token and its drafts)."""
        return PackedView(self, slot_ids, positions)


def _prefill_as_decode() -> bool:
    """CODESHELL_PREFILL_ATTN_DECODE (default 1; read per call, A/B runs): where no native prefill
    attention applies, a bf16 prompt attends through decode's kernel per query; 0: PyTorch's SDPA
    with the mask, as before session 31 (not batch-invariant)."""
    return os.environ.get("CODESHELL_PREFILL_ATTN_DECODE", "1") not in ("0", "off")


class CacheView:
    """What the model's attention layers call: write new k, v; read all keys up to the longest row."""

    def __init__(self, cache: KVCache, slot_ids: list[int], positions: torch.Tensor):
        self.cache = cache
        self.positions = positions  # [B, T]
        self.kv_len = int(positions.max()) + 1
        B = len(slot_ids)
        first = slot_ids[0]
        # Consecutive slots are read through a view (no copy); others are gathered.
        self.contiguous = slot_ids == list(range(first, first + B))
        self.slot_slice = slice(first, first + B)
        self.slot_index = torch.tensor(slot_ids, device=cache.device)
        self.lens = positions[:, -1] + 1  # keys each row attends to (its last position + 1)
        self._mask: torch.Tensor | None = None
        # One prompt at consecutive positions (a prefill alone, or a chunk of one): its keys are
        # stored by a slice copy per layer instead of an index_put (session 18: 0.18-0.33 ms of
        # codeshell-mini's ~7 ms 256-token prompt, 1.2 ms of the small shape's 126 ms for the
        # index_put; the same values either way).
        T = positions.shape[1]
        self._run = None
        if B == 1 and T > 1 and bool((positions[0] == torch.arange(T) + positions[0, 0]).all()):
            self._run = (first, int(positions[0, 0]), T)

    def mask(self) -> torch.Tensor:
        """bool [B, 1, T, kv_len]: a query at position p sees keys 0..p of its own row. Built on
        the first call of a forward and kept for its other layers; the model asks for it only
        where SDPA runs (`attend` needs none)."""
        if self._mask is None:
            k_pos = torch.arange(self.kv_len, device=self.positions.device)
            self._mask = (k_pos[None, None, :] <= self.positions[:, :, None])[:, None]
        return self._mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor | None:
        """Store k, v and return attention [B, H, T, D] computed from the cache in place by a
        native kernel (no gather of the batch's slots, no mask): decode (one new token per row)
        and, on AVX512-BF16 CPUs, prefill (T > 1, causal by position: `prefill_attention`, whose
        result is laid out [B, T, H, D] underneath, so the caller's transpose back is free);
        and, for bf16 elsewhere with the native kernels (AVX2), prefill as one decode query per
        prompt token (`_attend_as_decode`: decode's bits for every row; on AVX2 by
        `prefill_attention_lanes`, 8 queries a pass with those bits, unless CODESHELL_PREFILL_ATTN_LANES=0);
        None, storing nothing, where neither applies (the caller uses `update` and SDPA)."""
        from ..kernels import decode_attention, decode_attention_ok
        from ..kernels.prefill_attention import prefill_attention, prefill_attention_ok
        c = self.cache
        k_layer, v_layer = c.k[layer], c.v[layer]
        if self.positions.shape[1] == 1:
            if not decode_attention_ok(q, k_layer):
                return None
            self._store(layer, k, v)
            return decode_attention(q, k_layer, v_layer, self.slot_index, self.lens, scale)
        if prefill_attention_ok(q, k_layer):
            self._store(layer, k, v)
            return prefill_attention(q, k_layer, v_layer, self.slot_index, self.positions, scale).transpose(1, 2)
        y = self._attend_as_decode(layer, q, k, v, scale)                        # [B*T, H, 1, D]
        if y is None:
            return None
        B, H, T, D = q.shape
        return y.view(B, T, H, D).transpose(1, 2)                              # [B, H, T, D], a view

    def attend_rows(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    rows: torch.Tensor) -> torch.Tensor | None:
        """Store every row's k, v and return attention [R, H * D] for the queries at flat indices
        `rows` [R] of q's B*T (the prompt's last block: only the sampled positions go on, see
        `CodeShellModel.forward`), or None, storing nothing, where `attend` would not take the
        prompt as one decode query a token (the caller then runs the whole attention and picks
        the rows): each of those queries through decode's kernel (`_attend_as_decode`), the bits
        `attend` gives it, since a query's result there does not depend on the other queries."""
        from ..kernels.prefill_attention import prefill_attention_ok
        if self.positions.shape[1] == 1 or prefill_attention_ok(q, self.cache.k[layer]):
            return None
        y = self._attend_as_decode(layer, q, k, v, scale, rows)                  # [R, H, 1, D]
        return None if y is None else y.view(-1, q.shape[1] * q.shape[3])

    def _attend_as_decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """A bf16 prompt's queries [B, H, T, D] (every one, or those at the flat indices `rows` [R]
        of B*T) each as one decode query: store k, v and return attention [B*T or R, H, 1, D], or
        None, storing nothing, where this does not apply (not bf16, switched off, or the decode
        kernel does not take the shape).
        Why (`attend` and `attend_rows`' path where no native prefill kernel runs, AVX2): each query
        gets decode's own one-query attention (`packed_attention`, the bits `decode_attention`
        gives that query), so with the AVX2 bf16 linears (prefill paths with decode's bits,
        kernels/ops.py) every prompt row is computed exactly as a decode step would compute it,
        whatever the padding, the batch around it or a cached prefix. PyTorch's SDPA gave a
        prompt's last row other bits in a padded batch than alone (session 31: codeshell-mini's
        greedy text at batch 8 differed from batch 1, tests/engine/test_prompt_lookup.py).
        The whole prompt (rows None) on AVX2 goes through `prefill_attention_lanes` (the same bits
        per query, 8 queries in a register's lanes; `lanes_ok`, CODESHELL_PREFILL_ATTN_LANES=0: off);
        the sampled rows of the last block, and other ISAs, through `packed_attention`."""
        from ..kernels import decode_attention_ok
        if q.dtype != torch.bfloat16 or not _prefill_as_decode():
            return None
        k_layer, v_layer = self.cache.k[layer], self.cache.v[layer]
        B, H, T, D = q.shape
        from ..kernels.prefill_attention import lanes_ok, prefill_attention_lanes
        if rows is None and T > 1 and lanes_ok(q, k_layer):
            # the same bits per query, 8 queries a pass (session 42): y [B, T, H, D]
            self._store(layer, k, v)
            y = prefill_attention_lanes(q, k_layer, v_layer, self.slot_index, self.positions, scale)
            return y.view(B * T, H, 1, D)
        qt = q.transpose(1, 2).reshape(B * T, H, 1, D)                          # [B*T, H, 1, D]
        if rows is not None:
            qt = qt[rows]                                                       # [R, H, 1, D]
        if not decode_attention_ok(qt, k_layer):
            return None
        from ..kernels.attention import packed_attention
        self._store(layer, k, v)
        slots = self.slot_index.repeat_interleave(T)
        lens = (self.positions + 1).reshape(-1)  # query at position p: keys 0..p of its slot
        if rows is not None:
            slots, lens = slots[rows], lens[rows]
        return packed_attention(qt, k_layer, v_layer, slots, lens, scale)

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [B, G, T, D] at [slot, :, position] of any slots, consecutive or not."""
        c = self.cache
        if self._run is not None:  # [G, T, D] into [slot, :, p0:p0 + T]
            slot, p0, T = self._run
            c.k[layer, slot, :, p0:p0 + T].copy_(k[0])
            c.v[layer, slot, :, p0:p0 + T].copy_(v[0])
            return
        slots = self.slot_index[:, None]
        c.k[layer][slots, :, self.positions] = k.transpose(1, 2)
        c.v[layer][slots, :, self.positions] = v.transpose(1, 2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [B, G, T, D] -> stored at [slot, :, position]; returns [B, G, kv_len, D].
        self._store(layer, k, v)
        c = self.cache
        if self.contiguous:  # consecutive slots: read through a view, no copy
            return c.k[layer, self.slot_slice, :, :self.kv_len], c.v[layer, self.slot_slice, :, :self.kv_len]
        return c.k[layer, self.slot_index, :, :self.kv_len], c.v[layer, self.slot_index, :, :self.kv_len]


class PackedView:
    """Tokens of several sequences packed into one row of the forward (input [1, M]): each
    token is a query of its own, at its own position of its own slot, attending to keys
    0..position of that slot. No padding and no mask: a decode step is M = batch tokens, a
    speculative verify step M = sum over sequences of 1 + its draft, whatever the drafts'
    lengths.

    Every token gets the one-query attention of plain decode (`decode_attention`'s arithmetic,
    per token and KV group, independent of what else is in the forward), so the verify step's
    attention computes exactly what plain decoding would at that position: the same bits,
    given the same keys. The call is `packed_attention`, where consecutive tokens of one slot
    (a sequence's last token and its drafts) share one pass over the slot's keys and values. The tokens' keys are all stored before any of them attends, so the draft at
    position p sees the keys of the tokens before it in its own sequence, and only those (its
    length is p + 1; rejected drafts' keys past it are never read and later overwritten).
    """

    def __init__(self, cache: KVCache, slot_ids: list[int], positions: list[int]):
        self.cache = cache
        dev = cache.device
        pos = torch.tensor(positions, dtype=torch.long)
        self.kv_len = int(pos.max()) + 1
        self.positions = pos.to(dev)[None]                                         # [1, M]
        self.slot_index = torch.tensor(slot_ids, dtype=torch.long, device=dev)      # [M]
        self.lens = (pos + 1).to(dev)                                              # [M]

    def mask(self) -> None:
        return None  # attention is per token (see the class docstring): there is no mask

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [1, G, M, D] -> [M, G, D] at [slot_i, :, position_i]
        c, pos = self.cache, self.positions[0]
        c.k[layer][self.slot_index, :, pos] = k[0].transpose(0, 1)
        c.v[layer][self.slot_index, :, pos] = v[0].transpose(0, 1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Store k, v and return attention [1, H, M, D] for q [1, H, M, D]; never None (the
        model's padded SDPA path does not apply to a packed row)."""
        from ..kernels import decode_attention_ok
        from ..kernels.attention import packed_attention
        c = self.cache
        _, H, M, D = q.shape
        self._store(layer, k, v)
        qt = q[0].transpose(0, 1)[:, :, None]                                       # [M, H, 1, D]
        k_layer, v_layer = c.k[layer], c.v[layer]
        if decode_attention_ok(qt, k_layer):
            y = packed_attention(qt, k_layer, v_layer, self.slot_index, self.lens, scale)
        else:
            # No native kernel: each token's slot gathered ([M, G, S, D], S = the longest
            # row) and masked to its own keys; for decode-sized M only.
            ks = k_layer[self.slot_index, :, :self.kv_len]
            vs = v_layer[self.slot_index, :, :self.kv_len]
            mask = torch.arange(self.kv_len, device=q.device)[None] < self.lens[:, None]
            y = F.scaled_dot_product_attention(qt, ks, vs, attn_mask=mask[:, None, None], scale=scale,
                                               enable_gqa=ks.shape[1] != H)
        return y.view(M, H, D).transpose(0, 1)[None]                                # [1, H, M, D]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError("a packed view attends through `attend` only")
