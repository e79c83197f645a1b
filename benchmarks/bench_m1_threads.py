"""Batch-1 (M = 1) linears against the read probe at 1 and 2 threads, in one process and minute.

What this measures (issue 14: in the host's fast minutes the 2-thread probe reads 80-86 GB/s and
our batch-1 decode ~50-60): per round, for each thread count (1, then 2, the order rotating) and
the same weights on huge pages, in turn
  * `probe`: `read_stream` over 1 GiB (bench_kernels.read_probe: the bound of the decode figures);
  * `read W`: `read_stream` over the weight tensors themselves (the same pages the kernel reads);
  * each kind's M = 1 kernel on those weights (the planned native path, fp32 x), cold: the set
    holds several copies of the shape, called one after another (a copy was last read a whole
    set ago, more than the LLC); a set's time is the best of 3 passes, GB/s its packed bytes.
Then medians over the rounds, per thread count, and the 2-thread / 1-thread ratio of each, so the
loss of a kernel at 2 threads can be put on the core (1 thread against the 1-thread probe) or on
the pair (2 threads against twice its own 1-thread figure).
Variants (--ab: environment settings the kernels read per call) run in turn inside each round.

    python benchmarks/bench_m1_threads.py --sets small_head:int8 c_fc:int8 c_fc:int4 c_fc:bf16 --rounds 5
    python benchmarks/bench_m1_threads.py --sets small:int8 --ab - CODESHELL_X=1   # the small shape's step
    python benchmarks/bench_m1_threads.py --sets small:bf16 --threads 1 --clock thread --ab - CODESHELL_X=1

--clock thread (session 39 helper C: the 2-core host ran three kernel builds at load 11-14, where a wall
clock measures the scheduler): every pass is timed by the calling thread's CPU time (time.thread_time), so
only with --threads 1, where that thread does all of the work; a pass's rate is then the rate of the core
while it runs (the other core's load still shares the memory bus). The probe is timed the same way.

Sets: SHAPE:KIND with SHAPE one of `small_head` (70144 x 1024, the small shape's head), `c_fc`
(16384 x 4096, the 1.7B / 7B c_fc), `mlp.c_proj` (4096 x 16384), `c_attn7` (6144 x 4096), the small
shape's `small_attn` (1536 x 1024), `small_fc` (4096 x 1024), `small_mproj` (1024 x 4096), or `small` (the small shape's
8 layers of four linears then its head, in model order: a whole batch-1 step's linears).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_kernels import MODEL_SHAPES, pack, read_probe, set_env  # noqa: E402

SINGLE = {"small_head": (70144, 1024), "c_fc": (16384, 4096), "mlp.c_proj": (4096, 16384),
          "c_attn7": (6144, 4096), "small_fc": (4096, 1024), "small_attn": (1536, 1024), "small_mproj": (1024, 4096)}


def build(spec: str, gen: torch.Generator, copies_bytes: int):
    """[(name, PackedWeight, bias)] for SHAPE:KIND; a single shape repeated until the set holds
    at least `copies_bytes` (cold between passes)."""
    from codeshell.kernels import hugepages
    shape, kind, *opt = spec.split(":")
    arena = os.environ.get("CODESHELL_HUGE_ARENA")
    if "4k" in opt:  # tensors under 2 MiB on torch's allocator (4 KiB pages), as before session 18
        os.environ["CODESHELL_HUGE_ARENA"] = "0"
    if shape == "small":
        sh = MODEL_SHAPES["small"]
        names = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"] * 8 + ["lm_head"]
        dims = [(nm, sh[nm][0], sh[nm][1], sh[nm][2]) for nm in names]
    else:
        n, k = SINGLE[shape]
        dims = [(shape, n, k, False)]
    out, total = [], 0
    while True:
        for nm, n, k, has_bias in dims:
            w = torch.randn(n, k, generator=gen) * 0.02
            pw = pack("int8" if kind == "int4" and nm == "lm_head" else kind, w, 128)  # int4 checkpoints' int8 head
            if kind != "bf16":
                pw = dataclasses.replace(pw, data=hugepages.resident(pw.data))
            out.append((nm, pw, torch.randn(n, generator=gen) * 0.02 if has_bias else None))
            total += pw.nbytes
        if shape == "small" or total >= copies_bytes:
            if arena is None:
                os.environ.pop("CODESHELL_HUGE_ARENA", None)
            else:
                os.environ["CODESHELL_HUGE_ARENA"] = arena
            return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["small_head:int8", "c_fc:int8"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ab", nargs="+", default=["-"])
    ap.add_argument("--env-all", action="store_true", help="apply each --ab variant to every kind (default too)")
    ap.add_argument("--set-mb", type=int, default=160, help="a single shape's set holds at least this many MB")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: the calling thread's CPU time (needs --threads 1)")
    a = ap.parse_args()
    if a.clock == "thread" and a.threads != [1]:
        ap.error("--clock thread needs --threads 1 (the calling thread's CPU time counts only its own work)")
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    from codeshell.kernels import _ext, hugepages, ops
    mod = _ext.get()
    gen = torch.Generator().manual_seed(0)
    probe_buf = hugepages.empty(((1 << 30) // 4,), torch.float32).fill_(1.0)
    sets = {s: build(s, gen, a.set_mb << 20) for s in a.sets}
    base_env = dict(os.environ)
    try:
        print(f"load average: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    except OSError:
        pass
    calls = {}
    for s, layers in sets.items():
        kind = s.split(":")[1]
        xdt = torch.bfloat16 if kind == "bf16" else torch.float32
        xs = {pw.in_features: torch.randn(1, pw.in_features, generator=gen).to(xdt) for _, pw, _ in layers}
        calls[s] = [(ops.plan(pw, 1, xdt), xs[pw.in_features], pw, b) for _, pw, b in layers]
        nb = sum(pw.nbytes for _, pw, _ in layers)
        print(f"{s}: {len(layers)} calls, {nb / 1e6:.0f} MB a pass, paths {sorted({c[0] for c in calls[s]})}")

    def best_of(fn) -> float:
        fn()
        return min(_t(fn) for _ in range(a.passes))

    def _t(fn) -> float:
        t = clock()
        fn()
        return clock() - t

    # res[(threads, label)] = list of GB/s per round
    res: dict[tuple[int, str], list[float]] = {}
    from codeshell.bench import HostLoad
    for r in range(a.rounds):
        hl = HostLoad()
        hl.__enter__()
        tord = a.threads[r % len(a.threads):] + a.threads[:r % len(a.threads)]
        line = []
        for t in tord:
            torch.set_num_threads(t)
            p = read_probe(probe_buf) if a.clock == "wall" else probe_buf.nbytes / best_of(lambda: mod.read_stream(probe_buf, 1)) / 1e9
            res.setdefault((t, "probe"), []).append(p)
            line.append(f"T{t} probe {p:5.1f}")
            for s, layers in sets.items():
                datas = [pw.data for _, pw, _ in layers]
                nb = sum(d.nbytes for d in datas)
                sec = best_of(lambda: [mod.read_stream(d, 1) for d in datas])
                res.setdefault((t, f"read {s}"), []).append(nb / sec / 1e9)
                vord = a.ab[r % len(a.ab):] + a.ab[:r % len(a.ab)]
                nbp = sum(pw.nbytes for _, pw, _ in layers)
                for v in vord:
                    set_env(v, base_env)
                    cl = calls[s]
                    sec = best_of(lambda: [ops._compute(path, mod, x, pw, b) for path, x, pw, b in cl])
                    res.setdefault((t, f"{s} {v}"), []).append(nbp / sec / 1e9)
                    line.append(f"{s} {v} {nbp / sec / 1e9:5.1f}")
                set_env("-", base_env)
        hl.__exit__(None, None, None)
        print(f"round {r} ({hl}): " + "; ".join(line), flush=True)
    torch.set_num_threads(max(a.threads))
    labels = ["probe"] + [f"read {s}" for s in a.sets] + [f"{s} {v}" for s in a.sets for v in a.ab]
    print(f"medians of {a.rounds} rounds, GB/s (% of the same thread count's probe, paired per round)")
    print(f"{'':36}" + "".join(f"{'T' + str(t):>18}" for t in a.threads) + f"{'T2/T1':>8}")
    for lb in labels:
        cells = []
        for t in a.threads:
            v = res[(t, lb)]
            pct = statistics.median(100 * x / p for x, p in zip(v, res[(t, "probe")]))
            cells.append(f"{statistics.median(v):8.1f} ({pct:5.1f}%)")
        ratio = ""
        if 1 in a.threads and 2 in a.threads:
            ratio = f"{statistics.median(b / x for x, b in zip(res[(1, lb)], res[(2, lb)])):8.2f}"
        first = f"{lb.rsplit(' ', 1)[0]} {a.ab[0]}"
        if lb.startswith(("probe", "read ")) or lb == first:
            vs = ""
        else:
            vs = "  vs first: " + " ".join(
                f"T{t} {statistics.median(x / f for x, f in zip(res[(t, lb)], res[(t, first)])):5.3f}x" for t in a.threads)
        print(f"{lb:36}" + "".join(f"{c:>18}" for c in cells) + ratio + vs)


if __name__ == "__main__":
    main()
