"""Batch-1 decode against llama-bench's tg, alternating in the same minutes, a read probe beside each.

What this measures (session 41 helper B, issue 14's "decode batch 1 >= 1.0x llama.cpp" and ">= 90% of the
read bound" on a host whose read level moves between ~35 and ~68 GB/s within seconds): one process loads
our checkpoint once (LLM, greedy, `--threads`), then per round, for each --ab variant (environment switches
the kernels read per call) and for llama.cpp in turn:
  * a read probe (bench_kernels.read_probe: `read_stream` over 1 GiB on huge pages, best of its loops);
  * ours: the seconds of `--tokens` + 1 greedy tokens less those of 1 (as bench_quant's decode figure),
    best of `--reps`;
  * llama.cpp: `llama-bench -p 0 -n TOKENS -r REPS -t THREADS` on the GGUF, its best sample.
Each side's ms a token and its weight bytes a token over that time as % of the probe right before it.
Medians per side over the rounds, and split by the probe's level (above / below `--split` GB/s), so the
two sides are compared where they met the same level. Not a test: prints figures.

    flock /work/notes/bench.lock python benchmarks/bench_b1_llamacpp.py /tmp/bq-small/int4 \\
        /tmp/bq-B/model-q4_0.gguf --bin /tmp/llama.cpp/build/bin --rounds 6 --ab - CODESHELL_X=0
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_kernels import read_probe, set_env  # noqa: E402


def gguf_bytes_per_token(path: str) -> int:
    """The bytes llama.cpp's decode reads a token: every tensor but the token embedding (one row a token),
    or all of them where the output head is the embedding (no output.weight)."""
    import gguf
    ts = gguf.GGUFReader(path).tensors
    tied = not any(t.name == "output.weight" for t in ts)
    return sum(int(t.n_bytes) for t in ts if tied or t.name != "token_embd.weight")


def llama_tg(bin_dir: str, gguf_path: str, threads: int, tokens: int, reps: int) -> float:
    """Seconds a token of llama-bench's tg (its best sample: codeshell.llamacpp.llama_bench, no prompt run)."""
    from codeshell import llamacpp
    return 1.0 / llamacpp.llama_bench(Path(bin_dir), gguf_path, threads, 0, tokens, reps)["decode_tps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("gguf")
    ap.add_argument("--bin", required=True, help="llama.cpp's build/bin")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--split", type=float, default=50.0, help="probe GB/s between the host's two levels")
    ap.add_argument("--ab", nargs="+", default=["-"], help="our variants: 'NAME=V,NAME=V' or '-' (none)")
    ap.add_argument("--no-llamacpp", action="store_true")
    a = ap.parse_args()

    import torch

    from codeshell import LLM, SamplingParams
    from codeshell.bench import HostLoad, weight_bytes_per_token
    from codeshell.kernels import hugepages

    base_env = dict(os.environ)
    llm = LLM(a.folder, dtype="bfloat16", threads=a.threads, max_batch=1, max_model_len=a.tokens + 64)
    ours_bytes = weight_bytes_per_token(llm.model)
    theirs_bytes = gguf_bytes_per_token(a.gguf)
    g = torch.Generator().manual_seed(1)
    prompt = [{"prompt_token_ids": torch.randint(0, 70000, (16,), generator=g).tolist()}]

    def gen(n: int) -> float:
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t

    def ours() -> float:
        t1 = min(gen(1) for _ in range(a.reps))
        tn = min(gen(a.tokens + 1) for _ in range(a.reps))
        return (tn - t1) / a.tokens

    gen(4)
    buf = hugepages.empty(((1 << 30) // 4,), torch.float32).fill_(1.0)
    print(f"bytes a token: ours {ours_bytes / 1e6:.1f} MB, llama.cpp {theirs_bytes / 1e6:.1f} MB "
          f"({theirs_bytes / ours_bytes:.3f}x ours)", flush=True)
    sides = list(a.ab) + ([] if a.no_llamacpp else ["llama.cpp"])
    res: dict[str, list[tuple[float, float, float]]] = {s: [] for s in sides}  # (probe GB/s, s a token, other cores)
    for r in range(a.rounds):
        for s in sides[r % len(sides):] + sides[:r % len(sides)]:
            p = read_probe(buf)
            with HostLoad() as load:  # llama-bench is a child: its cores are ours, not "other"
                if s == "llama.cpp":
                    sec = llama_tg(a.bin, a.gguf, a.threads, a.tokens, a.reps)
                else:
                    set_env(s, base_env)
                    sec = ours()
                    set_env("-", base_env)
            res[s].append((p, sec, load.other if load.other is not None else float("nan")))
            nb = theirs_bytes if s == "llama.cpp" else ours_bytes
            print(f"  round {r} {s}: probe {p:.1f} GB/s, {sec * 1e3:.3f} ms a token ({1 / sec:.1f} tok/s, "
                  f"{100 * nb / sec / 1e9 / p:.0f}% of the probe), {load}", flush=True)

    def summary(rows, nb):
        if not rows:
            return "-"
        ms = statistics.median(s for _, s, _ in rows) * 1e3
        pct = statistics.median(100 * nb / s / 1e9 / p for p, s, _ in rows)
        pr = statistics.median(p for p, _, _ in rows)
        return f"{ms:.3f} ms ({1e3 / ms:.1f} tok/s, {pct:.0f}% of probe {pr:.1f}; n={len(rows)})"

    print("| side | all rounds | high level (probe >= %.0f) | low level |" % a.split)
    print("| --- | --- | --- | --- |")
    for s in sides:
        nb = theirs_bytes if s == "llama.cpp" else ours_bytes
        rows = res[s]
        hi = [x for x in rows if x[0] >= a.split]
        lo = [x for x in rows if x[0] < a.split]
        print(f"| {s} | {summary(rows, nb)} | {summary(hi, nb)} | {summary(lo, nb)} |", flush=True)
    if "llama.cpp" in res:
        ll = res["llama.cpp"]
        for s in a.ab:
            # paired by round: ours / llama.cpp's speed in the same round
            rat = [lr[1] / o[1] for o, lr in zip(res[s], ll)]
            print(f"{s} / llama.cpp, paired by round: median {statistics.median(rat):.3f}x "
                  f"(min {min(rat):.3f}, max {max(rat):.3f})", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
