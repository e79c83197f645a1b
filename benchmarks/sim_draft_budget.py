"""The draft budget without timings: bench_lookup.py's code-editing requests (codeshell-mini, greedy,
batch 1 and 8) with the budget's step costs frozen to a table (ms by rows) instead of measured, and
each run's cost counted as the sum of table[rows] over its forwards (the prefill step left out, as
bench_lookup does). Prints plain and lookup tokens per table-second and their ratio: a deterministic
figure for comparing budget and odds variants on a machine too busy for wall-clock A/Bs (session 26:
a load average of 3-5 moved bench_lookup's ratios by +-30%). It says nothing about the kernels.

Not a test. Variants are environment settings read at import, so one process per variant:

    python benchmarks/sim_draft_budget.py                                  # the defaults
    CODESHELL_LOOKUP_SHARE_RATE=1 python benchmarks/sim_draft_budget.py    # session 25's odds
    python benchmarks/sim_draft_budget.py --explore 1000                   # (almost) no exploration
    python benchmarks/sim_draft_budget.py --no-budget                      # every draft, up to the row cap

The default table: verify-step CPU ms by rows on the 2-core Ice Lake-class Xeon at one thread after
session 26's 17-64-row tiles (the budget's own averages in a quiet-ish bench_lookup run up to 20 rows,
bench_decode_step.py --profile's native call + ~0.9 ms of Python beyond).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

TABLE = "1:1.1,2:1.24,4:1.6,8:2.72,12:3.49,16:4.6,20:5.4,24:6.0,32:7.6,48:10.8,64:14.0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=TABLE, help="rows:ms pairs, interpolated linearly between them")
    ap.add_argument("--explore", type=int, default=0, help="DraftBudget.EXPLORE (0: the class default)")
    ap.add_argument("--no-budget", action="store_true", help="every draft, up to the row cap")
    ap.add_argument("--lookup", type=int, default=8)
    args = ap.parse_args()

    import bench_lookup
    import numpy as np

    from codeshell import LLM, SamplingParams
    from codeshell.engine.lookup import DraftBudget
    from codeshell.mini import MODEL_DIR
    from codeshell.prompts import CHAT

    pts = dict((int(a), float(b)) for a, b in (kv.split(":") for kv in args.table.split(",")))
    xs = sorted(pts)
    table = {m: float(np.interp(m, xs, [pts[x] for x in xs])) for m in range(1, 65)}
    llm = LLM(str(MODEL_DIR), max_batch=8, threads=1)
    eng, reqs = llm.engine, bench_lookup.requests("chat")
    res = {}
    for k in (0, args.lookup):
        sp = SamplingParams(temperature=0, max_tokens=256, stop=list(CHAT.stop), prompt_lookup_num_tokens=k)
        for b in (1, 8):
            budget = DraftBudget()
            budget.cost_s.update({m: c * 1e-3 for m, c in table.items()})
            budget.observe = lambda rows, secs: None  # frozen: the engine's timings do not reach it
            if args.explore:
                budget.EXPLORE = args.explore
            eng.draft_budget = None if args.no_budget else budget
            cost = [0.0]
            spec, dec = eng._speculate, eng._decode

            def counted_spec(seqs, drafts, spec=spec):
                rows = spec(seqs, drafts)
                cost[0] += table[rows]
                return rows

            def counted_dec(seqs, *a, dec=dec, **kw):
                cost[0] += table[len(seqs)]
                return dec(seqs, *a, **kw)

            eng._speculate, eng._decode = counted_spec, counted_dec
            toks, d0, a0 = 0, eng.spec_drafted, eng.spec_accepted
            try:
                for i in range(0, len(reqs), b):
                    for j, r in enumerate(reqs[i:i + b]):
                        eng.add_request(f"r{i}-{j}", llm.encode(r["prompt"]), sp, prompt=r["prompt"])
                    first = True
                    while eng.has_unfinished():
                        c0 = cost[0]
                        outs = eng.step()
                        if first:  # the prefill step
                            cost[0], first = c0, False
                        toks += sum(len(o.outputs[0].token_ids) - 1 for o in outs if o.finished)
            finally:
                eng._speculate, eng._decode = spec, dec
            res[k, b] = (toks, cost[0], eng.spec_drafted - d0, eng.spec_accepted - a0)
    print(f"frozen costs (ms by rows): {args.table}; lookup {args.lookup}, explore "
          f"{args.explore or DraftBudget.EXPLORE}, budget {'off' if args.no_budget else 'on'}; "
          f"CODESHELL_LOOKUP_SHARE_RATE={os.environ.get('CODESHELL_LOOKUP_SHARE_RATE', '')}")
    for b in (1, 8):
        (t0, c0, _, _), (t1, c1, d, a) = res[0, b], res[args.lookup, b]
        print(f"batch {b}: plain {t0 / c0 * 1e3:.0f} tok per table-second, lookup {t1 / c1 * 1e3:.0f}: "
              f"{t1 / c1 / (t0 / c0):.3f}x; drafted {d}, accepted {a}")


if __name__ == "__main__":
    main()
