"""Where a batch-1 decode token goes on a loaded checkpoint: the engine's time per token, the
native decode step's phases (`DecodeStep.profile`), the same linears called alone (the model's
own packed weights, in model order: cold when the model exceeds the LLC) and a plain read probe,
all in one process, alternated in rounds; variants (environment settings read per call) A/B'd
in the same rounds. Medians over the rounds, and the engine's speed per variant against the
first variant in the same round (the figure to trust on a host whose bandwidth moves).

Per round: the probe (bench_kernels.read_probe: `read_stream` over 1 GiB on huge pages, best of 3); then per variant
(the order rotating): the engine's ms/token (`LLM.generate` of TOKENS + 1 greedy tokens of one
16-token prompt, less a 1-token run, over TOKENS) with the step's phase profile on, and the
linears alone (the mean of 3 passes, as the engine figure is a mean of tokens; always with the
base environment). Printed once: the weight bytes a token reads and how many of the process's
bytes sit on transparent huge pages (/proc/self/smaps_rollup AnonHugePages).

    python benchmarks/bench_decode_phases.py W/int8 --rounds 8 --tokens 12
    python benchmarks/bench_decode_phases.py W/int8 --ab - CODESHELL_DECODE_TEAM=on CODESHELL_Q8_PANEL_MIN_M=1
    python benchmarks/bench_decode_phases.py W/int8 --trace --rounds 6 --tokens 32 [--ab - ENV=V]

--trace (session 27, helper C): instead of the phases, where the time between two batch-1 tokens
goes outside the native step's body, per token (medians over the rounds' tokens, the prompt's
step and the first decode step left out): the LLM loop between two engine steps (`loop`), the
engine's step before the native call (`pre`: the decoding list, the cache check, the arguments),
kernels.step.decode's Python and pybind's argument conversion and GIL release (`py in`, up to
the native entry's steady_clock stamp: DecodeStep.trace_times, the same clock as
time.perf_counter_ns), the native entry to the step's body (`team in`: the arena, RoPE rows,
the team taken and woken), the body, the body's end to the native exit (`team out`), the
native exit to the Python return (`py out`: the GIL taken back, the result converted), and the
engine's step after it (`post`: the appends, stop checks, outputs). Each wrapper adds ~0.2-0.5 us.
With CODESHELL_DECODE_MULTI > 1 (the default: several greedy tokens a native call,
kernels.step.decode_greedy) each segment is a call's divided by its tokens, and the token time
the step's period over its tokens (the last, shorter call of a generation included).

(W: a `bench_quant.py --shape 1.7b --workdir W` folder; any checkpoint the native step runs.)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ab_variant import add_step_args, load_step_model  # noqa: E402

LINEARS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "head")


def smaps() -> dict[str, int]:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2)) << 10
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(ap, rounds=8, tokens=12)
    ap.add_argument("--trace", action="store_true", help="the time between tokens outside the step's body")
    a = ap.parse_args()
    import torch

    from codeshell.bench import weight_bytes_per_token
    from codeshell.kernels import _ext, hugepages, ops
    from codeshell.kernels import step as kstep

    from bench_kernels import read_probe, set_env  # the --ab variants and the read probe, as bench_kernels --sweep

    base_env = dict(os.environ)

    llm, lm, gen, (prompt,) = load_step_model(a.folder, a.threads, 1, a.tokens)
    mod = _ext.get()
    bpt, s = weight_bytes_per_token(lm), smaps()
    print(f"{a.folder}: {bpt / 1e6:.0f} MB a token; RSS {s['Rss'] / 1e9:.2f} GB, on huge pages "
          f"{s.get('AnonHugePages', 0) / 1e9:.2f} GB", flush=True)
    g = torch.Generator().manual_seed(2)  # each linear's random x row
    fasts = []
    for blk in lm.transformer.h:
        fasts += [("c_attn", blk.attn.c_attn), ("attn.c_proj", blk.attn.c_proj), ("c_fc", blk.mlp.c_fc),
                  ("mlp.c_proj", blk.mlp.c_proj)]
    fasts.append(("head", lm.lm_head))
    calls, shape_bytes = [], dict.fromkeys(LINEARS, 0)
    for name, lin in fasts:
        f = kstep._fast(lin)
        p = f.packed
        path = ops.plan(p, 1, torch.bfloat16)
        xdt = torch.bfloat16 if path.startswith(("amx:bf16", "avx512_bf16")) else torch.float32
        calls.append((name, path, torch.randn(1, p.in_features, generator=g).to(xdt), p, f.bias))
        shape_bytes[name] += p.nbytes
    lin_bytes = sum(shape_bytes.values())
    print("paths: " + ", ".join(sorted({f"{c[0]} {c[1]}" for c in calls})), flush=True)

    def sweep() -> tuple[float, dict[str, float]]:
        per = dict.fromkeys(LINEARS, 0.0)
        t0 = time.perf_counter()
        for name, path, x, p, b in calls:
            t = time.perf_counter()
            ops._compute(path, mod, x, p, b)
            per[name] += time.perf_counter() - t
        return time.perf_counter() - t0, per

    if a.trace:
        trace(a, llm, lm, kstep, gen, prompt, bpt, base_env, set_env)
        return
    buf = hugepages.empty(((1 << 30) // 4,), torch.float32).fill_(1.0)

    res: dict[str, list[dict]] = {v: [] for v in a.ab}
    for r in range(a.rounds):
        bw = read_probe(buf)
        line = []
        for v in a.ab[r % len(a.ab):] + a.ab[:r % len(a.ab)]:
            set_env(v, base_env)
            gen(2)  # a rebuilt step / the kernels' first calls with this setting
            st = kstep._DECODERS[lm].step
            t1 = min(gen(1) for _ in range(2))
            st.profile = True
            tn = gen(a.tokens + 1)
            n, phases = st.profile_times()
            st.profile = False
            set_env("-", base_env)
            passes = [sweep() for _ in range(3)]
            res[v].append(dict(bw=bw, eng=(tn - t1) / a.tokens, prof={k: t / n for k, t in phases},
                               sw=sum(t for t, _ in passes) / 3,
                               per={k: sum(p[k] for _, p in passes) / 3 for k in LINEARS}))
            e = res[v][-1]
            line.append(f"[{v}] engine {e['eng'] * 1e3:.2f} ms ({100 * bpt / e['eng'] / 1e9 / bw:.0f}%), "
                        f"native {sum(e['prof'].values()) * 1e3:.2f}, linears alone {e['sw'] * 1e3:.2f}")
        print(f"round {r}: probe {bw:.1f} GB/s; " + "; ".join(line), flush=True)
    first = res[a.ab[0]]
    for v, rs in res.items():
        def med(f):
            return statistics.median(f(x) for x in rs)
        print(f"== {v}: engine {med(lambda x: x['eng']) * 1e3:.2f} ms a token, "
              f"{med(lambda x: 100 * bpt / x['eng'] / 1e9 / x['bw']):.0f}% of the round's probe "
              f"(median probe {med(lambda x: x['bw']):.1f} GB/s), "
              f"{statistics.median(b['eng'] / x['eng'] for x, b in zip(rs, first)):.3f}x the first variant; "
              f"native step {med(lambda x: sum(x['prof'].values())) * 1e3:.2f} ms; "
              f"linears alone {med(lambda x: x['sw']) * 1e3:.2f} ms "
              f"({med(lambda x: 100 * lin_bytes / x['sw'] / 1e9 / x['bw']):.0f}% of the probe)")
        print("   step phases ms: " + ", ".join(f"{k} {med(lambda x: x['prof'][k]) * 1e3:.3f}" for k in rs[0]["prof"]))
        print("   GB/s in the step / alone: " + ", ".join(
            f"{k} {med(lambda x: shape_bytes[k] / x['prof'][k] / 1e9):.1f} / "
            f"{med(lambda x: shape_bytes[k] / x['per'][k] / 1e9):.1f}" for k in LINEARS))


SEGMENTS = ("loop", "pre", "py in", "team in", "body", "team out", "py out", "post")


def trace(a, llm, lm, kstep, gen, prompt, bpt, base_env, set_env) -> None:
    """--trace: per variant and round, one greedy generation of TOKENS + 1 tokens with the engine's
    step and kernels.step.decode wrapped (perf_counter_ns) and the native step's own stamps
    (DecodeStep.trace_times); per decode token the segments of SEGMENTS (ns), medians printed."""
    from codeshell import SamplingParams

    eng = llm.engine
    steps, calls = [], []
    real_step, real_decode, real_greedy = type(eng).step, kstep.decode, kstep.decode_greedy

    def step_w(*args, **kw):
        t0 = time.perf_counter_ns()
        out = real_step(eng, *args, **kw)
        steps.append((t0, time.perf_counter_ns()))
        return out

    def decode_w(*args, **kw):
        t0 = time.perf_counter_ns()
        out = real_decode(*args, **kw)
        calls.append((t0, time.perf_counter_ns(), len(steps), 1))  # the engine step it is in: steps' next entry
        return out

    def greedy_w(*args, **kw):  # CODESHELL_DECODE_MULTI > 1: several tokens a call
        t0 = time.perf_counter_ns()
        out = real_greedy(*args, **kw)
        calls.append((t0, time.perf_counter_ns(), len(steps), len(out) if out is not None else 0))
        return out

    res: dict[str, list[dict]] = {v: [] for v in a.ab}
    for r in range(a.rounds):
        line = []
        for v in a.ab[r % len(a.ab):] + a.ab[:r % len(a.ab)]:
            set_env(v, base_env)
            gen(2)
            st = kstep._DECODERS[lm].step
            steps.clear()
            calls.clear()
            eng.step, kstep.decode, kstep.decode_greedy = step_w, decode_w, greedy_w
            st.profile = True
            try:
                llm.generate([prompt], SamplingParams(temperature=0, max_tokens=a.tokens + 1, ignore_eos=True))
            finally:
                del eng.step
                kstep.decode, kstep.decode_greedy = real_decode, real_greedy
            nat = st.trace_times()
            st.profile = False
            set_env("-", base_env)
            if len(nat) != len(calls):
                sys.exit(f"{len(calls)} decode calls but {len(nat)} native traces (the native step did not run)")
            segs, wakes = [], sum(t[4] for t in nat[1:])
            toks = []  # per decode step: ns per token of the step's period
            for j in range(1, len(calls)):  # the first decode call's previous step is the prompt's
                (w0, w1, si, nt), (e, b, be, x, _) = calls[j], nat[j]
                s0, s1 = steps[si]
                p1 = steps[si - 1][1]
                nt = max(nt, 1)  # segments per token: a call of nt tokens spreads its Python over them
                segs.append({k: d / nt for k, d in zip(SEGMENTS, (s0 - p1, w0 - s0, e - w0, b - e, be - b, x - be,
                                                                 w1 - x, s1 - w1))})
                toks.append((s1 - p1) / nt)
            per = {k: statistics.median(sg[k] for sg in segs) for k in SEGMENTS}
            tok = statistics.median(toks)
            res[v].append(dict(per=per, tok=tok, wakes=wakes))
            line.append(f"[{v}] token {tok / 1e3:.0f} us, outside the body {(tok - per['body']) / 1e3:.0f} us, "
                        f"wakes {wakes}")
        print(f"round {r}: " + "; ".join(line), flush=True)
    for v, rs in res.items():
        def med(f):
            return statistics.median(f(x) for x in rs)
        tok = med(lambda x: x["tok"])
        print(f"== {v}: token {tok / 1e3:.1f} us ({bpt / tok:.1f} GB/s of weights); "
              f"outside the body {med(lambda x: x['tok'] - x['per']['body']) / 1e3:.1f} us; helper wakes "
              f"{med(lambda x: x['wakes'])} a run")
        print("   us: " + ", ".join(f"{k} {med(lambda x: x['per'][k]) / 1e3:.1f}" for k in SEGMENTS))


if __name__ == "__main__":
    main()
