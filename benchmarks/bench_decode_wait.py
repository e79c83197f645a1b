"""Batch-1 decode right after a prompt, per step, under process-wide settings read at load
(OMP_WAIT_POLICY, GOMP_SPINCOUNT, ...): what `bench_quant.py`'s decode figure sees.

Not a test: prints figures. bench_quant times decode as (t(generate 17 tokens) - t(generate 1
token)) / 16 on a 16-token prompt, so the steps right after the prompt's prefill count: libgomp's
worker, left spinning by the prefill's OpenMP regions (its default spin: ~300k pauses), competes
with the decode team's master and helper on a 2-core machine. Variants run in separate processes
(libgomp reads its environment once, at load), alternating, the order rotating each round; each
process loads the model, warms up, then per repeat times generate(1) and generate(TOKENS + 1)
with each engine step's wall time recorded. Printed per variant: bench_quant's figure (best of 2
differences, as there), the median of those over repeats, and the median step time by position
after the prompt (steps 1-4, 5-8, 9-16, 17+), medians over rounds and repeats.

    python benchmarks/bench_decode_wait.py --rounds 4 --ab - OMP_WAIT_POLICY=passive
    python benchmarks/bench_decode_wait.py --model /work/ckpt/qsmall/int8 --tokens 16 --ab - OMP_WAIT_POLICY=passive
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SPANS = ((1, 4), (5, 8), (9, 16), (17, 10**9))


def worker(model: str, tokens: int, threads: int, repeats: int) -> dict:
    import torch

    from codeshell import LLM, SamplingParams
    if model == "codeshell-mini":
        from codeshell.mini import MODEL_DIR
        model = str(MODEL_DIR)
    llm = LLM(model, dtype="bfloat16", threads=threads, max_batch=8, max_model_len=16 + tokens + 8)
    g = torch.Generator().manual_seed(1)
    V = min(llm.config.vocab_size, 70000)
    eng = llm.engine
    step, stamps = eng.step, []

    def timed_step(*a, **k):
        t = time.perf_counter()
        r = step(*a, **k)
        stamps.append(time.perf_counter() - t)
        return r

    eng.step = timed_step

    def gen(p, n):
        t = time.perf_counter()
        llm.generate([p], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t

    p = {"prompt_token_ids": torch.randint(0, V, (16,), generator=g).tolist()}
    gen(p, 2)
    quant, steps, prefill = [], [], []
    for _ in range(repeats):
        p = {"prompt_token_ids": torch.randint(0, V, (16,), generator=g).tolist()}
        t1 = min(gen(p, 1) for _ in range(2))
        ts = []
        for _ in range(2):
            stamps.clear()
            ts.append(gen(p, tokens + 1))
            steps.append(stamps[1:])
            prefill.append(stamps[0])
        quant.append(tokens / (min(ts) - t1))
    return {"quant_tps": quant, "steps": steps, "prefill": prefill}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="codeshell-mini")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--ab", nargs="+", default=["-", "OMP_WAIT_POLICY=passive"],
                    help="variants: 'NAME=V,NAME=V' or '-' (the environment as it is)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.model, a.tokens, a.threads, a.repeats)))
        return
    print(f"{a.model}: {a.threads} threads, {a.tokens} tokens, {a.rounds} rounds x {a.repeats}; "
          f"load average {os.getloadavg()}", flush=True)
    res: dict[str, list[dict]] = {v: [] for v in a.ab}
    for r in range(a.rounds):
        for v in a.ab[r % len(a.ab):] + a.ab[:r % len(a.ab)]:
            env = dict(os.environ)
            if v != "-":
                for kv in v.split(","):
                    k, _, val = kv.partition("=")
                    env[k] = val
            out = subprocess.run([sys.executable, __file__, "--worker", "--model", a.model, "--tokens", str(a.tokens),
                                  "--threads", str(a.threads), "--repeats", str(a.repeats)],
                                 env=env, capture_output=True, text=True, check=True)
            res[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"round {r}: " + "; ".join(f"[{v}] {statistics.median(res[v][-1]['quant_tps']):.1f} tok/s"
                                          for v in a.ab), flush=True)
    base = None
    for v, rs in res.items():
        q = [x for rr in rs for x in rr["quant_tps"]]
        allsteps = [s for rr in rs for s in rr["steps"]]
        spans = []
        for lo, hi in SPANS:
            xs = [t for s in allsteps for i, t in enumerate(s, 1) if lo <= i <= hi]
            if xs:
                spans.append(f"steps {lo}-{min(hi, a.tokens)} {statistics.median(xs) * 1e6:.0f} us")
        pf = statistics.median(x for rr in rs for x in rr["prefill"]) * 1e3
        med = statistics.median(q)
        base = base or med
        print(f"== {v}: bench_quant-style decode {med:.1f} tok/s (median of {len(q)}; "
              f"best {max(q):.1f}; {med / base:.3f}x the first), {'; '.join(spans)}; prefill+1st token {pf:.2f} ms")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
