# Session 22 helper D (docs/kernels-log.md): python benchmarks/ab_gguf_scales_thp.py /work/ckpt/serve/model-1.7b-q4_0.gguf 12
# Same-process A/B: a q4_0 GGUF's int4 scales on 4 KiB pages (as loaded) against on huge pages,
# crossed with CODESHELL_Q4_M1_G32 off / on. Two LLMs, greedy generate, rounds alternate.
import os, sys, time, statistics, dataclasses
import torch
from codeshell import LLM
from codeshell.engine import SamplingParams
from codeshell.kernels import hugepages
from codeshell.quant.linear import Int4Linear

path = sys.argv[1]; rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4; N = 24
def load(huge):
    llm = LLM(path, threads=2, max_batch=1)
    n = 0
    if huge:
        for m in llm.model.modules() if hasattr(llm, "model") else []:
            if isinstance(m, Int4Linear) and getattr(m, "_kernel", None) is not None and m._kernel.scales is not None:
                m._kernel = dataclasses.replace(m._kernel, scales=hugepages.resident(m._kernel.scales))
                n += 1
    print("huge scales on", n, "linears", flush=True)
    llm.generate("warm up", SamplingParams(temperature=0, max_tokens=4))
    return llm
A = load(False); B = load(True)
def tok_ms(llm):
    sp = SamplingParams(temperature=0, max_tokens=N + 1, ignore_eos=True)
    sp1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter(); llm.generate("def f(x):", sp); t1 = time.perf_counter()
    llm.generate("def f(x):", sp1); t2 = time.perf_counter()
    return ((t1 - t0) - (t2 - t1)) / N * 1e3
res = {}
vs = [("4k", A, "off"), ("4k", A, "on"), ("huge", B, "off"), ("huge", B, "on")]
for r in range(rounds):
    order = vs[r % 4:] + vs[:r % 4]
    line = []
    for name, llm, g in order:
        os.environ["CODESHELL_Q4_M1_G32"] = g
        ms = tok_ms(llm)
        res.setdefault((name, g), []).append(ms)
        line.append(f"{name}/g32={g} {ms:.2f}")
    print(f"round {r}: " + ", ".join(line), flush=True)
base = res[("4k", "off")]
for k, v in res.items():
    print(k, f"median {statistics.median(v):.2f} ms", "paired vs 4k/off", f"{statistics.median(b / x for b, x in zip(base, v)):.3f}x")
