"""Weight casts made once per optimizer step rather than once per micro-batch (bf16 training).

Under torch.autocast each forward casts every float32 weight a matmul reads to bf16; autocast
keeps those copies only until its outermost region exits, i.e. for one micro-batch, so with
gradient accumulation the same, unchanged weights were cast again for every micro-batch (and
the fused loss cast the output head itself each time: 54M values at the 125m preset).
`step_casts()` wraps the micro-batches of one optimizer step: it keeps autocast's cast cache
open across them (autocast clears it when its nesting count drops to zero; the step holds one
count) and keeps the fused loss's low-precision copy of the head (`cached_cast`). Both are
dropped when it exits, before the optimizer changes the weights: the fused AdamW does not bump
a tensor's version counter, so no cache could tell an updated weight by itself.

This is no mixed-precision scheme of its own: the numbers are exactly autocast's (the same
casts, made fewer times), and float32 runs never enter it. Not for FSDP2, whose unsharded
parameters are gathered again for each forward; the loop leaves it off there.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_local = threading.local()  # like autocast's own cache, per thread: .cache {key: (weight, version, copy)}


def cached_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight.to(dtype), made once per `step_casts()` (a plain cast outside one)."""
    if weight.dtype == dtype:
        return weight
    cache = getattr(_local, "cache", None)
    if cache is None:
        return weight.to(dtype)
    key = (id(weight), dtype)
    hit = cache.get(key)
    # The version check guards in-place changes made inside the step (the optimizer runs after).
    if hit is not None and hit[0] is weight and hit[1] == weight._version:
        return hit[2]
    copy = weight.to(dtype)
    cache[key] = (weight, weight._version, copy)
    return copy


@contextlib.contextmanager
def step_casts(enabled: bool = True):
    """Share weight casts across the micro-batches inside; drop them on exit (before the
    optimizer step). Re-entering, or enabled=False, changes nothing."""
    if not enabled or getattr(_local, "cache", None) is not None:
        yield
        return
    _local.cache = {}
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        _local.cache = None
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
