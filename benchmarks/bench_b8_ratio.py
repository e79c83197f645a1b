"""Issue 14's batched-decode ratio (b8 / b1 aggregate tokens/s) in one process: batch 1 and batch 8 decode steps
(LLM.generate of 16-token prompts: TOKENS + 1 greedy tokens less the best of two 1-token runs, per step) with
variants (environment switches read per call: ENV=V[,ENV=V] or '-' for none) alternating each round, so the
ratio of a switch's on and off is taken against a batch 1 measured in the same rounds. Medians over the rounds.
Each variant first generates 48 tokens at batch 8 (a warm-up; the decode step's measured kernel choices,
csrc/q8_rows_tune.h, are made there).

    flock /work/notes/bench.lock python benchmarks/bench_b8_ratio.py /tmp/bq-small/int8 --ab - CODESHELL_Q8_ROWS_TUNE=0

What this is not: bench_quant.py's table (that one also runs llama.cpp and the bound); this is the quick
in-process A/B of a switch's effect on b1, b8 and their ratio (session 38 helper B, docs/kernels-log.md)."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from codeshell import LLM, SamplingParams


def parse_variant(v: str) -> dict[str, str]:
    """'-' -> {}; 'A=1,B=0' -> {'A': '1', 'B': '0'}; anything else is a usage error."""
    if v == "-":
        return {}
    out = {}
    for kv in v.split(","):
        k, sep, val = kv.partition("=")
        if not sep or not k:
            raise SystemExit(f"bench_b8_ratio: --ab variant {v!r}: expected ENV=VALUE[,ENV=VALUE] or '-'")
        out[k] = val
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a checkpoint folder (e.g. bench_quant's /tmp/bq-small/int8)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed a run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ab", nargs="+", default=["-"], help="variants: ENV=V[,ENV=V] or '-' (the defaults)")
    a = ap.parse_args()
    if a.rounds < 1 or a.tokens < 1 or a.threads < 1:
        ap.error("--rounds, --tokens and --threads must be >= 1")
    variants = {v: parse_variant(v) for v in a.ab}

    llm = LLM(a.folder, dtype="bfloat16", threads=a.threads, max_batch=8, max_model_len=a.tokens + 64)
    g = torch.Generator().manual_seed(1)
    vocab = min(llm.model.cfg.vocab_size, 70000)
    p8 = [{"prompt_token_ids": torch.randint(0, vocab, (16,), generator=g).tolist()} for _ in range(8)]
    p1 = p8[:1]

    def gen(ps, n: int) -> float:
        t = time.perf_counter()
        llm.generate(ps, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t

    def step(ps) -> float:  # seconds a decode step: the prompt and first token's run taken off
        one = min(gen(ps, 1), gen(ps, 1))
        return (gen(ps, a.tokens + 1) - one) / a.tokens

    base = dict(os.environ)

    def setv(v: str) -> None:
        os.environ.clear()
        os.environ.update(base)
        os.environ.update(variants[v])

    for v in a.ab:  # warm-up (and the step's measured choices) per variant
        setv(v)
        gen(p8, 48)
        gen(p1, 4)
    res: dict[str, tuple[list[float], list[float]]] = {v: ([], []) for v in a.ab}
    for r in range(a.rounds):
        for v in a.ab[r % len(a.ab):] + a.ab[:r % len(a.ab)]:  # the order rotated each round
            setv(v)
            res[v][0].append(step(p1))
            res[v][1].append(step(p8))
    os.environ.clear()
    os.environ.update(base)
    print(f"load avg {os.getloadavg()[0]:.2f}")
    for v, (t1, t8) in res.items():
        m1, m8 = statistics.median(t1), statistics.median(t8)
        ratios = sorted(8 * x / y for x, y in zip(t1, t8))
        print(f"[{v}] b1 {m1*1e3:.3f} ms ({1/m1:.0f} tok/s), b8 {m8*1e3:.3f} ms ({8/m8:.0f} tok/s), "
              f"b8/b1 {8*m1/m8:.2f}x (per round {', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
        # the least step of the rounds: on a loaded host (other jobs preempting ours) the rounds' medians
        # carry the preemption; the least of many short rounds is the step as it runs when not preempted
        l1, l8 = min(t1), min(t8)
        print(f"[{v}] least: b1 {l1*1e3:.3f} ms ({1/l1:.0f} tok/s), b8 {l8*1e3:.3f} ms ({8/l8:.0f} tok/s), "
              f"b8/b1 {8*l1/l8:.2f}x", flush=True)


if __name__ == "__main__":
    main()
