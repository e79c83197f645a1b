"""The AVX2 bf16 decode linears at M = 1..64 (prompt-lookup verify steps, batched decode) against
the fp32-FMA ceiling, one thread (session 32 helper B).

Per linear of codeshell-mini (K = 256, the 16384 x 256 head) or the small shape (K = 1024 / 4096)
and per M: `decode_bf16(x fp32, isa avx2)` (what the native decode step calls: `avx2:panel`) under
each variant of environment switches (`--ab`, read per call), and optionally the prefill GEMM
`prefill_bf16_fma(isa 0)` (`avx2:gemm`, the same bits) at the same M (`--gemm`); rounds alternate the
candidates in rotating order, medians of the calling thread's CPU time (one thread: the calls run on
it; steadier than the wall clock on a shared host), or of the wall clock with --threads > 1; GF/s = 2 M N K / t and % of the ceiling
(`bf16_fma_peak(isa 0)`: Avx2::micro's register block on L1 operands, measured in the same run).

    flock /work/notes/bench.lock python benchmarks/bench_bf16_rows_avx2.py --model mini --m 8 16 36 64
    flock /work/notes/bench.lock python benchmarks/bench_bf16_rows_avx2.py --model mini --ab - CODESHELL_BF16_AVX2_BLOCK=0
    flock /work/notes/bench.lock python benchmarks/bench_bf16_rows_avx2.py --model small --m 1 --shapes lm_head --read --threads 2

--read (session 34 helper B) adds the read probe (`read_stream`, the weight's bytes once a call) to the
rounds and prints each candidate as GB/s of the weight's bytes too: the M = 1 stream against what a
plain read achieves in the same process and minute.

Not a test: prints figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from codeshell.kernels import _ext, prepack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from linear_ab import SETS, parse_variants, round_times  # noqa: E402

# (N, K): codeshell-mini's linears and head, bench_quant's small shape (the head named as the checkpoints name it)
SHAPES = {m: {("lm_head" if k == "head" else k): nk for k, nk in shapes.items()} for m, shapes in SETS.items()}


def alternating(fns, envs, reps: int, rounds: int, clock) -> dict[str, float]:
    """Median seconds a call of each candidate over `rounds` rounds in rotating order (after a warm-up
    round), each candidate's environment switches set for its turn."""
    times = round_times({v: (envs[v], f) for v, f in fns.items()}, reps, rounds, clock=clock, rotate=True)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini", choices=list(SHAPES))
    ap.add_argument("--shapes", nargs="+", default=None)
    ap.add_argument("--nk", nargs="+", default=[], metavar="NxK",
                    help="extra shapes N x K (e.g. 16x256: one panel, a call's fixed costs)")
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16, 36, 64])
    ap.add_argument("--ab", nargs="+", default=["-"], help="variants of decode_bf16: 'NAME=V,NAME=V' or '-' (none)")
    ap.add_argument("--gemm", action="store_true", help="also prefill_bf16_fma isa 0 (avx2:gemm) at the same M")
    ap.add_argument("--read", action="store_true",
                    help="also read_stream over a buffer of the weight's bytes (the read probe) in the same rounds; "
                         "every candidate's figure then also as GB/s of the weight's bytes")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0.02, help="time a candidate's turn takes a round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mod = _ext.get()
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    best = 0.0
    for _ in range(5):
        t = clock()
        f = mod.bf16_fma_peak(20000, 0)
        best = max(best, f / (clock() - t))
    peak = best / 1e9
    print(f"threads {args.threads} ({'thread CPU time' if args.threads == 1 else 'wall clock'}), load avg {os.getloadavg()[0]:.2f}, fp32-FMA ceiling {peak:.1f} GF/s "
          f"({args.threads} thread(s), Avx2::micro on L1 operands)", flush=True)
    env = parse_variants(args.ab)
    total = {}
    shapes = {name: SHAPES[args.model][name] for name in (args.shapes or list(SHAPES[args.model]))}
    shapes.update({nk: tuple(int(v) for v in nk.split("x")) for nk in args.nk})
    for name, (n, k) in shapes.items():
        p = prepack(torch.randn(n, k) / k ** 0.5)
        bias = torch.randn(n)
        for m in args.m:
            x = torch.randn(m, k)
            fns = {f"panel[{v}]": (lambda: mod.decode_bf16(x, p.data, n, bias, 0)) for v in args.ab}
            envs = {f"panel[{v}]": env[v] for v in args.ab}
            if args.gemm:
                fns["gemm"] = lambda: mod.prefill_bf16_fma(x, p.data, n, bias, False, False, 0)
                envs["gemm"] = {}
            wbytes = p.data.numel() * p.data.element_size()
            if args.read:  # the read probe on the weight's bytes (session 34 helper B)
                buf = torch.ones((wbytes + 127) // 128 * 32, dtype=torch.int32)
                fns["read"] = lambda buf=buf: mod.read_stream(buf, 1)
                envs["read"] = {}
            flops = 2 * m * n * k
            reps = max(1, int(args.seconds * peak * 1e9 / flops))
            med = alternating(fns, envs, reps, args.rounds, clock)
            base = med[next(iter(fns))]
            for v in fns:
                total.setdefault((v, m), 0.0)
                total[(v, m)] += med[v]
            gbs = {v: f" {wbytes / med[v] / 1e9:5.1f} GB/s" if args.read else "" for v in fns}
            print(f"{args.model} {name:12s} N={n:5d} K={k:5d} M={m:3d}: " + "; ".join(
                f"{v} {med[v] * 1e6:8.1f} us {flops / med[v] / 1e9:5.1f} GF/s ({flops / med[v] / 1e9 / peak * 100:3.0f}%)"
                f"{gbs[v]} x{base / med[v]:.2f}" for v in fns), flush=True)
    print("sum over the shapes (us a call of each):")
    for m in args.m:
        print(f"  M={m:3d}: " + "; ".join(f"{v} {total[(v, m)] * 1e6:8.1f}" for v in fns if (v, m) in total))


if __name__ == "__main__":
    main()
