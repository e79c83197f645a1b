"""Prompt-lookup decoding: decode tokens/s with and without it on code-editing requests, with
the project's own codeshell-mini (or any checkpoint given by --model).

Not a test: prints figures. A request gives a function from Python's standard library
(its source through `inspect`, so no data file is needed) and asks for it rewritten with one
small change (the function or one of its arguments renamed): in the chat format the model
was tuned on (`codeshell.prompts.chat_prompt`, the default) or as a plain completion
("# original\\n<function>\\n# the same function, with <change>\\n", --format completion).
The answer of a model that does the job copies most of the prompt's function, which is what
prompt lookup drafts; how much codeshell-mini actually copies is printed (the similarity of
its answers to the given function, and the acceptance of the drafts).

Separate processes take turns (plain, lookup, lookup, plain, ...: the machine is shared and
timings drift); each loads the model and greedily answers every request at batch 1 (one
request at a time) and at batch 8 (8 concurrent requests in one engine). Decode tokens/s
counts the tokens after each request's first one over the time after the prefill step (wall
clock; also over the measuring process's CPU seconds, steadier on a shared machine); at batch 8
the clock starts after the step that prefilled the last prompt (the engine admits 512 prompt
tokens a step) and the tokens each request had by then are left out.
Printed: the CPU flags and kernel ISA, the load average, medians per mode, the speed-up
(target >= 1.8x), the acceptance, and whether the greedy texts are identical with and
without lookup at each batch size (they must be: the exit status is 1 otherwise).

    python benchmarks/bench_lookup.py                       # codeshell-mini, chat, 3 rounds
    python benchmarks/bench_lookup.py --format completion --rounds 1
    python benchmarks/bench_lookup.py --model PATH --dtype float32 --lookup 10
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Pure-Python standard-library functions of 90-260 codeshell-mini tokens (source via inspect).
FUNCTIONS = [
    "colorsys.rgb_to_hsv", "colorsys.hsv_to_rgb", "colorsys.rgb_to_hls", "colorsys.hls_to_rgb",
    "textwrap.indent", "string.capwords", "html.escape", "calendar.leapdays",
    "fnmatch.filter", "statistics.median", "statistics.mode", "glob.escape",
    "urllib.parse.urldefrag", "quopri.needsquoting", "shutil.copyfileobj", "base64.b64encode",
]


def requests(fmt: str) -> list[dict]:
    """One code-editing request per function: the source, the change asked for, the prompt."""
    from codeshell.prompts import chat_prompt

    out = []
    for i, qual in enumerate(FUNCTIONS):
        mod, name = qual.rsplit(".", 1)
        fn = getattr(importlib.import_module(mod), name)
        src = inspect.getsource(fn)
        if i % 2 == 0:
            change = f"the function renamed from `{name}` to `{name}_v2`"
            ask = f"Rewrite this function, renaming it from `{name}` to `{name}_v2`:"
        else:
            arg = next(iter(inspect.signature(fn).parameters))
            change = f"the argument `{arg}` renamed to `{arg}_value`"
            ask = f"Rewrite this function, renaming its argument `{arg}` to `{arg}_value`:"
        if fmt == "chat":
            prompt = chat_prompt([{"role": "user", "content": f"{ask}\n```python\n{src}```"}])
        else:
            prompt = f"# original\n{src}\n# the same function, with {change}\n"
        out.append({"name": qual, "source": src, "prompt": prompt})
    return out


def code_of(answer: str) -> str:
    """The code in an answer: its opening ``` fence's contents if it starts with one (a chat
    answer), else the text before any fence (a completion)."""
    if answer.lstrip().startswith("```"):
        body = answer.split("```", 2)[1]
        return body[len("python"):] if body.startswith("python") else body
    return answer.split("```", 1)[0]


