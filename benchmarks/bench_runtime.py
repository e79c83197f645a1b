"""Runtime benchmark: codeshell's engine against plain transformers on the same weights.

Writes a random-weight checkpoint of the chosen shape (default: the real CodeShell-7B shape,
bfloat16, sharded safetensors) to a temporary folder, then measures, one after the other in
separate processes (two bf16 copies of 7B do not fit in 24 GiB):
  - codeshell: `LLM(folder)` load time, peak memory, prefill tokens/s for a `--prompt-len`
    prompt, decode tokens/s at batch 1 and aggregate at `--batch`, through the engine;
  - transformers: `AutoModelForCausalLM.from_pretrained(folder)` + `.generate()`, the same figures;
and prints both with their ratios, the measured memory bandwidth and the decode bound.

    python benchmarks/bench_runtime.py                      # 7B shape, ~30-60 min on 2 cores
    python benchmarks/bench_runtime.py --shape 1b --prompt-len 128

Not a test: it prints figures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = ("Reference figures from the issue, measured on the Intel AVX-512/AMX machine kind (not "
             "necessarily this one): official modeling code in transformers 58.6 prompt tok/s, 0.96 decode "
             "tok/s; llama.cpp BF16 11.4 and 1.10.")


def write_random_checkpoint(shape: str, out: Path, shard_gb: float = 2.0) -> Path:
    """A sharded bf16 safetensors checkpoint of random weights, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    from codeshell.config import SHAPES
    from codeshell.model import CodeShellForCausalLM
    cfg = SHAPES[shape]
    with torch.device("meta"):
        meta = CodeShellForCausalLM(cfg)
    block = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    shards, cur, size, wm = [], {}, 0, {}

    def flush():
        nonlocal cur, size
        if cur:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(cur, str(out / name), metadata={"format": "pt"})
            shards.append((name, list(cur)))
            cur, size = {}, 0

    for name, p in meta.named_parameters():
        if name == "lm_head.weight":
            continue  # tied
        if ".ln_" in name or "ln_f" in name:
            t = torch.ones(p.shape, dtype=torch.bfloat16) if name.endswith("weight") else torch.zeros(p.shape, dtype=torch.bfloat16)
        else:
            n = p.numel()
            t = block.repeat((n + block.numel() - 1) // block.numel())[:n].view(p.shape).clone()
        cur[name] = t
        size += t.numel() * 2
        if size >= shard_gb * 1e9:
            flush()
    flush()
    total = len(shards)
    for i, (old, names) in enumerate(shards):
        new = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        (out / old).rename(out / new)
        wm.update({n: new for n in names})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_dtype": "bfloat16"}, indent=2))
    return out


OURS = """
import json, sys
from codeshell.bench import run_bench
r = run_bench(model=sys.argv[1], shape=None, dtype="bfloat16", prompt_len=int(sys.argv[2]),
              decode_tokens=int(sys.argv[3]), batch=int(sys.argv[4]), threads=int(sys.argv[5]), print_table=False)
print("RESULT " + json.dumps(r))
"""

THEIRS = """
import json, resource, sys, time
import torch
import codeshell  # registers the CodeShell architecture with transformers
from transformers import AutoModelForCausalLM
from codeshell.bench import read_bandwidth_gbs
ckpt, P, D, B, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
load = time.perf_counter() - t
g = torch.Generator().manual_seed(0)
def gen(batch, plen, new):
    ids = torch.randint(0, 60000, (batch, plen), generator=g)
    t = time.perf_counter()
    with torch.inference_mode():
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0)
    return time.perf_counter() - t
gen(1, 8, 2)
r = {"load_s": load}
r["prefill_tok_s"] = P / gen(1, P, 1)
for b in sorted({1, B}):
    one = gen(b, 16, 1)
    full = gen(b, 16, D + 1)
    r[f"decode_b{b}_tok_s"] = b * D / (full - one)
r["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT " + json.dumps(r))
"""


def run(code: str, *args) -> dict:
    env = {**os.environ, "CODESHELL_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark subprocess failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=["7b", "1b", "tiny"])
    ap.add_argument("--checkpoint", help="use this checkpoint folder instead of writing random weights")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", help="write all figures here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="codeshell-bench-") as tmp:
        ckpt = a.checkpoint
        if ckpt is None:
            t = time.perf_counter()
            ckpt = str(write_random_checkpoint(a.shape, Path(tmp)))
            print(f"wrote random {a.shape} checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
        args = (ckpt, a.prompt_len, a.decode_tokens, a.batch, a.threads)
        ours = run(OURS, *args)
        print("codeshell:", json.dumps(ours), flush=True)
        theirs = None if a.skip_transformers else run(THEIRS, *args)
        if theirs:
            print("transformers:", json.dumps(theirs), flush=True)
    report(ours, theirs, a)


def report(ours: dict, theirs: dict | None, a) -> None:
    from rich.console import Console
    from rich.table import Table
    rows = [("load", "load_s", "s", False), ("peak memory (RSS)", "peak_rss_gib", "GiB", False),
            (f"prefill ({a.prompt_len} tokens)", "prefill_tok_s", "tok/s", True),
            ("decode, batch 1", "decode_b1_tok_s", "tok/s", True),
            (f"decode, batch {a.batch} (aggregate)", f"decode_b{a.batch}_tok_s", "tok/s", True)]
    t = Table(title=f"CodeShell {a.shape} shape, bfloat16, {a.threads} threads")
    for c in ("measure", "codeshell", "transformers", "codeshell / transformers"):
        t.add_column(c, justify="right" if c != "measure" else "left")
    for label, key, unit, higher_better in rows:
        o = ours.get(key)
        th = theirs.get(key) if theirs else None
        ratio = ""
        if o and th:
            ratio = f"{o / th:.2f}x" if higher_better else f"{th / o:.2f}x less" if key != "load_s" else f"{th / o:.2f}x faster"
        t.add_row(label, f"{o:.2f} {unit}" if o is not None else "-", f"{th:.2f} {unit}" if th is not None else "-", ratio)
    Console().print(t)
    print(f"memory read bandwidth {ours['read_bandwidth_gbs']:.1f} GB/s; weights {ours['weight_gb']:.2f} GB -> "
          f"decode bound {ours['decode_bound_tok_s']:.2f} tok/s; codeshell batch-1 decode reaches "
          f"{100 * ours['decode_fraction_of_bound']:.0f}% of it; batch-{a.batch} aggregate is "
          f"{ours.get('batch_speedup', float('nan')):.1f}x batch 1.")
    print(REFERENCE)
    if a.json:
        Path(a.json).write_text(json.dumps({"codeshell": ours, "transformers": theirs}, indent=2))


if __name__ == "__main__":
    main()
