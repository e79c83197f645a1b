"""The native decode step (codeshell/kernels/step.py): decode ms/step and tokens/s with it
(`CODESHELL_DECODE_STEP=on`) and without it (`off`, the Python fused path), on any checkpoint
(default: the project's codeshell-mini).

Not a test: prints figures. Separate processes take turns (off, on, off, on, ...: the machine
is shared and timings drift); each loads the model with `LLM(folder, dtype="bfloat16",
threads=...)`, greedily generates N tokens for `batch` random 16-token prompts three times
and keeps the median per-step time, the prefill and first token subtracted (a 1-token
generation of the same prompts timed just before). Wall clock and the measuring process's CPU
time per step (steadier on a shared machine at 1 thread; at 2 threads a process that shares a
core with another job slows down several-fold). Printed: the load average before and after,
per batch the medians over the rounds, the best round, and the ratio off / on.

    python benchmarks/bench_decode_step.py                              # codeshell-mini, batch 1 and 8
    python benchmarks/bench_decode_step.py --model /tmp/bq/bf16 --tokens 32 --threads 1
    python benchmarks/bench_decode_step.py --compare team   # the step without / with its thread team
    python benchmarks/bench_decode_step.py --calls          # the native call alone, team off / on, percentiles
    python benchmarks/bench_decode_step.py --profile --model /tmp/q/int4 --tokens 32 --ab - team=1
                                     # where a step's time goes (DecodeStep.profile), per phase, per batch,
                                     # variants alternating in one process (team=0|1 or ENV=V, '-' = none)
    python benchmarks/bench_decode_step.py --profile --prompt-len 256 --tokens 128 --rounds 5
                                     # bench_quant's codeshell-mini prompt and decode lengths
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from codeshell.mini import MODEL_DIR as MINI  # the built-in model's folder


def worker(model: str, tokens: int, batch: int, threads: int) -> None:
    import torch

    from codeshell import LLM, SamplingParams

    llm = LLM(model, dtype="bfloat16", threads=threads, max_batch=max(8, batch), max_model_len=16 + tokens + 8)
    vocab = llm.engine.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    ps = [{"prompt_token_ids": torch.randint(0, vocab, (16,), generator=g).tolist()} for _ in range(batch)]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    llm.generate(ps, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    wall, cpu = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        llm.generate(ps, one)
        t1, c1 = time.perf_counter(), time.process_time()
        llm.generate(ps, many)
        t2, c2 = time.perf_counter(), time.process_time()
        wall.append(((t2 - t1) - (t1 - t0)) / tokens * 1e3)
        cpu.append(((c2 - c1) - (c1 - c0)) / tokens * 1e3)
    print(json.dumps({"wall_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu)}))


def calls(model: str, batch: int, threads: int, blocks: int) -> None:
    """The native call alone (`DecodeStep.decode`, what the engine's `_packed` calls), timed call by
    call (blocks of 100 calls), then the engine's steps of greedy generations: each step's wall
    time and the native call's share. CODESHELL_DECODE_TEAM as the caller set it (one mode per
    process: switching the team on and off inside one process slowed the off calls at batch 8).
    Percentiles: on a shared machine the low ones are the steps the other jobs left alone."""
    import numpy as np
    import torch

    import codeshell.engine.engine as engine_mod
    from codeshell import LLM, SamplingParams
    from codeshell.kernels import step as step_mod

    llm = LLM(model, dtype="bfloat16", threads=threads, max_batch=max(8, batch), max_model_len=400)
    eng = llm.engine
    llm.generate([{"prompt_token_ids": [5] * 16}] * batch, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    d = step_mod._DECODERS.get(eng.model)
    if d is None or d.step is None:
        sys.exit("error: the native decode step does not run this model")
    pc, cache, pct = time.perf_counter, eng.cache, (10, 50)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(blocks):
            for i in range(100):
                t = pc()
                d.step.decode([5] * batch, [20 + i % 40] * batch, list(range(batch)), cache.k, cache.v, d.scale)
                times.append(pc() - t)
    team = "team on" if d.step.uses_team else "team off"
    q = np.percentile(times, pct) * 1e3
    print(f"  batch {batch}, {team}: native call p10 {q[0]:.3f} ms, p50 {q[1]:.3f} ms")
    inner: list[float] = []
    orig = engine_mod._native_decode

    def timed(*a):
        t = pc()
        out = orig(*a)
        inner.append(pc() - t)
        return out

    engine_mod._native_decode = timed
    g = torch.Generator().manual_seed(1)
    steps, native = [], []
    for rep in range(4):
        for i in range(batch):
            eng.add_request(f"c{rep}-{i}", torch.randint(0, eng.cfg.vocab_size, (16,), generator=g).tolist(),
                            SamplingParams(temperature=0, max_tokens=129, ignore_eos=True))
        while eng.has_unfinished():
            inner.clear()
            t = pc()
            eng.step()
            if len(inner) == 1:
                steps.append(pc() - t)
                native.append(inner[0])
    engine_mod._native_decode = orig
    s, n = np.array(steps), np.array(native)
    for q in pct:
        st, nt, py = (np.percentile(v, q) * 1e3 for v in (s, n, s - n))
        print(f"  batch {batch}, {team}: engine step p{q} {st:.3f} ms, native call {nt:.3f} ms, the rest "
              f"(engine Python) {py:.3f} ms ({py / st:.0%})")


def profile(model: str, tokens: int, batches: list[int], threads: int, rounds: int, variants: list[str],
            prompt_len: int = 16, stat: str = "median") -> None:
    """Per-phase wall time of the native step (`DecodeStep.profile` / `profile_times`, us a call,
    medians over the rounds) for each batch and variant, in one process: greedy generations of
    `tokens` tokens after `prompt_len`-token prompts (--prompt-len; bench_quant's codeshell-mini
    figures use 256), the variants' order reversed every other round.
    A variant is '-' (as loaded), `team=0|1` (DecodeStep.team, set on the built step) or
    comma-separated ENV=V settings the kernels read per call (CODESHELL_Q4_ROWS_MAX_M=0, ...).
    stat "min" (--stat): the least of the rounds instead of the median (a loaded host: preemption only adds)."""
    import torch

    from codeshell import LLM, SamplingParams
    from codeshell.kernels import step as step_mod

    from ab_variant import apply_variant, restore  # the --ab variants, shared with bench_loaded.py

    llm = LLM(model, dtype="bfloat16", threads=threads, max_batch=max(batches), max_model_len=prompt_len + tokens + 8)
    vocab = min(llm.engine.cfg.vocab_size, 70000)
    g = torch.Generator().manual_seed(1)
    prompts = {b: [{"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=g).tolist()} for _ in range(b)]
               for b in batches}
    llm.generate(prompts[max(batches)], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    d = step_mod._DECODERS.get(llm.engine.model)
    if d is None or d.step is None:
        sys.exit("error: the native decode step does not run this model")
    st, team0, env0 = d.step, d.step.team, dict(os.environ)
    sp = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    res: dict[tuple[str, int], list[dict]] = {}
    for r in range(rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            apply_variant(v, st, team0, env0)
            for b in batches:
                st.profile = True  # clears the sums
                llm.generate(prompts[b], sp)
                calls, phases = st.profile_times()
                st.profile = False
                row = {n: s / calls * 1e6 for n, s in phases}
                row["whole call"] = sum(s for _, s in phases) / calls * 1e6
                res.setdefault((v, b), []).append(row)
    restore(st, team0, env0)
    cols = [(v, b) for v in variants for b in batches]
    agg = min if stat == "min" else statistics.median
    print(f"us a call, {'least' if stat == 'min' else 'medians'} over rounds".ljust(22) +
          "".join(f"{v[:14] + ' b' + str(b):>20}" for v, b in cols))
    for name in res[cols[0]][0]:
        print(name.ljust(22) + "".join(f"{agg([x[name] for x in res[c]]):20.1f}" for c in cols))
    for v in variants:
        w = {b: agg([x["whole call"] for x in res[(v, b)]]) for b in batches}
        print(f"{v}: " + ", ".join(f"b{b}/b{batches[0]} rows per second {b * w[batches[0]] / (batches[0] * w[b]):.2f}x"
                                   for b in batches[1:]))


def measure(model: str, tokens: int, batch: int, threads: int, mode: str, compare: str = "step") -> dict:
    var = "CODESHELL_DECODE_STEP" if compare == "step" else "CODESHELL_DECODE_TEAM"
    env = dict(os.environ, **{var: mode})
    out = subprocess.run([sys.executable, __file__, "--worker", model, str(tokens), str(batch), str(threads)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: the {mode} worker failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--calls-worker":
        calls(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    from ab_variant import HELP as AB_HELP, add_ab_argument  # --ab, shared with bench_loaded.py

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(MINI), help="checkpoint folder (default: codeshell-mini)")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per generation")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16, help="with --profile: prompt tokens (default 16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="with --profile: the rounds' median (default) or least per phase (a loaded host)")
    ap.add_argument("--compare", choices=["step", "team"], default="step",
                    help="step: the native step off / on (CODESHELL_DECODE_STEP); team: the native step "
                         "without / with its thread team (CODESHELL_DECODE_TEAM off / on)")
    ap.add_argument("--calls", action="store_true",
                    help="instead: the native call alone, call by call, team off / on in alternating processes "
                         "(percentiles), and the engine Python's share of a step")
    ap.add_argument("--profile", action="store_true",
                    help="instead: per-phase time of the native step (DecodeStep.profile) at each --batch, "
                         "--ab variants alternating over --rounds in one process")
    add_ab_argument(ap, ["-"], "with --profile: " + AB_HELP)
    a = ap.parse_args()
    if not Path(a.model, "config.json").is_file():
        ap.error(f"--model {a.model}: no config.json there")
    if a.profile:
        print(f"model {a.model}, {a.threads} threads, {a.tokens} tokens, rounds {a.rounds}; "
              f"load average before: {os.getloadavg()}")
        profile(a.model, a.tokens, a.batch, a.threads, a.rounds, a.ab, a.prompt_len, a.stat)
        print(f"load average after: {os.getloadavg()}")
        return
    if a.calls:
        print(f"model {a.model}, {a.threads} threads; load average before: {os.getloadavg()}")
        for b in a.batch:
            for r in range(a.rounds):
                for mode in ("off", "on"):  # separate processes, alternating
                    out = subprocess.run([sys.executable, __file__, "--calls-worker", a.model, str(b), str(a.threads),
                                          "10"], env=dict(os.environ, CODESHELL_DECODE_TEAM=mode),
                                         capture_output=True, text=True)
                    if out.returncode != 0:
                        sys.exit(f"error: the worker failed: {out.stderr.strip().splitlines()[-1:]}")
                    print(out.stdout.rstrip(), flush=True)
        print(f"load average after: {os.getloadavg()}")
        return
    print(f"model {a.model}, {a.threads} threads, {a.tokens} tokens, rounds {a.rounds}, off / on: {a.compare}; "
          f"load average before: {os.getloadavg()}")
    for b in a.batch:
        res: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(a.rounds):
            for mode in ("off", "on"):
                res[mode].append(measure(a.model, a.tokens, b, a.threads, mode, a.compare))
                m = res[mode][-1]
                print(f"  batch {b} round {r + 1} {mode:>3}: {m['wall_ms']:.3f} ms/step wall, "
                      f"{m['cpu_ms']:.3f} ms/step CPU", flush=True)
        med = {k: {f: statistics.median(x[f] for x in v) for f in ("wall_ms", "cpu_ms")} for k, v in res.items()}
        best = {k: min(x["wall_ms"] for x in v) for k, v in res.items()}
        off, on = med["off"], med["on"]
        print(f"batch {b}: wall {off['wall_ms']:.3f} -> {on['wall_ms']:.3f} ms/step "
              f"({1e3 * b / off['wall_ms']:.0f} -> {1e3 * b / on['wall_ms']:.0f} tok/s, "
              f"{off['wall_ms'] / on['wall_ms']:.2f}x); CPU {off['cpu_ms']:.3f} -> {on['cpu_ms']:.3f} ms/step "
              f"({off['cpu_ms'] / on['cpu_ms']:.2f}x); best round {best['off']:.3f} -> {best['on']:.3f} ms/step "
              f"({best['off'] / best['on']:.2f}x)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