# ---- one measuring process -------------------------------------------------------------------
def worker(args) -> None:
    from codeshell import LLM, SamplingParams
    from codeshell.prompts import CHAT

    llm = LLM(args.model, dtype=args.dtype, max_batch=8, threads=args.threads)
    eng, reqs = llm.engine, requests(args.format)
    k = args.lookup if args.mode == "lookup" else 0
    stop = list(CHAT.stop) if args.format == "chat" else ["\n# ", "<|endoftext|>"]
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, stop=stop, prompt_lookup_num_tokens=k)
    llm.generate([r["prompt"] for r in reqs[:2]], sp)  # warm-up (kernel choices, caches)

    def run(batch: list[dict]) -> tuple[list, int, float]:
        for i, r in enumerate(batch):
            eng.add_request(f"r{i}", llm.encode(r["prompt"]), sp, prompt=r["prompt"])
        # The decode clock starts after the step that prefilled the last prompt: a step admits
        # at most `prefill_chunk` (512) prompt tokens, so 8 prompts of 150-330 tokens are
        # prefilled over ~5 steps, interleaved with the decode steps of those admitted before.
        # Until session 31 the clock started after the first step, and those later prefills
        # (~0.45 s of a ~1.5 s batch-8 pass of codeshell-mini on the Zen 3, the same in both
        # modes) counted as decode time. The tokens each request had by then are not counted.
        final, have, base, t1 = {}, {}, None, None
        while eng.has_unfinished():
            outs = eng.step()
            for o in outs:
                have[o.request_id] = len(o.outputs[0].token_ids)
                if o.finished:
                    final[o.request_id] = o.outputs[0]
            if base is None and not eng.waiting and len(have) == len(batch):  # every prompt prefilled
                t1, c1, base = time.perf_counter(), time.process_time(), dict(have)
        secs, cpu = time.perf_counter() - t1, time.process_time() - c1
        got = [final[f"r{i}"] for i in range(len(batch))]
        return got, sum(len(o.token_ids) - base[f"r{i}"] for i, o in enumerate(got)), secs, cpu

    res = {}
    for b in (1, 8):
        d0, a0, s0 = eng.spec_drafted, eng.spec_accepted, eng.spec_steps
        outs, toks, secs, cpu = [], 0, 0.0, 0.0
        for i in range(0, len(reqs), b):
            o, n, s, c = run(reqs[i:i + b])
            outs += o
            toks += n
            secs += s
            cpu += c
        res[f"b{b}"] = {"tok_s": toks / secs, "cpu_tok_s": toks / cpu, "tokens": toks, "texts": [o.text for o in outs],
                        "ids": [o.token_ids for o in outs], "drafted": eng.spec_drafted - d0,
                        "accepted": eng.spec_accepted - a0, "spec_steps": eng.spec_steps - s0}
    budget = getattr(eng, "draft_budget", None)
    res["step_ms"] = {m: 1e3 * c for m, c in sorted(budget.cost_s.items())} if budget is not None else {}
    print("RESULT " + json.dumps(res))


