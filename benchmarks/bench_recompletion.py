"""IDE re-completion latency: time to first token of a ~1.9k-token FIM prompt (cold), then of
the same file with 20 characters typed at the cursor (the request a plugin user waits for).

Not a test: prints figures. Runs the engine directly (no HTTP) on random weights of a small
CodeShell shape with the real tokenizer. With the prefix cache on, the retyped request reuses
the KV of the longest common token prefix with what a slot holds (token-granular), so only
the tokens from the cursor on are computed; the same request with the cache off is the
baseline. Two cursor places: near the end of the file (the plugin's usual case: what is
after the cursor is short) and in the middle (half the file is after the cursor and must be
recomputed: the suffix's keys depend on the prefix). Each round starts with a new first line,
so its cold request finds nothing cached; the figures are medians over rounds, cache on and
off taking turns, after one uncounted warm-up round.

    python benchmarks/bench_recompletion.py [--tokens 1900] [--rounds 3] [--shape small]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # random weights; the blocks of "small" hold 19M parameters, its embedding 36M
    "tiny": dict(n_embd=128, n_layer=2, n_head=4, num_query_groups=2, n_inner=512),
    "small": dict(n_embd=512, n_layer=6, n_head=8, num_query_groups=2, n_inner=2048),
    "medium": dict(n_embd=1024, n_layer=12, n_head=16, num_query_groups=4, n_inner=4096),
}
TYPED = "helper_3(data) + hel"  # 20 characters


def fim_file(tok, n_tokens: int) -> str:
    lines = []
    while len(tok.encode("".join(lines))) < n_tokens:
        k = len(lines)
        lines.append(f"def helper_{k}(items, factor={k}):\n    total = 0\n    for x in items:\n"
                     f"        total += x * factor + {k}\n    return total\n\n")
    return "".join(lines)


def ttft(llm, rid: str, ids: list[int]) -> tuple[float, int]:
    """Seconds from submitting to the step that returns the first token; prompt tokens reused."""
    from codeshell.engine import SamplingParams
    eng = llm.engine
    t0 = time.perf_counter()
    eng.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    t1, cached = None, 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid and t1 is None and o.outputs[0].token_ids:
                t1, cached = time.perf_counter() - t0, o.num_cached_tokens
    return t1, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1900, help="FIM prompt size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokenizer", default=os.environ.get("CODESHELL_TOKENIZER",
                                                          str(REPO.parent / "shared" / "codeshell-tokenizer")))
    args = ap.parse_args()

    import torch

    from codeshell import LLM
    from codeshell.config import CodeShellConfig
    from codeshell.model import CodeShellForCausalLM
    from codeshell.prompts import fim_prompt
    from codeshell.testing import random_state_dict
    from codeshell.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(args.tokenizer), 70000)
    cfg = CodeShellConfig(vocab_size=70144, n_positions=8192, **SHAPES[args.shape])
    dtype = getattr(torch, args.dtype)
    model = CodeShellForCausalLM(cfg).to(dtype)
    model.load_state_dict(random_state_dict(cfg, 0, dtype=dtype, std=0.02), strict=False)
    n_params = sum(p.numel() for p in model.parameters())
    llm = LLM.from_model(model, cfg, tok, max_batch=4, threads=args.threads)
    eng = llm.engine
    text = fim_file(tok, args.tokens)
    # the cursor in a new function typed before the last two helpers, or before the middle one
    funcs = text.split("\n\ndef ")
    cuts = {"end": len("\n\ndef ".join(funcs[:-2])) + 2, "middle": len("\n\ndef ".join(funcs[:len(funcs) // 2])) + 2}
    print(f"shape {args.shape} ({n_params / 1e6:.0f}M parameters, "
          f"{args.dtype}), {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          "(a shared machine: figures are noisy)")
    ttft(llm, "warm", tok.encode("def f(x):\n    return x\n"))
    res: dict[tuple[str, str], list[float]] = {}
    recomputed: dict[tuple[str, str], int] = {}
    n_prompt = {}
    # Round -1 is a warm-up, not counted: the kernels measure their fastest path once per
    # weight shape and M bucket in a process, which would land in the first requests' TTFT.
    for r in range(-1, args.rounds):
        for where, cut in cuts.items():
            for cache in ((True, False) if r % 2 == 0 else (False, True)):
                eng.prefix_caching = cache
                # a new first line: nothing cached for the cold request of this round
                pre = f"# round {r} {where} {cache} {time.time_ns()}\n" + text[:cut] + "def main(data):\n    result = "
                first = tok.encode(fim_prompt(pre, text[cut:]))
                second = tok.encode(fim_prompt(pre + TYPED, text[cut:]))
                t_cold, _ = ttft(llm, f"{r}{where}{cache}a", first)
                t_re, hit = ttft(llm, f"{r}{where}{cache}b", second)
                key = (where, "on" if cache else "off")
                if r < 0:
                    continue
                res.setdefault(key + ("cold",), []).append(t_cold)
                res.setdefault(key + ("retyped",), []).append(t_re)
                recomputed[key] = len(second) - hit
                n_prompt[where] = len(second)
            eng.prefix_caching = False
            eng.slot_tokens.clear()
    print(f"\nIDE re-completion: a {n_prompt['end']}-token FIM prompt, then 20 characters typed at the cursor "
          f"(time to first token, median of {args.rounds})")
    print("| cursor | prefix cache | cold ms | retyped ms | tokens computed (retyped) |")
    print("| --- | --- | --- | --- | --- |")
    for where in cuts:
        for c in ("on", "off"):
            a = statistics.median(res[(where, c, "cold")])
            b = statistics.median(res[(where, c, "retyped")])
            print(f"| {where} | {c} | {a * 1e3:.0f} | {b * 1e3:.0f} | {recomputed[(where, c)]} of {n_prompt[where]} |")
    for where in cuts:
        on, off = (statistics.median(res[(where, c, "retyped")]) for c in ("on", "off"))
        print(f"cursor {where}: retyped TTFT {off / on:.1f}x lower with the prefix cache")


if __name__ == "__main__":
    main()
