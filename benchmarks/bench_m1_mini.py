"""codeshell-mini's linears at M = 1, one native call each, warm: us a call (median over rounds) per
variant (environment settings read per call, alternating in rounds), the call's fixed cost included
(pybind, the output tensor, x's rounding: the 16-row shapes t16 / t16k show it).

Session 37, helper A: the bf16 model's linears too (--kinds bf16: ops.plan's M = 1 path for bf16 x;
CODESHELL_AMX_BF16_M1=0 the AMX M = 1 before session 37) and CODESHELL_AMX_Q8_M1=0 (int8 / int4 M = 1 on
AMX CPUs before session 37).

Session 28, helper C: the int4 / int8 M = 1 tiles for rows of 1-16 groups / blocks (q4_m1_e.h,
q8_m1_e.h) against the former tiles. With 1 thread (the default) the time is the thread's CPU time
(time.thread_time_ns: steadier on a shared host); with more, wall time.

    python benchmarks/bench_m1_mini.py                                   # 1 thread, default only
    python benchmarks/bench_m1_mini.py --ab - CODESHELL_Q4_M1E=0 CODESHELL_Q8_M1E=0
    python benchmarks/bench_m1_mini.py --threads 2 --rounds 9 --ab - CODESHELL_Q4_M1E=0,CODESHELL_Q8_M1E=0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# name: (N, K, kind); the mini's linears (width 256, inner 1024, 8 heads of 32, 2 KV groups; int4 groups
# of 128, the head int8) and two 16-row shapes for the fixed cost a call
SHAPES = {"t16 int4": (16, 256, "int4"), "t16k int4": (16, 1024, "int4"),
          "c_attn int4": (384, 256, "int4"), "attn.c_proj int4": (256, 256, "int4"),
          "c_fc int4": (1024, 256, "int4"), "mlp.c_proj int4": (256, 1024, "int4"),
          "c_attn int8": (384, 256, "int8"), "c_fc int8": (1024, 256, "int8"), "mlp.c_proj int8": (256, 1024, "int8"),
          "head int8": (16384, 256, "int8"),
          # session 37 helper A: the bf16 model's (amx:bf16 on AMX CPUs, else the vdpbf16ps / fp32 panels)
          "c_attn bf16": (384, 256, "bf16"), "attn.c_proj bf16": (256, 256, "bf16"), "c_fc bf16": (1024, 256, "bf16"),
          "mlp.c_proj bf16": (256, 1024, "bf16"), "head bf16": (16384, 256, "bf16")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ab", nargs="+", default=["-"], help="variants: 'NAME=V,NAME=V' or '-' (none)")
    ap.add_argument("--kinds", nargs="+", default=["int4", "int8", "bf16"], choices=["int4", "int8", "bf16"])
    a = ap.parse_args()
    shapes = {k: v for k, v in SHAPES.items() if v[2] in a.kinds}
    import torch

    from codeshell.kernels import _ext, isa_level, ops, prepack, quantize_int4, quantize_int8

    from bench_kernels import set_env

    mod, isa = _ext.get(), isa_level()
    torch.set_num_threads(a.threads)
    clock = time.thread_time_ns if a.threads == 1 else time.perf_counter_ns
    g = torch.Generator().manual_seed(0)
    calls = {}
    for name, (n, k, kind) in shapes.items():
        w = torch.randn(n, k, generator=g) * 0.05
        x = torch.randn(1, k, generator=g)
        if kind == "bf16":  # ops.plan's path for bf16 x at M = 1, called as ops._compute calls it
            pw, xb = prepack(w), x.to(torch.bfloat16)
            path = ops.plan(pw, 1, torch.bfloat16)
            if path == "amx:bf16":
                calls[name] = (lambda xb=xb, pw=pw, n=n: mod.prefill_bf16_amx(xb, pw.data, n, None))
            else:
                calls[name] = (lambda xb=xb, pw=pw, path=path: ops._compute(path, mod, xb, pw, None))
        elif kind == "int8":
            pw = quantize_int8(w)
            calls[name] = (lambda x=x, pw=pw: mod.decode_int8_q8(x, pw.data, pw.scales, None, isa))
        else:
            pw = quantize_int4(w, 128, symmetric=True)
            calls[name] = (lambda x=x, pw=pw: mod.decode_int4_q8(x, pw.data, pw.scales, pw.offsets, 128, None, isa))
    base = dict(os.environ)
    res = {(v, name): [] for v in a.ab for name in shapes}
    for r in range(a.rounds):
        for v in a.ab[r % len(a.ab):] + a.ab[:r % len(a.ab)]:
            set_env(v, base)
            for name, f in calls.items():
                reps = 200 if shapes[name][0] > 4096 else 2000
                for _ in range(20):
                    f()
                t = clock()
                for _ in range(reps):
                    f()
                res[(v, name)].append((clock() - t) / reps / 1e3)
            set_env("-", base)
    print(f"{a.threads} thread(s), {'thread CPU' if a.threads == 1 else 'wall'} us a call, medians of {a.rounds} rounds")
    for name, (n, k, _) in shapes.items():
        first = statistics.median(res[(a.ab[0], name)])
        cells = []
        for v in a.ab:
            t = statistics.median(res[(v, name)])
            cells.append(f"{v}: {t:.2f}" + ("" if v == a.ab[0] else f" ({t / first:.2f}x the first)"))
        print(f"  {name:18s} {n}x{k}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
