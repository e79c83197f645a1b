"""Benchmark of `codeshell serve`: batching throughput, time to first token, and IDE-style
FIM latency with and without the prefix cache, and against llama.cpp's `llama-server` on the
same weights in the same run. Prints figures; not a test.

    python benchmarks/bench_serve.py                      # starts its own servers (random weights)
    python benchmarks/bench_serve.py --url http://127.0.0.1:8080 --skip-nocache
    python benchmarks/bench_serve.py --compare-llamacpp ~/.cache/codeshell/llama.cpp/build/bin --format q4_0

Without --url it writes a random-weight checkpoint of the chosen shape (with the real
tokenizer from ../shared/codeshell-tokenizer), starts `python -m codeshell.serve` on it with
the prefix cache, measures, then restarts it with `--no-prefix-cache` for the baseline of
the FIM test. Targets (issue 3): 16 streaming clients >= 6x the tokens/s of one; the second
FIM request's time to first token >= 5x lower with the cache.

With --compare-llamacpp BIN_DIR the checkpoint is exported with `codeshell export-gguf`
(--format bf16, q8_0 or q4_0) and both servers run side by side with the same threads:
ours (`--max-batch 16`; bf16 on the checkpoint folder, q8_0/q4_0 on the GGUF file itself) and
`llama-server -np 16` (continuous batching) on the GGUF file. Each measurement alternates
between the two, round after round: 1 / 4 / 16 streaming clients with distinct ~90-token
prompts (64 new tokens each, sampled), and the IDE re-completion case (a ~1.9k-token FIM
prompt through /infill, then the same file with 20 characters typed at the cursor: the second
request is the one a plugin user waits for). It prints both sides and the ratios, and each round's
decode ms a token (a request's time after its first token: the step without the prefill that tok/s holds).

On a shared host: `--quiet-wait 20` starts each round in a 1-s window in which other processes used at most
`--quiet-cores` (0.2) cores, and `--read-probe` prints the read bandwidth level the round met (the Zen 4 VM's
moves between ~37 and ~66 GB/s within seconds, and a batch-1 bf16 step follows it: docs/kernels-log.md,
session 40 helper A).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

# One client for every request, as an IDE plugin or SDK keeps its connections: a fresh
# httpx.Client per request spends ~45 ms of CPU building an SSL context, which would count in
# every time to first token and take a core from the server on a 2-core machine.
HTTP = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codeshell.bench import HostLoad, read_bandwidth_gbs, wait_quiet  # noqa: E402  (after the path: runs from a checkout)

SHAPES = {
    # ~110M parameters (55M of them the 70144-token embedding): a few minutes on 2 CPU cores.
    "small": dict(n_embd=512, n_layer=8, n_head=8, num_query_groups=2, n_inner=2048, n_positions=4096),
    # ~160M parameters: decode reads more weights per step, so batching pays more.
    "medium": dict(n_embd=1024, n_layer=8, n_head=16, num_query_groups=4, n_inner=4096, n_positions=4096),
    # ~1.7B parameters: CodeShell-7B's width (4096, 32 heads / 8 KV groups, FFN 16384) with 8 of
    # its 42 layers: the issue-14 comparison with llama-server (3.4 GB in bf16, 1 GB in Q4_0).
    "1.7b": dict(n_embd=4096, n_layer=8, n_head=32, num_query_groups=8, n_inner=16384, n_positions=8192),
    "tiny": dict(n_embd=128, n_layer=2, n_head=4, num_query_groups=2, n_inner=512, n_positions=4096),
}


def make_model(shape: str, folder: Path) -> Path:
    from codeshell.config import CodeShellConfig
    from codeshell.testing import make_tiny_checkpoint
    shared = Path(os.environ.get("CODESHELL_SHARED", REPO.parent / "shared"))
    tok = shared / "codeshell-tokenizer"
    if not tok.is_dir():
        sys.exit(f"the tokenizer is needed at {tok} (set CODESHELL_SHARED)")
    cfg = CodeShellConfig(vocab_size=70144, position_embedding_type="rope", **SHAPES[shape])
    # bfloat16 like the released checkpoints, so the server runs what users run (the bf16 kernels)
    return make_tiny_checkpoint(folder, tok, cfg=cfg, dtype="bfloat16")


def checkpoint(args, tmp: Path) -> Path:
    """The random-weight checkpoint of args.shape: reused from --work-dir when it is there."""
    folder = (args.work_dir or tmp) / f"codeshell-{args.shape}"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    print(f"writing a random-weight '{args.shape}' checkpoint ...", flush=True)
    return make_model(args.shape, folder)


def gguf_file(args, model: Path, tmp: Path) -> Path:
    """args.format's GGUF export of `model` (`codeshell export-gguf`): reused from --work-dir."""
    from codeshell import llamacpp
    gfile = (args.work_dir or tmp) / f"model-{args.shape}-{args.format}.gguf"
    if not gfile.is_file():
        t = llamacpp.export_with_cli(model, gfile, args.format)
        print(f"codeshell export-gguf --type {args.format}: {t:.1f} s", flush=True)
    return gfile


