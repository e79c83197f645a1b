"""A/B of the bf16-weight kernels on an AVX-512 CPU without AVX512-BF16 (session 23 helper A):
`avx512_vnni:panel` (Avx512Fma, 512-bit fp32 FMA) against `avx2:panel` at decode Ms, and the
prefill candidates (`avx512_vnni:panel64`, `avx2:panel64`, `sgemm:fp32`, torch's fp32 matmul)
at M = 512. Single linears (bench_kernels.py's 7B / small shapes), fp32 x, paths called by name
(ops._compute), rounds alternating the paths, medians; the ratio is avx2's time over ours (> 1:
the new kernel is faster) and GFLOP/s = 2 M N K / t.

    flock /work/notes/bench.lock python benchmarks/bench_bf16_fma512.py --model 7b --m 1 2 3 8 16 64
    flock /work/notes/bench.lock python benchmarks/bench_bf16_fma512.py --model small --m 512
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import MODEL_SHAPES  # noqa: E402

from codeshell.bench import alternating_medians  # noqa: E402
from codeshell.kernels import _ext, ops, prepack  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="7b", choices=list(MODEL_SHAPES))
    ap.add_argument("--shapes", nargs="+", default=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 3, 8, 16, 64])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    mod = _ext.get()
    print(f"threads {torch.get_num_threads()}, isa level {ops.ISA_LEVELS[ops.isa_level()]}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    for name in args.shapes:
        n, k, _ = MODEL_SHAPES[args.model][name]
        w = torch.randn(n, k) / k ** 0.5
        p = prepack(w)
        wf = w.bfloat16().float()
        for m in args.m:
            x = torch.randn(m, k)
            if m <= ops.BF16_PANEL_MAX_M:
                paths = {"avx2:panel": lambda: ops._compute("avx2:panel", mod, x, p, None),
                         "avx512_vnni:panel": lambda: ops._compute("avx512_vnni:panel", mod, x, p, None)}
            else:
                paths = {"avx2:panel64": lambda: ops._compute("avx2:panel64", mod, x, p, None),
                         "avx512_vnni:panel64": lambda: ops._compute("avx512_vnni:panel64", mod, x, p, None),
                         "sgemm:fp32": lambda: ops._compute("sgemm:fp32", mod, x, p, None),
                         "torch fp32 matmul": lambda: x @ wf.T}
            reps = max(1, int(2e8 / (2 * m * n * k + 4e6)))  # ~0.05-0.2 s a round
            med = alternating_medians(paths, reps, args.rounds)
            base = med[next(iter(paths))]
            print(f"{args.model} {name:12s} N={n:5d} K={k:5d} M={m:4d}: " + "; ".join(
                f"{v} {med[v] * 1e3:7.3f} ms {2 * m * n * k / med[v] / 1e9:6.1f} GF/s x{base / med[v]:.2f}"
                for v in paths), flush=True)


if __name__ == "__main__":
    main()
