"""`codeshell bench`: prefill and decode speed and memory of the runtime on this machine.

Measures through the engine exactly what a user gets: a prompt's prefill, decode at batch 1
and at batch N, peak memory, and the machine's memory read bandwidth, from which it prints
the decode bound (every weight is read once per decode step). Random weights of a named
shape need no download; speed does not depend on weight values.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from .config import SHAPES, CodeShellConfig


def fill_random_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter with N(0, std) values (LayerNorm weights 1) without a randn per tensor.

    Generating 7B normal samples takes minutes on two cores; tiling one 16M-value random block
    takes seconds, and speed does not depend on the values.
    """
    g = torch.Generator().manual_seed(seed)
    p0 = next(model.parameters())
    block = (torch.randn(1 << 24, generator=g) * std).to(p0.dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            flat = p.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                n = min(block.numel(), flat.numel() - start)
                flat[start:start + n].copy_(block[:n])


def random_model(cfg: CodeShellConfig, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    from .weights import build_empty
    m = build_empty(cfg, dtype, device)
    fill_random_(m)
    return m


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-N memory read bandwidth in GB/s (a reduction over a buffer larger than any cache)."""
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes read per decode step: every parameter once (tied tensors once), minus embedding rows."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or name.endswith("wpe.weight"):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    for name, b in model.named_buffers():  # quantized weights live in buffers
        total += b.numel() * b.element_size()
    return total


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure_engine(llm, prompt_len: int, decode_tokens: int, batch: int) -> dict:
    """Prefill tokens/s, decode tokens/s at batch 1 and aggregate at `batch`, through the engine."""
    from .engine import SamplingParams
    eng = llm.engine
    vocab = llm.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(0, min(vocab, 60000), (n,), generator=g).tolist()

    def run(prompts, max_tokens):
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for i, p in enumerate(prompts):
            eng.add_request(f"bench-{time.monotonic_ns()}-{i}", p, sp)
        stamps = []
        while eng.has_unfinished():
            eng.step()
            stamps.append(time.perf_counter())
        return stamps

    run([prompt(8)], 2)  # warm-up
    t0 = time.perf_counter()
    run([prompt(prompt_len)], 1)
    prefill_s = time.perf_counter() - t0
    res = {"prompt_len": prompt_len, "prefill_s": prefill_s, "prefill_tok_s": prompt_len / prefill_s}
    for b in sorted({1, batch}):
        stamps = run([prompt(16) for _ in range(b)], decode_tokens + 1)
        # The first step of the run prefills and samples token 1; the rest are pure decode steps.
        dt = stamps[-1] - stamps[0]
        res[f"decode_b{b}_tok_s"] = b * decode_tokens / dt
    return res


def run_bench(model: str | None, shape: str | None, dtype: str = "bfloat16", device: str = "cpu",
              prompt_len: int = 512, decode_tokens: int = 16, batch: int = 8, threads: int | None = None,
              json_out: Path | None = None, print_table: bool = True) -> dict:
    from .llm import LLM, default_threads
    from .weights import resolve_dtype
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if shape is not None:
        if shape not in SHAPES:
            raise ValueError(f"unknown --shape {shape!r}; choose one of {', '.join(SHAPES)}")
        cfg = SHAPES[shape]
        llm = LLM.from_model(random_model(cfg, resolve_dtype(dtype), device), cfg, max_batch=max(batch, 1),
                             threads=threads)
        what = f"random {shape} ({cfg.num_parameters() / 1e9:.2f} B parameters)"
    else:
        llm = LLM(model, dtype=dtype, device=device, max_batch=max(batch, 1), threads=threads)
        cfg = llm.config
        what = str(model)
    load_s = time.perf_counter() - t0
    res = {"model": what, "dtype": dtype, "threads": threads, "load_s": load_s}
    res.update(measure_engine(llm, min(prompt_len, llm.max_model_len - 2), decode_tokens, batch))
    res["peak_rss_gib"] = peak_rss_gib()
    bw = read_bandwidth_gbs()
    wb = weight_bytes_per_token(llm.model)
    res.update({"read_bandwidth_gbs": bw, "weight_gb": wb / 1e9, "decode_bound_tok_s": bw * 1e9 / wb})
    res["decode_fraction_of_bound"] = res["decode_b1_tok_s"] / res["decode_bound_tok_s"]
    if batch > 1:
        res["batch_speedup"] = res[f"decode_b{batch}_tok_s"] / res["decode_b1_tok_s"]
    if print_table:
        _print(res, batch)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(res, indent=2))
    return res


def _print(r: dict, batch: int) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"codeshell bench: {r['model']}, {r['dtype']}, {r['threads']} threads")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("load / init", f"{r['load_s']:.1f} s")
    t.add_row("peak memory (RSS)", f"{r['peak_rss_gib']:.2f} GiB")
    t.add_row(f"prefill ({r['prompt_len']} tokens)", f"{r['prefill_tok_s']:.1f} tokens/s")
    t.add_row("decode, batch 1", f"{r['decode_b1_tok_s']:.2f} tokens/s")
    if batch > 1:
        t.add_row(f"decode, batch {batch} (aggregate)",
                  f"{r[f'decode_b{batch}_tok_s']:.2f} tokens/s ({r['batch_speedup']:.1f}x batch 1)")
    t.add_row("memory read bandwidth", f"{r['read_bandwidth_gbs']:.1f} GB/s")
    t.add_row("decode bound (bandwidth / weight bytes)",
              f"{r['decode_bound_tok_s']:.2f} tokens/s (reached {100 * r['decode_fraction_of_bound']:.0f}%)")
    Console().print(t)
