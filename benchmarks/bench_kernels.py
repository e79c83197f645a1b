"""Benchmark codeshell.kernels.linear against torch on CodeShell-7B's linear shapes.

Prints, per shape and M: time, effective weight bandwidth (GB/s of packed weight bytes read
once), GFLOP/s (2*M*N*K), and the ratio of torch's bf16 F.linear time to ours (>1 = we are
faster), all measured in the same run. Baselines: torch F.linear with bf16 weights and x
(what a bf16 model does today) and with fp32 weights and x; for int8/int4 also torch's own
weight-only ops (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu).

    python benchmarks/bench_kernels.py                       # all shapes, M=1,8,512, bf16
    python benchmarks/bench_kernels.py --kinds bf16 int8 int4 --m 1 8 --shapes c_fc
    python benchmarks/bench_kernels.py --attention      # decode attention vs SDPA, 7B heads
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codeshell.kernels import available, linear, prepack, quantize_int4, quantize_int8, set_num_threads  # noqa: E402

SHAPES = {  # name: (N = out_features, K = in_features, has_bias) for CodeShell-7B
    "c_attn": (6144, 4096, True),
    "attn.c_proj": (4096, 4096, True),
    "c_fc": (16384, 4096, True),
    "mlp.c_proj": (4096, 16384, True),
    "lm_head": (70144, 4096, False),
}


CLOCK = time.perf_counter  # --per-core switches to time.thread_time (CPU time of this thread)


def timeit(fn, budget_s: float, min_reps: int = 3, max_reps: int = 20) -> float:
    """Fastest of several calls after one warm-up call (stops after ~budget_s). The minimum,
    not the median: on a shared machine the slower samples measure the other jobs."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > budget_s:  # slow call (e.g. torch bf16 prefill): one more is enough
        min_reps = 1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return min(times)


def torch_int8(w: torch.Tensor):
    pw = quantize_int8(w)
    scales = pw.scales.to(torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, pw.data, scales)


def torch_int4(w: torch.Tensor, group: int):
    # torch's packed int4: int32 [N, K] of values 0..15, w = (q - 8) * scale + zero, bf16 scale/zero [K/G, N, 2]
    pw = quantize_int4(w, group, symmetric=False)
    from codeshell.kernels import unpack_nibbles

    q = unpack_nibbles(pw.data).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([pw.scales.t(), pw.offsets.t()], dim=-1).to(torch.bfloat16).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)


def attention(budget: float) -> None:
    """One decode step's attention for one 7B layer (32 heads, 8 KV groups, head dim 128, bf16
    cache): ours (read from the cache slots) vs torch SDPA on the gathered keys and values."""
    from codeshell.kernels import decode_attention
    h, g, d, slots_n = 32, 8, 128, 8
    print(f"{'batch':>5} {'keys':>5} {'ours ms':>8} {'SDPA ms':>8} {'x':>6} {'cache GB/s (ours)':>18}")
    for length in (600, 2000):
        kc, vc = (torch.randn(slots_n, g, length, d).to(torch.bfloat16) for _ in range(2))
        for b in (1, 8):
            q = torch.randn(b, h, 1, d).to(torch.bfloat16)
            slots, lens = torch.arange(b), torch.full((b,), length)
            ours = timeit(lambda: decode_attention(q, kc, vc, slots, lens, d ** -0.5), budget)
            k, v = kc[:b], vc[:b]
            sdpa = timeit(lambda: F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5, enable_gqa=True), budget)
            nbytes = 2 * b * g * length * d * 2
            print(f"{b:5d} {length:5d} {ours * 1e3:8.2f} {sdpa * 1e3:8.2f} {sdpa / ours:5.1f}x {nbytes / ours / 1e9:18.1f}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 8, 512])
    ap.add_argument("--kinds", nargs="+", default=["bf16"], choices=["bf16", "int8", "int4"])
    ap.add_argument("--group", type=int, default=128, help="int4 group size")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    ap.add_argument("--no-torch-bf16-prefill", action="store_true",
                    help="skip torch bf16 F.linear for M > 16 (it is ~4x slower than fp32 here)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--attention", action="store_true", help="only the decode attention kernel vs SDPA")
    ap.add_argument("--per-core", action="store_true",
                    help="1 thread, timed by this thread's CPU time: kernel efficiency without the "
                         "scheduling noise of a shared machine (memory contention still counts)")
    args = ap.parse_args()

    global CLOCK
    if args.per_core:
        CLOCK = time.thread_time
        args.threads = 1
    threads = set_num_threads(args.threads)
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {threads}, native kernels: {available()}, "
          f"clock: {'thread CPU time' if args.per_core else 'wall'}, best of several calls")
    if args.attention:
        return attention(args.budget)
    print(f"{'shape':12} {'M':>4} {'impl':22} {'ms':>9} {'GB/s':>7} {'GFLOP/s':>8} {'vs torch bf16':>13}")
    gen = torch.Generator().manual_seed(0)
    for name in args.shapes:
        n, k, has_bias = SHAPES[name]
        w = torch.randn(n, k, generator=gen) * 0.02
        bias = torch.randn(n, generator=gen) * 0.02 if has_bias else None
        wb = w.to(torch.bfloat16)
        bb = None if bias is None else bias.to(torch.bfloat16)
        packs = {"bf16": prepack(w)}
        if "int8" in args.kinds:
            packs["int8"] = quantize_int8(w)
        if "int4" in args.kinds:
            packs["int4"] = quantize_int4(w, args.group, symmetric=False)
        for m in args.m:
            x = torch.randn(m, k, generator=gen)
            xb = x.to(torch.bfloat16)
            flops = 2.0 * m * n * k
            rows: list[tuple[str, float, int]] = []
            if not (m > 16 and args.no_torch_bf16_prefill):
                rows.append(("torch F.linear bf16", timeit(lambda: F.linear(xb, wb, bb), args.budget), wb.numel() * 2))
            wf = w  # fp32 weights: the upper bound of what MKL gives without our packing
            rows.append(("torch F.linear fp32", timeit(lambda: F.linear(x, wf, bias), args.budget), wf.numel() * 4))
            for kind in args.kinds:
                pw = packs[kind]
                label = kind if kind != "int4" else f"int4 g{args.group}"
                rows.append((f"ours {label}", timeit(lambda: linear(xb, pw, bb), args.budget), pw.nbytes))
                if kind == "int8":
                    f8 = torch_int8(w)
                    rows.append(("torch _weight_int8pack", timeit(lambda: f8(xb), args.budget), pw.nbytes))
                if kind == "int4":
                    f4 = torch_int4(w, args.group)
                    rows.append(("torch _weight_int4pack", timeit(lambda: f4(xb), args.budget), pw.nbytes))
            base = rows[0][1] if rows[0][0] == "torch F.linear bf16" else None
            for label, t, nbytes in rows:
                ratio = f"{base / t:12.2f}x" if base else f"{'-':>13}"
                print(f"{name:12} {m:4d} {label:22} {t * 1e3:9.2f} {nbytes / t / 1e9:7.1f} "
                      f"{flops / t / 1e9:8.1f} {ratio}", flush=True)
        del packs, w, wb


if __name__ == "__main__":
    main()
