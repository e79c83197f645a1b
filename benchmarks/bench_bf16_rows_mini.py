"""bf16 AMX decode linears alone (prefill_bf16_amx) at M = 1 and 8 on codeshell-mini's shapes, weights cycled
through 48 MiB of copies (cold in L2, as in the step), TH threads (default 2, OpenMP), wall time a call, variants
(ENV=V[,ENV=V] or '-') alternating each round; medians.

    flock /work/notes/bench.lock python benchmarks/bench_bf16_rows_mini.py - CODESHELL_AMX_BF16_ROWS=0

Not a test: prints figures (session 38 helper B, docs/kernels-log.md)."""
import os, sys, time, statistics, torch
from codeshell.kernels import _ext, ops, prepack
mod = _ext.get()
torch.set_num_threads(int(os.environ.get("TH", "2")))
shapes = {"head": (16384, 256), "c_fc": (1024, 256), "mlp.c_proj": (256, 1024), "c_attn": (384, 256), "attn.c_proj": (256, 256)}
variants = sys.argv[1:] or ["-"]
def setv(v):
    for k in list(os.environ):
        if k.startswith("CODESHELL_AMX_BF16"): del os.environ[k]
    if v != "-":
        for kv in v.split(","):
            k, val = kv.split("="); os.environ[k] = val
for name, (n, k) in shapes.items():
    copies = max(2, (48 << 20) // (n * k * 2))
    ws = [prepack(torch.randn(n, k) * 0.05) for _ in range(copies)]
    res = {}
    for m in (1, 8):
        x = torch.randn(m, k).to(torch.bfloat16)
        reps = max(copies, int(3e7 / (n * k)))
        for r in range(7):
            for v in variants:
                setv(v)
                t = time.perf_counter()
                for i in range(reps):
                    mod.prefill_bf16_amx(x, ws[i % copies].data, n, None)
                res.setdefault((m, v), []).append((time.perf_counter() - t) / reps)
        setv("-")
    print(f"{name:12s} " + "  ".join(f"M={m} {v}: {statistics.median(t)*1e6:6.1f}us {n*k*2/statistics.median(t)/1e9:5.1f}GB/s" for (m, v), t in res.items()), flush=True)
