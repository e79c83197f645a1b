"""OpenMP's wait policy for the inference commands (`codeshell serve`, `generate`, `infill`, `chat`).

What it is: one function that sets OMP_WAIT_POLICY=passive in the environment before torch loads
libgomp (which reads it once, at load), with the switch that turns it off. What it is not: a thread
setting for training or for library users (`codeshell.LLM` in someone's own process keeps whatever
their environment says); it imports nothing heavy, so the CLI can call it before torch loads.

Why: with the decode team on (CODESHELL_DECODE_TEAM, default on) the native step runs on the team's
own threads, but an OpenMP region between two steps (session 20: the sampled row's float32 widening;
still: the sampler's torch ops for top-k / top-p / min-p / penalties, the batched temperature draw's
rows, a prompt's prefill) leaves libgomp's worker spinning (its default, ~300k spins) through the
next step beside the team's master and helper: three busy threads on two cores. Since session 21
a temperature-only row at one client runs no OpenMP region between steps (engine/sampling.py's
lean sampler), so there the policy no longer matters; it still guards the other cases.
Measured (docs/kernels-log.md, session 20): the 1.7B q4_0 server at one client, temperature 0.8, 37-48 ms
a step with the spinning worker against 33-43 passive (1.16x llama-server against 0.99x);
`codeshell generate` on the 1.7B int4 at -t 0.8, 26.5-29.4 tok/s against 35.4-36.4 passive.
Passive costs a futex wake per OpenMP region, nothing next to a prompt's regions of milliseconds;
the OpenMP decode path (team off or auto) forks for every small loop, so there the default stays.

The library (`codeshell.LLM`, session 24): `library_spin`, called by codeshell/llm.py before it
imports torch, sets GOMP_SPINCOUNT=10000 (libgomp's spin before its worker sleeps: ~0.5 ms of
pauses on an Ice Lake-class Xeon instead of the default 300k, ~15 ms) where torch is not loaded yet
and the user set neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT (CODESHELL_OMP_WAIT=keep: nothing).
Why: a prompt's OpenMP regions left the worker spinning through the next ~5-15 ms of decode steps
beside the team's two threads; codeshell-mini's batch-1 decode right after a 16-token prompt
(bench_quant's figure, `benchmarks/bench_decode_wait.py`): 1327 tok/s default, 1811 with the short
spin, 1822 passive, same minutes. Not passive: a prompt's back-to-back regions keep a hot worker
(16-token prompt + 1st token 4.2 ms with the short spin and the default, 6.0 ms passive). A process
that imported torch before codeshell.llm keeps libgomp's default (it read its environment at load).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

WAITS = ("passive", "keep")
# libgomp spins this many pauses before its idle worker sleeps (`library_spin`)
LIBRARY_SPINS = "10000"


def _ours_to_set(environ: MutableMapping[str, str]) -> bool:
    """Whether codeshell may set libgomp's waiting (`wait_policy`, `library_spin`): not where
    CODESHELL_OMP_WAIT=keep, the user set OMP_WAIT_POLICY, or the decode team is not on. A bad
    CODESHELL_OMP_WAIT value raises ValueError (one line)."""
    mode = environ.get("CODESHELL_OMP_WAIT", "passive")
    if mode not in WAITS:
        raise ValueError(f"CODESHELL_OMP_WAIT={mode!r}: expected {' or '.join(WAITS)}")
    return not (mode == "keep" or "OMP_WAIT_POLICY" in environ
                or environ.get("CODESHELL_DECODE_TEAM", "on") != "on")


def wait_policy(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Sets OMP_WAIT_POLICY=passive in `environ` and returns "passive", or returns None where it sets
    nothing: CODESHELL_OMP_WAIT=keep (the behaviour before session 20), an OMP_WAIT_POLICY the user
    set, or the decode team not on. A bad CODESHELL_OMP_WAIT value raises ValueError (one line)."""
    if not _ours_to_set(environ):
        return None
    environ["OMP_WAIT_POLICY"] = "passive"
    return "passive"


def library_spin(environ: MutableMapping[str, str] = os.environ, loaded: bool | None = None) -> str | None:
    """Sets GOMP_SPINCOUNT=LIBRARY_SPINS in `environ` and returns it, or returns None where it sets
    nothing: torch (so libgomp) already loaded (`loaded`, default: "torch" in sys.modules),
    CODESHELL_OMP_WAIT=keep, an OMP_WAIT_POLICY or GOMP_SPINCOUNT the user set, or the decode team
    not on. A bad CODESHELL_OMP_WAIT value raises ValueError (one line)."""
    if not _ours_to_set(environ) or "GOMP_SPINCOUNT" in environ:
        return None
    if loaded is None:
        loaded = "torch" in sys.modules
    if loaded:
        return None
    environ["GOMP_SPINCOUNT"] = LIBRARY_SPINS
    return LIBRARY_SPINS
