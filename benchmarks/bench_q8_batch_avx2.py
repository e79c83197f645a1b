"""Time the int8 / int4 `q8` decode linears (decode_int8_q8 / decode_int4_q8, the kernels the native
decode step calls per linear) at batched-decode M on this CPU's isa level, per shape of the small
random shape (bench_quant --shape small: 1024 wide, FFN 4096, vocab 70144) or codeshell-mini (256
wide), to see where batch 8 loses against batch 1: per-call cost, x's rounding, the kernel's ALU.

    flock /work/notes/bench.lock python benchmarks/bench_q8_batch_avx2.py --set small --format int8
    flock /work/notes/bench.lock python benchmarks/bench_q8_batch_avx2.py --set mini --format int4 --m 1 8 \
        --ab - CODESHELL_Q8_AVX2_ROWS=0
    flock /work/notes/bench.lock python benchmarks/bench_q8_batch_avx2.py --set mini --threads 1 --m 1 8 \
        --ab - CODESHELL_Q8_AVX2_M1=0 CODESHELL_Q8_AVX2_LANES=1     # session 33: the M = 1 kernel, the lanes kernel

Prints per shape and M: us a call (median of alternating rounds, weights warm unless they exceed
the caches), us per row of x, weight GB/s, int8 GOP/s (2*M*N*K), and the time against M = 1 (x1.00
= a batch of M costs what one row costs: the ideal of a memory-bound decode). `--ab` variants
(ENV=V[,ENV=V] or '-') alternate within each round; the figure is each variant's fastest round (on a
host shared with other jobs a preempted round only slows; the kernels here are compute bound from M ~ 4).
int4 runs groups of 128, symmetric (bench_quant's int4 scheme); the model's int4 head is int8.
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
    ap.add_argument("--format", choices=["int8", "int4"], default="int8")
    a = ap.parse_args()
    shapes = {k: v for k, v in SETS[a.set].items() if a.shapes is None or k in a.shapes}
    mod, isa, variants = setup(a, f"format {a.format}")
    torch.manual_seed(0)
    for name, (n, k) in shapes.items():
        fmt = "int8" if name == "head" else a.format
        if fmt == "int4":
            pw = quantize_int4(torch.randn(n, k) * 0.05, group_size=128, symmetric=True)
        else:
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
            s = torch.rand(n) * 1e-2
        base: dict[str, float] = {}
        for m in a.m:
            x = torch.randn(m, k)
            if fmt == "int4":
                def f(x=x):
                    mod.decode_int4_q8(x, pw.data, pw.scales, pw.offsets, pw.group_size, None, isa)
                wbytes = n * k // 2
            else:
                def f(x=x):
                    mod.decode_int8_q8(x, q, s, None, isa)
                wbytes = n * k
            res = time_call(f, variants, a.budget, a.rounds)
            if m == a.m[0]:
                base = res
            print(f"{fmt} {name:11s} N={n:5d} K={k:4d} M={m:2d}: " + "; ".join(
                f"[{v}] {t * 1e6:8.1f} us {t * 1e6 / m:7.1f}/row {wbytes / t / 1e9:5.1f} GB/s "
                f"{2 * m * n * k / t / 1e9:5.0f} GOP/s x{t / base[v]:.2f}"
                for v, t in res.items()), flush=True)


if __name__ == "__main__":
    main()
