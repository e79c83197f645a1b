"""Same-process A/B of the serving workload straight on the engine (no HTTP): bench_serve.py's requests
(`direct`: C clients' distinct ~90-token prompts added at once, 64 sampled tokens each, one token a step as
the server runs them) with sets of environment switches read per call, the variants alternating round after
round in one process, so old and new meet the same host minutes. Per variant and client count the medians
of tok/s, time to first token p50, decode ms a token (a request's time after its first token, a token), the
engine's steps and the seconds in steps that prefilled (a step that admitted prompts) against decode-only steps.

    flock /work/notes/bench.lock python benchmarks/ab_serve_direct.py /tmp/bs-A/model-1.7b-q4_0.gguf \\
        --clients 1 16 --rounds 3 --variant old CODESHELL_VNNI_Q4_NIB=0 --variant new ''

Session 41 (helper C): the int4 (GGUF q4_0) prompt's vpdpbusd GEMM on the nibbles as stored. Session 42:
`--measure-cost` measures the prefill cost as the server does at load, so the rounds admit as the server
does (an A/B of CODESHELL_PREFILL_ADMIT=budget needs it). Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernels import set_env  # noqa: E402
from bench_serve import direct  # noqa: E402 (the round, each step timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a checkpoint folder or GGUF file")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure-cost", action="store_true",
                    help="measure the prefill cost at load as the server does (Engine.measure_prefill_cost): "
                         "the server's admission (prefill_plan.first_group) and grouping; without it the "
                         "engine admits by the token budget, as LLM.generate")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "SWITCHES"), required=True,
                    help="a name and NAME=VALUE[,NAME=VALUE...] set for its rounds ('' for none)")
    args = ap.parse_args()
    from codeshell import LLM
    from codeshell.engine import SamplingParams
    llm = LLM(args.model, max_batch=16, threads=args.threads)  # the server's engine (`--max-batch 16`)
    llm.generate("warm up", SamplingParams(temperature=0, max_tokens=2))
    if args.measure_cost:
        print(f"prefill cost: {llm.engine.measure_prefill_cost()}", flush=True)
    variants = [(name, sw or "-") for name, sw in args.variant]
    base_env = dict(os.environ)
    res: dict[tuple[str, int], list[dict]] = {}
    off = 0
    for r in range(args.rounds + 1):  # round 0 warms up every variant and is not counted
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for c in args.clients:
            for name, sw in order:
                set_env(sw, base_env)
                try:
                    x = direct(llm, list(range(off, off + c)), args.max_tokens)  # distinct prompts: no prefix hits
                finally:
                    set_env("-", base_env)
                off += c
                if r:
                    res.setdefault((name, c), []).append(x)
                print(f"  round {r}{' (warm-up)' if not r else ''} {name:6s} {c:2d} clients: {x['tok_s']:6.1f} tok/s, "
                      f"TTFT p50 {x['ttft_p50'] * 1e3:6.0f} ms, decode {x['decode_ms']:6.1f} ms a token, {x['steps']} steps "
                      f"({x['pre_n']} with prefill: {x['pre_s']:.2f} s; decode-only median {x['dec_ms']:.1f} ms), "
                      f"other processes {x['other']:.2f} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"\n{args.model}: medians of {args.rounds} rounds, {args.threads} threads")
    print("| variant | clients | tok/s | TTFT p50 ms | decode ms a token | prefill steps s | decode-only step ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in args.clients:
        for name, _ in variants:
            xs = res[(name, c)]
            med = {k: statistics.median(x[k] for x in xs) for k in ("tok_s", "ttft_p50", "decode_ms", "pre_s", "dec_ms")}
            print(f"| {name} | {c} | {med['tok_s']:.1f} | {med['ttft_p50'] * 1e3:.0f} | {med['decode_ms']:.1f} | "
                  f"{med['pre_s']:.2f} | {med['dec_ms']:.1f} |")


if __name__ == "__main__":
    main()
