"""int8 / int4 decode linears alone at the small shape (head 70144x1024, c_fc, mlp.c_proj, c_attn), M = 1 (the
default path) and M rows (env M, default 8) under variants (ENV=V[,ENV=V] or '-'), weights cycled through copies
(>= 96 MiB: read from L3 / DRAM as in the step), TH threads (default 1: thread CPU time, steadier on the shared
host; 2: wall time), FMT int8 (default) or int4 (group 128, asymmetric), SHAPES a comma list. Variants alternate
in each round; medians, and each M's time against M = 1's.

    flock /work/notes/bench.lock python benchmarks/bench_q8_rows_small.py - CODESHELL_Q8_AMX_MIN_M=2

Not a test: prints figures (session 38 helper B, docs/kernels-log.md)."""
from __future__ import annotations
import os, sys, time, statistics, torch
from codeshell.kernels import _ext, ops, quantize_int4
mod = _ext.get(); isa = ops.isa_level()
TH = int(os.environ.get("TH", "1")); torch.set_num_threads(TH)
FMT = os.environ.get("FMT", "int8")
clock = time.thread_time if TH == 1 else time.perf_counter
shapes = {"head": (70144, 1024), "c_fc": (4096, 1024), "mlp.c_proj": (1024, 4096), "c_attn": (1536, 1024)}
if os.environ.get("SHAPES"): shapes = {k: shapes[k] for k in os.environ["SHAPES"].split(",")}
variants = sys.argv[1:] or ["-"]
M8 = int(os.environ.get("M", "8"))
def setv(v):
    for k in list(os.environ):
        if k.startswith("CODESHELL_Q8") or k.startswith("CODESHELL_AMX"): del os.environ[k]
    if v != "-":
        for kv in v.split(","):
            k, val = kv.split("="); os.environ[k] = val
for name, (n, k) in shapes.items():
    nbytes = n * k if FMT == "int8" else n * k // 2
    copies = max(2, (96 << 20) // nbytes)
    if FMT == "int8":
        q = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]; s = torch.rand(n) * 1e-2
        call = lambda x, i: mod.decode_int8_q8(x, q[i], s, None, isa)
    else:
        pws = [quantize_int4(torch.randn(n, k) * 0.05, group_size=128, symmetric=False) for _ in range(copies)]
        call = lambda x, i: mod.decode_int4_q8(x, pws[i].data, pws[i].scales, pws[i].offsets, 128, None, isa)
    res = {}
    cases = [(1, "-")] + [(M8, v) for v in variants]
    for r in range(5):
        for m, v in cases:
            x = torch.randn(m, k)
            setv(v)
            reps = copies
            t = clock()
            for i in range(reps): call(x, i)
            res.setdefault((m, v), []).append((clock() - t) / reps)
        setv("-")
    b1 = statistics.median(res[(1, "-")])
    print(f"{name:11s} " + "  ".join(f"M={m} {v}: {statistics.median(t)*1e6:7.1f}us {nbytes/statistics.median(t)/1e9:5.1f}GB/s ({statistics.median(t)/b1:.2f}x)" for (m, v), t in res.items()), flush=True)