class Server:
    def __init__(self, model: Path, port: int, *args: str, threads: int | None = None, env: dict | None = None):
        cmd = [sys.executable, "-m", "codeshell.serve", "--model", str(model), "--port", str(port),
               "--max-batch", "16", "--log-level", "warning", *args]
        if threads:
            cmd += ["--threads", str(threads)]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the server exited with {self.proc.returncode}")
            try:
                if HTTP.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        sys.exit("the server did not become ready in 300 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def thread_cpu(pid: int) -> dict[int, tuple[str, float, int]]:
    """{tid: (name, CPU seconds, involuntary context switches)} of process `pid`'s threads, from
    /proc (Linux; {} elsewhere): where a served token's CPU goes (the event loop is the process's
    first thread, the engine's driver thread runs the steps' serial code, the decode team's helper
    and OpenMP's workers the rest) and how often each was preempted."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{t}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{t}/status").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        f = stat[stat.rindex(")") + 2:].split()
        nv = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("nonvoluntary_ctxt_switches")), 0)
        out[int(t)] = (name, (int(f[11]) + int(f[12])) / tick, nv)
    return out


def cpu_split(pid: int, before: dict, after: dict) -> str:
    """The threads' CPU seconds (and preemptions) between two thread_cpu() readings, busiest first."""
    rows = []
    for tid, (name, cpu, nv) in after.items():
        c0, n0 = before.get(tid, (name, 0.0, 0))[1:]
        if cpu - c0 > 0.005 or nv - n0 > 0:
            label = "main" if tid == pid else name
            rows.append((cpu - c0, f"{label}:{cpu - c0:.2f}s/{nv - n0}p"))
    return " ".join(r[1] for r in sorted(rows, reverse=True)[:5])


def model_name(url: str, headers: dict) -> str:
    return HTTP.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]


def stream_one(url: str, headers: dict, body: dict) -> tuple[float, int, float]:
    """(time to first token, output tokens, total time) of one streamed completion."""
    from codeshell.serve.timing import time_streamed_completion

    ttft, tokens, total = time_streamed_completion(HTTP, url, body, headers)
    return ttft or 0.0, tokens, total


def decode_ms(ttft: float | None, tokens: int | None, total: float) -> float | None:
    """One request's decode time a token after its first, in ms: (total - time to first token) /
    (tokens - 1); None where it made fewer than 2 tokens. Why beside tok/s: a round's tok/s holds
    the prompt's prefill too (at one client ~0.7 s of a ~4-7 s request of the 1.7B shape), so a
    slower decode step and a slower prefill read the same there; this is the step alone, the
    figure to put against a bare step (bench_b8_ratio.py) or llama-bench's tg."""
    if ttft is None or not tokens or tokens < 2:
        return None
    return (total - ttft) / (tokens - 1) * 1e3


