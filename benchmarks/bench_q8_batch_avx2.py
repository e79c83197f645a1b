"""Time the int8 / int4 `q8` decode linears (decode_int8_q8 / decode_int4_q8, the kernels the native
decode step calls per linear) at batched-decode M on this CPU's isa level, per shape of the small
random shape (bench_quant --shape small: 1024 wide, FFN 4096, vocab 70144) or codeshell-mini (256
wide), to see where batch 8 loses against batch 1: per-call cost, x's rounding, the kernel's ALU.

    flock /work/notes/bench.lock python benchmarks/bench_q8_batch_avx2.py --set small --format int8
    flock /work/notes/bench.lock python benchmarks/bench_q8_batch_avx2.py --set mini --format int4 --m 1 8 \
        --ab - CODESHELL_Q8_AVX2_ROWS=0

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
import time

import torch

from codeshell.kernels import _ext, ops, quantize_int4

SETS = {
    "small": {"c_attn": (1536, 1024), "attn.c_proj": (1024, 1024), "c_fc": (4096, 1024),
              "mlp.c_proj": (1024, 4096), "head": (70144, 1024)},
    "mini": {"c_attn": (384, 256), "attn.c_proj": (256, 256), "c_fc": (1024, 256), "mlp.c_proj": (256, 1024),
             "head": (16384, 256)},
}


def fastest_rounds(f, variants: dict[str, dict[str, str]], reps: int, rounds: int) -> dict[str, float]:
    """Seconds a call of f under each variant's environment: the fastest of `rounds` rounds of `reps`
    calls, the variants taking turns within each round (after one warm-up round)."""
    keys = {k for e in variants.values() for k in e}
    best = dict.fromkeys(variants, float("inf"))
    try:
        for r in range(rounds + 1):
            for v, env in variants.items():
                for k in keys:
                    os.environ.pop(k, None)
                os.environ.update(env)
                t0 = time.perf_counter()
                for _ in range(reps):
                    f()
                if r:
                    best[v] = min(best[v], (time.perf_counter() - t0) / reps)
    finally:
        for k in keys:
            os.environ.pop(k, None)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=list(SETS), default="small")
    ap.add_argument("--format", choices=["int8", "int4"], default="int8")
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ab", nargs="+", default=["-"])
    ap.add_argument("--shapes", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--budget", type=float, default=0.04, help="seconds a candidate's round aims at")
    a = ap.parse_args()
    shapes = {k: v for k, v in SETS[a.set].items() if a.shapes is None or k in a.shapes}
    if a.threads:
        torch.set_num_threads(a.threads)
    # the chunks on the process's shared Team (parallel.h chunks_in_team), as inside the decode step: a
    # 2-thread at::parallel_for region waits for its second thread to be scheduled (~8 ms a call on a
    # host with other runnable processes), which is all such a benchmark would measure there
    os.environ.setdefault("CODESHELL_CHUNKS_TEAM", "1")
    mod = _ext.get()
    isa = ops.isa_level()
    print(f"threads {torch.get_num_threads()}, isa {ops.ISA_LEVELS[isa]}, load avg {os.getloadavg()[0]:.2f}, "
          f"format {a.format}, set {a.set}", flush=True)
    variants = {v: ({} if v == "-" else dict(kv.split("=", 1) for kv in v.split(","))) for v in a.ab}
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
            t0 = time.perf_counter()
            f()
            f()
            one = max((time.perf_counter() - t0) / 2, 1e-6)
            reps = max(3, int(a.budget / one))
            res = fastest_rounds(f, variants, reps, a.rounds)
            if m == a.m[0]:
                base = res
            print(f"{fmt} {name:11s} N={n:5d} K={k:4d} M={m:2d}: " + "; ".join(
                f"[{v}] {t * 1e6:8.1f} us {t * 1e6 / m:7.1f}/row {wbytes / t / 1e9:5.1f} GB/s "
                f"{2 * m * n * k / t / 1e9:5.0f} GOP/s x{t / base[v]:.2f}"
                for v, t in res.items()), flush=True)


if __name__ == "__main__":
    main()
