"""Time the int4 `q8` decode linears (decode_int4_q8: groups of 128, int8-rounded x, the kernel the native decode
step calls per int4 linear) at M = 1..64 on this CPU's isa level, per shape of the small random shape (1024 wide,
FFN 4096) or codeshell-mini (256 wide), with a per-call probe: the same K with 16 weight rows, whose time is what a
call costs beyond its rows (x's rounding, the output tensor, the dispatch from Python), so that `us/row` of the real shapes can be
split into the fixed part and the rows' part.

    flock /work/notes/bench.lock python benchmarks/bench_q4_avx2.py --set small --threads 1 --m 1 8 \
        --ab - CODESHELL_Q4_AVX2_ROWS=0

Prints per shape and M: us a call (each variant's fastest round of alternating rounds), weight GB/s, G int8 MAC/s
(M*N*K / t), and the time against the first M. Written for session 31 helper A (docs/kernels-log.md); `--ab` variants are
ENV=V[,ENV=V] or '-' (nothing set). `--offsets` uses asymmetric groups (scales and offsets); bench_quant's int4
checkpoints are symmetric (scales only). Weights are warm (every shape here fits the L3).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from linear_ab import SETS, add_common_args, setup, time_call  # noqa: E402

from codeshell.kernels import quantize_int4  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--offsets", action="store_true", help="asymmetric groups (scales and offsets)")
    ap.add_argument("--group", type=int, default=128)
    a = ap.parse_args()
    shapes = {k: v for k, v in SETS[a.set].items() if k != "head"}
    ks = sorted({k for _, k in shapes.values()})
    for k in ks:
        shapes[f"probe{k}"] = (16, k)
    if a.shapes:
        shapes = {k: v for k, v in shapes.items() if k in a.shapes or (k.startswith("probe") and "probe" in a.shapes)}
    mod, isa, variants = setup(a, f"int4 g{a.group} {'asym' if a.offsets else 'sym'}")
    torch.manual_seed(0)
    for name, (n, k) in shapes.items():
        pw = quantize_int4(torch.randn(n, k) * 0.05, group_size=a.group, symmetric=not a.offsets)
        base: dict[str, float] = {}
        for m in a.m:
            x = torch.randn(m, k)

            def f(x=x):
                mod.decode_int4_q8(x, pw.data, pw.scales, pw.offsets, pw.group_size, None, isa)

            res = time_call(f, variants, a.budget, a.rounds)
            if m == a.m[0]:
                base = res
            wbytes = n * k // 2
            print(f"{name:11s} N={n:5d} K={k:4d} M={m:2d}: " + "; ".join(
                f"[{v}] {t * 1e6:8.2f} us {wbytes / t / 1e9:5.1f} GB/s {m * n * k / t / 1e9:5.1f} GMAC/s x{t / base[v]:.2f}"
                for v, t in res.items()), flush=True)


if __name__ == "__main__":
    main()
