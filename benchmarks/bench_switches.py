"""The kernels' switch cache (csrc/switches.h, session 29 helper C) on a batch-1 greedy token.

What this measures: the time of one batch-1 greedy token through `LLM.generate` (an N+1-token
generate less a 1-token one, divided by N; each the best of `--repeats`) with the switch cache on
(default) and off (CODESHELL_ENV_CACHE=0: a getenv per switch read, as before, plus the
fingerprint check), alternating in one process for `--rounds` rounds; medians and the paired ratio.
With `--threads 1` (the default) the time is the thread's CPU time (time.thread_time_ns: all of the
step runs on this thread; steadier on a shared 2-core host), else wall time. `--extra-env N` adds N
unrelated environment variables first (a getenv scans them all; a login shell or CI has ~50-150).
Asserts both variants give the same tokens. What it is not: a kernel timing (bench_m1_mini.py
prints a call's fixed cost with `--ab - CODESHELL_ENV_CACHE=0`).

    python benchmarks/bench_switches.py /work/ckpt/qmini/int4
    python benchmarks/bench_switches.py /work/ckpt/qmini/int8 --extra-env 100 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a checkpoint folder, or codeshell-mini")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--extra-env", type=int, default=0)
    a = ap.parse_args()
    os.environ.setdefault("CODESHELL_NO_PROGRESS", "1")
    for i in range(a.extra_env):
        os.environ[f"BENCH_SWITCHES_PAD_{i}"] = "x" * 16
    import torch

    from codeshell import LLM, SamplingParams
    path = a.model
    if path == "codeshell-mini":
        from codeshell.mini import packaged_model
        path = str(packaged_model())
    llm = LLM(path, dtype="bfloat16", threads=a.threads, max_batch=1, max_model_len=a.tokens + 64)
    g = torch.Generator().manual_seed(1)
    vocab = min(llm.config.vocab_size, 70000)
    prompt = [{"prompt_token_ids": torch.randint(0, vocab, (16,), generator=g).tolist()}]
    clock = time.thread_time_ns if a.threads == 1 else time.perf_counter_ns

    def best(n):
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t, out = float("inf"), None
        for _ in range(a.repeats):
            t0 = clock()
            out = llm.generate(prompt, sp)
            t = min(t, clock() - t0)
        return t, out[0].outputs[0].token_ids

    def token_us():
        one, _ = best(1)
        many, toks = best(a.tokens + 1)
        return (many - one) / a.tokens / 1e3, toks

    names = {"1": "cache on", "0": "CODESHELL_ENV_CACHE=0"}
    us, toks = {"1": [], "0": []}, {}
    token_us()  # warm-up
    for r in range(a.rounds):
        for v in ("1", "0") if r % 2 == 0 else ("0", "1"):
            os.environ["CODESHELL_ENV_CACHE"] = v
            t, toks[v] = token_us()
            us[v].append(t)
        print(f"round {r}: on {us['1'][-1]:.1f} us, off {us['0'][-1]:.1f} us a token", flush=True)
    assert toks["1"] == toks["0"], "the two variants gave different tokens"
    paired = statistics.median(o / n for o, n in zip(us["0"], us["1"]))
    kind = "thread CPU" if a.threads == 1 else "wall"
    print(f"{a.model}, {a.threads} thread(s), {a.tokens} tokens, {len(os.environ)} environment variables, "
          f"{kind} us a token, medians of {a.rounds} rounds")
    for v in ("1", "0"):
        print(f"  {names[v]}: {statistics.median(us[v]):.1f} us")
    print(f"  off - on: {statistics.median(us['0']) - statistics.median(us['1']):.1f} us a token; "
          f"off / on (paired median) {paired:.3f}x")


if __name__ == "__main__":
    main()
