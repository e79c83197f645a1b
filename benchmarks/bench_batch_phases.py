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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ab_variant import add_step_args, load_step_model, profiled_step  # noqa: E402
from bench_kernels import set_env  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(ap, rounds=5, tokens=16)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    base_env = dict(os.environ)
    _, lm, gen, _ = load_step_model(a.folder, a.threads, a.batch, a.tokens)
    res: dict[str, list[tuple[float, dict[str, float]]]] = {v: [] for v in a.ab}
    for r in range(a.rounds):
        for v in a.ab[r % len(a.ab):] + a.ab[:r % len(a.ab)]:
            set_env(v, base_env)
            res[v].append(profiled_step(lm, gen, a.tokens))
            set_env("-", base_env)
    for v, rows in res.items():
        step = statistics.median(e for e, _ in rows)
        print(f"[{v}] batch {a.batch}: {step * 1e3:.2f} ms a step, {a.batch / step:.0f} tok/s aggregate", flush=True)
        names = list(rows[0][1])
        print("   per native call: " + ", ".join(
            f"{k} {statistics.median(p.get(k, 0.0) for _, p in rows) * 1e6:.0f} us" for k in names), flush=True)


if __name__ == "__main__":
    main()
