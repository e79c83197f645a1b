"""A prompt's attention alone, switch against switch, alternating in one process.

What this is: the engine's prompt attention (`CacheView.attend`, engine/kv_cache.py: the native
`prefill_attention` of csrc/attention_prefill.cpp on AVX-512 CPUs; on AVX2 its AVX2 section
`prefill_attention_lanes` (8 queries in lanes, decode's bits per query; session 42), decode's kernel
one query each with CODESHELL_PREFILL_ATTN_LANES=0, or PyTorch's SDPA with
CODESHELL_PREFILL_ATTN_DECODE=0) at one shape (one row, T queries at
positions 0..T-1, as a prompt's layer calls it), timed for the default switches and for each
`--env` set (NAME=V[,NAME=V...]: set for that variant's calls only), the variants alternating in
every round so that a host whose speed drifts between minutes slows them alike. It prints, per
variant, the median / best wall ms and the median thread CPU ms of a call (CPU time: with
`--threads 1` what another process's load cannot inflate, only a time slice's cache refill), the
causal TFLOP/s (2 T^2 H D flops) at each, the time ratio against the default in the same rounds,
and whether its output has the default's bits.
What this is not: the kernel in a model (trace_prefill.py times it between the linears, whose
weights evict its caches) or a test (tests/kernels/test_prefill_attention*.py check the bits).

    flock /work/notes/bench.lock python benchmarks/bench_prefill_attn.py --shape small --threads 1 \
        --env CODESHELL_PREFILL_ATTN_T=0 --rounds 30
    flock /work/notes/bench.lock python benchmarks/bench_prefill_attn.py --model codeshell-mini --threads 1 \
        --rounds 30 --env CODESHELL_PREFILL_ATTN_LANES=0  # AVX2: the lanes kernel against decode's per query
    flock /work/notes/bench.lock python benchmarks/bench_prefill_attn.py --shape 7b \
        --env CODESHELL_PREFILL_ATTN_DECODE=0       # AVX2: the lanes kernel against SDPA
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small", help="a codeshell.config.SHAPES name, or small / mid")
    ap.add_argument("--model", default=None, help="a checkpoint's shape instead of --shape (codeshell-mini: the package's)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--env", nargs="*", default=[], help="variants: NAME=V[,NAME=V...] each")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from codeshell.config import SHAPES
    from codeshell.config import CodeShellConfig
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_quant import shape_config
    if args.model is not None:
        from codeshell.mini import MODEL_DIR
        cfg = CodeShellConfig.from_json(os.path.join(MODEL_DIR if args.model == "codeshell-mini" else args.model,
                                                     "config.json"))
    else:
        cfg = SHAPES.get(args.shape) or shape_config(args.shape)
    H, G, D, T = cfg.n_head, cfg.num_query_groups, cfg.head_dim, args.prompt_len
    g = torch.Generator().manual_seed(0)
    from codeshell.engine.kv_cache import KVCache
    from codeshell.model import _cached_sdpa
    cache = KVCache(CodeShellConfig(n_layer=1, n_embd=H * D, n_head=H, num_query_groups=G, n_positions=T + 8,
                                    vocab_size=64), 1, T + 8, torch.bfloat16)
    qkv = torch.randn(1, T, H + 2 * G, D, generator=g).bfloat16().transpose(1, 2)  # the model's views of qkv
    q, k, v = qkv[:, :H], qkv[:, H:H + G], qkv[:, H + G:]
    pos = torch.arange(T)[None]
    variants = [("default", {})] + [(e, dict(kv.split("=", 1) for kv in e.split(","))) for e in args.env]

    def call(env):
        old = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            w, c = time.perf_counter(), time.thread_time()
            view = cache.view([0], pos)
            y = view.attend(0, q, k, v, D ** -0.5)
            if y is None:  # the model's fallback: SDPA over the cache with the causal mask
                y = _cached_sdpa(0, q, k, v, None, view)
            return y, time.perf_counter() - w, time.thread_time() - c
        finally:
            for name, val in old.items():
                if val is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = val

    ys = {name: call(env)[0] for name, env in variants}
    wall = {name: [] for name, _ in variants}
    cpu = {name: [] for name, _ in variants}
    for _ in range(args.rounds):
        for name, env in variants:
            _, w, c = call(env)
            wall[name].append(w)
            cpu[name].append(c)
    flops = 2.0 * T * T * H * D
    print(f"prompt attention H {H} G {G} D {D} T {T}, {args.threads} thread(s), {args.rounds} rounds, "
          f"load avg {os.getloadavg()[0]:.2f}")
    base_w, base_c = statistics.median(wall["default"]), statistics.median(cpu["default"])
    for name, _ in variants:
        mw, bw, mc = statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name])
        same = torch.equal(ys[name].view(torch.int16), ys["default"].view(torch.int16))
        diff = (ys[name].float() - ys["default"].float()).abs().max().item()
        print(f"  {name}: wall median {mw * 1e3:.3f} ms (best {bw * 1e3:.3f}), {flops / mw / 1e12:.3f} TFLOP/s "
              f"(best {flops / bw / 1e12:.3f}); thread CPU median {mc * 1e3:.3f} ms; "
              f"x{mw / base_w:.3f} wall / x{mc / base_c:.3f} CPU of default; "
              f"{'same bits' if same else f'max |diff| {diff:.2e}'}")


if __name__ == "__main__":
    main()
