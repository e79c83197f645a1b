"""A/B of the bf16 batched-decode tiles (csrc/panel_bf16_rows.h, session 25 helper B) against the old
Avx512Fma tiles on an AVX-512 CPU without AVX512-BF16: `avx512_vnni:panel` at decode Ms, single linears
(bench_kernels.py's 7B / small / mid shapes), fp32 x, variants as environment settings (read per call by
the kernel) alternating within each round; medians of the rounds. GFLOP/s = 2 M N K / t, GB/s = the
weight's bytes / t, ratio = the first variant's time over each variant's (> 1: faster than the first).

    flock /work/notes/bench.lock python benchmarks/bench_bf16_rows.py --model 7b --m 4 8 16 \\
        --ab CODESHELL_BF16_ROWS=0 - CODESHELL_BF16_ROWS_TILE=8
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

KEYS = ("CODESHELL_BF16_ROWS", "CODESHELL_BF16_ROWS_TILE", "CODESHELL_BF16_ROWS_NP", "CODESHELL_BF16_ROWS_PF",
        "CODESHELL_BF16_ROWS_KB", "CODESHELL_BF16_ROWS_G")


def _variant(spec: str) -> dict[str, str]:
    if spec == "-":
        return {}
    return dict(kv.split("=", 1) for kv in spec.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="7b", choices=list(MODEL_SHAPES))
    ap.add_argument("--shapes", nargs="*", default=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])
    ap.add_argument("--m", nargs="+", type=int, default=[4, 8, 16])
    ap.add_argument("--nk", nargs="+", default=[], help="extra N x K shapes, e.g. 256x4096 (an L2-resident weight)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ab", nargs="+", default=["CODESHELL_BF16_ROWS=0", "-"],
                    help="variants: 'NAME=V,NAME=V' or '-' (the defaults)")
    args = ap.parse_args()
    mod = _ext.get()
    print(f"threads {torch.get_num_threads()}, isa level {ops.ISA_LEVELS[ops.isa_level()]}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    from codeshell.bench import fma_tflops
    print(f"fp32-FMA peak (avx512_vnni:gemm's block, L1): {fma_tflops() * 1e3:.0f} GF/s", flush=True)
    variants = {v: _variant(v) for v in args.ab}
    shapes = [(name, MODEL_SHAPES[args.model][name][:2]) for name in args.shapes]
    shapes += [(nk, tuple(int(v) for v in nk.split("x"))) for nk in args.nk]
    for name, (n, k) in shapes:
        p = prepack(torch.randn(n, k) / k ** 0.5)
        for m in args.m:
            x = torch.randn(m, k)
            reps = max(1, int(1e8 / (n * k * 2 + 2 * m * n * k)))  # ~0.05-0.1 s a round
            for key in KEYS:  # the shell's own settings of the switches do not leak into "-"
                os.environ.pop(key, None)
            fns = {v: (lambda: ops._compute("avx512_vnni:panel", mod, x, p, None)) for v in variants}
            med = alternating_medians(fns, reps, args.rounds, env=variants)
            base = med[args.ab[0]]
            print(f"{args.model} {name:12s} N={n:5d} K={k:5d} M={m:3d}: " + "; ".join(
                f"[{v}] {med[v] * 1e3:.3f} ms {2 * m * n * k / med[v] / 1e9:.0f} GF/s "
                f"{n * k * 2 / med[v] / 1e9:.1f} GB/s x{base / med[v]:.2f}" for v in variants), flush=True)


if __name__ == "__main__":
    main()
