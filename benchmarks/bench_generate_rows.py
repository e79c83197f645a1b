"""LLM.generate's batched greedy decode step with and without several tokens a native call.

What this measures: the time of one decode step of `--batch` plain-greedy sequences through
`LLM.generate` (the difference of a 1-token and an N+1-token generate of the same prompts,
divided by N; each the best of `--repeats`), alternating CODESHELL_DECODE_MULTI_ROWS=1 (several
tokens of every sequence a native call: Engine._decode_many_rows, session 28) and =0 (one token a
step) in one process for `--rounds` rounds, and batch 1 once for the b / 1 ratio. Asserts both
variants produce the same tokens. What it is not: a serving benchmark (streaming steps never take
the multi-token call) or a kernel timing (bench_decode_step.py).

    python benchmarks/bench_generate_rows.py codeshell-mini
    python benchmarks/bench_generate_rows.py /work/ckpt/qmini/int4 --batch 8 --tokens 64
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a checkpoint folder, or codeshell-mini")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    os.environ.setdefault("CODESHELL_NO_PROGRESS", "1")
    import torch

    from codeshell import LLM, SamplingParams
    path = a.model
    if path == "codeshell-mini":
        from codeshell.mini import packaged_model
        path = str(packaged_model())
    llm = LLM(path, dtype="bfloat16", threads=a.threads, max_batch=a.batch, max_model_len=a.tokens + 64)
    g = torch.Generator().manual_seed(1)
    vocab = min(llm.config.vocab_size, 70000)
    prompts = [{"prompt_token_ids": torch.randint(0, vocab, (16,), generator=g).tolist()} for _ in range(a.batch)]

    def best(n, ps):
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t, out = float("inf"), None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = llm.generate(ps, sp)
            t = min(t, time.perf_counter() - t0)
        return t, [o.outputs[0].token_ids for o in out]

    def step_us(ps):
        one, _ = best(1, ps)
        many, toks = best(a.tokens + 1, ps)
        return (many - one) / a.tokens * 1e6, toks

    steps, toks = {"1": [], "0": []}, {}
    for r in range(a.rounds):
        for v in ("1", "0") if r % 2 == 0 else ("0", "1"):
            os.environ["CODESHELL_DECODE_MULTI_ROWS"] = v
            us, toks[v] = step_us(prompts)
            steps[v].append(us)
            print(f"round {r}: MULTI_ROWS={v} step {us:.1f} us", flush=True)
    assert toks["1"] == toks["0"], "the two variants gave different tokens"
    os.environ["CODESHELL_DECODE_MULTI_ROWS"] = "1"
    b1, _ = step_us(prompts[:1])
    print(f"{a.model}, batch {a.batch}, {a.tokens} tokens, {a.threads} threads; batch 1 step {b1:.1f} us")
    for v, name in (("1", "several tokens a call"), ("0", "one token a step")):
        s = min(steps[v])
        print(f"  MULTI_ROWS={v} ({name}): step {s:.1f} us (best of {a.rounds} rounds), "
              f"b{a.batch} / b1 {a.batch * b1 / s:.2f}x")
    print(f"  on / off: {min(steps['0']) / min(steps['1']):.3f}x")


if __name__ == "__main__":
    main()
