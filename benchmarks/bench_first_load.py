"""What a model's first load on a machine pays for measuring its prefill paths (`measure.measure`), the
quick measurement (session 33, the default) against the full one before it
(`CODESHELL_KERNEL_MEASURE=full`), and whether they choose the same paths.

What this is: a benchmark with two parts.

* `--part shapes` (in this process): random packed weights of each distinct linear shape of a model
  shape (the blocks' four; the output head is not measured, `kernels.choose_prefill_paths`), in
  each format, planned for a prefill with no choices file (`CODESHELL_KERNEL_CHOICES=off`), once per
  mode and round, the modes alternating in rotated order each round. Prints per shape and mode the
  seconds spent measuring, where they went (seconds per candidate and M: `_time_call`'s calls, the
  warm-ups included), the winner, the margin, the looks and whether it would be stored; then per shape
  the quick choice against the full one: "same", or the full measurement's times of both (a
  different path within the full measurement's margin of error is either one).
  The measuring cost is per distinct weight shape, not per layer: the 7B has the 1.7b shape's four
  weight shapes (8 layers of the 7B's width), so its first load measures what the 1.7b's does.
* `--part rows`: each candidate's time per row on slices of growing rows of the shape's c_fc (is a
  slice's order the whole weight's?).
* `--part load FOLDER...` (subprocesses): `LLM(folder)` load seconds with an empty choices file in
  each mode ("first quick", "first full") and with the file the quick first load wrote ("cached"),
  in alternating rounds; the ratio first / cached is the first load's overhead. Each process's
  chosen paths and host levels are printed (session 36: which paths fresh processes take).
  `--no-level-ab` adds "first quick, no level": the measurement before session 36 exactly (the level
  probe replaced by 0 in `measure._host_level`: no probe, level vote or re-look; a second look below
  a 10% lead, `MEASURE_RELOOK_BELOW = MEASURE_CLOSE`; no provisional entries), A/B in the same rounds. `--shared` adds
  "one file" (and "one file, no level"): the rounds' processes share one choices file, empty at the
  start, as a machine's processes do (which path sets they take; session 36's provisional entries).
* `--part levels SECONDS` (session 36): the host's level and the measurement over time, in one
  process: every ~0.3 s the level probe (`measure._host_level`, both threads) and one-thread FMA
  peaks pinned to CPU 0 and CPU 1, then a fresh quick measurement of each shape (`--shape`,
  `--formats`; no choices file; the measurement before session 36: no level probe inside it). Prints
  each sample's winners and per-row times, then per shape the winners counted by the level they were
  measured at: does a worse path win at a slow level?

Why: session 32 saw a 1.7B int4 server spend a 480 s run in its first load's measurements; the
choices must stay measured per machine (no table), but not at that cost.

    flock /work/notes/bench.lock python benchmarks/bench_first_load.py --part shapes --shape small
    flock /work/notes/bench.lock python benchmarks/bench_first_load.py --part shapes --shape 1.7b --formats int8
    flock /work/notes/bench.lock python benchmarks/bench_first_load.py --part load /work/ckpt/qsmall/int4
    flock /work/notes/bench.lock python benchmarks/bench_first_load.py --part levels 60 --shape mini --formats int8
    flock /work/notes/bench.lock python benchmarks/bench_first_load.py --part load /work/ckpt/qmini/int8 \
        --modes quick --no-level-ab --rounds 4
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (N, K) of the blocks' linears (c_attn, attn.c_proj, c_fc, mlp.c_proj), in the order a model lists them
SHAPES = {
    "small": [(1536, 1024), (1024, 1024), (4096, 1024), (1024, 4096)],
    "1.7b": [(6144, 4096), (4096, 4096), (16384, 4096), (4096, 16384)],  # = the 7B's
    "mini": [(384, 256), (256, 256), (1024, 256), (256, 1024)],
}
NAMES = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]


def packed(fmt: str, n: int, k: int):
    import torch
    from codeshell.kernels.packing import prepack, quantize_int4, quantize_int8
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 7 + k)) * 0.02
    return {"bf16": prepack, "int8": quantize_int8, "int4": lambda t: quantize_int4(t, 128)}[fmt](w)


def plan_all(weights, mode: str) -> list[dict]:
    """Plans every weight's prefill in `mode` from nothing (no file, no in-process choice)."""
    import torch
    from codeshell.kernels import measure, ops
    os.environ["CODESHELL_KERNEL_MEASURE"] = mode
    ops._CHOICES.clear()
    ops.CHOICE_TIMES.clear()
    ops.CHOICE_CHECKS.clear()
    measure._SLICE_LOOKS.clear()
    spent: dict = collections.defaultdict(float)
    real = measure._time_call

    def timed(c, mod, x, p, x_dtype, epilogue=None):
        t = time.perf_counter()
        r = real(c, mod, x, p, x_dtype, epilogue)
        spent[(c, x.shape[0])] += time.perf_counter() - t
        return r

    measure._time_call = timed
    out = []
    try:
        for name, p in weights:
            spent.clear()
            t = time.perf_counter()
            path = ops.plan(p, ops.ROW_INVARIANT_MAX_M + 1, torch.bfloat16)
            s = time.perf_counter() - t
            key = next((k for k in ops.CHOICE_CHECKS if k[1:3] == (p.out_features, p.in_features)
                        and k[0] == p.kind), None)
            out.append({"name": name, "n": p.out_features, "k": p.in_features, "s": s, "path": path,
                        "times": dict(ops.CHOICE_TIMES.get(key, {})), "checks": dict(ops.CHOICE_CHECKS.get(key, {})),
                        "spent": dict(spent)})
    finally:
        measure._time_call = real
    return out


