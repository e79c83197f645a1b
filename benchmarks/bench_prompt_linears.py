"""A/B of an environment switch of the AVX2 bf16 prompt GEMM (`avx2:gemm`, csrc/gemm_fma.h) per
linear of a model, in one process, in a way another process's load does not inflate (session 34
helper C: the host ran 3-13 other jobs on its 2 cores): each call timed by the calling thread's
CPU time (`time.thread_time`) on ONE thread (a 2-thread call's wall time includes waiting for a
descheduled second thread; measured ~6-8 ms a parallel region at load 3), the settings
alternating call by call, the median of `--rounds` calls each. GFLOP/s = 2 M N K / t; ratio =
the switch's time over the default's (< 1: the switch is faster).

    flock /work/notes/bench.lock python benchmarks/bench_prompt_linears.py --model mini --env CODESHELL_FMA2_EPI=0
    flock /work/notes/bench.lock python benchmarks/bench_prompt_linears.py --model small --env CODESHELL_FMA2_EPI=0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from codeshell.kernels import _ext, ops, prepack  # noqa: E402

SHAPES = {  # (N, K, bias) of each model's linears (bench_quant's small shape; codeshell/mini/model)
    "small": {"c_attn": (1536, 1024), "attn.c_proj": (1024, 1024), "c_fc": (4096, 1024), "mlp.c_proj": (1024, 4096)},
    "mini": {"c_attn": (384, 256), "attn.c_proj": (256, 256), "c_fc": (1024, 256), "mlp.c_proj": (256, 1024)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini", choices=list(SHAPES))
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--env", required=True, help="NAME=VALUE[,NAME=VALUE...] set for the B calls")
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mod = _ext.get()
    pairs = [tuple(kv.split("=", 1)) for kv in args.env.split(",") if kv]
    print(f"threads {args.threads}, load avg {os.getloadavg()[0]:.2f}, B = {args.env}", flush=True)
    for name, (n, k) in SHAPES[args.model].items():
        p = prepack(torch.randn(n, k) / k ** 0.5)
        bias = torch.randn(n)
        x = torch.randn(args.m, k).bfloat16()
        ts = {"A": [], "B": []}
        for r in range(args.rounds + 1):
            for side in ("A", "B") if r % 2 else ("B", "A"):
                old = {a: os.environ.get(a) for a, _ in pairs}
                if side == "B":
                    os.environ.update(dict(pairs))
                t = time.thread_time()
                ops._compute("avx2:gemm", mod, x, p, bias)
                dt = time.thread_time() - t
                for a, v in old.items():
                    if v is None:
                        os.environ.pop(a, None)
                    else:
                        os.environ[a] = v
                if r:  # the first pair warms up
                    ts[side].append(dt)
        a, b = statistics.median(ts["A"]), statistics.median(ts["B"])
        f = 2.0 * args.m * n * k
        print(f"{args.model} {name:12s} N={n:5d} K={k:5d}: default {a * 1e3:7.3f} ms {f / a / 1e9:6.1f} GF/s; "
              f"B {b * 1e3:7.3f} ms {f / b / 1e9:6.1f} GF/s; B / default x{b / a:.3f}", flush=True)


if __name__ == "__main__":
    main()
