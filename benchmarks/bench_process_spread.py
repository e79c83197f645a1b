"""How much a small model's speed differs between fresh processes of the same code (session 35).

What this is: a driver that starts `--procs` fresh processes one after another (with `--variant`s,
in alternating order), each loading one model (codeshell-mini int8 by default) and timing, for
`--rounds` rounds over its life, a `--prompt-len`-token prompt (best of 2) and batch-1 decode (the
time of 17 tokens less that of 1, best of samples filling `--min-s`, as bench_quant.py's figures);
plus in-process probes before and after the rounds: the fp32-FMA peak on 2 threads and on 1
(`codeshell.bench.fma_tflops`), one model linear at M = 1 called repeatedly (its weights stay in
L2: it measures the cache placement and the two threads' hand-off, not memory) on 2 threads and on
1, and what each thread did: the CPU each thread ran on (/proc/self/task/*/stat field 39,
sampled every 2 ms by a thread of the child), its CPU time, its voluntary / involuntary context
switches (/proc/self/task/*/status). One line per process, then per variant the medians, the
spread (max / min) of the processes' prompt and b1 figures, and how much the rounds inside one
process differ (so a process that is fast for its whole life shows as such).

Why: codeshell-mini's int8 prompt read 7133-13287 tok/s in consecutive bench_quant.py runs of the
same code and environment, prompt and b1 moving together in one process, while llama-bench held
8750-8821 (docs/kernels-log.md, session 34 lead): something fixed per process sets the figure.

A variant is `NAME:ITEM ITEM ...`; an item `KEY=VALUE` is set in the child's environment, any other
item is a word of a command prefix (e.g. `noaslr:setarch x86_64 -R`); SPREAD_PIN=split0 / split1 in a
child's environment pins its master thread to CPU 0 / 1 and every other thread to the other CPU.
`--gap S` sleeps S seconds between rounds, so the rounds cover the process's life (session 35: one
process's figures then moved more than the processes' medians differed). Two probes instead of the
processes: `--colour KIB` (page colour in L2: 4 KiB pages against one huge page) and `--host-series S`
(one thread's FMA peak on CPU 0 and CPU 1 every ~0.5 s: the host's speed over time).
Not a timed test: figures only (docs/kernels-log.md, session 35 helper A).

    python benchmarks/bench_process_spread.py --procs 10
    python benchmarks/bench_process_spread.py --procs 6 --variant base: --variant 'arena:CODESHELL_HUGE_ARENA_MIN=0'
    python benchmarks/bench_process_spread.py --model codeshell-mini --procs 4     # bf16
    python benchmarks/bench_process_spread.py --procs 4 --rounds 8 --gap 2   # rounds over ~20 s of each process
    python benchmarks/bench_process_spread.py --colour 896    # page colour in L2: 4 KiB pages vs one huge page
    python benchmarks/bench_process_spread.py --host-series 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import zlib

DEFAULT_MODEL = "/work/ckpt/qmini/int8"


def _tasks() -> dict[int, dict]:
    """Per thread of this process: name, last CPU (field 39), state, utime + stime (ticks)."""
    out = {}
    base = "/proc/self/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        rest = s[s.rindex(")") + 2:].split()  # rest[0] is field 3 (state)
        out[int(tid)] = {"name": name, "state": rest[0], "cpu": int(rest[36]),
                         "ticks": int(rest[11]) + int(rest[12])}
    return out


def _huge_kib() -> tuple[int, int]:
    """(AnonHugePages, Anonymous) of this process in KiB (/proc/self/smaps_rollup)."""
    d = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                d[k] = int(v.split()[0])
    return d.get("AnonHugePages", 0), d.get("Anonymous", 0)


def _cpu_stat() -> dict[str, list[int]]:
    """/proc/stat's per-CPU lines: user nice system idle iowait irq softirq steal (ticks)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                k, *v = line.split()
                out[k] = [int(x) for x in v[:8]]
    return out


def _switches() -> dict[int, tuple[int, int]]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                d = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        out[int(tid)] = (int(d["voluntary_ctxt_switches"]), int(d["nonvoluntary_ctxt_switches"]))
    return out