def part_shapes(a) -> None:
    import torch
    from codeshell.kernels import choices, ops
    os.environ["CODESHELL_KERNEL_CHOICES"] = "off"
    choices.forget()
    if a.threads:
        torch.set_num_threads(a.threads)
    ops.isa_level()
    print(f"threads {torch.get_num_threads()}, isa {ops.ISA_LEVELS[ops.isa_level()]}, load avg "
          f"{os.getloadavg()[0]:.2f}, shape {a.shape}, modes {a.modes}, rounds {a.rounds}", flush=True)
    for fmt in a.formats:
        weights = [(nm, packed(fmt, n, k)) for nm, (n, k) in zip(NAMES, SHAPES[a.shape])]
        runs = {m: [] for m in a.modes}
        for r in range(a.rounds):
            order = a.modes[r % len(a.modes):] + a.modes[:r % len(a.modes)]
            for mode in order:
                la = os.getloadavg()[0]
                res = plan_all(weights, mode)
                runs[mode].append(res)
                print(f"\n{fmt} round {r} {mode}: {sum(x['s'] for x in res):.2f} s (load avg before {la:.2f})")
                for x in res:
                    ck = x["checks"]
                    where = ", ".join(f"{c}@{m} {s:.2f}" for (c, m), s in sorted(x["spent"].items()))
                    print(f"  {x['name']:12s} {x['n']}x{x['k']}: {x['s']:7.2f} s  -> {x['path']:12s} "
                          f"margin {ck.get('margin')} looks {ck.get('looks')} scatter {ck.get('scatter')} "
                          f"rows {ck.get('rows')} shared {ck.get('shared')} others {ck.get('others_per_core')} stored {ck.get('stored')}"
                          + (f"\n      spent: {where}" if where else ""), flush=True)
        print(f"\n{fmt}: median seconds measuring, per mode: "
              + ", ".join(f"{m} {sorted(sum(x['s'] for x in res) for res in runs[m])[len(runs[m]) // 2]:.2f}"
                          for m in a.modes))
        if "full" in runs and "quick" in runs:
            print(f"{fmt}: quick vs full choices (per round pair; full times us per row of x)")
            for full, quick in zip(runs["full"], runs["quick"]):
                for f, q in zip(full, quick):
                    ft = {c: round(t * 1e6, 2) for c, t in f["times"].items()}
                    same = "same" if f["path"] == q["path"] else (
                        f"DIFFERENT: full {f['path']} ({ft.get(f['path'])}) quick {q['path']} "
                        f"({ft.get(q['path'])}: {ft.get(q['path'], 0) / max(ft.get(f['path'], 1e-9), 1e-9):.3f}x)")
                    print(f"  {f['name']:12s} {same}; full times {ft} margin {f['checks'].get('margin')}")


