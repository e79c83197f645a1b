"""Benchmark codeshell.kernels.linear against torch on CodeShell-7B's linear shapes.

Prints the CPU flags and the kernel ISA level first, then per shape and M: time, effective
weight bandwidth (GB/s of packed weight bytes read once), GFLOP/s (2*M*N*K), the ratio of
torch's bf16 F.linear time to ours (>1 = we are faster) and the kernel path that ran
(`ops.plan`: "<isa>:<kernel>"), all measured in the same run. Baselines: torch F.linear with
bf16 weights and x (what a bf16 model does today) and with fp32 weights and x; for int8/int4
also torch's own weight-only ops (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu).
At the end, the targets of issue 14 as ratios against same-run baselines:
  * prompt (M = 512): TFLOP/s as % of the bf16 peak = the best of torch's bf16 matmul on these
    shapes and our AMX micro-kernel on L2-resident tiles (`bf16_peak`);
  * decode (M = 1): % of the bound from the read bandwidth measured here (weight bytes / GB/s);
  * batch 8: aggregate rows/s at M = 8 over M = 1 (8 * t(1) / t(8)).
Single layers only (no model is built).

    python benchmarks/bench_kernels.py                       # all shapes, M=1,8,512, bf16
    python benchmarks/bench_kernels.py --kinds bf16 int8 int4 --shapes c_attn attn.c_proj c_fc mlp.c_proj
    python benchmarks/bench_kernels.py --kinds bf16 int8 int4 --m 1 8 --shapes c_fc
    python benchmarks/bench_kernels.py --attention      # decode attention vs SDPA, 7B heads
    python benchmarks/bench_kernels.py --sweep 3 --no-head --kinds int8 --m 1 2 --ab - CODESHELL_Q8_PANEL_MIN_M=1
                                  # cold A/B: kernel variants (env switches read per call) alternating
                                  # in rounds with a plain read probe, medians (GB/s, % of the probe,
                                  # speed against the first variant in the same round)
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
MODEL_SHAPES = {  # --model: the same five linears of bench_quant.py's shapes
    "7b": dict(SHAPES),
    # bench_quant `shape_config("mid")`: n_embd 1536, 12 heads of 128, 4 kv groups, n_inner 6144
    "mid": {"c_attn": (1536 + 2 * 4 * 128, 1536, True), "attn.c_proj": (1536, 1536, True),
            "c_fc": (6144, 1536, True), "mlp.c_proj": (1536, 6144, True), "lm_head": (70144, 1536, False)},
    # bench_quant `shape_config("small")`: n_embd 1024, 8 heads of 128, 2 kv groups, n_inner 4096
    "small": {"c_attn": (1024 + 2 * 2 * 128, 1024, True), "attn.c_proj": (1024, 1024, True),
              "c_fc": (4096, 1024, True), "mlp.c_proj": (1024, 4096, True), "lm_head": (70144, 1024, False)},
}


CLOCK = time.perf_counter  # --per-core switches to time.thread_time (CPU time of this thread)


def timeit(fn, budget_s: float, min_reps: int = 3, max_reps: int = 20, before=None) -> float:
    """Fastest of several calls after one warm-up call (stops after ~budget_s). The minimum,
    not the median: on a shared machine the slower samples measure the other jobs.
    `before` runs ahead of each timed call, outside the timing (the cache flush)."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > budget_s:  # slow call (e.g. torch bf16 prefill): one more is enough
        min_reps = 1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        if before is not None:
            before()
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return min(times)


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if unknown."""
    import glob
    best = 0
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        txt = open(f).read().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        best = max(best, int(txt.rstrip("KMG")) * mult)
    return best or 32 << 20


class Flush:
    """Evicts the caches before a timed decode call: a real decode reads each layer's weight
    once per token from memory (42 layers of 7B do not fit any cache), but the same single
    layer called again is served from the last-level cache when it fits (480 MiB of L3 on the
    machine of the issue-14 figures: every 7B layer fits). Writes a buffer of 1.5x the LLC."""

    def __init__(self, enabled: bool):
        self.buf = torch.zeros(int(1.5 * llc_bytes()) // 4) if enabled else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.add_(1.0)


def pack(kind: str, w: torch.Tensor, group: int, symmetric: bool = False):
    """Our packed weight of one kind for w [N, K] (int4: groups of `group`, with zero points
    unless `symmetric`)."""
    if kind == "bf16":
        return prepack(w)
    return quantize_int8(w) if kind == "int8" else quantize_int4(w, group, symmetric=symmetric)


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


def read_bandwidth(budget: float) -> float:
    """GB/s of a plain streaming read from memory (sum of an fp32 tensor of 2x the LLC, at
    least 256 MiB, so a pass finds nothing in cache), with the threads set: the bound for
    decode, which reads each weight once."""
    t = torch.ones(max(64 << 20, 2 * llc_bytes() // 4))
    secs = timeit(lambda: t.sum(), budget, min_reps=3)
    n = t.numel() * 4
    del t
    return n / secs / 1e9


def bf16_peak(repeats: int) -> dict[str, float]:
    """TFLOP/s of our AMX-BF16 micro-kernel (`codeshell.bench.amx_tile_tflops`): `tiles` with the
    tile loads, `tmul` the tdpbf16ps alone. Empty without AMX."""
    from codeshell.bench import amx_tile_tflops
    out = {name: amx_tile_tflops(loads, repeats) for name, loads in (("tiles", True), ("tmul", False))}
    return {k: v for k, v in out.items() if v is not None}


def cpu_line() -> str:
    from codeshell.kernels import _ext, ops
    feats = _ext.features()
    flags = " ".join(k for k, v in feats.items() if v is True and k not in ("os_avx512", "compiled_avx512"))
    lvl = ops.isa_level()
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    cap = os.environ.get("CODESHELL_KERNEL_ISA")
    return (f"cpu: {model}; flags: {flags}; kernel ISA: {ops.ISA_LEVELS[lvl] if lvl >= 0 else 'none (torch)'}"
            + (f" (capped by CODESHELL_KERNEL_ISA={cap})" if cap else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], choices=list(SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 8, 512])
    ap.add_argument("--kinds", nargs="+", default=["bf16"], choices=["bf16", "int8", "int4"])
    ap.add_argument("--group", type=int, default=128, help="int4 group size")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    ap.add_argument("--no-torch-bf16-prefill", action="store_true",
                    help="skip torch bf16 F.linear for M > 16 (on an AVX2-only CPU it is ~4x slower than fp32)")
    ap.add_argument("--no-torch-fp32", action="store_true", help="skip torch fp32 F.linear")
    ap.add_argument("--no-torch-quant", action="store_true", help="skip torch's int8/int4 weight-only ops")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warm", action="store_true",
                    help="do not evict the caches before decode-sized calls (M <= 16): the weight may then be "
                         "read from the LLC, not memory")
    ap.add_argument("--attention", action="store_true", help="only the decode attention kernel vs SDPA")
    ap.add_argument("--model", default="7b", choices=list(MODEL_SHAPES),
                    help="whose linear shapes: CodeShell-7B or bench_quant.py's mid (0.41B, width 1536) or small (width 1024) shape")
    ap.add_argument("--direct", action="store_true",
                    help="time our kernels' native entry point for the planned path on fp32 x (ops._compute: "
                         "what the C++ decode step calls) instead of linear() on bf16 x with its Python dispatch")
    ap.add_argument("--sweep", type=int, default=0, metavar="LAYERS",
                    help="instead: one decode step's linears, LAYERS layers of the --model shape (each its own "
                         "weights) then lm_head, in model order, for each --kinds and --m: time per step against "
                         "the bound (weight bytes / read bandwidth); the kernels' share of a decode step")
    ap.add_argument("--ab", nargs="+", default=None, metavar="ENV=V[,ENV=V]",
                    help="with --sweep: variants (environment settings the kernels read per call, '-' for none) "
                         "timed in turn, --rounds rounds in rotating order, each round with a plain read probe "
                         "(read_stream over 1 GiB on huge pages); medians of GB/s and of %% of the probe")
    ap.add_argument("--rounds", type=int, default=5, help="--ab rounds")
    ap.add_argument("--no-head", action="store_true", help="--sweep without lm_head (the blocks' linears only)")
    ap.add_argument("--symmetric", action="store_true", help="int4 without offsets (default: with)")
    ap.add_argument("--per-core", action="store_true",
                    help="1 thread, timed by this thread's CPU time: kernel efficiency without the "
                         "scheduling noise of a shared machine (memory contention still counts)")
    args = ap.parse_args()

    global CLOCK
    SHAPES.update(MODEL_SHAPES[args.model])  # the same five names; summary() reads SHAPES too
    if args.per_core:
        CLOCK = time.thread_time
        args.threads = 1
    threads = set_num_threads(args.threads)
    from codeshell.kernels import _ext, ops
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {threads}, native kernels: {available()}, "
          f"clock: {'thread CPU time' if args.per_core else 'wall'}, best of several calls")
    print(cpu_line())
    try:
        print(f"load average: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    except OSError:
        pass
    if args.attention:
        return attention(args.budget)
    if args.sweep and args.ab:
        return sweep_ab(args)
    bw = read_bandwidth(args.budget)
    if args.sweep:
        return sweep(args, bw)
    peak = bf16_peak(4)
    flush = Flush(not args.warm)
    print(f"shapes: {args.model}; decode calls (M <= {ops.DECODE_MAX_M}) {'warm' if args.warm else f'cold: caches evicted before each ({llc_bytes() >> 20} MiB LLC)'}")
    print(f"read bandwidth: {bw:.1f} GB/s (fp32 sum over 2x the LLC)"
          + "".join(f"; AMX bf16 micro-kernel ({k}): {v:.2f} TFLOP/s" for k, v in peak.items()))
    print(f"{'shape':12} {'M':>4} {'impl':22} {'ms':>9} {'GB/s':>7} {'%read':>6} {'GFLOP/s':>8} {'vs torch bf16':>13}  path")
    gen = torch.Generator().manual_seed(0)
    results: dict[tuple[str, str, int], float] = {}  # (shape, label, M) -> seconds
    sizes: dict[tuple[str, str], int] = {}
    for name in args.shapes:
        n, k, has_bias = SHAPES[name]
        w = torch.randn(n, k, generator=gen) * 0.02
        bias = torch.randn(n, generator=gen) * 0.02 if has_bias else None
        wb = w.to(torch.bfloat16)
        bb = None if bias is None else bias.to(torch.bfloat16)
        packs = {kind: pack(kind, w, args.group) for kind in args.kinds}
        for m in args.m:
            x = torch.randn(m, k, generator=gen)
            xb = x.to(torch.bfloat16)
            flops = 2.0 * m * n * k
            rows: list[tuple[str, float, int, str]] = []
            fl = flush if m <= ops.DECODE_MAX_M else None  # the streaming decode kernels' range

            def tm(fn):
                return timeit(fn, args.budget, before=fl)
            if not (m > 16 and args.no_torch_bf16_prefill):
                rows.append(("torch F.linear bf16", tm(lambda: F.linear(xb, wb, bb)), wb.numel() * 2, ""))
            if not args.no_torch_fp32:
                rows.append(("torch F.linear fp32", tm(lambda: F.linear(x, w, bias)), w.numel() * 4, ""))
            for kind in args.kinds:
                pw = packs[kind]
                label = kind if kind != "int4" else f"int4 g{args.group}"
                linear(xb, pw, bb)  # a prefill's first call measures its candidates (ops.plan)
                path = ops.plan(pw, m, xb.dtype)
                if args.direct:
                    mod, xf = _ext.get(), x.float().contiguous()
                    rows.append((f"ours {label}", tm(lambda: ops._compute(path, mod, xf, pw, bias)), pw.nbytes, path))
                else:
                    rows.append((f"ours {label}", tm(lambda: linear(xb, pw, bb)), pw.nbytes, path))
                sizes[(name, f"ours {label}")] = pw.nbytes
                if kind == "int8" and not args.no_torch_quant:
                    f8 = torch_int8(w)
                    rows.append(("torch _weight_int8pack", tm(lambda: f8(xb)), pw.nbytes, ""))
                if kind == "int4" and not args.no_torch_quant:
                    f4 = torch_int4(w, args.group)
                    rows.append(("torch _weight_int4pack", tm(lambda: f4(xb)), pw.nbytes, ""))
            base = rows[0][1] if rows[0][0] == "torch F.linear bf16" else None
            for label, t, nbytes, path in rows:
                results[(name, label, m)] = t
                ratio = f"{base / t:12.2f}x" if base else f"{'-':>13}"
                print(f"{name:12} {m:4d} {label:22} {t * 1e3:9.3f} {nbytes / t / 1e9:7.1f} {100 * nbytes / t / 1e9 / bw:5.0f}% "
                      f"{flops / t / 1e9:8.1f} {ratio}  {path}", flush=True)
        del packs, w, wb
    summary(args, results, sizes, bw, peak)


def sweep(args, bw: float) -> None:
    """--sweep: the linears of one decode step (no attention, no norms), timed as a whole: each
    layer has its own weights, so, as in a model, a weight was last read one step ago."""
    from codeshell.kernels import _ext, ops
    mod, gen = _ext.get(), torch.Generator().manual_seed(0)
    order = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    print(f"sweep: {args.sweep} layers of {args.model} ({', '.join(order)}) + lm_head, native entry points, fp32 x")
    print(f"{'kind':10} {'M':>4} {'ms/step':>9} {'bound ms':>9} {'% of bound':>10} {'rows/s vs M=1':>14}")
    for kind in args.kinds:
        layers = []
        for name in order * args.sweep + ["lm_head"]:
            n, k, has_bias = SHAPES[name]
            w = torch.randn(n, k, generator=gen) * 0.02
            pw = pack(kind, w, args.group)
            layers.append((pw, torch.randn(n, generator=gen) * 0.02 if has_bias else None))
            del w
        nbytes = sum(pw.nbytes for pw, _ in layers)
        t1 = None
        for m in args.m:
            xs = {k_: torch.randn(m, k_, generator=gen) for k_ in {pw.in_features for pw, _ in layers}}
            calls = []
            for pw, b in layers:
                path = ops.plan(pw, m, torch.bfloat16 if kind == "bf16" else torch.float32)
                x = xs[pw.in_features] if kind != "bf16" or not path.startswith(("amx", "avx512_bf16")) \
                    else xs[pw.in_features].to(torch.bfloat16)
                calls.append((path, x, pw, b))

            def step():
                for path, x, pw, b in calls:
                    ops._compute(path, mod, x, pw, b)
            t = timeit(step, max(args.budget, 1.0), min_reps=5)
            t1 = t if m == 1 else t1
            bound = nbytes / bw / 1e9
            agg = f"{m * t1 / t:13.2f}x" if t1 else f"{'-':>14}"
            print(f"{kind:10} {m:4d} {t * 1e3:9.2f} {bound * 1e3:9.2f} {100 * bound / t:9.1f}% {agg}", flush=True)
        del layers


def sweep_layers(args, kind: str, gen: torch.Generator) -> list:
    """--sweep's weights: LAYERS layers of the four block linears (each its own weights) in
    model order, then lm_head unless --no-head; packed data on huge pages, as a model loads them
    (kernels/hugepages.py). [(name, PackedWeight, bias or None)]."""
    import dataclasses
    from codeshell.kernels import hugepages
    order = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    layers = []
    for name in order * args.sweep + ([] if args.no_head else ["lm_head"]):
        n, k, has_bias = SHAPES[name]
        w = torch.randn(n, k, generator=gen) * 0.02
        pw = pack(kind, w, args.group, args.symmetric)
        if kind != "bf16":
            pw = dataclasses.replace(pw, data=hugepages.resident(pw.data))
        layers.append((name, pw, torch.randn(n, generator=gen) * 0.02 if has_bias else None))
        del w
    return layers


def set_env(variant: str, base: dict[str, str]) -> None:
    """Apply one --ab variant: the environment becomes `base` plus 'NAME=V,NAME=V' (or '-': nothing).
    Also used by bench_decode_step.py --profile and bench_decode_phases.py."""
    os.environ.clear()
    os.environ.update(base)
    for kv in variant.split(","):
        if kv and kv != "-":
            name, _, val = kv.partition("=")
            os.environ[name] = val


def read_probe(buf: torch.Tensor) -> float:
    """GB/s of the native plain read (`read_stream`) over `buf` (a buffer on huge pages larger
    than the LLC, as the weights are placed): best of 3 passes after one, with the 2 KiB prefetch and
    without (session 39). Also used by bench_decode_phases.py."""
    from codeshell.kernels import _ext
    mod = _ext.get()
    best = float("inf")
    for pf in (2048, 0):  # with the decode kernels' prefetch and without (read_probe.h; Zen 4 reads faster without)
        mod.read_stream(buf, 1, pf)
        for _ in range(3):  # not timeit(..., 0.0, 3, 3): a zero budget makes that one timed pass
            t = time.perf_counter()
            mod.read_stream(buf, 1, pf)
            best = min(best, time.perf_counter() - t)
    return buf.numel() * buf.element_size() / best / 1e9


def sweep_ab(args) -> None:
    """--sweep with --ab: one decode step's linears, cold (the step's weights exceed the LLC),
    for each variant in turn, rounds rotating the order, a plain read probe in every round.
    A variant's step time is the best of 3 steps in a round; its GB/s = step bytes / time; its
    % of the probe is against the same round's probe. Medians over the rounds, per shape too
    (the sum of that shape's call times within the best step), and of the speed against the first
    variant in the same round (the host's bandwidth moves within minutes: the paired ratio is the
    figure to trust)."""
    import statistics
    from codeshell.kernels import _ext, hugepages, ops
    mod, gen = _ext.get(), torch.Generator().manual_seed(0)
    probe_buf = hugepages.empty(((1 << 30) // 4,), torch.float32).fill_(1.0)

    base_env = dict(os.environ)
    print(f"sweep A/B: {args.sweep} layers of {args.model}{'' if args.no_head else ' + lm_head'}, "
          f"variants {args.ab}, {args.rounds} rounds; int4 {'symmetric' if args.symmetric else 'with offsets'}, "
          f"g{args.group}")
    for kind in args.kinds:
        layers = sweep_layers(args, kind, gen)
        nbytes = sum(pw.nbytes for _, pw, _ in layers)
        shape_bytes: dict[str, int] = {}
        for name, pw, _ in layers:
            shape_bytes[name] = shape_bytes.get(name, 0) + pw.nbytes
        for m in args.m:
            xs = {k_: torch.randn(m, k_, generator=gen) for k_ in {pw.in_features for _, pw, _ in layers}}
            xdt = torch.bfloat16 if kind == "bf16" else torch.float32
            calls = [(name, ops.plan(pw, m, xdt), xs[pw.in_features].to(xdt), pw, b) for name, pw, b in layers]

            def step() -> tuple[float, dict[str, float]]:
                per: dict[str, float] = {}
                t0 = time.perf_counter()
                for name, path, x, pw, b in calls:
                    t = time.perf_counter()
                    ops._compute(path, mod, x, pw, b)
                    per[name] = per.get(name, 0.0) + time.perf_counter() - t
                return time.perf_counter() - t0, per

            res: dict[str, list[tuple[float, float, dict[str, float]]]] = {v: [] for v in args.ab}
            for r in range(args.rounds):
                bw = read_probe(probe_buf)
                order = args.ab[r % len(args.ab):] + args.ab[:r % len(args.ab)]
                for v in order:
                    set_env(v, base_env)
                    step()  # warm-up: the kernels' first call with this setting
                    best = min((step() for _ in range(3)), key=lambda s: s[0])
                    res[v].append((best[0], bw, best[1]))
                set_env("-", base_env)
                print(f"{kind} M={m} round {r}: probe {bw:5.1f} GB/s; "
                      + "; ".join(f"{v}: {nbytes / res[v][-1][0] / 1e9:5.1f}" for v in args.ab), flush=True)
            print(f"{kind} M={m}: {nbytes / 1e6:.0f} MB a step, medians over {args.rounds} rounds "
                  f"(path {calls[0][1]}); probe {statistics.median(bw for _, bw, _ in res[args.ab[0]]):.1f} GB/s")
            for v in args.ab:
                t = statistics.median(s for s, _, _ in res[v])
                pct = statistics.median(100 * nbytes / s / 1e9 / bw for s, bw, _ in res[v])
                per = " ".join(f"{name} {statistics.median(shape_bytes[name] / p[name] / 1e9 for _, _, p in res[v]):5.1f}"
                               for name in shape_bytes)
                ratio = statistics.median(b[0] / s[0] for s, b in zip(res[v], res[args.ab[0]]))
                print(f"  {v:40} {t * 1e3:8.2f} ms {nbytes / t / 1e9:6.1f} GB/s {pct:5.1f}% of probe "
                      f"{ratio:5.2f}x the first | GB/s: {per}", flush=True)
        del layers


def summary(args, results, sizes, bw: float, peak: dict[str, float]) -> None:
    """The issue-14 targets as same-run ratios."""
    labels = sorted({lab for (_, lab, _) in results if lab.startswith("ours")})
    if 512 in args.m:
        torch_best = max((2.0 * 512 * SHAPES[s][0] * SHAPES[s][1] / t / 1e12
                          for (s, lab, m), t in results.items() if m == 512 and lab == "torch F.linear bf16"), default=0.0)
        ref = max([torch_best, peak.get("tiles", 0.0)])
        print(f"\nprompt (M = 512): bf16 peak {ref:.2f} TFLOP/s = max(torch bf16 matmul best here {torch_best:.2f}, "
              f"our AMX micro-kernel {peak.get('tiles', 0.0):.2f}); target >= 80%")
        for s in args.shapes:
            for lab in labels:
                t = results.get((s, lab, 512))
                if t:
                    tf = 2.0 * 512 * SHAPES[s][0] * SHAPES[s][1] / t / 1e12
                    tb = results.get((s, "torch F.linear bf16", 512))
                    vs = f", {tb / t:.2f}x torch bf16" if tb else ""
                    print(f"  {s:12} {lab:16} {tf:6.2f} TFLOP/s = {100 * tf / ref:5.1f}% of peak{vs}")
    if 1 in args.m:
        print(f"decode (M = 1): bound = weight bytes / {bw:.1f} GB/s read; target >= 90%")
        for s in args.shapes:
            for lab in labels:
                t = results.get((s, lab, 1))
                if t:
                    gbs = sizes[(s, lab)] / t / 1e9
                    print(f"  {s:12} {lab:16} {gbs:6.1f} GB/s = {100 * gbs / bw:5.1f}% of the bound")
    if 1 in args.m and 8 in args.m:
        print("batch 8 aggregate vs batch 1 (8 * t(M=1) / t(M=8)); targets bf16, int8 >= 6x, int4 >= 4x")
        for s in args.shapes:
            for lab in labels:
                t1, t8 = results.get((s, lab, 1)), results.get((s, lab, 8))
                if t1 and t8:
                    print(f"  {s:12} {lab:16} {8 * t1 / t8:5.2f}x")


if __name__ == "__main__":
    main()
