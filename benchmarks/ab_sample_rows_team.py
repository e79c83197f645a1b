# Session 22 helper D (docs/kernels-log.md): python benchmarks/ab_sample_rows_team.py team  (run under OMP_WAIT_POLICY=passive for the server's setting)
# sample_temperature_rows at B = 4 / 16 rows of a 70,144-logit bf16 vocabulary, the team (default)
# against CODESHELL_SAMPLE_ROWS_TEAM=off (OpenMP), alternating, 2 threads; each call preceded by a
# 4096 x 4096 bf16 decode linear: with the argument `team` the native one inside run_in_team (the
# team's helper then spins, as after a decode step), without it torch's linear (an OpenMP region).
import os, time, statistics, torch
from codeshell.kernels import _ext
torch.set_num_threads(2)
mod = _ext.get()
V = 70144
g = torch.Generator().manual_seed(0)
res = {}
w = torch.randn(4096, 4096).bfloat16()
x = torch.randn(1, 4096).bfloat16()
import sys
PW = len(sys.argv) > 1
pw = mod.pack_bf16(w)
for B in (4, 16):
    rows = (torch.randn(B, V, generator=g) * 3).bfloat16()
    t = torch.full((B,), 0.8, dtype=torch.float64)
    for r in range(60):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            if mode == "off": os.environ["CODESHELL_SAMPLE_ROWS_TEAM"] = "off"
            else: os.environ.pop("CODESHELL_SAMPLE_ROWS_TEAM", None)
            u = torch.rand(B, generator=g, dtype=torch.float64)
            mod.run_in_team(lambda: mod.decode_bf16(x, pw, 4096, None, 2)) if PW else torch.nn.functional.linear(x, w)
            t0 = time.perf_counter(); mod.sample_temperature_rows(rows, t, u); t1 = time.perf_counter()
            res.setdefault((B, mode), []).append((t1 - t0) * 1e6)
for k, v in sorted(res.items()):
    print(k, f"median {statistics.median(v[5:]):.0f} us, p90 {sorted(v[5:])[int(0.9 * len(v[5:]))]:.0f} us")
