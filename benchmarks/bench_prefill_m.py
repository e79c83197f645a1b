"""The bf16 prefill candidates of an AVX-512 CPU without AVX512-BF16 at the Ms a prefill meets
(session 25 helper A): `avx512_vnni:gemm` (prefill_bf16_fma), `sgemm:fp32` and
`avx512_vnni:panel64`, on bf16 x as a bf16 model calls them, per weight shape and M, called by
name (ops._compute, timed up to the bf16 result as measure._time_call times them), rounds alternating
the paths, medians. Why: serving's time to first token at 1 client is one prefill forward of
~90 tokens on a 1.7B model of the 7B width (K = 4096), where the GEMM was only measured at
M = 512; the at-load choice (ops._choose) is one path per weight for every M above 64, measured
at measure.PREFILL_MEASURE_ROWS, so this prints what that choice would weigh and what it leaves out.
Also prints, per shape, the path measure._look's measurement picks in this process.

    flock /work/notes/bench.lock python benchmarks/bench_prefill_m.py --model 7b --m 65 90 128 512
    flock /work/notes/bench.lock python benchmarks/bench_prefill_m.py --model small --m 90 128 512

Session 41 (helper C): `--kind int4 --group 32` (or int8) times the quantized weight's prompt candidates
(`avx512_vnni:q8`, `onednn:bf16`, `sgemm:fp32`); a bf16-only path named among them (`avx512_bf16:gemm`)
runs on the same weight dequantised and packed as bf16, the bf16 model's figure for the same rows
(serving's q4_0 prefill of ~90 tokens against bf16's):

    flock /work/notes/bench.lock python benchmarks/bench_prefill_m.py --kind int4 --group 32 --m 6 90 \
        --paths avx512_vnni:q8 avx512_bf16:gemm --env CODESHELL_VNNI_Q4_NIB=0
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import MODEL_SHAPES  # noqa: E402

from codeshell.bench import alternating_medians  # noqa: E402
from codeshell.kernels import _ext, ops, prepack, quantize_int4, quantize_int8  # noqa: E402
from codeshell.kernels.packing import dequantize  # noqa: E402

BF16_ONLY = ("avx512_bf16:gemm", "avx512_bf16:panel64", "avx512_bf16:panel")  # paths of a bf16 weight only

MINI = {"c_attn": (384, 256, True), "attn.c_proj": (256, 256, True), "c_fc": (1024, 256, True),
        "mlp.c_proj": (256, 1024, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="7b", choices=list(MODEL_SHAPES) + ["mini"])
    ap.add_argument("--shapes", nargs="+", default=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])
    ap.add_argument("--m", nargs="+", type=int, default=[65, 90, 128, 512])
    ap.add_argument("--paths", nargs="+", default=["avx512_vnni:gemm", "sgemm:fp32", "avx512_vnni:panel64"])
    ap.add_argument("--kind", choices=["bf16", "int8", "int4"], default="bf16",
                    help="the weight's format (int4: symmetric, --group); bf16-only paths run on its bf16 copy")
    ap.add_argument("--group", type=int, default=32, help="int4 group size (GGUF q4_0: 32)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 gives a kernel's per-core rate, which a busy "
                         "second core disturbs far less than a 2-thread call (session 26)")
    ap.add_argument("--env", nargs="*", default=[], metavar="NAME=V",
                    help="extra variants of the first path: each NAME=V[,NAME=V] set around its turns, cleared for the other candidates (A/B)")
    args = ap.parse_args()
    mod = _ext.get()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, isa level {ops.ISA_LEVELS[ops.isa_level()]}, "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    shapes = MINI if args.model == "mini" else MODEL_SHAPES[args.model]
    for name in args.shapes:
        n, k, _ = shapes[name]
        w = torch.randn(n, k) / k ** 0.5
        if args.kind == "int4":
            p = quantize_int4(w, args.group)
        elif args.kind == "int8":
            p = quantize_int8(w)
        else:
            p = prepack(w.bfloat16())
        pb = p if args.kind == "bf16" else prepack(dequantize(p).bfloat16())
        bias = torch.randn(n) * 0.1
        for m in args.m:
            x = torch.randn(m, k).bfloat16()

            def call(path):
                pw = pb if path in BF16_ONLY else p
                return lambda: ops._compute(path, mod, x, pw, bias).to(torch.bfloat16)
            paths = {c: call(c) for c in args.paths}
            env = {}  # the --env variants' switches, set around their turns (alternating_medians)
            for e in args.env:
                paths[f"{args.paths[0]} {e}"] = call(args.paths[0])
                env[f"{args.paths[0]} {e}"] = dict(kv.split("=", 1) for kv in e.split(",") if kv)
            reps = max(1, int(1.5e8 / (2 * m * n * k + 4e6)))
            med = alternating_medians(paths, reps, args.rounds, rotate=True, env=env)
            base = med[next(iter(paths))]
            print(f"{args.model} {args.kind} {name:12s} N={n:5d} K={k:5d} M={m:4d}: " + "; ".join(
                f"{v} {med[v] * 1e3:8.3f} ms {2 * m * n * k / med[v] / 1e12:.3f} TF/s x{med[v] / base:.2f}"
                for v in paths), flush=True)


if __name__ == "__main__":
    main()