LOAD_CODE = """
import json, sys, time
t = time.perf_counter()
from codeshell import LLM
from codeshell.kernels import measure, ops
if sys.argv[3] == "nolevel":  # the measurement before session 36: no level probe, vote or re-look,
    from codeshell.kernels import choices  # a second look below a 10 percent lead, no provisional entries
    measure._host_level = lambda: 0.0
    measure.MEASURE_RELOOK_BELOW = measure.MEASURE_CLOSE
    _entry, _store = choices.entry, choices.store
    choices.entry = lambda key, cands=None, whole=False, provisional=False: None if provisional else _entry(key, cands, whole)
    choices.store = lambda key, w, t, c: _store(key, w, t, c) if c.get("stored") else None
llm = LLM(sys.argv[1], dtype="bfloat16", threads=%d, max_batch=1, max_model_len=1024)
s = time.perf_counter() - t
if sys.argv[2] == "fill":  # an untrusted measurement (scatter) stored anyway
    from codeshell.kernels import choices
    for key, c in ops.CHOICE_CHECKS.items():
        choices.store(key, ops._CHOICES[key], ops.CHOICE_TIMES[key], dict(c, stored=True))
ck = [c for c in ops.CHOICE_CHECKS.values() if not c.get("shared")]
print(json.dumps({"load_s": s, "measured": len(ck), "measure_s": sum(c.get("measure_s", 0) for c in ck),
                  "stored": sum(bool(c["stored"]) for c in ck),
                  "others": max([c.get("others_per_core", 0) for c in ck] or [0]),
                  "paths": {f"{k[1]}x{k[2]}": v for k, v in sorted(ops._CHOICES.items()) if k[3] == "prefill"},
                  "levels": [c.get("levels") for c in ck], "relooks": sum("relook" in c for c in ck),
                  "level_now": round(measure._LEVEL[0], 1)}))
"""