def cpu_line() -> str:
    from codeshell import kernels
    from codeshell.llamacpp import cpu_flags
    level = kernels.isa_level()
    isa = kernels.ISA_LEVELS[level] if level >= 0 else "none (torch fallback)"
    return f"CPU flags: {' '.join(cpu_flags()) or '?'}; kernel ISA: {isa}"


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the built-in codeshell-mini)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: the checkpoint's (bf16 for codeshell-mini)")
    ap.add_argument("--format", choices=["chat", "completion"], default="chat")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--lookup", type=int, default=8, help="prompt_lookup_num_tokens")
    ap.add_argument("--rounds", type=int, default=3, help="alternating plain/lookup process pairs")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1 by default: on a shared 2-core machine a second thread of so "
                         "small a model mostly waits at barriers)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["plain", "lookup"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.rounds < 1 or not 1 <= args.lookup <= 64 or args.max_tokens < 2:
        ap.error("--rounds must be >= 1, --lookup in 1..64, --max-tokens >= 2")

    import torch
    print(cpu_line())
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {args.threads} thread(s); "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    reqs = requests(args.format)
    runs: dict[str, list[dict]] = {"plain": [], "lookup": []}
    for r in range(args.rounds):
        for mode in (("plain", "lookup") if r % 2 == 0 else ("lookup", "plain")):
            cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--dtype", args.dtype,
                   "--format", args.format, "--lookup", str(args.lookup), "--max-tokens", str(args.max_tokens),
                   "--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"measuring process failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            res = json.loads(line[0][7:])
            runs[mode].append(res)
            print(f"  round {r + 1} {mode:6s}: batch 1 {res['b1']['tok_s']:7.1f} tok/s, "
                  f"batch 8 {res['b8']['tok_s']:7.1f} tok/s; per CPU second {res['b1']['cpu_tok_s']:7.1f} and "
                  f"{res['b8']['cpu_tok_s']:7.1f}  (load {os.getloadavg()[0]:.2f})", flush=True)

    plain, look = runs["plain"], runs["lookup"]
    p0, l0 = plain[0], look[0]
    print(f"\n{len(reqs)} code-editing requests ({args.format} format), greedy, up to {args.max_tokens} new "
          f"tokens, prompt_lookup_num_tokens={args.lookup}; {p0['b1']['tokens']} decoded tokens a pass "
          "at batch 1")
    sim = [difflib.SequenceMatcher(None, r["source"], code_of(t)).ratio() for r, t in zip(reqs, p0["b1"]["texts"])]
    print(f"how much the answers copy: similarity to the given function (difflib ratio) median "
          f"{statistics.median(sim):.2f}, min {min(sim):.2f}, max {max(sim):.2f}")
    print("| batch | plain tok/s | lookup tok/s | speed-up | drafts accepted | tokens per sequence-step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for b in ("b1", "b8"):
        p = statistics.median(x[b]["tok_s"] for x in plain)
        q = statistics.median(x[b]["tok_s"] for x in look)
        acc = l0[b]["accepted"] / max(1, l0[b]["drafted"])
        steps = l0[b]["tokens"] - l0[b]["accepted"]  # each sequence-step emits one token of its own
        print(f"| {b[1:]} | {p:.1f} | {q:.1f} | {q / p:.2f}x | {l0[b]['accepted']}/{l0[b]['drafted']} "
              f"({100 * acc:.0f}%) | {l0[b]['tokens'] / max(1, steps):.2f} |")
    print("target: >= 1.8x decode tokens/s (medians of alternating runs)")
    for b in ("b1", "b8"):
        print(f"batch {b[1:]}: {l0[b]['spec_steps']} verify steps, {l0[b]['drafted'] - l0[b]['accepted']} drafted rows "
              "rejected (each a row of the forward run for nothing)")
    ms = {int(m): c for m, c in l0.get("step_ms", {}).items()}
    if ms:  # what the draft budget measured: a verify step's CPU time by its rows
        show = [m for m in (2, 4, 8, 12, 16, 17, 20, 24, 32, 48, 64) if m in ms]
        print("verify step CPU ms by rows (the draft budget's moving averages, first lookup process): "
              + ", ".join(f"{m}: {ms[m]:.2f}" for m in show))
    # With one thread, tokens per CPU second of the measuring process leave out the time other
    # processes on a shared machine took the core (the wall-clock rounds above vary ~2x then);
    # they still include what sharing costs in caches and a hyperthread sibling.
    print("per CPU second of the measuring process (less sensitive to other load):")
    for b in ("b1", "b8"):
        p = statistics.median(x[b]["cpu_tok_s"] for x in plain)
        q = statistics.median(x[b]["cpu_tok_s"] for x in look)
        print(f"| {b[1:]} | {p:.1f} | {q:.1f} | {q / p:.2f}x |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    ok = True
    for b in ("b1", "b8"):
        diffs = []
        for i, name in enumerate(r["name"] for r in reqs):
            want = p0[b]["ids"][i]
            for x in plain + look:
                d = first_diff(want, x[b]["ids"][i])
                if d is not None:
                    diffs.append(f"{name} (token {d})")
                    break
        same = not diffs
        ok &= same
        print(f"greedy texts identical with and without lookup at batch {b[1:]}, every round: {same}"
              + ("" if same else f"; differ: {', '.join(diffs)}"))
    across = [r["name"] for i, r in enumerate(reqs) if p0["b1"]["ids"][i] != p0["b8"]["ids"][i]]
    print(f"plain decode itself, batch 1 vs batch 8: {len(reqs) - len(across)}/{len(reqs)} texts identical"
          + (f" (differ: {', '.join(across)}: the batch-8 prefill pads the prompts to one length, and "
             "attention over a padded batch rounds differently; decode steps are row-invariant)" if across else ""))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
