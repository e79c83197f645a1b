"""Prefill of int8 / int4 weights at the AVX2 level, per weight shape: the integer GEMM (`avx2:gemm`,
csrc/q8_gemm_avx2.h) against decode's streaming kernel at full M (`avx2:q8`) and dequant + sgemm
(`sgemm:fp32`), same process, rounds alternating, best and median of each. GOP/s = 2 M N K / time.

    flock /work/notes/bench.lock python benchmarks/bench_q8_gemm_avx2.py --formats int8 int4 --m 512

Shapes (N, K) default to the small model's: (1536,1024) c_attn, (1024,1024) attn.c_proj, (4096,1024)
c_fc, (1024,4096) mlp.c_proj, (70144,1024) the head. The figures are whole calls (x's rounding and,
for the GEMM, the weight's unpacking included), as ops._choose measures them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from codeshell.kernels import _ext, ops, quantize_int4, quantize_int8

SHAPES = [(1536, 1024), (1024, 1024), (4096, 1024), (1024, 4096), (70144, 1024)]


def call(c: str, mod, x: torch.Tensor, p) -> float:
    """Seconds of one call of path c (PATH@VAR=VALUE: with that switch set), to x's dtype as linear returns it."""
    path, _, env = c.partition("@")
    var, _, val = env.partition("=")
    old = os.environ.get(var) if var else None
    if var:
        os.environ[var] = val
    try:
        t = time.perf_counter()
        ops._compute(path, mod, x, p, None).to(x.dtype)
        return time.perf_counter() - t
    finally:
        if var:
            if old is None:
                del os.environ[var]
            else:
                os.environ[var] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["int8", "int4"])
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--paths", nargs="+", default=["avx2:gemm", "avx2:q8", "sgemm:fp32"],
                    help="ops paths; PATH@VAR=VALUE runs PATH with that environment switch (e.g. "
                         "avx2:gemm@CODESHELL_Q8_GEMM_U4=0: int4 by the int16 kernel)")
    ap.add_argument("--shapes", nargs="+", default=None, help="NxK ...")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    ops.set_num_threads(a.threads)
    mod = _ext.get()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes] if a.shapes else SHAPES
    print(f"threads {torch.get_num_threads()}  M {a.m}  NC env {os.environ.get('CODESHELL_Q8_GEMM_NC', '-')}")
    for fmt in a.formats:
        for n, k in shapes:
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05
            p = quantize_int8(w) if fmt == "int8" else quantize_int4(w, 128)
            x = torch.randn(a.m, k).bfloat16()
            times = {c: [] for c in a.paths}
            for c in a.paths:
                call(c, mod, x, p)
            for r in range(a.rounds):
                for c in a.paths[r % len(a.paths):] + a.paths[:r % len(a.paths)]:
                    times[c].append(call(c, mod, x, p))
            ops_ = 2 * a.m * n * k
            row = "  ".join(f"{c} {min(t) * 1e3:7.2f} ms {ops_ / min(t) / 1e9:6.1f} GOP/s (med {ops_ / statistics.median(t) / 1e9:6.1f})"
                            for c, t in times.items())
            print(f"{fmt} {n:>6}x{k:<5} {row}", flush=True)


if __name__ == "__main__":
    main()
