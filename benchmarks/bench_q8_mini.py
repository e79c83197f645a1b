"""Time the int8 q8 decode linear (decode_int8_q8, ops' `q8` kernel) alone at codeshell-mini's
shapes (head 16384x256, c_fc 1024x256, mlp.c_proj 256x1024, c_attn 384x256) for M = 1 and 8,
to split mini's int8 b8 step into kernel time (compute- or read-bound) and per-call costs.

    flock /work/notes/bench.lock python benchmarks/bench_q8_mini.py [--m 1 8] [--rounds 5]

Prints per shape and M: us a call (median of rounds), int8 GOP/s (2*M*N*K), weight GB/s, and
b8 time / b1 time. `--ab` variants (ENV=V[,ENV=V] or '-') alternate within each round.
"""
from __future__ import annotations

import argparse
import os

import torch

from codeshell.bench import alternating_medians
from codeshell.kernels import _ext, ops

SHAPES = {"head": (16384, 256), "c_fc": (1024, 256), "mlp.c_proj": (256, 1024), "c_attn": (384, 256)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ab", nargs="+", default=["-"])
    a = ap.parse_args()
    mod = _ext.get()
    isa = ops.isa_level()
    print(f"threads {torch.get_num_threads()}, isa {ops.ISA_LEVELS[isa]}, load avg {os.getloadavg()[0]:.2f}")
    variants = {v: ({} if v == "-" else dict(kv.split("=", 1) for kv in v.split(","))) for v in a.ab}
    for name, (n, k) in SHAPES.items():
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s = torch.rand(n) * 1e-2
        res = {}
        for m in a.m:
            x = torch.randn(m, k)
            reps = max(20, int(2e7 / (n * k + 4 * m * n * k)))
            fns = {v: (lambda: mod.decode_int8_q8(x, q, s, None, isa)) for v in variants}
            res[m] = alternating_medians(fns, reps, a.rounds, env=variants)
            print(f"{name:10s} N={n:5d} K={k:4d} M={m:2d}: " + "; ".join(
                f"[{v}] {t * 1e6:7.1f} us {2 * m * n * k / t / 1e9:5.0f} GOP/s {n * k / t / 1e9:5.1f} GB/s"
                + (f" x{t / res[a.m[0]][v]:.2f} of M={a.m[0]}" if m != a.m[0] else "")
                for v, t in res[m].items()), flush=True)


if __name__ == "__main__":
    main()
