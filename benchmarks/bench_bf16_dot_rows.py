"""`avx512_bf16:panel` (decode_bf16 at isa avx512_bf16, vdpbf16ps) alone on codeshell-mini's shapes at the
verify steps' row counts, variants (ENV=V[,ENV=V] or '-') alternating each round in one process; medians.

Prints per shape and M: us a call, us a row, and GFLOP/s, with the vdpbf16ps peak of one thread
(bf16_dot_peak) for scale. The weights cycle through --mib MiB of copies (default 24: L3-resident, as
codeshell-mini's ~14 MiB of weights are between the steps of one process).

    flock /work/notes/bench.lock python benchmarks/bench_bf16_dot_rows.py --ab - CODESHELL_BF16_DOT_ROWS=0

Not a test: prints figures (session 39 helper D, docs/kernels-log.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's codeshell

SHAPES = {"c_attn": (384, 256), "attn.c_proj": (256, 256), "c_fc": (1024, 256), "mlp.c_proj": (256, 1024),
          "head": (16384, 256)}


def setv(v: str) -> None:
    """Clears every CODESHELL_BF16_DOT* switch, then sets the variant's."""
    for k in list(os.environ):
        if k.startswith("CODESHELL_BF16_DOT"):
            del os.environ[k]
    if v != "-":
        for kv in v.split(","):
            k, val = kv.split("=")
            os.environ[k] = val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", nargs="+", type=int, default=[8, 9, 12, 16, 24, 32])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--ab", nargs="+", default=["-"], help="variants: ENV=V[,ENV=V] or '-' (nothing set)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=24)
    ap.add_argument("--budget", type=float, default=0.02, help="seconds a variant's round aims at")
    a = ap.parse_args()
    if a.rounds < 1 or a.mib < 1 or any(m < 1 or m > 64 for m in a.m):
        ap.error("--rounds and --mib must be >= 1, --m in 1..64")
    torch.set_num_threads(1)
    from codeshell.kernels import _ext, prepack
    mod = _ext.get()
    isa = 2  # avx512_bf16
    reps = 2000
    t = time.perf_counter()
    fl = mod.bf16_dot_peak(reps)
    peak = fl / (time.perf_counter() - t) / 1e9
    print(f"vdpbf16ps peak, 1 thread: {peak:.0f} GFLOP/s; load average {os.getloadavg()[0]:.2f}", flush=True)
    for name in a.shapes:
        n, k = SHAPES[name]
        copies = max(2, (a.mib << 20) // (n * k * 2))
        ws = [prepack(torch.randn(n, k) * 0.05).data for _ in range(copies)]
        for m in a.m:
            x = torch.randn(m, k).to(torch.bfloat16)
            ref = None
            for v in a.ab:  # every variant gives the bits of the first
                setv(v)
                y = mod.decode_bf16(x, ws[0], n, None, isa)
                if ref is None:
                    ref = y
                elif not torch.equal(ref, y):
                    raise SystemExit(f"{name} M={m}: variant {v} differs from {a.ab[0]}")
            t = time.perf_counter()
            mod.decode_bf16(x, ws[0], n, None, isa)
            calls = max(copies, int(a.budget / max(time.perf_counter() - t, 1e-6)))
            res: dict[str, list[float]] = {v: [] for v in a.ab}
            for r in range(a.rounds):
                for v in (a.ab if r % 2 == 0 else a.ab[::-1]):
                    setv(v)
                    t = time.perf_counter()
                    for i in range(calls):
                        mod.decode_bf16(x, ws[i % copies], n, None, isa)
                    res[v].append((time.perf_counter() - t) / calls)
            setv("-")
            cells = []
            for v in a.ab:
                s = statistics.median(res[v])
                cells.append(f"{v}: {s * 1e6:7.1f}us {s * 1e6 / m:5.2f}us/row {2 * m * n * k / s / 1e9:5.0f}GF/s")
            print(f"{name:12s} M={m:2d}  " + "  |  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
