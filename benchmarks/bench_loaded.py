"""Decode and prompt speed on a host that is not quiet: ms a decode step (median and p90 over the
steps) and ms a prompt, per variant, with N competing CPU-bound processes running beside the
measurement (`--load N`), all in one process with the variants (and loads) alternating.

Why: on the 2-core machine, any other runnable process sharing the second core made every 2-thread
at::parallel_for (OpenMP) call wait ~8 ms for its second thread to be scheduled (docs/kernels-log.md,
session 18 helper A): a small-shape decode token took 124-344 ms instead of 3. A user's laptop
always runs other processes (the IDE, a browser, the server's own clients), so the defaults have to
hold up there, and this makes that minute reproducible: the load is a plain busy loop per process,
started at this process's niceness (inherited: under `flock /tmp/bench.lock nice -n -10` they run at
-10 too), for each measured block and stopped after it (always: also on an error, Ctrl-C or SIGTERM;
they also die with this process through PR_SET_PDEATHSIG).

A variant is '-' (as loaded: the defaults), `team=0|1|2` (the native decode step's thread team,
DecodeStep.team: off / on / auto, as CODESHELL_DECODE_TEAM) or comma-separated ENV=V settings that the
kernels read per call (CODESHELL_CHUNKS_TEAM=1, ...), as bench_decode_step.py --profile --ab.
Decode: `batch` requests of 16-token prompts (`--context`), greedy, `--tokens` decode steps each; every engine step
that ran the native decode call once is timed (the prefill steps are not). Prompt: one request of
`--prompt-len` tokens with max_tokens=1, timed whole (prefill and its one sampled token).
Printed: per load, per batch, per variant, the decode step's median and p90 ms (tok/s = batch * 1000 /
ms), the prompt's median ms, and what the rest of the host did meanwhile (codeshell.bench.HostLoad:
cores' worth used by processes outside this one and its children, so the load processes are not
counted there).

    flock /tmp/bench.lock nice -n -10 python benchmarks/bench_loaded.py --load 0 1 --rounds 3
    flock /tmp/bench.lock nice -n -10 python benchmarks/bench_loaded.py --model /work/ckpt/qsmall/int4 \\
        --load 0 1 --prompt-len 512 --ab team=0 team=1 team=2 team=0,CODESHELL_CHUNKS_TEAM=1
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_BUSY = "while True: pass"


def _die_with_parent(own_group: bool = True) -> None:
    """preexec_fn of a load process: its own session (setsid, so its own scheduler autogroup, as an
    application started elsewhere has; see Load) unless own_group is False, and SIGKILL when the
    process that started it dies (Linux prctl PR_SET_PDEATHSIG), so a killed benchmark leaves no busy
    loop behind."""
    if own_group:
        os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class Load:
    """`with Load(n) as load:` n busy-loop processes (plain Python `while True: pass`) run for the
    block at this process's niceness (inherited), and are killed and reaped when it ends, whatever
    ends it. `load.pids` lists them while they run.
    own_group (the default): each in a session of its own. Why: with the kernel's autogroup scheduling
    (/proc/sys/kernel/sched_autogroup_enabled = 1 on this host) niceness ranks threads only inside one
    session's group, and the groups share the CPUs equally: a busy loop started in the benchmark's own
    session at its niceness takes 1/3 of 2 cores from it (3 equal threads), one in another session (an
    IDE, a browser, another helper's pytest) takes a whole group's share whatever the niceness (session
    18: a nice-10 busy loop beside the run did not reproduce the ~8 ms waits; another helper's pytest
    did). own_group=False (--load-group same): the benchmark's session."""

    def __init__(self, n: int, own_group: bool = True) -> None:
        self.n = n
        self.own_group = own_group
        self.procs: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> "Load":
        try:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen([sys.executable, "-S", "-c", _BUSY], stdin=subprocess.DEVNULL,
                                                   preexec_fn=lambda: _die_with_parent(self.own_group)))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []

    def __enter__(self) -> "Load":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _sigterm(signum, frame) -> None:  # SIGTERM ends the run as Ctrl-C does: the `with Load` blocks stop their processes
    raise KeyboardInterrupt(f"signal {signum}")


def hold(n: int, own_group: bool = True) -> None:
    """--hold-load N (for tests/kernels/test_loaded.py): start the load, print its pids and this
    process's niceness, then wait for a signal."""
    signal.signal(signal.SIGTERM, _sigterm)
    # Ctrl-C too, even where the parent ignored SIGINT (a background job of a non-interactive shell
    # starts with it ignored, and Python then leaves it so: the test's SIGINT went unheard)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Load(n, own_group) as load:
        print(" ".join(map(str, [os.getpriority(os.PRIO_PROCESS, 0)] + load.pids)), flush=True)
        while True:
            time.sleep(1)


def decode_steps(eng, prompts: list[list[int]], tokens: int) -> list[float]:
    """The wall time (s) of each engine step of greedy generations of `prompts` that ran one native
    decode call (the decode steps; the prefill steps run none)."""
    import codeshell.engine.engine as engine_mod
    from codeshell import SamplingParams

    calls = [0]
    orig = engine_mod._native_decode

    def counted(*a):
        calls[0] += 1
        return orig(*a)

    engine_mod._native_decode = counted
    sp = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    out, pc = [], time.perf_counter
    try:
        for i, p in enumerate(prompts):
            eng.add_request(f"d{time.monotonic_ns()}-{i}", p, sp)
        while eng.has_unfinished():
            calls[0] = 0
            t = pc()
            eng.step()
            dt = pc() - t
            if calls[0] == 1:
                out.append(dt)
    finally:
        engine_mod._native_decode = orig
    return out