class Sampler:
    """Samples every thread's CPU and state every `period` s on its own thread (itself excluded)."""

    def __init__(self, period: float = 0.002):
        self.period, self.stop, self.me = period, threading.Event(), None
        self.cpus: dict[int, dict[int, int]] = {}  # tid -> cpu -> samples in state R
        self.snaps: list[dict[int, tuple[str, int]]] = []
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.me = threading.get_native_id()
        while not self.stop.wait(self.period):
            snap = {}
            for tid, d in _tasks().items():
                if tid == self.me or d["state"] != "R":
                    continue
                c = self.cpus.setdefault(tid, {})
                c[d["cpu"]] = c.get(d["cpu"], 0) + 1
                snap[tid] = d["cpu"]
            self.snaps.append(snap)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


def child(a) -> dict:
    t0 = time.perf_counter()
    from codeshell import LLM, SamplingParams  # before torch, as bench_quant's worker
    import torch
    from codeshell import bench
    llm = LLM(a.model, dtype="bfloat16", threads=a.threads, max_batch=1, max_model_len=a.prompt_len + 40)
    load_s = time.perf_counter() - t0
    huge = _huge_kib()
    g = torch.Generator().manual_seed(1)
    V = min(llm.config.vocab_size, 70000)

    def prompt(n):
        return {"prompt_token_ids": torch.randint(0, V, (n,), generator=g).tolist()}

    def run(prompts, max_tokens, repeats=2, min_s=0.0):
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        times, cpu = [], []
        while len(times) < repeats or (sum(times) < min_s and len(times) < 100):
            t, c = time.perf_counter(), time.thread_time()
            llm.generate(prompts, sp)
            times.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
        run.cpu = min(cpu)  # this (the master) thread's CPU time, best sample: less sensitive to a loaded host
        return min(times)

    # one model linear at M = 1 (the first block's mlp.c_fc: 256 KiB of int8 rows in mini), called
    # `reps` times: L2-resident weights, so its time is the cache placement plus the threads' hand-off
    lin = None
    for name, mod in llm.model.named_modules():
        if name.endswith("mlp.c_fc"):
            lin = mod
            break
    x = torch.randn(1, lin.in_features, generator=g).to(torch.bfloat16)

    def lin_us(reps=20, repeats=300):  # the best of many short samples: a loaded host's preemptions drop out
        best = float("inf")
        with torch.inference_mode():
            for _ in range(repeats):
                t = time.perf_counter()
                for _ in range(reps):
                    lin(x)
                best = min(best, time.perf_counter() - t)
        return best / reps * 1e6

    def probes():
        out = {"fma2": bench.fma_tflops(), "lin2": lin_us()}
        torch.set_num_threads(1)
        out.update({"fma1": bench.fma_tflops(), "lin1": lin_us()})
        # the model on one thread, best of many short samples (robust to a loaded host): b1 tok/s
        # (9 tokens less 1) and a 128-token prompt's tok/s
        short = [prompt(16)]
        t1, t9 = run(short, 1, repeats=30), run(short, 9, repeats=30)
        out.update({"b1_1t": 8 / (t9 - t1) if t9 > t1 else float("nan"),
                    "pre_1t": 128 / run([prompt(128)], 1, repeats=8)})
        torch.set_num_threads(a.threads)
        return out

    run([prompt(16)], 2)
    # experiment (SPREAD_PIN): "split0" = this (the master) thread on CPU 0, every other on CPU 1;
    # "split1" the other way round (whether the vCPU the master lands on decides a process's speed)
    pin = os.environ.get("SPREAD_PIN", "")
    if pin in ("split0", "split1"):
        me, mine = threading.get_native_id(), int(pin[-1])
        for tid in _tasks():
            os.sched_setaffinity(tid, {mine} if tid == me else {1 - mine})
    sw0, st0 = _switches(), _cpu_stat()
    tk0 = {t: d["ticks"] for t, d in _tasks().items()}
    rounds = []
    with Sampler() as smp:
        p0 = probes()
        run([prompt(a.prompt_len)], 1, repeats=1)
        for i in range(a.rounds):
            if i and a.gap:  # spread the rounds over the process's life (sleeping: the threads go idle too)
                time.sleep(a.gap)
            pre = run([prompt(a.prompt_len)], 1, repeats=2)
            pre_cpu = run.cpu
            short = [prompt(16)]
            t1 = run(short, 1, min_s=a.min_s)
            c1 = run.cpu
            tn = run(short, 17, min_s=a.min_s)
            cn = run.cpu
            rounds.append({"prompt": a.prompt_len / pre, "b1": 16 / (tn - t1) if tn > t1 else float("nan"),
                           "prompt_cpu": a.prompt_len / pre_cpu, "b1_cpu": 16 / (cn - c1) if cn > c1 else float("nan"),
                           "t": time.perf_counter() - t0})
        p1 = probes()
    sw1, st1 = _switches(), _cpu_stat()
    # per CPU over the rounds: ticks busy (not idle / iowait) and stolen by the host
    cpu_use = {k: {"busy": sum(st1[k][i] - st0[k][i] for i in (0, 1, 2, 5, 6)), "steal": st1[k][7] - st0[k][7],
                   "all": sum(st1[k]) - sum(st0[k])} for k in st1 if k in st0}
    tasks = _tasks()
    threads = []
    for tid, d in tasks.items():
        if tid == smp.me:
            continue
        ticks = d["ticks"] - tk0.get(tid, 0)
        v0, n0 = sw0.get(tid, (0, 0))
        v1, n1 = sw1.get(tid, (v0, n0))
        threads.append({"tid": tid, "name": d["name"], "ticks": ticks, "vcs": v1 - v0, "ivcs": n1 - n0,
                        "cpus": smp.cpus.get(tid, {})})
    threads.sort(key=lambda r: -r["ticks"])
    busy = [r["tid"] for r in threads[:3]]
    # of the samples with two of the busiest threads running at once, how many had them on one CPU
    # (only possible if one of them had just been moved: /proc's field is the last CPU)
    both = same = 0
    for snap in smp.snaps:
        on = [snap[t] for t in busy[:2] if t in snap]
        if len(on) == 2:
            both += 1
            same += on[0] == on[1]
    from codeshell.kernels import ops
    choices = {str(k): str(v) for k, v in ops._CHOICES.items()}
    return {"load_s": load_s, "rounds": rounds, "cpu_use": cpu_use, "choices": choices, "loadavg": float(open("/proc/loadavg").read().split()[0]), "huge_kib": huge, "probes": [p0, p1], "threads": threads,
            "nthreads": len(tasks) - 1, "both_running": both, "same_cpu": same, "samples": len(smp.snaps)}