def part_load(a) -> None:
    for folder in a.folders:
        tmp = tempfile.mkdtemp(prefix="first-load-")
        cached = os.path.join(tmp, "cached.json")
        # the file the cached runs read: a quick first load's choices stored whatever the trust checks
        # said (on a host where other work runs they store little; what they guard is the choice,
        # not the cached load's time)
        print(f"{folder}: fill (first quick) {_load(folder, cached, 'quick', a.threads, fill=True)}", flush=True)
        shared = [(f"one file{', no level' if i else ''}", os.path.join(tmp, f"shared-{i}.json"), "quick")
                  for i in range(2 if a.no_level_ab else 1)]
        variants = [("cached", cached, "quick"), ("first quick", None, "quick")] + \
            ([("first quick, no level", None, "quick")] if a.no_level_ab else []) + \
            (shared if a.shared else []) + \
            ([("first full", None, "full")] if "full" in a.modes else [])
        got = collections.defaultdict(list)
        paths = collections.defaultdict(collections.Counter)
        for r in range(a.rounds):
            k = r % len(variants)
            for name, f, mode in variants[k:] + variants[:k]:
                if f is None:
                    f = os.path.join(tmp, f"empty-{r}-{mode}-{len(name)}.json")
                res = _load(folder, f, mode, a.threads, nolevel=name.endswith("no level"))
                got[name].append(res["load_s"])
                paths[name][json.dumps(res["paths"], sort_keys=True)] += 1
                print(f"  {folder} round {r} {name}: {res['load_s']:.2f} s, measured {res['measured']} in "
                      f"{res['measure_s']:.2f} s, stored {res['stored']}, others {res['others']:.2f} a core, "
                      f"relooks {res['relooks']}, level now {res['level_now']}, probes {res['levels']} "
                      f"(load avg {os.getloadavg()[0]:.2f})\n      paths {res['paths']}", flush=True)
        for name, cnt in paths.items():
            print(f"{folder}: {name}: {len(cnt)} path set(s): " + "; ".join(f"{n}x {p}" for p, n in cnt.most_common()))
        med = {n: sorted(v)[len(v) // 2] for n, v in got.items()}
        print(f"{folder}: median load s " + ", ".join(f"{n} {s:.2f}" for n, s in med.items())
              + "; first / cached: " + ", ".join(f"{n} {s / med['cached']:.2f}x" for n, s in med.items() if n != "cached"))


def _load(folder: str, choices_file: str, mode: str, threads: int, fill: bool = False, nolevel: bool = False) -> dict:
    env = dict(os.environ, CODESHELL_KERNEL_CHOICES=choices_file, CODESHELL_KERNEL_MEASURE=mode)
    r = subprocess.run([sys.executable, "-c", LOAD_CODE % threads, folder, "fill" if fill else "-",
                        "nolevel" if nolevel else "-"], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"load of {folder} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def part_rows(a) -> None:
    """Each candidate's time per (x row, weight row) on slices of growing rows of the shape's c_fc
    (the largest N), best of 5 alternating calls: where a slice stops standing for the whole weight."""
    import torch
    from codeshell.kernels import _ext, measure, ops
    torch.set_num_threads(a.threads)
    mod = _ext.get()
    n, k = SHAPES[a.shape][2]
    for fmt in a.formats:
        p = packed(fmt, n, k)
        cands = ops.prefill_candidates(p, torch.bfloat16, ops.isa_level())
        for m in (128, 512):
            x = torch.randn(m, k).bfloat16()
            for rows in sorted({r for r in (256, 512, 1024, 2048, 4096) if r < n} | {n}):
                part = measure._row_slice(p, rows)
                for c in cands:
                    measure._time_call(c, mod, x, part, torch.bfloat16)
                ts = {c: [] for c in cands}
                for _ in range(5):
                    for c in cands:
                        ts[c].append(measure._time_call(c, mod, x, part, torch.bfloat16))
                print(f"{fmt} {n}x{k} M={m} rows={rows} ({part.nbytes / 2**20:.1f} MiB): " + ", ".join(
                    f"{c} {min(t) / rows / m * 1e9:.2f}" for c, t in ts.items()) + " ns a (row, weight row)", flush=True)


def part_levels(a) -> None:
    """The host's level and a fresh quick measurement of each shape, every ~0.3 s for a.seconds."""
    import statistics

    import torch
    from codeshell.kernels import _ext, choices, measure, ops
    os.environ["CODESHELL_KERNEL_CHOICES"] = "off"
    os.environ["CODESHELL_KERNEL_MEASURE"] = "quick"
    choices.forget()
    torch.set_num_threads(a.threads)
    mod = _ext.get()
    isa = 1 if ops.isa_level() >= ops.ISA_LEVELS.index("avx512_vnni") else 0
    cpus = sorted(os.sched_getaffinity(0))
    real = measure._host_level

    def one_thread(cpu: int) -> float:  # one thread's FMA peak on one CPU, GFLOP/s (best of 3)
        os.sched_setaffinity(0, {cpu})
        torch.set_num_threads(1)
        best, fl = float("inf"), 0
        for _ in range(3):
            t = time.perf_counter()
            fl = mod.bf16_fma_peak(measure.MEASURE_LEVEL_REPS, isa)
            best = min(best, time.perf_counter() - t)
        os.sched_setaffinity(0, set(cpus))
        torch.set_num_threads(a.threads)
        return fl / best / 1e9

    weights = [(f"{fmt} {nm}", packed(fmt, n, k)) for fmt in a.formats for nm, (n, k) in zip(NAMES, SHAPES[a.shape])]
    print(f"levels: {a.seconds:.0f} s, threads {a.threads}, shape {a.shape}, formats {a.formats}, load avg "
          f"{os.getloadavg()[0]:.2f}; per sample: probe (both threads) GFLOP/s, CPU 0 / CPU 1 one-thread, then per "
          f"weight the winner and each candidate's us a row (quick, whole-weight scaled)", flush=True)
    rows, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        lv = measure._host_level()
        c0, c1 = one_thread(cpus[0]), one_thread(cpus[-1])
        lv2 = measure._host_level()
        # the measurement before session 36 (no probe, no level vote, a second look below a 10% lead)
        measure._host_level, relook_below = (lambda: 0.0), measure.MEASURE_RELOOK_BELOW
        measure.MEASURE_RELOOK_BELOW = measure.MEASURE_CLOSE
        try:
            res = plan_all(weights, "quick")
        finally:
            measure._host_level, measure.MEASURE_RELOOK_BELOW = real, relook_below
        rows.append((time.perf_counter() - t0, min(lv, lv2), c0, c1, res))
        print(f"{rows[-1][0]:5.1f}s probe {lv:5.1f}/{lv2:5.1f} cpu {c0:5.1f}/{c1:5.1f}  " + "  ".join(
            f"{x['name'].split()[-1]}:{x['path']}({'/'.join(f'{t * 1e6:.1f}' for t in x['times'].values())})"
            for x in res if not x["checks"].get("shared")), flush=True)
        time.sleep(0.3)
    levels = sorted(r[1] for r in rows)
    cut = statistics.median(levels)
    print(f"\nprobe: min {levels[0]:.1f} median {cut:.1f} max {levels[-1]:.1f}; CPU 0 one-thread median "
          f"{statistics.median(r[2] for r in rows):.1f}, CPU 1 {statistics.median(r[3] for r in rows):.1f}")
    for i, (name, _) in enumerate(weights):
        for label, sel in (("probe >= median", lambda r: r[1] >= cut), ("probe < median", lambda r: r[1] < cut)):
            got = [r[4][i] for r in rows if sel(r)]
            wins = collections.Counter(x["path"] for x in got)
            med = {c: statistics.median(x["times"][c] for x in got) * 1e6 for c in (got[0]["times"] if got else {})}
            print(f"  {name:18s} {label:16s} n={len(got):3d} winners {dict(wins)}; median us a row "
                  + ", ".join(f"{c} {t:.2f}" for c, t in med.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["shapes", "load", "rows", "levels"], default="shapes")
    ap.add_argument("folders", nargs="*", help="checkpoint folders (--part load); seconds (--part levels)")
    ap.add_argument("--shared", action="store_true",
                    help="--part load: add processes sharing one choices file (empty at the start)")
    ap.add_argument("--no-level-ab", action="store_true",
                    help="--part load: add first loads without the level probe (the measurement before session 36)")
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--formats", nargs="+", choices=["bf16", "int8", "int4"], default=["bf16", "int8", "int4"])
    ap.add_argument("--modes", nargs="+", choices=["quick", "full"], default=["full", "quick"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.part == "shapes":
        part_shapes(a)
    elif a.part == "rows":
        part_rows(a)
    elif a.part == "levels":
        a.seconds = float(a.folders[0]) if a.folders else 30.0
        part_levels(a)
    else:
        if not a.folders:
            raise SystemExit("--part load needs checkpoint folders")
        part_load(a)


if __name__ == "__main__":
    main()
