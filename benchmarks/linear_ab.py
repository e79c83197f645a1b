"""Shared setup of the decode-linear kernel benchmarks (bench_q8_batch_avx2.py, bench_q4_avx2.py; the shapes,
variants and rounds of bench_bf16_rows_avx2.py and bench_b8_nonlinear.py): the shapes
of the small random shape and codeshell-mini, the common command-line options, the process setup (torch threads,
the chunks on the process's Team), the `--ab` variants' parsing and the alternating timing of one call.

What this is: a helper module, not a benchmark (no main). Why: the two benchmarks had the same ~40 lines
(session 32 helper C folded them here); a third kernel benchmark of the same kind imports it the same way
(`sys.path` holds benchmarks/ when a script there runs).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

# (N, K) of each linear; the head is int8 in bench_quant's int4 checkpoints
SETS = {
    "small": {"c_attn": (1536, 1024), "attn.c_proj": (1024, 1024), "c_fc": (4096, 1024),
              "mlp.c_proj": (1024, 4096), "head": (70144, 1024)},
    "mini": {"c_attn": (384, 256), "attn.c_proj": (256, 256), "c_fc": (1024, 256), "mlp.c_proj": (256, 1024),
             "head": (16384, 256)},
}


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """--set, --m, --rounds, --ab, --shapes, --threads, --budget."""
    ap.add_argument("--set", choices=list(SETS), default="small")
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ab", nargs="+", default=["-"], help="variants: ENV=V[,ENV=V] or '-' (nothing set)")
    ap.add_argument("--shapes", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--budget", type=float, default=0.04, help="seconds a variant's round aims at")


def setup(a: argparse.Namespace, what: str):
    """Sets the threads and the chunks' Team, prints the header line; returns (module, isa level, variants)."""
    from codeshell.kernels import _ext, ops

    if a.threads:
        torch.set_num_threads(a.threads)
    # the chunks on the process's shared Team (parallel.h chunks_in_team), as inside the decode step: a
    # 2-thread at::parallel_for region waits for its second thread to be scheduled (~8 ms a call on a
    # host with other runnable processes), which is all such a benchmark would measure there
    os.environ.setdefault("CODESHELL_CHUNKS_TEAM", "1")
    mod = _ext.get()
    isa = ops.isa_level()
    print(f"threads {torch.get_num_threads()}, isa {ops.ISA_LEVELS[isa]}, load avg {os.getloadavg()[0]:.2f}, "
          f"{what}, set {a.set}", flush=True)
    return mod, isa, parse_variants(a.ab)


def parse_variants(ab: list[str]) -> dict[str, dict[str, str]]:
    """'-' -> {} (nothing set); 'A=1,B=2' -> {'A': '1', 'B': '2'}."""
    return {v: ({} if v == "-" else dict(kv.split("=", 1) for kv in v.split(","))) for v in ab}


def round_times(fns: dict[str, tuple[dict[str, str], object]], reps: int, rounds: int,
                clock=time.perf_counter, rotate: bool = False) -> dict[str, list[float]]:
    """Seconds (by `clock`) a call of each variant's function under its environment, one figure per round
    of `reps` calls: `rounds` rounds, the variants taking turns within each round (after one warm-up round),
    in the same order each round or, with `rotate`, starting one later each round.
    fns: variant -> (environment, function)."""
    keys = {k for env, _ in fns.values() for k in env}
    out: dict[str, list[float]] = {v: [] for v in fns}
    names = list(fns)
    try:
        for r in range(rounds + 1):
            k0 = r % len(names) if rotate else 0
            for v in names[k0:] + names[:k0]:
                env, f = fns[v]
                for k in keys:
                    os.environ.pop(k, None)
                os.environ.update(env)
                t0 = clock()
                for _ in range(reps):
                    f()
                if r:
                    out[v].append((clock() - t0) / reps)
    finally:
        for k in keys:
            os.environ.pop(k, None)
    return out


def fastest_rounds(f, variants: dict[str, dict[str, str]], reps: int, rounds: int) -> dict[str, float]:
    """Seconds a call of f under each variant's environment: the fastest of `rounds` rounds of `reps`
    calls, the variants taking turns within each round (after one warm-up round)."""
    times = round_times({v: (env, f) for v, env in variants.items()}, reps, rounds)
    return {v: min(t) for v, t in times.items()}


def time_call(f, variants: dict[str, dict[str, str]], budget: float, rounds: int) -> dict[str, float]:
    """fastest_rounds with the repetitions a round sized from two timed calls to about `budget` seconds."""
    t0 = time.perf_counter()
    f()
    f()
    one = max((time.perf_counter() - t0) / 2, 1e-6)
    return fastest_rounds(f, variants, max(3, int(budget / one)), rounds)
