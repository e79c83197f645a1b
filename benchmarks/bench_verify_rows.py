"""Where a prompt-lookup verify step's time goes, by its rows: the native step's phases
(`DecodeStep.profile`) for B sequences with r rows each (a verify step of B sequences whose
drafts are r - 1 tokens long), on the KV cache bench_lookup's code-editing requests leave.

Not a test: prints figures. One process: the engine prefills bench_lookup's first B
requests (chat format, codeshell-mini by default) and decodes `--warm` tokens each, so the
sequences hold 150-350 cached positions as in bench_lookup's verify steps; then the native
call (`DecodeStep.decode`, what `Engine._packed` calls) runs for each r in --rows-per-seq on
those sequences' slots, the rows at positions cached .. cached + r - 1 (written into the
cache beyond what the sequences keep, as a rejected draft is), `--calls` calls per setting,
the settings in turn `--rounds` times (reversed every other round). Printed: us a call per
phase (medians over the rounds), the whole call, and the cost of a row past B (the slope
between consecutive settings), which is what decides whether a drafted row pays at batch B
(lookup.DraftBudget): a step of B + d rows gives B + (accepted) tokens.

    python benchmarks/bench_verify_rows.py                      # batch 8, 1..4 rows a sequence, 1 thread
    python benchmarks/bench_verify_rows.py --batch 1 --rows-per-seq 1 2 4 6 8 9
    python benchmarks/bench_verify_rows.py --ab - CODESHELL_X=0  # variants alternating in the process
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: codeshell-mini)")
    ap.add_argument("--batch", type=int, default=8, help="sequences B")
    ap.add_argument("--rows-per-seq", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=1, help="1: bench_lookup's setting")
    ap.add_argument("--warm", type=int, default=32, help="tokens decoded per sequence before timing")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--logits", action="store_true", help="ask for the bf16 logits (a sampled row's step)")
    ap.add_argument("--ab", nargs="+", default=["-"],
                    help="variants: '-' (as loaded) or comma-separated ENV=V settings read per call")
    args = ap.parse_args()

    import torch

    from bench_lookup import requests
    from codeshell import LLM, SamplingParams
    from codeshell.kernels import step as step_mod

    llm = LLM(args.model, max_batch=max(8, args.batch), threads=args.threads)
    eng = llm.engine
    reqs = requests("chat")[:args.batch]
    sp = SamplingParams(temperature=0, max_tokens=args.warm + 1024, ignore_eos=True)  # none finishes while warming
    for i, r in enumerate(reqs):
        eng.add_request(f"w{i}", llm.encode(r["prompt"]), sp, prompt=r["prompt"])
    # step until every sequence has `warm` tokens; keep them running (the last step is not taken)
    for _ in range(args.warm + 100):
        eng.step()
        seqs = [s for q in eng.running.values() for s in q.seqs]
        if len(seqs) == args.batch and not eng.waiting and min(len(s.output_ids) for s in seqs) >= args.warm:
            break
    else:
        sys.exit("error: the sequences did not reach --warm tokens")
    seqs.sort(key=lambda s: s.slot)
    rmax = max(args.rows_per_seq)
    eng._ensure_cache(max(s.cached for s in seqs) + rmax + 1)
    d = step_mod._DECODERS.get(eng.model)
    if d is None or d.step is None:
        sys.exit("error: the native decode step does not run this model")
    st, cache = d.step, eng.cache
    print(f"{args.batch} sequences at {min(s.cached for s in seqs)}-{max(s.cached for s in seqs)} cached positions, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f}", flush=True)

    def setting(r: int):
        """tokens, positions, slots of a step with r rows a sequence: its last token, then r - 1
        tokens of its own output as the draft (the tokens do not change the work, only the bits)"""
        toks, pos, slots = [], [], []
        for s in seqs:
            toks += [s.last_token] + s.output_ids[:r - 1]
            pos += range(s.cached, s.cached + r)
            slots += [s.slot] * r
        return toks, pos, slots

    env0 = dict(os.environ)
    res: dict[tuple[str, int], list[dict]] = {}
    walls: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for rnd in range(args.rounds):
            for v in (args.ab if rnd % 2 == 0 else args.ab[::-1]):
                os.environ.clear()
                os.environ.update(env0)
                if v != "-":
                    for kv in v.split(","):
                        k, _, val = kv.partition("=")
                        os.environ[k] = val
                for r in args.rows_per_seq:
                    toks, pos, slots = setting(r)
                    st.decode(toks, pos, slots, cache.k, cache.v, d.scale, args.logits)  # warm
                    st.profile = True
                    t = time.thread_time()
                    for _ in range(args.calls):
                        st.decode(toks, pos, slots, cache.k, cache.v, d.scale, args.logits)
                    walls.setdefault((v, r), []).append((time.thread_time() - t) / args.calls * 1e6)
                    calls, phases = st.profile_times()
                    st.profile = False
                    row = {n: s / calls * 1e6 for n, s in phases}
                    row["whole call"] = sum(s for _, s in phases) / calls * 1e6
                    res.setdefault((v, r), []).append(row)
    os.environ.clear()
    os.environ.update(env0)
    cols = [(v, r) for v in args.ab for r in args.rows_per_seq]
    print("us a call (median of rounds)".ljust(26) + "".join(f"{(v[:12] + ' M=' + str(r * args.batch)):>18}"
                                                           for v, r in cols))
    for name in res[cols[0]][0]:
        print(name.ljust(26) + "".join(f"{statistics.median(x[name] for x in res[c]):18.1f}" for c in cols))
    print("thread CPU a call".ljust(26) + "".join(f"{statistics.median(walls[c]):18.1f}" for c in cols))
    for v in args.ab:
        w = [(r * args.batch, statistics.median(x["whole call"] for x in res[(v, r)])) for r in args.rows_per_seq]
        print(f"{v}: us a row past the previous setting: " + ", ".join(
            f"{m0}->{m1}: {(c1 - c0) / (m1 - m0):.1f}" for (m0, c0), (m1, c1) in zip(w, w[1:])))


if __name__ == "__main__":
    main()