def prompt_time(eng, prompt: list[int]) -> float:
    """Wall time (s) of one request of `prompt` with max_tokens=1: its prefill and first token."""
    from codeshell import SamplingParams

    eng.add_request(f"p{time.monotonic_ns()}", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    t = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    return time.perf_counter() - t


def p90(v: list[float]) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(0.9 * len(s)))]


def run(model: str, tokens: int, batches: list[int], threads: int, rounds: int, variants: list[str],
        loads: list[int], prompt_len: int, own_group: bool = True, context: int = 16) -> None:
    import torch

    from ab_variant import apply_variant, restore  # the --ab variants, as bench_decode_step.py --profile
    from codeshell import LLM, SamplingParams
    from codeshell.bench import HostLoad
    from codeshell.kernels import step as step_mod

    llm = LLM(model, dtype="bfloat16", threads=threads, max_batch=max(batches),
              max_model_len=max(context + tokens, prompt_len) + 8)
    eng = llm.engine
    vocab = min(eng.cfg.vocab_size, 70000)
    g = torch.Generator().manual_seed(1)
    prompts = {b: [torch.randint(0, vocab, (context,), generator=g).tolist() for _ in range(b)] for b in batches}
    long = torch.randint(0, vocab, (prompt_len,), generator=g).tolist() if prompt_len else None
    llm.generate([{"prompt_token_ids": p} for p in prompts[max(batches)]],
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up (builds the step)
    if long:
        prompt_time(eng, long)
    d = step_mod._DECODERS.get(eng.model)
    if d is None or d.step is None:
        sys.exit("error: the native decode step does not run this model")
    st, team0, env0 = d.step, d.step.team, dict(os.environ)
    steps: dict[tuple[int, str, int], list[float]] = {}
    proms: dict[tuple[int, str], list[float]] = {}
    other: dict[int, list[float]] = {}
    for r in range(rounds):
        for n in (loads if r % 2 == 0 else loads[::-1]):
            with Load(n, own_group), HostLoad() as h:
                time.sleep(0.05 if n else 0)  # the load processes up and running
                for v in (variants if r % 2 == 0 else variants[::-1]):
                    apply_variant(v, st, team0, env0)
                    try:
                        for b in batches:
                            steps.setdefault((n, v, b), []).extend(decode_steps(eng, prompts[b], tokens))
                        if long:
                            proms.setdefault((n, v), []).append(prompt_time(eng, long))
                    finally:
                        restore(st, team0, env0)
            if h.other is not None:
                other.setdefault(n, []).append(h.other)
            print(f"  round {r + 1} load {n} done ({h})", flush=True)
    w = max(len(v) for v in variants) + 2
    for n in loads:
        o = f"; other processes {statistics.median(other[n]):.2f} cores (median of rounds)" if n in other else ""
        print(f"load {n} (busy-loop processes beside the run){o}")
        for b in batches:
            for v in variants:
                x = steps[(n, v, b)]
                med = statistics.median(x) * 1e3
                print(f"  b{b} {v:<{w}} decode step median {med:8.2f} ms  p90 {p90(x) * 1e3:8.2f} ms  "
                      f"({b * 1e3 / med:7.1f} tok/s, {len(x)} steps)")
        if long:
            for v in variants:
                x = proms[(n, v)]
                print(f"  prompt {prompt_len} {v:<{w}} median {statistics.median(x) * 1e3:9.1f} ms  "
                      f"min {min(x) * 1e3:9.1f} ms  ({prompt_len / statistics.median(x):7.1f} tok/s, {len(x)} runs)")


def main() -> None:
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--hold-load":
        hold(int(sys.argv[2]), sys.argv[3:] != ["same"])
        return
    from codeshell.mini import MODEL_DIR as MINI

    from ab_variant import add_ab_argument  # --ab, shared with bench_decode_step.py

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(MINI), help="checkpoint folder (default: codeshell-mini)")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per generation")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=16,
                    help="the decode requests' prompt tokens (default 16; long ones time attention at long contexts)")
    ap.add_argument("--load", type=int, nargs="+", default=[0, 1], metavar="N",
                    help="busy-loop processes beside the measurement; several values alternate by round (default 0 1)")
    ap.add_argument("--load-group", choices=["own", "same"], default="own",
                    help="own: each load process in a session (scheduler autogroup) of its own, as another "
                         "application (default); same: in this benchmark's session, at its niceness")
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="prompt tokens for the prompt timing (default 256 for codeshell-mini, else 512; 0: none)")
    add_ab_argument(ap, ["team=0", "team=1", "team=2", "team=0,CODESHELL_CHUNKS_TEAM=1"])
    a = ap.parse_args()
    if not Path(a.model, "config.json").is_file():
        ap.error(f"--model {a.model}: no config.json there")
    if any(n < 0 for n in a.load):
        ap.error("--load: N >= 0")
    plen = a.prompt_len if a.prompt_len is not None else (256 if Path(a.model).resolve() == Path(MINI).resolve() else 512)
    signal.signal(signal.SIGTERM, _sigterm)
    print(f"model {a.model}, {a.threads} threads, {a.tokens} tokens, rounds {a.rounds}, loads {a.load} ({a.load_group} group), "
          f"niceness {os.getpriority(os.PRIO_PROCESS, 0)}, {time.strftime('%H:%M:%S', time.gmtime())} UTC; "
          f"load average before: {os.getloadavg()}", flush=True)
    run(a.model, a.tokens, a.batch, a.threads, a.rounds, a.ab, a.load, plen, a.load_group == "own", a.context)
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
