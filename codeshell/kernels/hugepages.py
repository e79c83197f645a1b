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

MIN_BYTES = 4 << 20  # below this a 2 MiB-aligned huge page rarely fits inside the tensor


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
    try:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):  # no such advice on this kernel, or no address space left
        return None
    # frombuffer keeps the mapping alive as long as the tensor (or a view of it) lives; the
    # mapping is page aligned, more than the kernels' 64 bytes.
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


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