def median_or_nan(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def quiet(args) -> str:
    """Before a round: wait (at most --quiet-wait seconds) for a window in which the processes
    outside this run used at most --quiet-cores cores, then (--read-probe) read a 512 MiB buffer;
    a note for the round's line ('' when both are off)."""
    note = ""
    if getattr(args, "quiet_wait", 0):
        waited, other = wait_quiet(args.quiet_cores, 1.0, args.quiet_wait)
        note = f"; waited {waited:.0f} s for quiet" + ("" if other is None else f" (last {other:.2f} cores)")
    if getattr(args, "read_probe", False):
        note += f"; read probe {read_probe():.1f} GB/s"
    return note


def read_probe(mib: int = 512) -> float:
    """The host's read bandwidth level now, GB/s: `codeshell.bench.read_bandwidth_gbs` (the bound every
    benchmark uses: the best of its probes, on huge pages) over `mib` MiB, best of two passes each. Why:
    this host's read bandwidth moves between two levels (~37 and ~66 GB/s) within seconds, and a batch-1
    bf16 step of the 1.7B shape follows it (57 against 95 ms, in process or served, docs/kernels-log.md
    session 40 helper A): a round's level says which one it met."""
    return read_bandwidth_gbs(gib=mib / 1024, repeats=2)


def task_prompt(k: int) -> str:
    """A distinct prompt of ~90 tokens (90-93 with the CodeShell tokenizer)."""
    return (f"# Task {k}: the records in `data` are dicts with the keys 'kind', 'score' and 'when'.\n"
            f"# Keep the records whose score is above {k}, group them by kind, and return a dict that\n"
            f"# maps each kind to the mean score of its records, rounded to {k % 4 + 1} decimals.\n"
            f"def summarize_{k}(data: list[dict]) -> dict[str, float]:\n    ")


def throughput(url: str, headers: dict, clients: int, rounds: int, max_tokens: int, offset: int = 0) -> dict:
    name = model_name(url, headers)
    jobs = [{"model": name, "prompt": task_prompt(offset + k), "max_tokens": max_tokens,
             "temperature": 0.8, "seed": k, "ignore_eos": True} for k in range(clients * rounds)]
    t0 = time.perf_counter()
    # what else used the cores meanwhile (a round that lost a core to another process says so)
    with HostLoad() as load, ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda b: stream_one(url, headers, b), jobs))
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in res)
    return {"clients": clients, "tokens": sum(r[1] for r in res), "wall": wall, "other": load.other or 0.0,
            "tok_s": sum(r[1] for r in res) / wall, "ttft_p50": statistics.median(ttfts),
            "decode_ms": median_or_nan(decode_ms(*r) for r in res),
            "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]}


def median_run(runs: list[dict], base: list[dict]) -> dict:
    """The median of repeated runs; `ratio` is the median of each round's ratio to `base`."""
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)
    return {"clients": runs[0]["clients"], "tok_s": med("tok_s"), "ttft_p50": med("ttft_p50"),
            "ttft_p95": med("ttft_p95"),
            "ratio": statistics.median(r["tok_s"] / b["tok_s"] for r, b in zip(runs, base))}


def engine_throughput(model: Path, clients: list[int], max_tokens: int, threads: int | None) -> dict[int, float]:
    """The same workload straight on the engine in this process (no HTTP): the ceiling the
    server's batching can reach on this machine."""
    from codeshell import LLM
    from codeshell.engine import SamplingParams
    llm = LLM(model, max_batch=16, threads=threads)
    llm.generate("warm up", SamplingParams(temperature=0, max_tokens=2))
    out = {}
    for c in clients:
        prompts = [task_prompt(k) for k in range(c)]
        sps = [SamplingParams(temperature=0.8, seed=k, max_tokens=max_tokens, ignore_eos=True) for k in range(c)]
        t0 = time.perf_counter()
        llm.generate(prompts, sps)
        out[c] = c * max_tokens / (time.perf_counter() - t0)
    return out


def direct(llm, ks: list[int], max_tokens: int) -> dict:
    """The requests `throughput` sends for prompts `ks` (one round), run straight on `llm`'s
    engine in this process, all added at once: no HTTP, no engine thread, no event loop. Each
    step timed too: the steps that admitted a waiting prompt (`pre_s`, `pre_n`) apart from the
    decode-only ones (`dec_ms`, their median; ab_serve_direct.py prints both)."""
    from codeshell.engine import SamplingParams
    eng = llm.engine
    with HostLoad() as load:
        t0 = time.perf_counter()
        for k in ks:
            sp = SamplingParams(temperature=0.8, seed=k % 1000, max_tokens=max_tokens, ignore_eos=True)
            eng.add_request(f"direct-{k}-{time.time_ns()}", llm.tokenizer.encode(task_prompt(k)), sp)
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        tokens: dict[str, int] = {}
        pre, dec = [], []  # seconds of the steps that admitted a prompt / of the decode-only ones
        while eng.has_unfinished():
            prefill = bool(eng.waiting)
            s = time.perf_counter()
            outs = eng.step()
            e = time.perf_counter()
            (pre if prefill else dec).append(e - s)
            for out in outs:
                tokens[out.request_id] = n = len(out.outputs[0].token_ids)
                last[out.request_id] = e - t0
                if n and out.request_id not in first:
                    first[out.request_id] = e - t0
        wall = time.perf_counter() - t0
    return {"clients": len(ks), "tokens": sum(tokens.values()), "wall": wall, "tok_s": sum(tokens.values()) / wall,
            "ttft_p50": statistics.median(first.values()), "other": load.other or 0.0,
            "decode_ms": median_or_nan(decode_ms(first.get(r), tokens[r], last[r]) for r in tokens),
            "steps": len(pre) + len(dec), "pre_s": sum(pre), "pre_n": len(pre),
            "dec_ms": 1e3 * statistics.median(dec) if dec else float("nan")}


