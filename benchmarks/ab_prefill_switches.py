"""Same-process A/B of whole prompts with sets of the kernels' environment switches (read per call).

Loads a model as `trace_prefill.py` does (a checkpoint, or `--model codeshell-mini`), then times
one `--prompt-len`-token prompt (batch 1, 1 new token, as bench_quant times a prompt) per variant
per round, the variants alternating in the process; prints per variant the median and best time
and the % of the bf16 peak (`codeshell.bench.prompt_flops` over `bf16_matmul_peak`, measured in
this process). `--cpu` times with the process's CPU time instead of the wall clock (meant with
`--threads 1` on a host whose other jobs make wall times meaningless: the work the prompt does).

    flock /tmp/bench.lock nice -n -10 python benchmarks/ab_prefill_switches.py --model codeshell-mini \\
        --prompt-len 256 --rounds 20 --variant old CODESHELL_PREFILL_ATTN_R4=0,CODESHELL_PREFILL_ATTN_PREPACK=0 --variant new ''
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a checkpoint directory, or codeshell-mini")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cpu", action="store_true", help="time by the process's CPU time (see above)")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "SWITCHES"), required=True,
                    help="a name and NAME=VALUE[,NAME=VALUE...] set for its prompts ('' for none)")
    args = ap.parse_args()
    from codeshell import SamplingParams
    from codeshell.bench import bf16_matmul_peak, prompt_flops
    from trace_prefill import build
    llm, cfg = build("small", 0, args.threads, args.prompt_len, args.model)
    g = torch.Generator().manual_seed(1)
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    clock = time.process_time if args.cpu else time.perf_counter
    variants = [(name, dict(p.split("=", 1) for p in sw.split(",") if p)) for name, sw in args.variant]

    def prompt(env):
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            ids = torch.randint(0, min(cfg.vocab_size, 60000), (args.prompt_len,), generator=g).tolist()
            t = clock()
            llm.generate([{"prompt_token_ids": ids}], sp)
            return clock() - t
        finally:
            for k, v in old.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v

    for _, env in variants:  # warm-up
        prompt(env), prompt(env)
    # The peak is measured before and after the rounds and the larger taken: one ~1 s measurement
    # is what another process's burst on a shared host halves (session 21: 0.49 TFLOP/s in a
    # loaded second against 1.05-1.09 in the same minute), where the rounds' medians hold.
    peaks = [bf16_matmul_peak()["peak"]]
    flops = prompt_flops(cfg, args.prompt_len)
    ts = {name: [] for name, _ in variants}
    for _ in range(args.rounds):
        for name, env in variants:
            ts[name].append(prompt(env))
    peaks.append(bf16_matmul_peak()["peak"])
    peak = max(peaks)
    first = statistics.median(ts[variants[0][0]])
    print(f"{args.model}, prompt {args.prompt_len}, {args.threads} threads, {args.rounds} rounds alternating, "
          f"{'CPU time' if args.cpu else 'wall'}, peak {peak:.3f} TFLOP/s (before / after the rounds: "
          f"{peaks[0]:.3f} / {peaks[1]:.3f}), load average {os.getloadavg()[0]:.1f}")
    for name, _ in variants:
        m = statistics.median(ts[name])
        print(f"  {name:8s} median {m * 1e3:8.2f} ms (best {min(ts[name]) * 1e3:.2f}) = {100 * flops / m / 1e12 / peak:5.1f}% of "
              f"peak at the median; {m / first:.3f}x the first variant")


if __name__ == "__main__":
    main()
