"""Large CPU tensors on transparent huge pages (2 MiB) where Linux offers them.

What this is: `empty` / `resident`, which put a tensor of at least `MIN_BYTES` in an
anonymous mapping advised MADV_HUGEPAGE before its first touch, so its pages fault in as 2 MiB
pages. Used for what a decode step streams every token: the packed weights (bf16 panels,
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

What this is not: an allocator for everything (small tensors and activations stay on torch's
allocator: a mapping per tensor costs a system call and rounds up to the page size), or a
guarantee: where THP is `never`, memory is short or fragmented, the kernel quietly gives 4 KiB
pages and nothing else changes. `CODESHELL_HUGE_PAGES=0` turns it off (for A/B timing).
"""

from __future__ import annotations

import mmap
import os

import torch

HUGE = 2 << 20  # the x86-64 transparent huge page
# At least one whole huge page: a smaller tensor stays on torch's allocator (see `_map`).
MIN_BYTES = HUGE
# Where the tensor starts in its mapping (`_map`): at the mapping's first 2 MiB boundary (True),
# or at the mapping's start as before session 16 (False: for A/B timing only).
ALIGN = True


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
