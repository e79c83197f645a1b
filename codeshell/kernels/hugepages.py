"""Large CPU tensors on transparent huge pages (2 MiB) where Linux offers them.

What this is: `empty` / `resident`, which put a tensor of at least `MIN_BYTES` in an
anonymous mapping advised MADV_HUGEPAGE before its first touch, so its pages fault in as 2 MiB
pages; a tensor of `ARENA_MIN_BYTES` up to `MIN_BYTES` goes into a shared chunk of such pages
(`_arena`, since session 18: the small shape's c_attn / attn.c_proj). Used for what a decode step streams every token: the packed weights (bf16 panels,
int8 rows, int4 nibbles, written once at load), and the read-bandwidth probe that the decode
figures are put against (`codeshell.bench.read_bandwidth_gbs`). Not the KV cache (see
engine/kv_cache.py: faulted in by the first requests, it would make them pay the pages' cost).

Why: a batch-1 decode step reads every weight byte once, a few MiB per linear, from memory.
With 4 KiB pages that is a TLB miss (a page walk) every 4 KiB of every stream. Measured on a
2-core AMD EPYC (Zen 5 class, session 14; `/work/notes/thp_dec.py`-style A/B, the same packed
weights copied to either kind of page, alternating rounds, medians): the four 7B linears at
M = 1 read bf16 38.4 vs 34.8 GB/s, int8 43.6 vs 39.1, int4 36.8 vs 35.8; a plain read of
1 GiB 45.8 vs 41.8 GB/s. Most distributions set THP to `madvise` (only advised mappings get
huge pages), and torch's allocator never advises, hence this. llama.cpp maps its GGUF file,
whose page cache the kernel may back with large folios.

What this is not: an allocator for everything (tensors under ARENA_MIN_BYTES and activations
stay on torch's allocator; chunks are never reused once their tensors die), or a
guarantee: where THP is `never`, memory is short or fragmented, the kernel quietly gives 4 KiB
pages and nothing else changes. `CODESHELL_HUGE_PAGES=0` turns it off (for A/B timing).
"""

from __future__ import annotations

import mmap
import os
import threading

import torch

HUGE = 2 << 20  # the x86-64 transparent huge page
# At least one whole huge page: a smaller tensor stays on torch's allocator (see `_map`).
MIN_BYTES = HUGE
# Where the tensor starts in its mapping (`_map`): at the mapping's first 2 MiB boundary (True),
# or at the mapping's start as before session 16 (False: for A/B timing only).
ALIGN = True
# Tensors from ARENA_MIN_BYTES up to MIN_BYTES share huge-page chunks of ARENA_CHUNK (`_arena`),
# each at a 4 KiB boundary of its chunk; below ARENA_MIN_BYTES they stay on torch's allocator.
# CODESHELL_HUGE_ARENA=0 turns the sharing off (for A/B timing: such tensors then stay on 4 KiB pages).
# CODESHELL_HUGE_ARENA_MIN=BYTES (read per call, as the others; session 35) moves the floor, for A/B
# timing of smaller weights on huge pages (codeshell-mini's 64-256 KiB linears). Session 35 measured
# no page-colour effect of 4 KiB pages on an L2-resident stream (docs/kernels-log.md), so the floor stays.
ARENA_MIN_BYTES = 256 << 10
ARENA_CHUNK = 16 << 20


def enabled() -> bool:
    return (os.environ.get("CODESHELL_HUGE_PAGES", "1").strip().lower() not in ("0", "off", "false", "no")
            and hasattr(mmap, "MADV_HUGEPAGE"))


