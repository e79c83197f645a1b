"""Prompt-lookup decoding: decode tokens/s with and without it on code-editing requests.

Not a test: prints figures. The project has no small released model yet (codeshell-mini does
not exist), so the benchmark first trains one that can do the job: a tiny CodeShell model
(rope, GQA) taught, with plain torch AdamW (1500 steps of 16 examples), to rewrite a Python
function with a small change ("# rename total to acc" / "# change 7 to 12"), i.e. to copy
with edits; a share of the examples are plain repeats of random token strings, which only
copying predicts, so the copying (induction) heads form sooner. Training runs over the
tokens the task uses only (a compact vocabulary, so a step is cheap); the trained weights
are then placed in a model of the full 70144-token vocabulary, whose other tokens get a
logit of -30 through a constant dimension of the final LayerNorm (so the engine runs the
real output head, and those tokens never win). The model copies imperfectly (it often
misapplies the edit): the acceptance and speed-up printed are those of such a model.

Then, in separate processes taking turns (plain, lookup, plain, ...; the machine is shared
and timings drift), each process loads that model and greedily rewrites the evaluation
functions through `codeshell.LLM` at batch 1 (one request at a time) and batch 8 (all at
once). Decode tokens/s counts the tokens after each request's first one, over the time
after the prefill step. Printed: medians per mode, the speed-up (target >= 1.8x), the draft
acceptance, and whether the greedy texts are identical (they must be).

    python benchmarks/bench_lookup.py                    # defaults: 1500 steps, 3 rounds
    python benchmarks/bench_lookup.py --steps 400 --rounds 1 --lookup 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ["total", "count", "items", "value", "result", "index", "scale", "limit", "offset", "buffer",
         "score", "weight", "price", "amount", "entry", "record", "node", "left", "right", "size",
         "width", "height", "delta", "start", "stop", "step", "accum", "first", "last", "name",
         "data", "rows", "cols", "key", "block", "chunk", "level", "depth", "queue", "stack"]
VERBS = ["compute", "merge", "scale", "filter", "count", "collect", "update", "build", "parse", "sum"]
CMPS = ["<", ">", "<=", ">=", "==", "!="]
OPS = ["+", "-", "*"]


def make_function(rng: random.Random) -> str:
    """A small Python function of 4-12 lines from a few templates with random names."""
    w = rng.sample(WORDS, 6)
    name = f"{rng.choice(VERBS)}_{w[0]}"
    c = [rng.randint(0, 99) for _ in range(4)]
    kind = rng.randrange(4)
    if kind == 0:
        body = (f"    {w[1]} = {c[0]}\n    for {w[2]} in {w[3]}:\n        if {w[2]} {rng.choice(CMPS)} {c[1]}:\n"
                f"            {w[1]} {rng.choice(OPS)}= {w[2]} * {c[2]}\n    return {w[1]}\n")
        args = f"{w[3]}"
    elif kind == 1:
        body = (f"    {w[1]} = []\n    for {w[2]} in range({w[3]}, {c[0]}):\n"
                f"        {w[4]} = {w[2]} {rng.choice(OPS)} {c[1]}\n        if {w[4]} {rng.choice(CMPS)} {c[2]}:\n"
                f"            {w[1]}.append({w[4]})\n    return {w[1]}\n")
        args = f"{w[3]}, {w[5]}={c[3]}"
    elif kind == 2:
        body = (f"    {w[1]} = {{}}\n    for {w[2]}, {w[4]} in {w[3]}.items():\n"
                f"        {w[1]}[{w[2]}] = {w[4]} {rng.choice(OPS)} {c[0]}\n"
                f"    if len({w[1]}) {rng.choice(CMPS)} {c[1]}:\n        return None\n    return {w[1]}\n")
        args = f"{w[3]}"
    else:
        body = (f"    {w[1]} = {c[0]}\n    {w[2]} = {c[1]}\n    while {w[1]} {rng.choice(CMPS)} {w[3]}:\n"
                f"        {w[1]} {rng.choice(OPS)}= {c[2]}\n        {w[2]} += 1\n"
                f"        if {w[2]} > {c[3]}:\n            break\n    return {w[1]}, {w[2]}\n")
        args = f"{w[3]}"
    return f"def {name}({args}):\n{body}"


def make_example(rng: random.Random) -> tuple[str, str]:
    """(prompt, answer): the function with an edit instruction, and the edited function."""
    import re
    f = make_function(rng)
    if rng.random() < 0.5:
        names = sorted(set(re.findall(r"\b[a-z]+\b", f)) & set(WORDS))
        old = rng.choice(names)
        new = rng.choice([w for w in WORDS if w not in names])
        task, out = f"rename {old} to {new}", re.sub(rf"\b{old}\b", new, f)
    else:
        nums = sorted(set(re.findall(r"\b\d+\b", f)))
        old = rng.choice(nums)
        new = str(rng.choice([n for n in range(100) if str(n) not in nums]))
        task, out = f"change {old} to {new}", re.sub(rf"\b{old}\b", new, f)
    return f"# {task}\n{f}# result:\n", out + "# end\n"


# ---- training ------------------------------------------------------------------------------
def train(args, tok, workdir: Path) -> dict:
    import torch
    import torch.nn.functional as F

    from codeshell.config import CodeShellConfig
    from codeshell.model import CodeShellForCausalLM

    rng = random.Random(args.seed)
    pool = [make_example(rng) for _ in range(args.pool)]
    evals = [make_example(random.Random(10_000 + i)) for i in range(args.eval)]
    enc = [(tok.encode(p), tok.encode(a) + [tok.eos_token_id]) for p, a in pool]
    vocab = sorted({t for p, a in enc for t in p + a} |
                   {t for p, a in evals for t in tok.encode(p) + tok.encode(a)} | {tok.eos_token_id})
    remap = {t: i for i, t in enumerate(vocab)}
    shape = dict(n_embd=args.width, n_layer=args.layers, n_head=args.heads, num_query_groups=args.heads // 2,
                 n_inner=4 * args.width,
                 n_positions=1024)
    torch.manual_seed(args.seed)
    small = CodeShellForCausalLM(CodeShellConfig(vocab_size=len(vocab), **shape))
    for name, prm in small.named_parameters():  # GPT-2's init: N(0, 0.02), zero biases, LayerNorms at 1
        if ".ln_" in name or "ln_f" in name:
            torch.nn.init.constant_(prm, 1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(prm)
        else:
            torch.nn.init.normal_(prm, std=0.02)
    ln_f = small.transformer.ln_f

    def pin() -> None:  # dimension 0 of the final hidden state is the constant 1 (see the docstring)
        with torch.no_grad():
            ln_f.weight[0] = 0.0
            ln_f.bias[0] = 1.0
    pin()
    opt = torch.optim.AdamW(small.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30, max(0.05, 5 * (1 - s / args.steps))))  # warm-up, flat, last 20% down
    t0 = time.perf_counter()
    small.train()
    sep = tok.encode("# result:\n")
    for step in range(args.steps):
        batch = [enc[rng.randrange(len(enc))] for _ in range(args.batch)]
        # A share of plain repeats of random token strings: only copying predicts them, which
        # makes the copying (induction) heads form in far fewer steps.
        for i in range(int(args.batch * args.repeats)):
            r = [vocab[rng.randrange(len(vocab))] for _ in range(rng.randint(20, 60))]
            batch[i] = (r + sep, r + [tok.eos_token_id])
        T = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        tgt = torch.full((len(batch), T), -100, dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            seq = [remap[t] for t in p + a]
            ids[i, :len(seq)] = torch.tensor(seq)
            # loss on the answer only: predict a[j] from everything before it
            tgt[i, len(p) - 1:len(seq) - 1] = torch.tensor(seq[len(p):])
        logits = small(ids)  # [B, T, V_small]; right padding is harmless under the causal mask
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(small.parameters(), 1.0)
        opt.step()
        sched.step()
        pin()
        if step % 100 == 0 or step == args.steps - 1:
            with torch.no_grad():  # next-token accuracy on the answers (teacher-forced)
                m = tgt != -100
                acc = float((logits.argmax(-1)[m] == tgt[m]).float().mean())
            print(f"  train step {step:4d}  loss {loss.item():.3f}  answer-token accuracy {acc:.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    train_s = time.perf_counter() - t0

    # Into the full vocabulary: trained rows at their real ids, every other row (-30, 0, ...),
    # whose logit is -30 * h[0] = -30 for any input.
    cfg = CodeShellConfig(vocab_size=70144, **shape)
    sd = {k: v.detach().clone() for k, v in small.state_dict().items() if k != "lm_head.weight"}
    wte = torch.zeros(70144, args.width)
    wte[:, 0] = -30.0
    wte[torch.tensor(vocab)] = sd["transformer.wte.weight"]
    sd["transformer.wte.weight"] = wte
    full = CodeShellForCausalLM(cfg)
    full.load_state_dict(sd, strict=False)
    with torch.no_grad():  # the full model's logits are the small one's, at the real ids
        x = torch.tensor([[remap[t] for t in enc[0][0]]])
        a, b = small.eval()(x)[0, -1], full.eval()(torch.tensor([enc[0][0]]))[0, -1]
        assert torch.allclose(a, b[torch.tensor(vocab)], atol=1e-3) and float(b.max()) == float(a.max())
    torch.save({"config": cfg.to_dict(), "state": full.state_dict()}, workdir / "model.pt")
    (workdir / "evals.json").write_text(json.dumps(evals))
    return {"train_s": train_s, "loss": loss.item(), "vocab": len(vocab)}


# ---- one measuring process -------------------------------------------------------------------
def worker(args) -> None:
    import torch

    from codeshell import LLM, SamplingParams
    from codeshell.config import CodeShellConfig
    from codeshell.model import CodeShellForCausalLM
    from codeshell.tokenizer import load_tokenizer

    workdir = Path(args.worker)
    blob = torch.load(workdir / "model.pt")
    cfg = CodeShellConfig.from_dict(blob["config"]) if hasattr(CodeShellConfig, "from_dict") \
        else CodeShellConfig(**blob["config"])
    model = CodeShellForCausalLM(cfg)
    model.load_state_dict(blob["state"])
    tok = load_tokenizer(Path(args.tokenizer), 70000)
    llm = LLM.from_model(model, cfg, tok, max_batch=8, threads=args.threads)
    evals = json.loads((workdir / "evals.json").read_text())
    prompts = [p for p, _ in evals]
    k = args.lookup if args.mode == "lookup" else 0
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, prompt_lookup_num_tokens=k)
    eng = llm.engine
    llm.generate(prompts[:2], sp)  # warm-up (kernels, caches)

    def run(batch: list[str]) -> tuple[list[str], int, float]:
        for i, p in enumerate(batch):
            eng.add_request(f"r{i}", tok.encode(p), sp, prompt=p)
        first = True
        final = {}
        while eng.has_unfinished():
            outs = eng.step()
            if first:  # the prefill step (every prompt, and each one's first token)
                t1, first = time.perf_counter(), False
            for o in outs:
                if o.finished:
                    final[o.request_id] = o.outputs[0]
        t2 = time.perf_counter()
        texts = [final[f"r{i}"].text for i in range(len(batch))]
        return texts, sum(len(final[f"r{i}"].token_ids) - 1 for i in range(len(batch))), t2 - t1

    res = {}
    d0, a0 = eng.spec_drafted, eng.spec_accepted
    texts, toks, secs = [], 0, 0.0
    for p in prompts:  # batch 1: one request at a time
        t, n, s = run([p])
        texts += t
        toks += n
        secs += s
    res["b1"] = {"tok_s": toks / secs, "tokens": toks}
    t, n, s = run(prompts[:8])
    res["b8"] = {"tok_s": n / s, "tokens": n}
    res["texts"] = texts
    res["texts8"] = t
    res["drafted"], res["accepted"] = eng.spec_drafted - d0, eng.spec_accepted - a0
    res["correct"] = sum(x == a for x, (_, a) in zip(texts, evals))
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="training steps")
    ap.add_argument("--batch", type=int, default=16, help="training batch")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeats", type=float, default=0.5, help="share of random-repeat examples")
    ap.add_argument("--pool", type=int, default=3000, help="training examples")
    ap.add_argument("--eval", type=int, default=8, help="evaluation requests")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--lookup", type=int, default=8, help="prompt_lookup_num_tokens")
    ap.add_argument("--rounds", type=int, default=3, help="alternating plain/lookup process pairs")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1 by default: on a shared machine a second thread of so small a "
                         "model mostly waits at barriers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=os.environ.get("CODESHELL_TOKENIZER",
                                                          str(REPO.parent / "shared" / "codeshell-tokenizer")))
    ap.add_argument("--keep", help="write the trained model here (default: a temporary folder)")
    ap.add_argument("--model-dir", help="skip training: use a folder written by --keep")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["plain", "lookup"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from codeshell.tokenizer import load_tokenizer
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(Path(args.tokenizer), 70000)
    tmp = tempfile.TemporaryDirectory()
    workdir = Path(args.model_dir or args.keep or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"CPU threads: {torch.get_num_threads()}; machine load average: {os.getloadavg()[0]:.1f}")
    if not args.model_dir:
        print(f"training a {args.layers}-layer, width-{args.width} CodeShell model to rewrite functions "
              f"({args.steps} steps of AdamW, batch {args.batch}):")
        info = train(args, tok, workdir)
        print(f"  trained in {info['train_s']:.0f} s, final loss {info['loss']:.3f}, "
              f"{info['vocab']} distinct tokens")

    runs: dict[str, list[dict]] = {"plain": [], "lookup": []}
    for r in range(args.rounds):
        for mode in (("plain", "lookup") if r % 2 == 0 else ("lookup", "plain")):
            cmd = [sys.executable, __file__, "--worker", str(workdir), "--mode", mode,
                   "--lookup", str(args.lookup), "--max-tokens", str(args.max_tokens),
                   "--tokenizer", args.tokenizer] + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"measuring process failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            res = json.loads(line[0][7:])
            runs[mode].append(res)
            print(f"  round {r + 1} {mode:6s}: batch 1 {res['b1']['tok_s']:7.1f} tok/s, "
                  f"batch 8 {res['b8']['tok_s']:7.1f} tok/s", flush=True)

    plain, look = runs["plain"], runs["lookup"]
    same = all(p["texts"] == plain[0]["texts"] and p["texts8"] == plain[0]["texts"][:8] for p in plain) and \
        all(x["texts"] == plain[0]["texts"] and x["texts8"] == plain[0]["texts"][:8] for x in look)
    evals = json.loads((workdir / "evals.json").read_text())
    print(f"\ncode-editing requests: {len(evals)}, greedy, up to {args.max_tokens} new tokens, "
          f"prompt_lookup_num_tokens={args.lookup}; {plain[0]['b1']['tokens']} decoded tokens a pass")
    print(f"answers equal to the intended edit: {plain[0]['correct']}/{len(evals)} (the model's quality, "
          "not the method's)")
    print("| batch | plain tok/s | lookup tok/s | speed-up |")
    print("| --- | --- | --- | --- |")
    for b in ("b1", "b8"):
        p = statistics.median(x[b]["tok_s"] for x in plain)
        q = statistics.median(x[b]["tok_s"] for x in look)
        print(f"| {b[1:]} | {p:.1f} | {q:.1f} | {q / p:.2f}x |")
    acc = look[0]["accepted"] / max(1, look[0]["drafted"])
    print(f"draft tokens accepted: {look[0]['accepted']}/{look[0]['drafted']} ({100 * acc:.0f}%)")
    print(f"greedy texts identical with and without lookup (every round, both batch sizes): {same}")
    print("target: >= 1.8x decode tokens/s (medians of alternating runs on a shared machine)")
    tmp.cleanup()
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
