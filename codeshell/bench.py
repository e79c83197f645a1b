"""`codeshell bench`: prefill and decode speed and memory of the runtime on this machine.

Measures through the engine exactly what a user gets: a prompt's prefill, decode at batch 1
and at batch N, peak memory, and the machine's memory read bandwidth, from which it prints
the decode bound (every weight is read once per decode step). Random weights of a named
shape need no download; speed does not depend on weight values.

Each phase (writing random weights or loading a checkpoint, packing, prefill, decode, the
bandwidth probe) reports its progress and running figure as it goes (`BenchProgress`: a rich
display on a terminal, one line per finished phase otherwise); the table comes at the end.
This is not a profiler: it measures the engine as a user runs it, not its parts.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .config import SHAPES, CodeShellConfig

# progress(phase, done, total, figure): called when a phase starts (done 0), as it advances and
# when it ends (done == total); `total` None for a phase of unknown length, `figure` its running
# result ("12.3 tokens/s").
ProgressFn = Callable[[str, int, "int | None", str], None]


def _no_progress(phase: str, done: int, total: int | None, figure: str = "") -> None:
    pass


class BenchProgress:
    """The bench's phases on stderr as they run: with rich on a terminal (one line per phase, its
    count, running figure and time), one plain line per finished phase otherwise (logs, pipes).
    CODESHELL_NO_PROGRESS=1 silences it."""

    def __init__(self, console=None, enabled: bool | None = None):
        from rich.console import Console
        self.console = console or Console(stderr=True)
        if enabled is None:
            enabled = os.environ.get("CODESHELL_NO_PROGRESS") != "1"
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self._tasks: dict[str, int] = {}
        self._start: dict[str, float] = {}
        self._prog = None

    def __enter__(self) -> "BenchProgress":
        if self.live:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            self._prog = Progress(SpinnerColumn(finished_text="[green]done"), TextColumn("{task.description}"),
                                  BarColumn(), TextColumn("{task.fields[count]}"),
                                  TextColumn("[bold]{task.fields[figure]}"), TimeElapsedColumn(),
                                  console=self.console)
            self._prog.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._prog is not None:
            self._prog.__exit__(*exc)
            self._prog = None

    def __call__(self, phase: str, done: int, total: int | None, figure: str = "") -> None:
        if not self.enabled:
            return
        if phase not in self._start:
            self._start[phase] = time.perf_counter()
        count = f"{done:,}/{total:,}" if total and total > 1 else ""
        finished = total is not None and done >= total
        if self._prog is not None:
            if phase not in self._tasks:
                self._tasks[phase] = self._prog.add_task(phase, total=total, count=count, figure=figure)
            self._prog.update(self._tasks[phase], total=total, completed=done, count=count, figure=figure)
        elif finished:
            took = time.perf_counter() - self._start[phase]
            self.console.print(f"bench: {phase}: {figure + ', ' if figure else ''}{took:.1f} s", highlight=False)

    def finish(self, phase: str, figure: str = "", started: float | None = None) -> None:
        """End a phase of unknown length (that began at `started`, a perf_counter time, if given)."""
        if started is not None:
            self._start.setdefault(phase, started)
        self(phase, 1, 1, figure)


def alternating_medians(fns: dict[str, Callable[[], object]], reps: int, rounds: int, rotate: bool = False,
                        env: dict[str, dict[str, str]] | None = None) -> dict[str, float]:
    """Median seconds per call of each of `fns` (name -> callable) over `rounds` rounds that
    alternate them (after one warm-up round that is not counted), `reps` calls a round each.

    For the kernel A/B scripts in benchmarks/: on a shared 2-core host the machine's speed drifts
    between minutes, so the candidates take turns within each round instead of running one after
    the other. `rotate` starts each round at the next candidate (no fixed order to favour one);
    `env` (name -> {VAR: value}) sets a candidate's environment switches before its calls (the
    switches any candidate names are cleared before every candidate's turn and after the last)."""
    import statistics
    keys = {k for e in (env or {}).values() for k in e}
    times: dict[str, list[float]] = {v: [] for v in fns}
    try:
        for r in range(rounds + 1):
            order = list(fns.items())
            if rotate:
                order = order[r % len(order):] + order[:r % len(order)]
            for v, f in order:
                for k in keys:
                    os.environ.pop(k, None)
                os.environ.update((env or {}).get(v, {}))
                t0 = time.perf_counter()
                for _ in range(reps):
                    f()
                if r:  # round 0 warms up
                    times[v].append((time.perf_counter() - t0) / reps)
    finally:
        for k in keys:
            os.environ.pop(k, None)
    return {v: statistics.median(t) for v, t in times.items()}