def _map(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A tensor on a fresh anonymous mapping advised MADV_HUGEPAGE (reads zero until written),
    or None where it is too small, turned off or refused."""
    n = 1
    for s in shape:
        n *= s
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if arena_min_bytes() <= nbytes < MIN_BYTES:
        return _arena(shape, dtype, nbytes)
    if nbytes < MIN_BYTES or not enabled():
        return None
    # The kernel backs only the 2 MiB-aligned ranges that lie wholly inside an advised mapping
    # with huge pages, and mmap returns a 4 KiB-aligned address: a tensor placed at the start
    # of its mapping lost its first partial 2 MiB to 4 KiB pages, and one under ~4 MiB usually
    # got no huge page at all (the small shape's c_attn, 3.1 MiB, and attn.c_proj, 2.1 MiB:
    # they read ~30 GB/s in the decode step where c_fc and mlp.c_proj, 8.4 MiB, read ~42).
    # So the mapping is over-sized by up to 2 MiB, the tensor starts at its first 2 MiB
    # boundary, and only the tensor's own range is advised: its whole 2 MiB ranges get huge
    # pages, a tail under 2 MiB stays on 4 KiB pages (advising past the end would fault a whole
    # huge page there: up to 2 MiB more resident memory per tensor). The unused front is never
    # touched (no memory).
    page = mmap.PAGESIZE
    pad = HUGE - page if ALIGN else 0
    try:
        m = mmap.mmap(-1, nbytes + pad, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        start = 0
        if pad:
            addr = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
            start = -addr % HUGE  # a multiple of the page size, <= pad
        length = (nbytes + page - 1) // page * page
        m.madvise(mmap.MADV_HUGEPAGE, start, min(length, len(m) - start))
    except (OSError, ValueError):  # no such advice on this kernel, or no address space left
        return None
    # frombuffer keeps the mapping alive as long as the tensor (or a view of it) lives; the
    # tensor is page aligned (2 MiB aligned with ALIGN), more than the kernels' 64 bytes.
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=start).view(dtype).view(shape)


_ARENA_LOCK = threading.Lock()
_arena_state: list = []  # [mmap, next free offset, end offset] of the chunk being filled


def arena_min_bytes() -> int:
    """The smallest tensor that goes into the arena: CODESHELL_HUGE_ARENA_MIN (bytes) where set,
    else ARENA_MIN_BYTES. A bad value raises ValueError (one line)."""
    env = os.environ.get("CODESHELL_HUGE_ARENA_MIN", "").strip()
    if not env:
        return ARENA_MIN_BYTES
    try:
        v = int(env)
    except ValueError:
        v = -1
    if v < 0:
        raise ValueError(f"CODESHELL_HUGE_ARENA_MIN={env!r}: expected a byte count >= 0")
    return v


def arena_enabled() -> bool:
    return os.environ.get("CODESHELL_HUGE_ARENA", "1").strip().lower() not in ("0", "off", "false", "no")


def _arena(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor | None:
    """A tensor of ARENA_MIN_BYTES..MIN_BYTES placed in a shared chunk of huge pages (a fresh
    anonymous mapping of ARENA_CHUNK bytes, 2 MiB aligned and advised MADV_HUGEPAGE as a whole),
    at the chunk's next 4 KiB boundary; None where it is off or refused.
    Why: the small shape's c_attn and attn.c_proj (int8 1.5 / 1 MiB, int4 0.75 / 0.5 MiB) sat on
    4 KiB pages (a TLB miss every 4 KiB of the stream) and read slower in the decode step than
    c_fc and mlp.c_proj on huge pages (docs/kernels-log.md, session 18 helper A). A chunk lives as long
    as any tensor in it (each tensor's storage holds the mapping); at most the chunk being filled
    is held here. Cost: up to 2 MiB of resident memory past the last tensor of a chunk (its last
    huge page), and the rest of the chunk's address space."""
    if not (enabled() and arena_enabled()) or nbytes > ARENA_CHUNK:
        return None
    page = mmap.PAGESIZE
    need = (nbytes + page - 1) // page * page
    with _ARENA_LOCK:
        if not _arena_state or _arena_state[1] + need > _arena_state[2]:
            try:
                m = mmap.mmap(-1, ARENA_CHUNK + HUGE - page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                addr = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
                start = -addr % HUGE
                m.madvise(mmap.MADV_HUGEPAGE, start, ARENA_CHUNK)
            except (OSError, ValueError):
                return None
            _arena_state[:] = [m, start, start + ARENA_CHUNK]
        m, off = _arena_state[0], _arena_state[1]
        _arena_state[1] = off + need
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=off).view(dtype).view(shape)


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor; on advised huge pages when it is big enough."""
    shape = tuple(int(s) for s in shape)
    t = _map(shape, dtype)
    return torch.empty(shape, dtype=dtype) if t is None else t


def resident(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor `t` on advised huge pages where it is big enough, else `t`
    itself (the caller drops `t`, so the copy costs time, not memory). Call it once, on a
    freshly built tensor: it does not know whether `t` is already on such a mapping."""
    if t.device.type != "cpu":
        return t
    out = _map(tuple(t.shape), t.dtype)
    if out is None:
        return t
    out.copy_(t)
    return out
