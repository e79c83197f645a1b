"""How a prefill path is chosen on this machine: the candidates measured on the weight, and whether
the result is one to keep on disk.

What this is: `measure(key, cands, p, x_dtype, held)`, which `ops._choose` calls once per weight
shape (and x dtype, ISA level) where `ops.prefill_candidates` offers more than one path for prefill
M (above ROW_INVARIANT_MAX_M): the looks at the candidates (`_look`: timed calls at each of
PREFILL_MEASURE_ROWS, rotated rounds), the quick measurement on a slice of the weight's rows shared
by weights of one slice shape (session 33, `mode()`), and the checks that decide whether the winner
is stored for later processes (steady repeats, a second look where the first was unsteady or close,
a quiet host) and (session 36) the host's speed level around each look (`_host_level`,
`MEASURE_LEVEL_GAIN`: the host moves between levels over seconds, and a slow level can turn the
candidates' order). It returns the winner, its times and checks; `ops` keeps them (`_CHOICES`,
`CHOICE_TIMES`, `CHOICE_CHECKS`) and `choices.py` keeps trusted winners on disk (and untrusted ones
as provisional entries); `relook` says whether a stored winner is to be measured again.
What this is not: the dispatch (`ops.plan`, `ops.prefill_candidates`), the kernels' calls
(`ops._compute`) or the on-disk store (`choices.py`). Moved out of ops.py in session 34 (ops.py had
grown to 790 lines around it); tests replace `_time_call`, `_host_load`, `_others_per_core` and
`_host_level` here.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from . import _ext, ops
from .packing import PackedWeight

# Rows of x at which a prefill choice is measured: the M buckets of the engine's prefill steps
# (its prefill_chunk, 512 tokens a step, in padded groups of any size up to it).
PREFILL_MEASURE_ROWS = (128, 256, 512)


MEASURE_ROUNDS = 5
"""Timed calls per candidate per M in `_measure` (after one warm-up call), candidates alternating;
at most this many in a quick measurement (`MEASURE_MIN_ROUNDS`)."""

MEASURE_MIN_ROUNDS = 3
"""Quick measurement (session 33): at each M the rounds stop after this many once the look there is
steady (every candidate's median within MEASURE_SCATTER_MAX of its best) and its leader is ahead of
every other candidate by MEASURE_CLEAR; else they go on to MEASURE_ROUNDS. Three calls are the
fewest whose median a single burst cannot move."""

MEASURE_CLEAR = 0.20
"""Quick measurement: a lead at one M of at least this fraction (twice MEASURE_CLOSE) ends that M's
rounds at MEASURE_MIN_ROUNDS (two more calls of each, best kept, do not turn such a lead)."""

MEASURE_SLICE_WEIGHTS = 1 << 20
"""Quick measurement: the candidates run on the weight's first rows, at least this many weights
(rows x K; rows a multiple of MEASURE_SLICE_ALIGN, at least MEASURE_SLICE_MIN_ROWS), where the whole
weight is larger: the prefill paths' cost is linear in N for a fixed K and M (they split N between
the threads and stream it in panels; x and its int8 rounding are per call, whatever N), so the time
per row of the slice, scaled by N / rows, stands for the whole weight's. 1M weights: ~1.3 ms a
call at M = 128 on the 2-core AVX2 host, past the calls' fixed costs; the candidates' order on
slices of 512 rows and more was the whole weight's (`bench_first_load.py --part rows`). The slice is a view of the
packed weight (no copy); a candidate that expands the weight (sgemm:fp32, the bf16 blocks) expands
only the slice's rows. Weights of one kind, K (and int4 group / symmetry) measure the same slice
shape, so they share one measurement (`_SLICE_LOOKS`): the 7B's c_attn, attn.c_proj and c_fc (K =
4096) are one measurement."""

MEASURE_SLICE_ALIGN = 64  # slice rows: a multiple of the bf16 panel (16) and of the integer GEMM's 16-row blocks, per thread
MEASURE_SLICE_MIN_ROWS = 256

_MEASURE_MODES = ("quick", "full")
_MODE: dict[str | None, str] = {}  # CODESHELL_KERNEL_MEASURE value -> mode (read once per value)


def mode() -> str:
    """`CODESHELL_KERNEL_MEASURE`: `quick` (default, session 33: a slice of the weight, shared by the
    weights of one (kind, K), rounds that stop early on a clear steady lead) or `full` (the
    measurement before: every candidate on the whole weight of every shape, MEASURE_ROUNDS rounds;
    for A/B, `benchmarks/bench_first_load.py`). Another value is a ValueError naming both."""
    env = os.environ.get("CODESHELL_KERNEL_MEASURE")
    hit = _MODE.get(env)
    if hit is None:
        hit = (env or "quick").strip().lower()
        if hit not in _MEASURE_MODES:
            raise ValueError(f"CODESHELL_KERNEL_MEASURE={env!r}: expected quick or full")
        _MODE[env] = hit
    return hit


def _measure_rows(p) -> int:
    """Rows of the weight a quick measurement runs the candidates on (all N where the slice would
    be most of it)."""
    n, k = p.out_features, p.in_features
    rows = max(MEASURE_SLICE_MIN_ROWS, -(-MEASURE_SLICE_WEIGHTS // k))
    rows = -(-rows // MEASURE_SLICE_ALIGN) * MEASURE_SLICE_ALIGN
    return n if rows * 4 >= n * 3 else rows


def _row_slice(p: PackedWeight, rows: int) -> PackedWeight:
    """The packed weight's first `rows` output rows as a PackedWeight sharing its storage (views:
    bf16 keeps whole 16-row panels, rows being a multiple of MEASURE_SLICE_ALIGN)."""
    if rows >= p.out_features:
        return p
    data = p.data[: -(-rows // 16)] if p.kind == "bf16" else p.data[:rows]
    return PackedWeight(p.kind, rows, p.in_features, data, None if p.scales is None else p.scales[:rows],
                        None if p.offsets is None else p.offsets[:rows], p.group_size)


_SLICE_LOOKS: dict[tuple, tuple[tuple, dict[str, float], dict, bool]] = {}
"""Quick measurements of this process by slice shape (kind, K, rows, int4 group, symmetric, ISA
level, x dtype, candidates, threads): (the choice key measured, seconds per row of the slice,
checks, trusted); a weight of another N with the same slice shape takes it instead of measuring."""

_CALLS = [0]  # `_look`'s candidate calls since import (warm-ups included): the checks' `calls`

MEASURE_SCATTER_MAX = 0.25
"""A look at the candidates is steady when, for every candidate at every measured M, the median of
its MEASURE_ROUNDS calls is within this fraction of their best. In quiet minutes of the 2-core Zen 5
host the small shape's and codeshell-mini's bf16 candidates read 1.00-1.09 (session 22); another
process's burst inside one candidate's calls reads 1.5-3x."""

MEASURE_CLOSE = 0.10
"""A winner within this fraction of the runner-up gets a second look before it is stored (a close
call is where a little load flips the order); steady looks whose winners differ but are each within
it are stored either way (the candidates then run at the same speed)."""

MEASURE_RELOOK_BELOW = MEASURE_CLEAR
"""A first look whose winner leads by less than this gets a second look (MEASURE_CLOSE before session
36). Session 36: two of six quiet first loads of codeshell-mini int8 (the host's fast level, no other
process) stored `sgemm:fp32` for c_fc (1024 x 256) on one look with a lead of 14.5 / 17%, where
`avx2:gemm` measures 14% ahead on clean calls (bench_first_load.py) and the all-GEMM path set prefills
a 512-token prompt 1.19x faster end to end: the GEMM's calls there are often far slower than its best
(at M = 128 its median of 15 calls alternating with the others 5.7x its best, of 15 in a row 57x), so
three calls need not hold a clean one. The second look's calls give each candidate more chances at one (its least
time over both looks), and looks that disagree are not stored."""

MEASURE_LOAD_MAX = 1.5
"""No choice is stored while the host's 1-minute load average is above this many runnable tasks
per core (this process's own threads count: 2 on the 2-core host while it measures): session 21
stored `onednn:bf16` for the small shape's 4096 x 1024 and 1024 x 1024 weights in a minute where
helpers' builds held the load at 3-35, where a quiet minute measures the vdpbf16ps GEMM 1.3-1.5x
faster. The load average lags by up to a minute, so it is one check of three (with the repeats'
scatter and the second look), not the only one."""

def _time_call(c: str, mod, x: torch.Tensor, p: PackedWeight, x_dtype: torch.dtype,
               epilogue: str | None = None) -> float:
    """One call of candidate c, timed up to what the model takes from it: the result in x's dtype
    (as `linear` returns it: the GEMMs' bf16 epilogue where they have one, `module.epilogue_call`;
    the other fp32 paths' conversion to bf16 is part of their cost; oneDNN returns bf16 itself), or
    with epilogue="gelu" the GELU of it (`module.gelu_call`: the GEMMs' GELU epilogue, the others'
    output then the fused GELU pass). Session 41: the candidates were timed bare, so a GELU linear's
    choice left out the pass the paths without the epilogue need after them (session 40, helper C).
    Tests replace this with scripted times."""
    from . import module  # (module imports ops, which imports this)
    t = time.perf_counter()
    if epilogue == "gelu" and x_dtype == torch.bfloat16:
        module.gelu_call(c, mod, x, p, None)
    elif x_dtype != torch.bfloat16 or module.epilogue_call(c, mod, x, p, None, False) is None:
        ops._compute(c, mod, x, p, None).to(x_dtype)
    return time.perf_counter() - t


def _host_load() -> float:
    """The host's 1-minute load average per core (0 where the OS does not say). Tests replace it."""
    try:
        return os.getloadavg()[0] / max(1, os.cpu_count() or 1)
    except (AttributeError, OSError):
        return 0.0


MEASURE_LEVEL_GAIN = 0.25
"""The host's speed moves between levels over seconds (session 35: one thread's fp32-FMA peak read
46-101 GFLOP/s within 40 s, the two vCPUs independently), and a measurement (a few hundredths of a
second for codeshell-mini, a second or two for the 1.7b) sits inside one level, where the candidates'
order need not be the fast level's (session 35's cache: a quiet process stored `sgemm:fp32` for mini
int8's 256 x 256 at 5.3 us a row against the GEMM's 5.5, every candidate 1.3-2x its time in other
entries, where those measure the GEMM 2.7-3.4 against 3.4-4.4). So each measurement records the host's level (`_host_level`) with its times, and:
* a look taken at a level more than this fraction below the measurement's best look has no vote
  (the times still count: each candidate keeps its least time over every look);
* a stored choice measured at a level more than this fraction below the level a later process reads
  at its lookup is measured again by that process, its looks merged with the stored times (each
  candidate's least), and the winner of the merged times replaces it (or confirms it) when the new
  measurement passes the trust checks. 0.25: above the probe's own scatter in a quiet minute (its
  two-thread readings 114-160 GFLOP/s over 60 probes, session 36), below the slow levels that turn the
  order (mini's GEMM 1.6-2x slower; a second thread held by another process reads 6-40). The stored
  level only grows (a re-look keeps the higher), so an entry is measured again a few times at most."""

MEASURE_LEVEL_REPS = 500
"""`_host_level`: FMA passes a probe call (~0.5 ms on the 2-core Zen 3); the best of MEASURE_LEVEL_CALLS
calls, or of those made within MEASURE_LEVEL_BUDGET seconds (at least one). A call that waited for a
descheduled second thread reads far below the level (session 36, a loaded host: 6-40 against ~190
GFLOP/s on two threads, each call taking ~3-7 ms instead of 0.5): the best of several where they are
cheap, and a bounded cost where they are not (best of 5 x 1000 passes cost a median 38 ms a probe there,
~10 probes a first load)."""

MEASURE_LEVEL_CALLS = 5
MEASURE_LEVEL_BUDGET = 0.004

MEASURE_LEVEL_AGE = 0.25
"""`_level`: a probe younger than this (seconds) stands for now (a measurement's closing probe is the
next weight's opening one; a cached load's lookups share one)."""

_LEVEL: list[float] = [0.0, -1e9]  # the last probe: (GFLOP/s, perf_counter when taken)


def _host_level() -> float:
    """The host's speed now: GFLOP/s of the fp32-FMA micro-kernel run on every one of torch's threads at
    once (`bf16_fma_peak`; the call lasts as long as its slowest thread, so it reads the slower vCPU's
    level; one whose second thread is descheduled reads far lower), best of MEASURE_LEVEL_CALLS calls of
    MEASURE_LEVEL_REPS passes; 0 without the native kernels (no level: no re-look). Tests replace it."""
    mod = _ext.get()
    level = ops.isa_level()
    if mod is None or level < 0 or not hasattr(mod, "bf16_fma_peak"):
        return 0.0
    isa = 1 if level >= ops.ISA_LEVELS.index("avx512_vnni") else 0
    best, flops, t0 = float("inf"), 0, time.perf_counter()
    for _ in range(MEASURE_LEVEL_CALLS):
        t = time.perf_counter()
        flops = mod.bf16_fma_peak(MEASURE_LEVEL_REPS, isa)
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - t0 > MEASURE_LEVEL_BUDGET:
            break
    return flops / best / 1e9 if best > 0 else 0.0


def _level(max_age: float = MEASURE_LEVEL_AGE) -> float:
    """The host's level (`_host_level`), probed again unless the last probe is younger than max_age."""
    now = time.perf_counter()
    if now - _LEVEL[1] > max_age:
        _LEVEL[0] = _host_level()
        _LEVEL[1] = time.perf_counter()
    return _LEVEL[0]


def relook(entry: dict) -> bool:
    """Whether a stored choice (`choices.entry`) was measured at a level of the host more than
    MEASURE_LEVEL_GAIN below the one this process reads now, so this process measures it again
    (an entry without a level, written before session 36, counts as level 0: measured again once)."""
    now = _level()
    return now > 0 and now > float(entry.get("checks", {}).get("level") or 0.0) * (1 + MEASURE_LEVEL_GAIN)


MEASURE_OTHERS_MAX = 0.15
"""No choice is stored when other processes (and the hypervisor's steal) took more than this many
cores' worth per core of the host while it was measured (`_others_per_core`: /proc/stat's busy and
steal time less this process's CPU time, over the measurement's wall time). Session 33: the 1-minute
load average lags, and a quick measurement (about a second) can sit wholly inside another process's
burst and still look steady: the 1.7b int4 shapes' quick look took `avx2:q8` as one to store, a 32% lead (load
average 1.15 a core, other jobs running) where quiet runs measure `avx2:gemm` ahead at every slice
size (benchmarks/bench_first_load.py). 0.15 a core: 0.3 cores of the 2-core host, past the jiffies'
rounding over a measurement of a few tenths of a second."""


def _cpu_mark() -> tuple[float, float, int] | None:
    """(wall, this process's CPU seconds, the host's busy + steal jiffies) now; None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return time.perf_counter(), time.process_time(), user + nice + system + irq + softirq + steal


def _others_per_core(mark: tuple[float, float, int] | None) -> float:
    """Cores' worth of CPU time per core of the host that other processes (and steal) took since
    `mark` (`_cpu_mark`); 0 where the OS does not say. Tests replace it."""
    now = _cpu_mark()
    if mark is None or now is None:
        return 0.0
    cpus, hz = max(1, os.cpu_count() or 1), os.sysconf("SC_CLK_TCK")
    wall = max(now[0] - mark[0], 1e-6)
    # less two jiffies a CPU: the busy count's rounding (a scripted measurement of no time reads 0)
    others = (now[2] - mark[2] - 2 * cpus) / hz - (now[1] - mark[1])
    return max(0.0, others / wall) / cpus


def _look(cands: list[str], p: PackedWeight, x_dtype: torch.dtype, mod, turn: int,
          quick: bool = False, epilogue: str | None = None) -> tuple[dict[str, float], float]:
    """One look at the candidates: at each of PREFILL_MEASURE_ROWS a warm-up call each, then
    MEASURE_ROUNDS rounds, the candidates alternating in a rotated order each round (starting at
    `turn`, so a second look does not repeat the first's order). Returns (seconds per row summed
    over the Ms, the best call of each candidate at each M; the look's scatter: the largest
    median / best - 1 over the candidates and Ms).
    quick (session 33): the warm-up calls at the first M only (the kernels are warm after it; a
    slow first call at the next M is one of at least three, and the best and the median pass
    over it), and at each M the rounds stop after MEASURE_MIN_ROUNDS where the look there is
    steady and its leader clear (`_clear_lead`). epilogue: `_time_call`'s (a GELU linear's "gelu")."""
    times: dict[str, float] = dict.fromkeys(cands, 0.0)
    scatter = 0.0
    for i, m in enumerate(PREFILL_MEASURE_ROWS):
        x = torch.randn(m, p.in_features, generator=torch.Generator().manual_seed(0)).to(x_dtype)
        calls: dict[str, list[float]] = {c: [] for c in cands}
        if not quick or i == 0:
            for c in cands:
                _time_call(c, mod, x, p, x_dtype, epilogue)
            _CALLS[0] += len(cands)
        for r in range(MEASURE_ROUNDS):
            k = (r + turn) % len(cands)
            for c in cands[k:] + cands[:k]:
                calls[c].append(_time_call(c, mod, x, p, x_dtype, epilogue))
            _CALLS[0] += len(cands)
            if quick and r + 1 >= MEASURE_MIN_ROUNDS and _clear_lead(calls):
                break
        for c in cands:
            best = min(calls[c])
            times[c] += best / m
            scatter = max(scatter, statistics.median(calls[c]) / best - 1 if best > 0 else float("inf"))
    return times, scatter


def _clear_lead(calls: dict[str, list[float]]) -> bool:
    """Whether the calls so far at one M are steady (each candidate's median within
    MEASURE_SCATTER_MAX of its best) and one candidate's best leads every other's by MEASURE_CLEAR."""
    best = {c: min(t) for c, t in calls.items()}
    if any(b <= 0 or statistics.median(calls[c]) / b - 1 > MEASURE_SCATTER_MAX for c, b in best.items()):
        return False
    return _margin(best) >= MEASURE_CLEAR


def _moved(a: float, b: float) -> bool:
    """Whether two probes of the host's level differ by more than MEASURE_LEVEL_GAIN (0: no probe)."""
    return a > 0 and b > 0 and max(a, b) > min(a, b) * (1 + MEASURE_LEVEL_GAIN)


def _margin(times: dict[str, float]) -> float:
    """The runner-up's time over the winner's, less 1 (inf with one candidate)."""
    t = sorted(times.values())
    return t[1] / t[0] - 1 if len(t) > 1 and t[0] > 0 else float("inf")


def measure(key: tuple, cands: list[str], p: PackedWeight, x_dtype: torch.dtype,
            held: dict[tuple, str], prior: dict | None = None) -> tuple[str, dict[str, float], dict, bool]:
    """Measures the candidates (`_look`) and returns (the one with the least time per row summed over
    PREFILL_MEASURE_ROWS, the best call of each at each M; each candidate's seconds per row of the
    whole weight; the checks; whether the measurement is one to store on disk for later processes).
    held: the choices this process holds now (`ops._CHOICES`), for the shared slice measurements. Costs 1 + MEASURE_ROUNDS calls per
    candidate per M a look, once per (weight shape, x dtype) per machine.

    Why rotated rounds and the best of them (was the best of 2 in a fixed order): on a shared
    2-core host a burst of another process's work inside both of one candidate's calls made it
    lose. Why the checks before storing (session 22): the choice is kept on disk and reused by every
    later process, so one loaded minute stuck a wrong path (session 18: the small shape's
    mlp.c_proj stored as `avx512_bf16:panel64`, 78 us a row against the GEMM's 98, and in another
    build `onednn:bf16`, where a quiet minute measures the GEMM 27, oneDNN 34, panel64 48; session
    21: `onednn:bf16` for two of the small shape's weights). So:
    * a look whose repeats scatter (median / best > 1 + MEASURE_SCATTER_MAX for any candidate at
      any M) or whose winner is within MEASURE_RELOOK_BELOW (MEASURE_CLOSE before session 36) of the
      runner-up gets a second look (another rotation); the winner is then the least of each
      candidate's best over both looks;
    * the choice is stored only when the last look is steady, the steady looks agree on the winner
      (or all call it close: the candidates then run at the same speed and either is right), and the
      host's load average is at most MEASURE_LOAD_MAX per core, and (session 33) other processes
      took at most MEASURE_OTHERS_MAX of the host's cores while it measured. Otherwise the winner
      holds for this process only and the next one measures again.

    Quick (the default, session 33, `mode`): the same looks and checks on a slice of the
    weight's rows (`_measure_rows`, `_row_slice`), with `_look`'s quick rounds, and one measurement
    for the weights of one slice shape (`_SLICE_LOOKS`: a later weight of the shape takes its
    times, checks and trust, and its winner); the times kept are the slice's per row scaled by
    N / rows, and the checks say `rows` (the slice's) and `shared` (taken from an earlier weight).
    Full: every weight measured whole, MEASURE_ROUNDS rounds (the measurement before session 33).

    The host's level (session 36, MEASURE_LEVEL_GAIN): a probe (`_level`) before the first look and
    after each; a look's level is the lesser of its two. A look whose level moved by more than
    MEASURE_LEVEL_GAIN gets a second look too; a look more than MEASURE_LEVEL_GAIN below the best
    look's level has no vote. prior: the stored entry this process measures again (`relook`), or a
    provisional one (an earlier untrusted measurement): its times (whole weight, per row) join the
    looks' (each candidate's least), when it was measured on the same rows. The checks record `level`
    (the best voting look's, or the prior's where higher: GFLOP/s), `levels` (every probe),
    `merged` (the measurements behind the times) and, for a re-look, `relook` (the stored path) and
    `overturned`."""
    t0 = time.perf_counter()
    quick = mode() == "quick"
    rows = _measure_rows(p) if quick else p.out_features
    epilogue = key[6] if len(key) > 6 else None  # a GELU linear's key ends in "gelu" (`ops._choose`)
    shape = (key[0], key[2], rows, getattr(p, "group_size", None), getattr(p, "offsets", None) is None,
             key[4], key[5], tuple(cands), torch.get_num_threads(), epilogue)
    hit = _SLICE_LOOKS.get(shape) if quick else None
    # a measurement holds while the choice it was made for does (dropping that choice from
    # `ops._CHOICES`, as tests do to measure again, drops it for its slice shape too)
    if hit is not None and held.get(hit[0]) == min(hit[1], key=hit[1].__getitem__):
        _, times, checks, trusted = hit
        checks = dict(checks, shared=True, measure_s=0.0, calls=0)
    else:
        mod = _ext.get()
        part = _row_slice(p, rows)
        calls0, mark = _CALLS[0], _cpu_mark()
        levels = [_level()]
        looks = [_look(cands, part, x_dtype, mod, 0, quick, epilogue)]
        levels.append(_level(0.0))
        # a measurement that cannot be stored (other processes ran, or the load average is high) looks
        # again only where it did before session 36 (unsteady, or a lead under MEASURE_CLOSE): on a
        # loaded host the probes swing between ~6 and ~195 and would call for a second look every time
        # (the small shape's first load measured 1.1-1.7 s against 0.7 s so), for no stored result
        storable = _others_per_core(mark) <= MEASURE_OTHERS_MAX and _host_load() <= MEASURE_LOAD_MAX
        if (looks[0][1] > MEASURE_SCATTER_MAX
                or _margin(looks[0][0]) < (MEASURE_RELOOK_BELOW if storable else MEASURE_CLOSE)
                or (storable and _moved(levels[0], levels[1]))):
            looks.append(_look(cands, part, x_dtype, mod, 1, quick, epilogue))
            levels.append(_level(0.0))
        at = [min(a, b) for a, b in zip(levels, levels[1:])]  # each look's level
        # the stored times this re-look checks (per row of x for the whole weight -> per row of the slice)
        scale = p.out_features / rows
        old = prior if prior and (prior.get("checks") or {}).get("rows", p.out_features) == rows and \
            set(prior.get("seconds") or {}) == set(cands) else None
        times = {c: min([t[c] for t, _ in looks] + ([old["seconds"][c] / scale] if old else [])) for c in cands}
        winner = min(times, key=times.__getitem__)
        winners = [min(t, key=t.__getitem__) for t, _ in looks]
        # an unsteady look has no vote, nor one taken at a level well below the best look's
        votes = [i for i, (_, s) in enumerate(looks)
                 if s <= MEASURE_SCATTER_MAX and not at[i] * (1 + MEASURE_LEVEL_GAIN) < max(at)]
        steady = [(looks[i][0], winners[i]) for i in votes]
        agree = all(w == winner for _, w in steady) or all(_margin(t) < MEASURE_CLOSE for t, _ in steady)
        load, others = _host_load(), _others_per_core(mark)
        trusted = (bool(steady) and looks[-1][1] <= MEASURE_SCATTER_MAX and agree and load <= MEASURE_LOAD_MAX
                   and others <= MEASURE_OTHERS_MAX)
        level = max([at[i] for i in votes] or at)
        if old:  # the merged times hold the prior's looks too: the best level behind them
            level = max(level, float((old.get("checks") or {}).get("level") or 0.0))
        checks = {"looks": len(looks), "scatter": [round(s, 4) for _, s in looks], "winners": winners,
                  "margin": round(_margin(times), 4), "load_per_core": round(load, 3),
                  "others_per_core": round(others, 3), "stored": trusted,
                  "rows": rows, "shared": False, "measure_s": round(time.perf_counter() - t0, 3),
                  "calls": _CALLS[0] - calls0, "level": round(level, 2),
                  "levels": [round(v, 2) for v in levels],
                  "merged": 1 + (int((old.get("checks") or {}).get("merged", 1)) if old else 0)}
        if prior and (prior.get("checks") or {}).get("stored"):  # a trusted entry measured again
            checks.update(relook=prior.get("path"), overturned=prior.get("path") != winner,
                          level_before=(prior.get("checks") or {}).get("level"))
        if quick:
            _SLICE_LOOKS[shape] = (key, times, checks, trusted)
    scale = p.out_features / rows
    return min(times, key=times.__getitem__), {c: t * scale for c, t in times.items()}, checks, trusted