def fill_random_(model: torch.nn.Module, seed: int = 0, std: float = 0.02,
                 advance: Callable[[int], None] | None = None) -> None:
    """Fill every parameter with N(0, std) values (LayerNorm weights 1) without a randn per tensor.

    Generating 7B normal samples takes minutes on two cores; tiling one 16M-value random block
    takes seconds, and speed does not depend on the values. `advance(n)` is told of each
    tensor's n values once it is written.
    """
    g = torch.Generator().manual_seed(seed)
    p0 = next(model.parameters())
    block = (torch.randn(1 << 24, generator=g) * std).to(p0.dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                flat = p.view(-1)
                for start in range(0, flat.numel(), block.numel()):
                    n = min(block.numel(), flat.numel() - start)
                    flat[start:start + n].copy_(block[:n])
            if advance is not None:
                advance(p.numel())


def random_model(cfg: CodeShellConfig, dtype: torch.dtype, device: str = "cpu",
                 progress: ProgressFn = _no_progress) -> torch.nn.Module:
    from .weights import build_empty
    m = build_empty(cfg, dtype, device)
    total = sum(p.numel() for p in m.parameters())
    phase = "writing random weights"
    done = 0
    progress(phase, 0, total, "")

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(phase, done, total, f"{_values(done)} / {_values(total)} values")
    fill_random_(m, advance=advance)
    return m


def _values(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5, progress: ProgressFn = _no_progress) -> float:
    """Best-of-N memory read bandwidth in GB/s over a buffer larger than any cache, on torch's
    thread count: the best of torch's float32 sum and, with the native kernels, a plain read of
    every byte (`read_stream`: 256-bit loads, the decode kernels' chunking, with their 2 KiB software
    prefetch and without any: on the Zen 4 EPYC a core read ~8% faster without it, session 39). Any
    one alone can read low: the sum is not memory bound on every CPU (Zen 4, 2 threads: 46-59 GB/s
    while the int8 decode kernel streamed 62), and a probe below what the kernels reach would make
    a "% of the bound" over 100% mean nothing."""
    from .kernels import _ext, hugepages
    phase = "memory read bandwidth"
    mod = _ext.get()
    probes = [lambda: x.sum()] + ([lambda: mod.read_stream(x, 1), lambda: mod.read_stream(x, 1, 0)]
                                  if mod is not None else [])
    progress(phase, 0, repeats * len(probes), "")
    # placed as the weights are (kernels/hugepages.py): the bound is the best read of the machine
    x = hugepages.empty((int(gib * (1 << 30)) // 128 * 32,), torch.float32).fill_(1.0)
    best, done = float("inf"), 0
    for probe in probes:
        probe()
        for _ in range(repeats):
            t = time.perf_counter()
            probe()
            best = min(best, time.perf_counter() - t)
            done += 1
            progress(phase, done, repeats * len(probes), f"{x.numel() * 4 / best / 1e9:.1f} GB/s")
    return x.numel() * 4 / best / 1e9


def prompt_flops(cfg: CodeShellConfig, tokens: int, last_rows: bool | None = None) -> float:
    """Floating-point operations of one `tokens`-long prefill, as the engine does it: 2 per weight of
    the blocks' linears per token, causal attention's QK^T and PV (T^2 / 2 query-key pairs, 2 *
    n_embd flops each, per layer, counted as 2 T^2 n_embd), and the output head for the last token
    only (the engine's prefill computes logits for the position it samples). last_rows (the engine's
    default since session 36, `CODESHELL_PREFILL_LAST_ROWS`): the last block runs c_attn on every
    token (its keys and values are stored) but its attention, attn.c_proj and MLP on the sampled
    token only, so the count is the work done, not the work a whole forward would do (a "% of peak"
    must not count skipped work); False: the whole last block, as a plain forward; None: as the
    engine's switch stands now (`engine._LAST_ROWS`, which A/B runs turn)."""
    if last_rows is None:
        from .engine import engine as _engine
        last_rows = _engine._LAST_ROWS
    d = cfg.n_embd
    rest = d * d + 2 * d * cfg.ffn_dim  # attn.c_proj, c_fc, mlp.c_proj
    per_layer = d * cfg.qkv_dim + rest  # and c_attn
    full = 2.0 * per_layer * cfg.n_layer * tokens + 2.0 * tokens * tokens * d * cfg.n_layer + 2.0 * cfg.vocab_size * d
    if not last_rows or cfg.n_layer == 0:
        return full
    # the last block's rows past its keys and values: T - 1 rows of the three linears, and of the
    # attention's T^2 / 2 pairs only the sampled query's T (4 * n_embd flops a pair)
    return full - 2.0 * rest * (tokens - 1) - (2.0 * tokens * tokens * d - 4.0 * tokens * d)


def bf16_matmul_peak(m: int = 512, cfg: CodeShellConfig | None = None, repeats: int = 3) -> dict[str, float]:
    """The machine's bf16 matmul peak in TFLOP/s on the current thread count, for prompt figures
    to be put against, the largest of the candidates measured now (`peak`):
    * `torch`: torch's own bf16 matmul (oneDNN) over CodeShell-7B's four linear shapes at
      M = `m` (total flops / the sum of each shape's best time);
    * `kernel`: our AMX-BF16 micro-kernel with every thread on L2-resident tiles (AMX CPUs);
    * `dot_kernel`: our vdpbf16ps micro-kernel on L1-resident operands (`dot_tflops`,
      AVX512-BF16 CPUs);
    * on CPUs without bf16 hardware (no AVX512-BF16, no AMX: e.g. Ice Lake, AVX2-only CPUs) our
      bf16 path is fp32 FMA (the bf16 weights widened to fp32), and torch's bf16 matmul is
      emulated there (0.02-0.06 TFLOP/s on a 2-core Ice Lake-class Xeon, far below what the same
      machine multiplies in fp32), so the ceiling of that path counts instead: `torch_fp32`,
      torch's fp32 matmul (MKL / oneDNN) on the same shapes, and `fma_kernel`, our fp32-FMA
      micro-kernel on L1-resident operands (`fma_tflops`: the register block of the AVX-512
      GEMM `avx512_vnni:gemm`, or of `avx2:panel` on AVX2-only CPUs).
    Each figure is measured now: a ratio against it holds on any machine."""
    from .kernels import _ext, ops
    cfg = cfg or SHAPES["7b"]
    level = ops.isa_level() if _ext.get() is not None else -1
    bf16_hw = level >= ops.ISA_LEVELS.index("avx512_bf16")
    out = {"torch": _torch_matmul_tflops(torch.bfloat16, m, cfg, repeats)}
    if not bf16_hw:
        out["torch_fp32"] = _torch_matmul_tflops(torch.float32, m, cfg, repeats)
    kernel = amx_tile_tflops(True, repeats + 1)
    if kernel is not None:
        out["kernel"] = kernel
    dot = dot_tflops(repeats + 1)
    if dot is not None:
        out["dot_kernel"] = dot
    if not bf16_hw:
        fma = fma_tflops(repeats + 1)
        if fma is not None:
            out["fma_kernel"] = fma
    out["peak"] = max(out.values())
    return out


def best_peaks(*runs: dict[str, float]) -> dict[str, float]:
    """Several `bf16_matmul_peak` measurements of one run folded into one: each candidate's best,
    and `peak` the best of those. Why: the host's speed moves between minutes (2-core VMs: the
    fp32-FMA micro-kernel read 0.23-0.33 TFLOP/s in runs minutes apart), so a peak measured once,
    in a slow minute, flatters every prompt figure put against it; as with the read-bandwidth
    bound, the best of the run's probes is the honest (strictest) denominator."""
    out: dict[str, float] = {}
    for r in runs:
        for k, v in r.items():
            if k != "peak" and v == v:  # NaN (a candidate this CPU lacks) never wins
                out[k] = max(out.get(k, v), v)
    out["peak"] = max(out.values())
    return out


def _torch_matmul_tflops(dtype: torch.dtype, m: int, cfg: CodeShellConfig, repeats: int) -> float:
    """TFLOP/s of torch's matmul in `dtype` over `cfg`'s four linear shapes at M = `m`: total
    flops / the sum of each shape's best of `repeats` timed calls (after a warm-up call)."""
    d = cfg.n_embd
    flops = secs = 0.0
    x = torch.randn(m, max(d, cfg.ffn_dim)).to(dtype)
    for n_out, n_in in ((cfg.qkv_dim, d), (d, d), (cfg.ffn_dim, d), (d, cfg.ffn_dim)):
        w = torch.randn(n_out, n_in).to(dtype)
        xs = x[:, :n_in].contiguous()
        torch.nn.functional.linear(xs, w)  # warm-up (oneDNN builds its kernel on the first call)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.nn.functional.linear(xs, w)
            best = min(best, time.perf_counter() - t)
        flops, secs = flops + 2.0 * m * n_out * n_in, secs + best
    return flops / secs / 1e12


def fma_tflops(repeats: int = 4, reps: int = 20000) -> float | None:
    """TFLOP/s of our fp32-FMA micro-kernel (the ceiling of the bf16 path on CPUs without bf16
    hardware, which widens bf16 weights to fp32) with every thread on L1-resident operands, the
    best of `repeats` timed calls of `reps` passes: on AVX-512 CPUs the register block of the
    fp32-FMA GEMM `avx512_vnni:gemm` (4 panels x 6 rows, 24 zmm accumulators), on AVX2-only CPUs
    that of `avx2:panel` (6 rows x 16 outputs, 12 ymm). None without the native kernels."""
    from .kernels import _ext, ops
    mod = _ext.get()
    if mod is None or ops.isa_level() < 0 or not hasattr(mod, "bf16_fma_peak"):
        return None
    isa = 1 if ops.isa_level() >= ops.ISA_LEVELS.index("avx512_vnni") else 0
    best, done = float("inf"), 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        done = mod.bf16_fma_peak(reps, isa)
        best = min(best, time.perf_counter() - t)
    return done / best / 1e12


def dot_tflops(repeats: int = 4, reps: int = 20000) -> float | None:
    """TFLOP/s of our vdpbf16ps micro-kernel (the register block of the AVX512-BF16 prefill,
    `avx512_bf16:gemm`) with every thread on L1-resident operands, the best of `repeats` timed
    calls of `reps` passes. The ceiling of AVX512-BF16 machines without AMX (on AMX machines the
    tiles' `amx_tile_tflops` is far above it). None without AVX512-BF16 or the native kernels."""
    from .kernels import _ext, ops
    mod = _ext.get()
    if mod is None or ops.isa_level() < ops.ISA_LEVELS.index("avx512_bf16") or not hasattr(mod, "bf16_dot_peak"):
        return None
    best, done = float("inf"), 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        done = mod.bf16_dot_peak(reps)
        best = min(best, time.perf_counter() - t)
    return done / best / 1e12


def amx_tile_tflops(loads: bool = True, repeats: int = 4, reps: int = 200) -> float | None:
    """TFLOP/s of our AMX-BF16 micro-kernel with every thread on L2-resident tiles (K = 4096, the 7B
    width), the best of `repeats` timed calls of `reps` passes: with the tile loads (`loads`), or
    the tdpbf16ps alone. None without AMX (or without the native kernels)."""
    from .kernels import _ext, ops
    mod = _ext.get()
    if mod is None or ops.isa_level() < ops.ISA_LEVELS.index("amx"):
        return None
    best, done = float("inf"), 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        done = mod.bf16_peak(128, reps, loads)
        best = min(best, time.perf_counter() - t)
    return done / best / 1e12


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes decode reads per token: every weight tensor once (the kernels' packed layouts
    included, shared storage counted once; the tied token embedding is read whole as the output
    head). An untied embedding, or one whose head is a `QuantLinear` read in its own format, and a
    learned position embedding are only looked up, one row per token, and are not counted."""
    from .quant.linear import QuantLinear
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():  # kernel layouts kept as plain attributes
        tensors += m.kernel_tensors() if hasattr(m, "kernel_tensors") else []
        pw = getattr(m, "packed", None)  # codeshell.kernels.PackedLinear
        tensors += [getattr(pw, a, None) for a in ("data", "scales", "offsets")]
    for t in tensors:
        if t is None or not hasattr(t, "data_ptr") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    looked_up = [getattr(model.transformer, "wpe", None)]  # learned positions, if any
    if not model.cfg.tie_word_embeddings or isinstance(model.lm_head, QuantLinear):
        looked_up.append(model.transformer.wte)
    for emb in filter(None, looked_up):  # nn.Embedding's weight, or a PackedEmbedding's data
        total -= sum(t.numel() * t.element_size() for t in [*emb.parameters(), *emb.buffers()])
    return total


class HostLoad:
    """What the rest of the machine did while a benchmark ran: `with HostLoad() as h: ...`, then
    `h.other` (cores' worth of CPU that processes outside this one and its descendants used, from
    /proc/stat's busy time less this process tree's own), `h.steal` (cores' worth the hypervisor
    gave to other guests) and `str(h)`, a short note to print beside the figure.
    Why: on a shared 2-core VM the same run moves by 2-5x from minute to minute; a figure printed
    with "other 0.9 cores" says its round lost a core to something else, and one printed with
    "other 0.0" that is still slow points at what /proc cannot see (memory bandwidth taken by other
    guests: the read probe says that). Linux only; elsewhere the fields stay None.
    What this is not: a profiler, or a per-process account of the others."""

    def __init__(self) -> None:
        self.other: float | None = None
        self.steal: float | None = None
        self.wall = 0.0

    @staticmethod
    def _system() -> tuple[int, int]:
        """(busy, steal) jiffies of all CPUs since boot (busy without idle, iowait and steal)."""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
        return user + nice + system + irq + softirq, steal

    @staticmethod
    def _tree() -> int:
        """CPU jiffies of this process and its live descendants, each with its reaped children's
        (so a child that exits inside the window moves from one term to the other, not out)."""
        stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, utime + stime + cutime + cstime)
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()  # after "(comm)": field 3 on
            except OSError:  # exited meanwhile
                continue
            stats[int(d)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        total, todo = 0, [os.getpid()]
        while todo:
            pid = todo.pop()
            total += stats.get(pid, (0, 0))[1]
            todo.extend(children.get(pid, []))
        return total

    def __enter__(self) -> "HostLoad":
        try:
            self._t0, self._sys0, self._own0 = time.perf_counter(), self._system(), self._tree()
        except (OSError, ValueError, IndexError):
            self._t0 = None
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "_t0", None) is None:
            return
        try:
            (busy, steal), own = self._system(), self._tree()
        except (OSError, ValueError, IndexError):
            return
        self.wall = time.perf_counter() - self._t0
        hz = os.sysconf("SC_CLK_TCK") * max(self.wall, 1e-9)
        self.other = max(0.0, (busy - self._sys0[0] - (own - self._own0)) / hz)
        self.steal = (steal - self._sys0[1]) / hz

    def __str__(self) -> str:
        if self.other is None:
            return "host load n/a"
        return f"other processes {self.other:.2f} cores, steal {self.steal:.2f}"


def wait_quiet(max_cores: float = 0.2, window_s: float = 1.0, timeout_s: float = 30.0) -> tuple[float, float | None]:
    """Wait until the processes outside this one's tree used at most `max_cores` cores over a
    `window_s` window (`HostLoad`), or until `timeout_s` has passed; returns (seconds waited, the
    last window's other cores; None where /proc cannot say, at once).
    Why: on the shared 2-core VM another job (a test run, a compile) that takes one core doubles a
    batch-1 decode step of a memory-bound model: the 1.7B bf16 step read 112 ms with "other
    processes 1.0 cores" and 57 ms a minute later with 0.01 (docs/kernels-log.md, session 40 helper
    A); a benchmark round that starts in a quiet window measures the code, not the neighbour."""
    t0 = time.monotonic()
    while True:
        with HostLoad() as h:
            time.sleep(window_s)
        if h.other is None or h.other <= max_cores or time.monotonic() - t0 >= timeout_s:
            return time.monotonic() - t0, h.other


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure_engine(llm, prompt_len: int, decode_tokens: int, batch: int,
                   progress: ProgressFn = _no_progress, samples: int = 1) -> dict:
    """Prefill tokens/s, decode tokens/s at batch 1 and aggregate at `batch`, through the engine;
    each the best of `samples` runs (`codeshell bench --compare-llamacpp` takes as many as
    llama-bench's -r: both sides' best of the same count).

    `progress` hears of each engine step of each phase, with the phase's running tokens/s.
    """
    from .engine import SamplingParams
    eng = llm.engine
    vocab = llm.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(0, min(vocab, 60000), (n,), generator=g).tolist()

    def run(prompts, max_tokens, on_step=None):
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for i, p in enumerate(prompts):
            eng.add_request(f"bench-{time.monotonic_ns()}-{i}", p, sp)
        stamps = []
        while eng.has_unfinished():
            eng.step()
            stamps.append(time.perf_counter())
            if on_step is not None:
                on_step(stamps)
        return stamps

    progress("warm-up", 0, 1, "")
    run([prompt(8)], 2)
    progress("warm-up", 1, 1, "")
    samples = max(1, samples)
    phase = f"prefill ({prompt_len} tokens)"
    progress(phase, 0, samples, "")
    prefill_s = float("inf")
    for i in range(samples):
        t0 = time.perf_counter()
        run([prompt(prompt_len)], 1)
        prefill_s = min(prefill_s, time.perf_counter() - t0)
        progress(phase, i + 1, samples, f"{prompt_len / prefill_s:.1f} tokens/s")  # the best so far
    res = {"prompt_len": prompt_len, "prefill_s": prefill_s, "prefill_tok_s": prompt_len / prefill_s}
    for b in sorted({1, batch}):
        phase = f"decode, batch {b}"
        steps = decode_tokens + 1
        total = steps * samples
        progress(phase, 0, total, "")
        dt = float("inf")
        for i in range(samples):
            def on_step(stamps, phase=phase, b=b, steps=steps, total=total, before=i * steps):
                # The first step prefills and samples token 1; the rest are pure decode steps.
                n = len(stamps) - 1
                figure = f"{b * n / (stamps[-1] - stamps[0]):.2f} tokens/s" if n else ""
                progress(phase, before + min(len(stamps), steps), total, figure)
            stamps = run([prompt(16) for _ in range(b)], steps, on_step)
            dt = min(dt, stamps[-1] - stamps[0])
        res[f"decode_b{b}_tok_s"] = b * decode_tokens / dt
        if samples > 1:  # the figure shown last is the best sample's, the result
            progress(phase, total, total, f"{res[f'decode_b{b}_tok_s']:.2f} tokens/s")
    return res


def run_bench(model: str | None, shape: str | None, dtype: str = "bfloat16", device: str = "cpu",
              prompt_len: int = 512, decode_tokens: int = 16, batch: int = 8, threads: int | None = None,
              json_out: Path | None = None, print_table: bool = True, progress: bool | None = None,
              samples: int = 1) -> dict:
    """Measure and (by default) print the table; `progress` None shows it unless CODESHELL_NO_PROGRESS=1;
    each speed figure the best of `samples` runs (`measure_engine`)."""
    from .llm import LLM, default_threads
    from .weights import resolve_dtype
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown --shape {shape!r}; choose one of {', '.join(SHAPES)}")
    t0 = time.perf_counter()
    if model is not None:
        # Loading shows its own per-shard progress (codeshell.weights) before the phases start.
        llm = LLM(model, dtype=dtype, device=device, max_batch=max(batch, 1), threads=threads)
        cfg = llm.config
        what = str(model)
    with BenchProgress(enabled=progress) as report:
        if model is not None:  # its own bar and spinners showed while it ran; now its line
            report.finish(f"loading {model} (weights, native kernels, packing)", started=t0)
        if shape is not None:
            cfg = SHAPES[shape]
            m = random_model(cfg, resolve_dtype(dtype), device, report)
            from .kernels import available
            report("native kernels (built on first use)", 0, None, "")
            report.finish("native kernels (built on first use)", "available" if available() else "unavailable: torch fallback")
            report("packing weights for the kernels", 0, None, "")
            llm = LLM.from_model(m, cfg, max_batch=max(batch, 1), threads=threads)
            report.finish("packing weights for the kernels")
            del m
            what = f"random {shape} ({_values(cfg.num_parameters())} parameters)"
        load_s = time.perf_counter() - t0
        res = {"model": what, "dtype": dtype, "threads": threads, "load_s": load_s}
        res.update(measure_engine(llm, min(prompt_len, llm.max_model_len - 2), decode_tokens, batch, report, samples))
        res["peak_rss_gib"] = peak_rss_gib()
        bw = read_bandwidth_gbs(progress=report)
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
