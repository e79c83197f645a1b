"""A/B of the bf16-weight prefill candidates on an AVX2-only CPU (session 30 helper A): the AVX2
fp32-FMA GEMM (`avx2:gemm`, csrc/gemm_fma.h) against the decode panel kernel in 64-row calls
(`avx2:panel64`) and the fp32 sgemm path (`sgemm:fp32`) at prefill M, single linears of the small
shape (N, K) and codeshell-mini's, bf16 x (a bf16 model's activations), paths called by name
(ops._compute), rounds alternating the paths in rotating order, medians; GFLOP/s = 2 M N K / t and
x = the first path's time over each.

    flock /work/notes/bench.lock python benchmarks/bench_bf16_avx2_gemm.py --model small --m 512
    flock /work/notes/bench.lock python benchmarks/bench_bf16_avx2_gemm.py --model mini --m 256 512
    flock /work/notes/bench.lock python benchmarks/bench_bf16_avx2_gemm.py --peak
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from codeshell.bench import alternating_medians
from codeshell.kernels import _ext, ops, prepack

SHAPES = {  # (N, K) of each model's linears (bench_quant's small shape; codeshell/mini/model)
    "small": {"c_attn": (1536, 1024), "attn.c_proj": (1024, 1024), "c_fc": (4096, 1024),
              "mlp.c_proj": (1024, 4096), "lm_head": (70144, 1024)},
    "mini": {"c_attn": (384, 256), "attn.c_proj": (256, 256), "c_fc": (1024, 256), "mlp.c_proj": (256, 1024)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=list(SHAPES))
    ap.add_argument("--shapes", nargs="+", default=None)
    ap.add_argument("--m", nargs="+", type=int, default=[512])
    ap.add_argument("--paths", nargs="+", default=["avx2:gemm", "avx2:panel64", "sgemm:fp32"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peak", action="store_true", help="also the fp32-FMA ceiling (bf16_fma_peak isa 0)")
    args = ap.parse_args()
    mod = _ext.get()
    print(f"threads {torch.get_num_threads()}, isa level {ops.ISA_LEVELS[ops.isa_level()]}, "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    if args.peak:
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            f = mod.bf16_fma_peak(20000, 0)
            best = max(best, f / (time.perf_counter() - t))
        print(f"fp32-FMA peak (avx2:panel's block, L1): {best / 1e9:.1f} GFLOP/s", flush=True)
    for name in args.shapes or list(SHAPES[args.model]):
        n, k = SHAPES[args.model][name]
        p = prepack(torch.randn(n, k) / k ** 0.5)
        for m in args.m:
            x = torch.randn(m, k).bfloat16()
            paths = {c: (lambda c=c: ops._compute(c, mod, x, p, None)) for c in args.paths}
            reps = max(1, int(1e9 / (2 * m * n * k)))  # ~0.05-0.2 s a round
            med = alternating_medians(paths, reps, args.rounds, rotate=True)
            base = med[args.paths[0]]
            print(f"{args.model} {name:12s} N={n:5d} K={k:5d} M={m:4d}: " + "; ".join(
                f"{v} {med[v] * 1e3:7.3f} ms {2 * m * n * k / med[v] / 1e9:6.1f} GF/s x{med[v] / base:.2f}"
                for v in paths), flush=True)


if __name__ == "__main__":
    main()
