"""Time the int8 q8 decode linear (decode_int8_q8, ops' `q8` kernel) alone at codeshell-mini's
shapes (head 16384x256, c_fc 1024x256, mlp.c_proj 256x1024, c_attn 384x256) for M = 1 and 8,
to split mini's int8 b8 step into kernel time (compute- or read-bound) and per-call costs.
`--format int4` times decode_int4_q8 instead (group 128, asymmetric as bench_quant writes mini's
int4 block linears; the head stays int8 in the model, so `--shapes` drops it by default there).

    flock /work/notes/bench.lock python benchmarks/bench_q8_mini.py [--m 1 8] [--rounds 5]
    flock /work/notes/bench.lock python benchmarks/bench_q8_mini.py --format int4 --ab - CODESHELL_Q8R_INT4=0

Prints per shape and M: us a call (median of rounds), int8 GOP/s (2*M*N*K), weight GB/s, and
b8 time / b1 time. `--ab` variants (ENV=V[,ENV=V] or '-') alternate within each round.
"""
from __future__ import annotations

import argparse
import os

import torch

from codeshell.bench import alternating_medians
from codeshell.kernels import _ext, ops, quantize_int4

SHAPES = {"head": (16384, 256), "c_fc": (1024, 256), "mlp.c_proj": (256, 1024), "c_attn": (384, 256)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ab", nargs="+", default=["-"])
    ap.add_argument("--format", choices=["int8", "int4"], default="int8")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None)
    ap.add_argument("--symmetric", action="store_true", help="int4: symmetric groups (no offsets)")
    a = ap.parse_args()
    shapes = a.shapes or [s for s in SHAPES if a.format == "int8" or s != "head"]
    mod = _ext.get()
    isa = ops.isa_level()
    print(f"threads {torch.get_num_threads()}, isa {ops.ISA_LEVELS[isa]}, load avg {os.getloadavg()[0]:.2f}")
    variants = {v: ({} if v == "-" else dict(kv.split("=", 1) for kv in v.split(","))) for v in a.ab}
    print(f"format {a.format}")
    for name in shapes:
        n, k = SHAPES[name]
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s = torch.rand(n) * 1e-2
        pw = quantize_int4(torch.randn(n, k) * 0.05, group_size=128, symmetric=a.symmetric) if a.format == "int4" else None
        res = {}
        for m in a.m:
            x = torch.randn(m, k)
            reps = max(20, int(2e7 / (n * k + 4 * m * n * k)))
            if pw is not None:
                fns = {v: (lambda: mod.decode_int4_q8(x, pw.data, pw.scales, pw.offsets, pw.group_size, None, isa))
                       for v in variants}
            else:
                fns = {v: (lambda: mod.decode_int8_q8(x, q, s, None, isa)) for v in variants}
            res[m] = alternating_medians(fns, reps, a.rounds, env=variants)
            print(f"{name:10s} N={n:5d} K={k:4d} M={m:2d}: " + "; ".join(
                f"[{v}] {t * 1e6:7.1f} us {2 * m * n * k / t / 1e9:5.0f} GOP/s {n * k / t / 1e9:5.1f} GB/s"
                + (f" x{t / res[a.m[0]][v]:.2f} of M={a.m[0]}" if m != a.m[0] else "")
                for v, t in res[m].items()), flush=True)


if __name__ == "__main__":
    main()