_READ_SETS_C = r"""
#include <stdint.h>
#include <immintrin.h>
#include <x86intrin.h>
/* n buffers of `bytes` each read `reps` times; the best rep's TSC cycles per 64-byte line */
double read_sets(char** p, int n, long bytes, int reps) {
  double best = 1e30; __m256i acc = _mm256_setzero_si256();
  for (int r = 0; r < reps; ++r) {
    uint64_t t = __rdtsc();
    for (int i = 0; i < n; ++i)
      for (long j = 0; j < bytes; j += 64) acc = _mm256_add_epi64(acc, _mm256_load_si256((const __m256i*)(p[i] + j)));
    double per = (double)(__rdtsc() - t) / (n * (bytes / 64));
    if (per < best) best = per;
  }
  volatile long sink = _mm256_extract_epi64(acc, 0); (void)sink;
  return best;
}
"""


def colour(total_kib: int, trials: int) -> None:
    """Page colouring in L2, measured: `total_kib` of 64 KiB buffers (mini's linears are 64-256 KiB),
    each on its own 4 KiB-page mapping (the physical pages, so the L2 sets, fall where they fall)
    or all in one 2 MiB huge page (every L2 set used evenly), read over and over on CPU 0 (an
    AVX2 loop compiled here with cc: no Python in the timed loop); a fresh allocation per trial,
    alternating. A spread across the 4 KiB allocations that the huge-page ones do not show is
    what page colour can do to an L2-resident kernel."""
    import ctypes
    import mmap
    import tempfile
    d = tempfile.mkdtemp()
    with open(f"{d}/rd.c", "w") as f:
        f.write(_READ_SETS_C)
    subprocess.run(["cc", "-O2", "-mavx2", "-shared", "-fPIC", "-o", f"{d}/rd.so", f"{d}/rd.c"], check=True)
    lib = ctypes.CDLL(f"{d}/rd.so")
    lib.read_sets.restype = ctypes.c_double
    lib.read_sets.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_long, ctypes.c_int]
    piece, n = 64 << 10, (total_kib << 10) // (64 << 10)

    def bufs(huge):
        keep, ptrs = [], []
        if huge:
            m = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            a = ctypes.addressof(ctypes.c_char.from_buffer(m))
            start = -a % (2 << 20)
            m.madvise(mmap.MADV_HUGEPAGE, start, 2 << 20)
            keep.append(m)
            ptrs = [a + start + i * piece for i in range(n)]
        else:
            for _ in range(n):
                m = mmap.mmap(-1, piece, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                m.madvise(mmap.MADV_NOHUGEPAGE)
                keep.append(m)
                ptrs.append(ctypes.addressof(ctypes.c_char.from_buffer(m)))
        for p in ptrs:
            ctypes.memset(p, 1, piece)
        return keep, (ctypes.c_void_p * n)(*ptrs)

    os.sched_setaffinity(0, {0})
    res = {False: [], True: []}
    for _ in range(trials):
        for huge in (False, True):
            keep, arr = bufs(huge)
            res[huge].append(min(lib.read_sets(arr, n, piece, 50) for _ in range(20)))
            del arr
            keep.clear()
    print(f"page colour: {n} x 64 KiB = {total_kib} KiB read on CPU 0, TSC cycles per 64-byte line, "
          f"a fresh allocation per figure (best of 20 x 50 reads each)")
    for huge in (False, True):
        v = res[huge]
        print(f"  {'2 MiB page ' if huge else '4 KiB pages'} {' '.join(f'{x:.2f}' for x in v)}  median "
              f"{statistics.median(v):.2f}  max/min {max(v) / min(v):.2f}")


def host_series(seconds: float) -> None:
    """The host's speed over time, in one process and one thread: every ~0.5 s the fp32-FMA peak
    (`codeshell.bench.fma_tflops`, best of 4 passes of ~5 ms) pinned to CPU 0, then to CPU 1. A guest
    whose single-thread figures move by as much as a model's over seconds has a host that moves."""
    import torch

    from codeshell import bench
    torch.set_num_threads(1)
    t0, rows = time.perf_counter(), []
    while time.perf_counter() - t0 < seconds:
        row = [time.perf_counter() - t0]
        for cpu in (0, 1):
            os.sched_setaffinity(0, {cpu})
            row.append(bench.fma_tflops(repeats=4, reps=5000) * 1e3)
        rows.append(row)
        time.sleep(0.4)
    print("host series: 1-thread fp32-FMA peak GFLOP/s, CPU 0 / CPU 1, every ~0.5 s")
    print("  " + "  ".join(f"{t:.0f}s {a:.0f}/{b:.0f}" for t, a, b in rows))
    for i, name in ((1, "CPU 0"), (2, "CPU 1")):
        v = [r[i] for r in rows]
        print(f"  {name}: median {statistics.median(v):.0f}  min {min(v):.0f}  max {max(v):.0f}  max/min {max(v) / min(v):.2f}")


def _variant(spec: str) -> tuple[str, dict[str, str], list[str]]:
    name, _, items = spec.partition(":")
    env, prefix = {}, []
    for it in items.split():
        if "=" in it and not it.startswith("-"):
            k, _, v = it.partition("=")
            env[k] = v
        else:
            prefix.append(it)
    return name or "base", env, prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder, or codeshell-mini (bf16)")
    ap.add_argument("--procs", type=int, default=10, help="processes per variant")
    ap.add_argument("--rounds", type=int, default=4, help="prompt + b1 rounds inside each process")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--min-s", type=float, default=0.4, help="each b1 sample set fills this many seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gap", type=float, default=0.0, help="seconds of sleep between two rounds")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:ITEM ... (KEY=VALUE: child env; other items: a command prefix); repeatable")
    ap.add_argument("--json", default=None, help="append each process's record to this file")
    ap.add_argument("--colour", type=int, default=0, metavar="KIB",
                    help="instead: the page-colour probe on KIB of 64 KiB buffers (4 KiB pages against one huge page)")
    ap.add_argument("--host-series", type=float, default=0.0, metavar="SECONDS",
                    help="instead: the 1-thread FMA peak on CPU 0 and CPU 1 every ~0.5 s for SECONDS")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.colour:
        colour(a.colour, 16)
        return
    if a.host_series:
        host_series(a.host_series)
        return
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    variants = [_variant(v) for v in (a.variant or ["base:"])]
    per: dict[str, list[dict]] = {v[0]: [] for v in variants}
    print(f"{a.model}: {a.procs} processes per variant, {a.rounds} rounds each, prompt {a.prompt_len}, "
          f"threads {a.threads}", flush=True)
    print("variant  #  prompt tok/s (rounds: min..max)  b1 tok/s (min..max)  fma2/fma1 TF  lin2/lin1 us  "
          "threads  busy: name ticks cpu-share vcs/ivcs  same-cpu", flush=True)
    for i in range(a.procs):
        order = variants if i % 2 == 0 else variants[::-1]
        for name, env, prefix in order:
            cmd = prefix + [sys.executable, os.path.abspath(__file__), "--child", "--model", a.model,
                            "--rounds", str(a.rounds), "--prompt-len", str(a.prompt_len),
                            "--min-s", str(a.min_s), "--threads", str(a.threads), "--gap", str(a.gap)]
            p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                print(f"{name:8s} {i}: failed (rc {p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(line[0][7:])
            r["variant"] = name
            for t in r["threads"]:
                t["cpus"] = {int(c): n for c, n in t["cpus"].items()}
            per[name].append(r)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
            pr = [x["prompt"] for x in r["rounds"]]
            if len(pr) > 3:
                at = " ".join(f"{x['t']:.0f}s" for x in r["rounds"])
                b1s = " ".join(f"{x['b1']:.0f}" for x in r["rounds"])
                print(f"         rounds at {at}: prompt {' '.join(f'{x:.0f}' for x in pr)}; b1 {b1s}")
            b1 = [x["b1"] for x in r["rounds"]]
            pb = r["probes"]
            busy = []
            for t in r["threads"][:3]:
                n = sum(t["cpus"].values()) or 1
                share = "/".join(f"{int(100 * t['cpus'].get(c, 0) / n)}" for c in sorted({*t["cpus"]} | {0, 1}))
                busy.append(f"{t['ticks']}t c{share} {t['vcs']}/{t['ivcs']}")
            pc = statistics.median(x["prompt_cpu"] for x in r["rounds"])
            bc = statistics.median(x["b1_cpu"] for x in r["rounds"])
            print(f"{name:8s} {i:2d}  {statistics.median(pr):7.0f} ({min(pr):.0f}..{max(pr):.0f})  "
                  f"[master cpu: {pc:.0f} / {bc:.0f}]  "
                  f"{statistics.median(b1):6.0f} ({min(b1):.0f}..{max(b1):.0f})  "
                  f"{pb[0]['fma2']:.3f}/{pb[0]['fma1']:.3f}  "
                  f"{pb[0]['lin2']:.1f}/{pb[0]['lin1']:.1f}->{pb[1]['lin2']:.1f}/{pb[1]['lin1']:.1f}  "
                  f"1t b1 {pb[0]['b1_1t']:.0f}->{pb[1]['b1_1t']:.0f} pre {pb[0]['pre_1t']:.0f}->{pb[1]['pre_1t']:.0f}  "
                  f"{r['nthreads']:2d}  load {r['loadavg']:.1f}  steal "
                  f"{'/'.join(str(u['steal']) for u in r['cpu_use'].values())} of "
                  f"{'/'.join(str(u['all']) for u in r['cpu_use'].values())}  thp {r['huge_kib'][0] >> 10}/{r['huge_kib'][1] >> 10}M  {' | '.join(busy)}  {r['same_cpu']}/{r['both_running']}  "
                  f"choices {','.join(sorted(set(r['choices'].values())))}#{zlib.crc32(json.dumps(r['choices'], sort_keys=True).encode()) % 1000:03d}", flush=True)
    print("\nper variant: median over processes of each process's median (spread = max / min of them)")
    for name, rs in per.items():
        if not rs:
            continue
        for key in ("prompt", "b1", "prompt_cpu", "b1_cpu"):
            meds = [statistics.median(x[key] for x in r["rounds"]) for r in rs]
            inside = [max(x[key] for x in r["rounds"]) / min(x[key] for x in r["rounds"]) for r in rs]
            print(f"  {name:8s} {key:6s} median {statistics.median(meds):8.0f}  min {min(meds):8.0f}  "
                  f"max {max(meds):8.0f}  spread {max(meds) / min(meds):.2f}x  "
                  f"within a process (median max/min) {statistics.median(inside):.2f}x")
        for key in ("lin1", "lin2", "b1_1t", "pre_1t"):
            v = [max(p[key] for p in r["probes"]) if key.endswith("_1t") else min(p[key] for p in r["probes"])
                 for r in rs]
            print(f"  {name:8s} {key:6s} median {statistics.median(v):8.2f}  min {min(v):8.2f}  max {max(v):8.2f}  "
                  f"spread {max(v) / min(v):.2f}x (each process's best of its two probes)")


if __name__ == "__main__":
    main()
