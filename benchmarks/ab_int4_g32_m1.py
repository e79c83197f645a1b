# Session 22 helper D (docs/kernels-log.md): python benchmarks/ab_int4_g32_m1.py [threads]
# int4 g32 M = 1 linears of the 7B width (Q4_0's group), cold (2 copies alternating), 2 threads:
# tile_q4v (CODESHELL_Q4_M1_G32=off) against the 16-row tile with the scale prefetch (PFS=1, default) / without (PFS=0).
import os, time, statistics, torch
from codeshell.kernels import _ext, quantize_int4, ops
import sys; torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
mod = _ext.get()
VNNI = ops.ISA_LEVELS.index("avx512_vnni")
g = torch.Generator().manual_seed(0)
shapes = {"c_fc 16384x4096": (16384, 4096), "mlp.c_proj 4096x16384": (4096, 16384), "c_attn 4608x4096": (4608, 4096)}
ws = {k: [quantize_int4(torch.randn(n, kk, generator=g) * 0.05, group_size=32, symmetric=True) for _ in range(3)] for k, (n, kk) in shapes.items()}
variants = [("off", {"CODESHELL_Q4_M1_G32": "off"}), ("tile pfs1", {}), ("tile pfs0", {"CODESHELL_Q4_M1_PFS": "0"})]
res = {}
for r in range(12):
    for name, env in (variants[r % 3:] + variants[:r % 3]):
        for v in ("CODESHELL_Q4_M1_G32", "CODESHELL_Q4_M1_PFS"): os.environ.pop(v, None)
        os.environ.update(env)
        for k, (n, kk) in shapes.items():
            x = torch.randn(1, kk)
            ts = []
            for pw in ws[k]:
                t0 = time.perf_counter(); mod.decode_int4_q8(x, pw.data, pw.scales, pw.offsets, 32, None, VNNI); ts.append(time.perf_counter() - t0)
            res.setdefault((k, name), []).append(statistics.mean(ts))
for k, (n, kk) in shapes.items():
    base = res[(k, "off")]
    line = []
    for name, _ in variants:
        v = res[(k, name)]
        gbs = n * kk * 0.625 / statistics.median(v) / 1e9
        line.append(f"{name} {statistics.median(v) * 1e3:.3f} ms ({gbs:.1f} GB/s, paired {statistics.median(b / x for b, x in zip(base, v)):.3f}x)")
    print(k + ": " + "; ".join(line))