def engine_metrics(url: str, headers: dict) -> tuple[float, float]:
    """(seconds in engine steps, steps) so far, from the server's /metrics."""
    vals = {}
    for line in HTTP.get(url + "/metrics", headers=headers).text.splitlines():
        name, _, v = line.partition(" ")
        if name in ("codeshell_engine_step_seconds", "codeshell_engine_steps"):
            vals[name] = float(v)
    return vals.get("codeshell_engine_step_seconds", 0.0), vals.get("codeshell_engine_steps", 0.0)


def engine_vs_served(args, model: Path, threads: int) -> None:
    """The bench's workload at each client count, alternating round by round: straight on the
    engine in this process, then through `codeshell serve` on the same checkpoint, so the
    server's own cost is a figure: tokens/s and TTFT against the engine's, and the share of
    the served run's wall time that the server's engine thread spent in steps (the rest is
    the hand-off, HTTP and the event loop, between steps). One request per client a round."""
    from codeshell import LLM
    from codeshell.engine import SamplingParams
    llm = LLM(model, max_batch=16, threads=threads)
    llm.generate("warm up", SamplingParams(temperature=0, max_tokens=2))
    server = Server(model, args.port, *args.serve_arg, threads=threads)
    headers: dict = {}
    counts = [int(x) for x in args.clients.split(",")]
    rows = {(side, c): [] for side in ("engine", "served") for c in counts}
    try:
        stream_one(server.url, headers, {"model": model_name(server.url, headers), "prompt": "warm up",
                                         "max_tokens": 2})
        for r in range(args.engine_vs_served):
            for c in counts:
                offset = 2000 + 100 * r
                for side in (("engine", "served") if r % 2 == 0 else ("served", "engine")):
                    note = quiet(args)
                    if side == "engine":
                        x = direct(llm, [offset + k for k in range(c)], args.max_tokens)
                        x["busy"] = 1.0
                    else:
                        s0, _ = engine_metrics(server.url, headers)
                        x = throughput(server.url, headers, c, 1, args.max_tokens, offset=offset)
                        x["busy"] = (engine_metrics(server.url, headers)[0] - s0) / x["wall"]
                    rows[side, c].append(x)
                    print(f"  round {r + 1}: {side:>6} {c:>3} clients: {x['tok_s']:7.2f} tok/s  ttft p50 "
                          f"{x['ttft_p50'] * 1e3:6.0f} ms  decode {x['decode_ms']:6.1f} ms a token  "
                          f"({x['tokens']} tokens in {x['wall']:.2f} s"
                          + (f"; {x['busy'] * 100:.0f}% in engine steps" if side == "served" else "")
                          + f"; other processes {x['other']:.2f} cores{note})", flush=True)
    finally:
        server.stop()

    def med(side, c, key):
        return statistics.median(x[key] for x in rows[side, c])
    print(f"\n## engine alone vs served ({args.format}, shape {args.shape}, {threads} threads; medians of "
          f"{args.engine_vs_served} alternating rounds; ratio: the median of each round's served / engine)")
    print("| clients | engine tok/s | served tok/s | ratio | engine TTFT p50 ms | served TTFT p50 ms | "
          "served wall in engine steps | decode ms a token engine / served |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in counts:
        ratio = statistics.median(s["tok_s"] / e["tok_s"] for s, e in zip(rows["served", c], rows["engine", c]))
        print(f"| {c} | {med('engine', c, 'tok_s'):.2f} | {med('served', c, 'tok_s'):.2f} | {ratio:.2f}x | "
              f"{med('engine', c, 'ttft_p50') * 1e3:.0f} | {med('served', c, 'ttft_p50') * 1e3:.0f} | "
              f"{med('served', c, 'busy') * 100:.0f}% | {med('engine', c, 'decode_ms'):.1f} / "
              f"{med('served', c, 'decode_ms'):.1f} |")


def fim_source(n_tokens: int, url: str, headers: dict) -> tuple[str, str]:
    """A Python file of about n_tokens tokens, split at a cursor near the end (10 lines of suffix)."""
    lines, k = [], 0
    while True:
        lines.append(f"def helper_{k}(items, factor={k}):\n    total = 0\n    for x in items:\n"
                     f"        total += x * factor + {k}\n    return total\n\n")
        k += 1
        if k % 10 == 0:
            text = "".join(lines)
            n = len(HTTP.post(url + "/tokenize", json={"content": text}, headers=headers).json()["tokens"])
            if n >= n_tokens:
                break
    text = "".join(lines)
    cut = len(text) - len("".join(lines[-2:]))
    return text[:cut] + "def main(data):\n    result = ", text[cut:]


def fim_latency(url: str, headers: dict, tokens: int, repeats: int) -> dict:
    """Time to first event of /infill: a first request, then the same file with 20 more characters typed."""
    prefix, suffix = fim_source(tokens, url, headers)
    typed = "helper_3(data) + hel"  # 20 characters
    firsts, seconds, cached = [], [], []
    for i in range(repeats):
        # A different first line each round: the first request of a round finds nothing cached.
        p = f"# file {i} of {time.time_ns()}\n" + prefix

        def run(pre: str) -> tuple[float, dict]:
            body = {"input_prefix": pre, "input_suffix": suffix, "n_predict": 8, "temperature": 0,
                    "ignore_eos": True, "stream": True, "cache_prompt": True}  # llama-server streams only if asked
            t0 = time.perf_counter()
            ttft, final = None, None
            with HTTP.stream("POST", url + "/infill", json=body, headers=headers) as r:
                for ln in r.iter_lines():
                    if ln.startswith("data:"):
                        ttft = ttft or time.perf_counter() - t0
                        final = json.loads(ln[5:])
            return ttft, final

        t1, _ = run(p)
        t2, fin = run(p + typed)
        firsts.append(t1)
        seconds.append(t2)
        # Prompt tokens reused from the cache: llama-server's tokens_cached counts every token in
        # the slot after the request (its timings.cache_n is the reused part); ours reports reuse.
        cached.append(fin.get("timings", {}).get("cache_n", fin["tokens_cached"]))
    return {"prompt_tokens": fin["tokens_evaluated"], "first": statistics.median(firsts),
            "second": statistics.median(seconds), "cached": statistics.median(cached)}


def compare_llamacpp(args, bins: Path, model: Path, tmp: Path) -> None:
    """Ours and llama-server side by side on the same weights, alternating request by request."""
    from codeshell import llamacpp
    gfile = gguf_file(args, model, tmp)
    print(llamacpp.version(bins), flush=True)
    threads = args.threads or os.cpu_count() or 1
    counts = [int(x) for x in args.clients.split(",")]
    # --ours-env: more `codeshell serve` processes, each with its environment variables, taking
    # their turn in every round beside the default one (a same-run A/B of a switch).
    variants = {"ours": {}}
    for spec in args.ours_env:
        variants[f"ours[{spec}]"] = dict(kv.split("=", 1) for kv in spec.split(","))
    sides = (*variants, "llama-server")
    runs = {side: {c: [] for c in counts} for side in sides}
    fims = {side: [] for side in sides}
    servers = {}
    try:
        for i, (side, env) in enumerate(variants.items()):
            servers[side] = Server(model if args.format == "bf16" else gfile, args.port + i, *args.serve_arg,
                                   threads=threads, env=env)
        # -np 16 slots of 2560 tokens each (the FIM prompt and its completion fit); -b 4096 so that
        # /infill keeps the whole ~1.9k-token prefix (it keeps at most 3/4 of the batch size).
        theirs = llamacpp.LlamaServer(bins, gfile, threads=threads, parallel=16, ctx=16 * 2560,
                                      extra=("-b", "4096", "-ub", "512"))
        # cpp-httplib (llama-server) drops kept-alive connections after streamed responses, so a
        # reused connection fails with "Server disconnected": both sides get one connection per
        # request (a local TCP connect costs well under a millisecond).
        headers = {"Connection": "close"}
        try:
            urls = {**{side: srv.url for side, srv in servers.items()}, "llama-server": theirs.url}
            for k in range(args.repeats):
                for c in counts:
                    # each round in a new order, so no side always follows the same one
                    order = sides[k % len(sides):] + sides[:k % len(sides)]
                    for side in order:
                        note = quiet(args)
                        srv = servers.get(side)
                        if srv is not None:
                            cpu0, (s0, n0) = thread_cpu(srv.proc.pid), engine_metrics(srv.url, headers)
                        r = throughput(urls[side], headers, c, args.rounds, args.max_tokens, offset=1000 * k)
                        runs[side][c].append(r)
                        extra = ""
                        if srv is not None:  # the server's steps: mean ms, share of the wall, threads' CPU
                            s1, n1 = engine_metrics(srv.url, headers)
                            extra = (f"\n      steps {n1 - n0:.0f}, {(s1 - s0) / max(1, n1 - n0) * 1e3:.1f} ms mean, "
                                     f"{(s1 - s0) / r['wall'] * 100:.0f}% of the wall; CPU "
                                     + cpu_split(srv.proc.pid, cpu0, thread_cpu(srv.proc.pid)))
                        print(f"  round {k + 1}: {side:>12} {c:>3} clients: {r['tok_s']:8.1f} tok/s  "
                              f"ttft p50 {r['ttft_p50'] * 1e3:7.0f} ms  decode {r['decode_ms']:6.1f} ms a token  "
                              f"({r['tokens']} tokens in {r['wall']:.1f} s; "
                              f"other processes {r['other']:.2f} cores{note}){extra}", flush=True)
            for i in range(args.fim_repeats):
                for side in sides:
                    f = fim_latency(urls[side], headers, args.fim_tokens, 1)
                    fims[side].append(f)
                    print(f"  FIM {i + 1}: {side:>12}: 1st {f['first'] * 1e3:.0f} ms, retyped {f['second'] * 1e3:.0f} ms "
                          f"({f['prompt_tokens']} prompt tokens, {f['cached']:.0f} cached)", flush=True)
        except Exception:
            if theirs.proc.poll() is not None:
                print(f"llama-server exited ({theirs.proc.returncode}): {theirs.error_line()}", flush=True)
            raise
        finally:
            theirs.stop()
    finally:
        for srv in servers.values():
            srv.stop()

    def med(xs):
        return statistics.median(xs)
    print(f"\n## codeshell serve vs llama-server ({args.format}, shape {args.shape}, {threads} threads each)")
    print(f"CPU: {llamacpp.cpu_name()}; flags: {' '.join(llamacpp.cpu_flags())}")
    print(f"medians of {args.repeats} alternating rounds; ratio = ours / llama-server (tok/s: > 1 is ours faster; "
          "TTFT: < 1 is ours faster)")
    print("| clients | ours tok/s | llama-server tok/s | ratio | ours TTFT p50 ms | llama-server TTFT p50 ms | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        for c in counts if args.repeats else []:  # --repeats 0: the FIM test only
            o, t_ = runs[v][c], runs["llama-server"][c]
            ratio = med([a["tok_s"] / b["tok_s"] for a, b in zip(o, t_)])
            tt = med([a["ttft_p50"] / b["ttft_p50"] for a, b in zip(o, t_)])
            label = f"{c}" if v == "ours" else f"{c} {v}"
            print(f"| {label} | {med([r['tok_s'] for r in o]):.1f} | {med([r['tok_s'] for r in t_]):.1f} | "
                  f"{ratio:.2f}x | {med([r['ttft_p50'] for r in o]) * 1e3:.0f} | "
                  f"{med([r['ttft_p50'] for r in t_]) * 1e3:.0f} | {tt:.2f}x |")
    if args.repeats:
        # the decode step alone (a request's time after its first token, a token), apart from tok/s,
        # which holds the prefill: which of the two a ratio comes from (session 40, helper A)
        print("\n| clients | ours decode ms a token | llama-server decode ms a token | ratio (< 1: ours faster) |")
        print("|---:|---:|---:|---:|")
        for v in variants:
            for c in counts:
                o, t_ = runs[v][c], runs["llama-server"][c]
                label = f"{c}" if v == "ours" else f"{c} {v}"
                print(f"| {label} | {med([r['decode_ms'] for r in o]):.1f} | {med([r['decode_ms'] for r in t_]):.1f} | "
                      f"{med([a['decode_ms'] / b['decode_ms'] for a, b in zip(o, t_)]):.2f}x |")
        busy = {side: med([r["other"] for c in counts for r in runs[side][c]]) for side in sides}
        print(f"(other processes on the machine during the rounds, median: {busy['ours']:.2f} cores in ours', "
              f"{busy['llama-server']:.2f} in llama-server's; from /proc/stat, this run's own processes excluded)")
    fo, ft = fims["ours"], fims["llama-server"]
    if not fo:  # --fim-repeats 0: throughput only
        return
    print(f"\nIDE re-completion ({fo[0]['prompt_tokens']}-token FIM prompt through /infill, then 20 characters typed; "
          f"time to first token, median of {args.fim_repeats}):")
    print("| request | ours ms | llama-server ms | ratio | cached tokens ours / llama-server |")
    print("|---|---:|---:|---:|---:|")
    for key, label in (("first", "1st (cold)"), ("second", "retyped")):
        a, b = med([f[key] for f in fo]), med([f[key] for f in ft])
        cached = f"{med([f['cached'] for f in fo]):.0f} / {med([f['cached'] for f in ft]):.0f}" if key == "second" else "-"
        print(f"| {label} | {a * 1e3:.0f} | {b * 1e3:.0f} | {a / b:.2f}x | {cached} |")


def stop_on_sigterm() -> None:
    """SIGTERM (`timeout 300 python benchmarks/bench_serve.py ...`, as runs under the shared timing
    lock are capped) raises SystemExit, so the `finally` blocks stop the servers this run started.
    Python's default SIGTERM ends the process at once: a capped run then left its llama-server
    (and ours) running, holding the cores and the memory of the next measurements."""
    def _term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _term)


def main() -> None:
    stop_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one on a random-weight model)")
    ap.add_argument("--api-key")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--port", type=int, default=18931)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all client counts (medians are reported)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--fim-tokens", type=int, default=1900, help="FIM prompt size (the IDE case: ~1.9k tokens)")
    ap.add_argument("--fim-repeats", type=int, default=3, help="0: no FIM test (with --compare-llamacpp)")
    ap.add_argument("--threads", type=int, help="torch threads of the servers it starts (default: all cores)")
    ap.add_argument("--skip-engine", action="store_true", help="no in-process engine baseline")
    ap.add_argument("--skip-nocache", action="store_true", help="with --url: no baseline server to compare")
    ap.add_argument("--compare-llamacpp", metavar="BIN_DIR",
                    help="llama.cpp's build/bin folder ('auto': $CODESHELL_LLAMACPP_BIN or the install script's "
                         "cache): ours against llama-server -np 16 on the same weights")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="an extra flag for the `codeshell serve` it starts (repeatable), e.g. --serve-arg=--no-warmup")
    ap.add_argument("--ours-env", action="append", default=[], metavar="NAME=V[,NAME=V]",
                    help="with --compare-llamacpp: one more `codeshell serve` with these environment variables, "
                         "alternating with the default one and llama-server in every round (repeatable)")
    ap.add_argument("--engine-vs-served", type=int, metavar="ROUNDS",
                    help="only time the --clients workloads straight on the engine and through the server, "
                         "alternating for ROUNDS rounds (the server's own cost)")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                    help="before each round wait up to S seconds for a 1-s window in which the processes outside "
                         "this run used at most --quiet-cores cores (0: start at once)")
    ap.add_argument("--quiet-cores", type=float, default=0.2)
    ap.add_argument("--read-probe", action="store_true",
                    help="before each round, read a 512 MiB buffer and print the GB/s (the host's level)")
    ap.add_argument("--work-dir", type=Path,
                    help="keep the random checkpoint (DIR/codeshell-SHAPE) and its GGUF files here and reuse them "
                         "in later runs (default: a temporary folder, written each run)")
    ap.add_argument("--format", choices=["bf16", "q8_0", "q4_0"], default="bf16",
                    help="with --compare-llamacpp: the GGUF type both servers run")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    tmp = tempfile.TemporaryDirectory()
    if args.compare_llamacpp:
        if args.url:
            sys.exit("error: --compare-llamacpp starts both servers itself; drop --url")
        from codeshell import llamacpp
        try:
            bins = llamacpp.find_bin_dir(None if args.compare_llamacpp == "auto" else args.compare_llamacpp)
        except llamacpp.LlamaCppError as e:
            sys.exit(f"error: {e}")
        if bins is None:
            sys.exit("error: llama.cpp not found (run .ci/install-llamacpp.sh or pass its build/bin folder)")
        compare_llamacpp(args, bins, checkpoint(args, Path(tmp.name)), Path(tmp.name))
        tmp.cleanup()
        return
    if args.engine_vs_served:
        model = checkpoint(args, Path(tmp.name))
        if args.format != "bf16":
            model = gguf_file(args, model, Path(tmp.name))
        engine_vs_served(args, model, args.threads or os.cpu_count() or 1)
        tmp.cleanup()
        return
    server = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        model = checkpoint(args, Path(tmp.name))
        server = Server(model, args.port, *args.serve_arg, threads=args.threads)
        url = server.url
    try:
        # Client counts alternate, round after round: on a shared machine whose speed drifts by
        # tens of percent, each ratio compares runs made a few seconds apart.
        counts = [int(x) for x in args.clients.split(",")]
        runs: dict[int, list[dict]] = {c: [] for c in counts}
        for k in range(args.repeats):
            for c in counts:
                note = quiet(args)
                r = throughput(url, headers, c, args.rounds, args.max_tokens)
                runs[c].append(r)
                print(f"  round {k + 1}: {c:>3} clients: {r['tok_s']:8.1f} tok/s  ttft p50 {r['ttft_p50'] * 1e3:7.0f} ms  "
                      f"p95 {r['ttft_p95'] * 1e3:7.0f} ms  ({r['tokens']} tokens in {r['wall']:.1f} s; "
                      f"other processes {r['other']:.2f} cores{note})", flush=True)
        rows = [median_run(runs[c], runs[counts[0]]) for c in counts]
        fim = fim_latency(url, headers, args.fim_tokens, args.fim_repeats)
    finally:
        if server:
            server.stop()
    nocache = None
    if not args.url and not args.skip_nocache:
        server = Server(model, args.port, "--no-prefix-cache", *args.serve_arg, threads=args.threads)
        try:
            nocache = fim_latency(server.url, headers, args.fim_tokens, args.fim_repeats)
        finally:
            server.stop()

    engine = None
    if not args.url and not args.skip_engine:
        engine = engine_throughput(model, [r["clients"] for r in rows], args.max_tokens, args.threads)

    print("\n## codeshell serve benchmark" + (f" (shape {args.shape})" if not args.url else f" ({url})"))
    print(f"medians of {args.repeats} rounds; 'x' is the median of each round's ratio to {rows[0]['clients']} client(s)")
    print("| clients | output tok/s | x vs 1 client | TTFT p50 ms | TTFT p95 ms | engine alone tok/s (x) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        e = f"{engine[r['clients']]:.1f} ({engine[r['clients']] / engine[rows[0]['clients']]:.2f}x)" if engine else "-"
        print(f"| {r['clients']} | {r['tok_s']:.1f} | {r['ratio']:.2f}x | {r['ttft_p50'] * 1e3:.0f} | "
              f"{r['ttft_p95'] * 1e3:.0f} | {e} |")
    print(f"\nIDE completion, {fim['prompt_tokens']}-token FIM prompt, then 20 more characters typed "
          f"(time to first token, median of {args.fim_repeats}):")
    print("| prefix cache | 1st request ms | 2nd request ms | cached tokens (2nd) |")
    print("|---|---:|---:|---:|")
    print(f"| on | {fim['first'] * 1e3:.0f} | {fim['second'] * 1e3:.0f} | {fim['cached']:.0f} |")
    if nocache:
        print(f"| off | {nocache['first'] * 1e3:.0f} | {nocache['second'] * 1e3:.0f} | {nocache['cached']:.0f} |")
        print(f"\n2nd-request TTFT speed-up from the cache: {nocache['second'] / fim['second']:.1f}x (target >= 5x)")
    top = rows[-1]
    print(f"throughput at {top['clients']} clients: {top['ratio']:.2f}x one client (target >= 6x at 16)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
