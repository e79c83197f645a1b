"""Time codeshell-mini's batch-8 decode non-linears alone: the greedy picks (argmax_rows_rounded
over 8 x 16384 fp32 logits) and the decode attention of 8 queries of 8 slots (packed_attention:
8 heads of 32 in 2 KV groups, bf16 cache, each query at its own length), on one thread.

Not a test: prints figures. Variants (`--ab`: '-' or ENV=V[,ENV=V]) alternate call by call in
short rounds; printed per kernel and variant: the minimum and the median us a call (the minimum
is the figure to compare on a loaded host: a preempted round only raises the median), and the
ratio of each variant's minimum to the first variant's.

    flock /work/notes/bench.lock python benchmarks/bench_b8_nonlinear.py --ab - CODESHELL_ARGMAX_RAW=0
    flock /work/notes/bench.lock python benchmarks/bench_b8_nonlinear.py --lens 48 80 --ab - CODESHELL_ATTN_RUN1=1
    flock /work/notes/bench.lock python benchmarks/bench_b8_nonlinear.py --only team --ab - CODESHELL_ARGMAX_RAW=0

`--only team`: inside the decode step's thread team (run_in_team, 2 threads), the int8 head (16384 x 256,
M = 8, as the step calls it) alone and followed by the argmax of its logits; printed: both, and
their difference (the argmax where the head's two threads left the logits in their own caches).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from codeshell.kernels import _ext, ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from linear_ab import round_times  # noqa: E402


def timed(fns: dict[str, tuple[dict[str, str], object]], reps: int, rounds: int) -> dict[str, list[float]]:
    """us a call of each variant per round (reps calls), variants alternating round by round."""
    return {v: [t * 1e6 for t in ts] for v, ts in round_times(fns, reps, rounds).items()}


def report(name: str, res: dict[str, list[float]]) -> None:
    base = min(next(iter(res.values())))
    for v, t in res.items():
        print(f"{name:28s} {v:34s} min {min(t):8.2f}  median {statistics.median(t):8.2f} us   min ratio {min(t) / base:5.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ab", nargs="+", default=["-"])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--lens", nargs="+", type=int, default=[16, 48, 80], help="keys each query attends (all rows)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["argmax", "attention", "team"], default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    mod = _ext.get()
    isa = ops.isa_level()
    print(f"threads {torch.get_num_threads()}, isa {ops.ISA_LEVELS[isa]}, load avg {os.getloadavg()[0]:.2f}")
    envs = {v: ({} if v == "-" else dict(kv.split("=", 1) for kv in v.split(","))) for v in a.ab}
    g = torch.Generator().manual_seed(0)
    M = a.m
    if a.only in (None, "argmax"):
        logits = torch.randn(M, 16384, generator=g) * 3
        res = timed({v: (e, lambda: mod.argmax_rows_rounded(logits)) for v, e in envs.items()}, 50, a.rounds)
        report(f"argmax {M}x16384", res)
    if a.only == "team":
        torch.set_num_threads(2)
        q8 = torch.randint(-127, 128, (16384, 256), dtype=torch.int8, generator=g)
        sc = torch.rand(16384, generator=g) * 1e-2
        x = torch.randn(M, 256, generator=g)
        reps = 100

        def head_only():
            for _ in range(reps):
                mod.decode_int8_q8(x, q8, sc, None, isa)

        def head_argmax():
            for _ in range(reps):
                mod.argmax_rows_rounded(mod.decode_int8_q8(x, q8, sc, None, isa))

        fns = {}
        for v, e in envs.items():
            fns[f"{v} head"] = (e, lambda: mod.run_in_team(head_only))
            fns[f"{v} head+argmax"] = (e, lambda: mod.run_in_team(head_argmax))
        res = {k: [t / reps for t in ts] for k, ts in timed(fns, 1, max(5, a.rounds // 4)).items()}
        report(f"team M={M}", res)
        for v in envs:
            h, ha = res[f"{v} head"], res[f"{v} head+argmax"]
            print(f"{'team argmax (difference)':28s} {v:34s} min {min(ha) - min(h):8.2f}  median "
                  f"{statistics.median(ha) - statistics.median(h):8.2f} us")
        return
    if a.only in (None, "attention"):
        H, G, D, L = 8, 2, 32, 128
        q = torch.randn(M, H, D, generator=g).to(torch.bfloat16)
        kc = torch.randn(M, G, L, D, generator=g).to(torch.bfloat16)
        vc = torch.randn(M, G, L, D, generator=g).to(torch.bfloat16)
        slots = torch.arange(M, dtype=torch.int64)
        for S in a.lens:
            lens = torch.full((M,), S, dtype=torch.int64)
            f = lambda: mod.packed_attention(q, kc, vc, slots, lens, D ** -0.5, isa)  # noqa: E731
            res = timed({v: (e, f) for v, e in envs.items()}, 20, a.rounds)
            report(f"attention M={M} S={S}", res)


if __name__ == "__main__":
    main()
