"""Where a batched decode step goes on a loaded checkpoint: the engine's ms per step at batch B
(LLM.generate of B 16-token prompts, TOKENS + 1 greedy tokens less a 1-token run) and the native
decode step's phase profile (`DecodeStep.profile`) per call, alternated over variants (environment
switches read per call) in the same rounds; medians over the rounds.

    flock /work/notes/bench.lock python benchmarks/bench_batch_phases.py /work/ckpt/qmini/int8 --batch 8
    flock /work/notes/bench.lock python benchmarks/bench_batch_phases.py /work/ckpt/qsmall/int8 --ab - CODESHELL_Q8_AVX2_ROWS=0

Not a test: prints figures (session 30 helper C: why codeshell-mini int8 at batch 8 ran slower than
batch 1 on the AVX2-only AMD Zen 3).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ab", nargs="+", default=["-"], help="variants: 'NAME=V,NAME=V' or '-' (none)")
    a = ap.parse_args()
    import torch

    from codeshell import LLM, SamplingParams
    from codeshell.kernels import step as kstep

    llm = LLM(a.folder, dtype="bfloat16", threads=a.threads, max_batch=a.batch, max_model_len=a.tokens + 64)
    lm = llm.model
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(0, min(lm.cfg.vocab_size, 70000), (16,), generator=g).tolist()}
               for _ in range(a.batch)]
    keys = {kv.split("=", 1)[0] for v in a.ab if v != "-" for kv in v.split(",")}

    def set_env(v: str) -> None:
        for k in keys:
            os.environ.pop(k, None)
        if v != "-":
            os.environ.update(dict(kv.split("=", 1) for kv in v.split(",")))

    def gen(n: int) -> float:
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t

    gen(4)
    dec = kstep._DECODERS.get(lm)
    if dec is None or dec.step is None:
        sys.exit("the native decode step does not run this model")
    res: dict[str, list[tuple[float, dict[str, float]]]] = {v: [] for v in a.ab}
    for r in range(a.rounds):
        for v in a.ab[r % len(a.ab):] + a.ab[:r % len(a.ab)]:
            set_env(v)
            gen(2)
            st = kstep._DECODERS[lm].step
            t1 = min(gen(1) for _ in range(2))
            st.profile = True
            tn = gen(a.tokens + 1)
            n, phases = st.profile_times()
            st.profile = False
            res[v].append(((tn - t1) / a.tokens, {k: t / max(n, 1) for k, t in phases}))
            set_env("-")
    for v, rows in res.items():
        step = statistics.median(e for e, _ in rows)
        print(f"[{v}] batch {a.batch}: {step * 1e3:.2f} ms a step, {a.batch / step:.0f} tok/s aggregate", flush=True)
        names = list(rows[0][1])
        print("   per native call: " + ", ".join(
            f"{k} {statistics.median(p.get(k, 0.0) for _, p in rows) * 1e6:.0f} us" for k in names), flush=True)


if __name__ == "__main__":
    main()
