"""llama.cpp beside this project, in the same run: find its programs, serve a GGUF file with
`llama-server`, time it with `llama-bench`, and compare with ours on the same weights.

What it is: the one place that starts llama.cpp's programs, for the GGUF tests
(tests/quant/test_gguf_llamacpp.py: tokens, greedy output), `codeshell bench
--compare-llamacpp`, benchmarks/bench_quant.py and benchmarks/bench_serve.py. The programs are
found in the folder given by the caller, else `$CODESHELL_LLAMACPP_BIN`, else the per-machine
cache that `.ci/install-llamacpp.sh` builds (``~/.cache/codeshell/llama.cpp/build/bin``; the
converter `convert_hf_to_gguf.py` and its `gguf-py` sit two levels up).

What it is not: a binding (nothing of llama.cpp is linked into this process) or an installer
(`.ci/install-llamacpp.sh` builds the binaries from the llama-cpp-python sdist on PyPI). No
figure here is hard-coded: every comparison measures both sides on this machine, now.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ENV_BIN = "CODESHELL_LLAMACPP_BIN"
TOOLS = ("llama-server", "llama-bench", "llama-simple", "llama-quantize")
# our format -> (GGUF type written by `codeshell export-gguf`, llama.cpp's name for it)
GGUF_OF = {"bf16": ("bf16", "BF16"), "int8": ("q8_0", "Q8_0"), "int4": ("q4_0", "Q4_0")}
# The CPU features that decide which kernels either side can use.
CPU_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


class LlamaCppError(RuntimeError):
    """llama.cpp is missing or failed; the message says which program and why, in one line."""


# ---- finding the programs -------------------------------------------------------------------------

def default_source_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "codeshell" / "llama.cpp"


def default_bin_dir() -> Path:
    return default_source_dir() / "build" / "bin"


def find_bin_dir(explicit: str | os.PathLike | None = None, need: str = "llama-server") -> Path | None:
    """The folder holding llama.cpp's programs (`need` among them): `explicit`, else
    $CODESHELL_LLAMACPP_BIN, else the install script's cache; None when none of them has it."""
    for cand in (explicit, os.environ.get(ENV_BIN), default_bin_dir()):
        if cand and (Path(cand) / need).is_file():
            return Path(cand)
        if explicit:  # a folder the caller named must be the one
            raise LlamaCppError(f"{explicit} has no {need} (build llama.cpp with .ci/install-llamacpp.sh "
                                "or ../shared/tools/build_llamacpp.sh and pass its build/bin folder)")
    return None


def tool(bin_dir: Path, name: str) -> Path:
    p = Path(bin_dir) / name
    if not p.is_file():
        raise LlamaCppError(f"{p} not found (is {bin_dir} a llama.cpp build/bin folder?)")
    return p


def converter(bin_dir: Path) -> tuple[Path, Path] | None:
    """(convert_hf_to_gguf.py, its gguf-py folder) of the source tree the binaries were built in."""
    src = Path(bin_dir).resolve().parents[1]
    script, gguf_py = src / "convert_hf_to_gguf.py", src / "gguf-py"
    return (script, gguf_py) if script.is_file() and gguf_py.is_dir() else None


def version(bin_dir: Path) -> str:
    prog = next((t for t in TOOLS if (Path(bin_dir) / t).is_file()), "llama-server")
    r = subprocess.run([str(tool(bin_dir, prog)), "--version"], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("version")]
    return lines[0] if lines else "unknown version"


# ---- machine facts printed beside every comparison --------------------------------------------------

def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in CPU_FLAGS if f in have]
    return []


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def read_bandwidth_gbs(threads: int, gib: float = 0.5, repeats: int = 5) -> float:
    """`codeshell.bench.read_bandwidth_gbs` (best-of-N read of a buffer larger than any
    cache, GB/s) on `threads` threads."""
    import torch

    from .bench import read_bandwidth_gbs as best_read_gbs
    torch.set_num_threads(threads)
    return best_read_gbs(gib, repeats)


# ---- llama-server -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class LlamaServer:
    """`llama-server` on one GGUF file, started on a free local port, stopped on exit.

    A file llama.cpp cannot load raises LlamaCppError quoting its log's error line (for example
    ``check_tensor_dims: tensor 'output.weight' not found``)."""

    def __init__(self, bin_dir: Path, model: str | os.PathLike, *, threads: int = 2, parallel: int = 1,
                 ctx: int = 2048, extra: tuple[str, ...] = (), port: int | None = None, timeout: float = 300):
        self.model = Path(model)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        cmd = [str(tool(bin_dir, "llama-server")), "-m", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), "-t", str(threads), "-tb", str(threads), "-np", str(parallel),
               "-c", str(ctx), "--no-webui", *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LlamaCppError(f"llama-server could not load {self.model.name}: {self.error_line()}")
            try:
                if _http(self.url + "/health", timeout=5).get("status") == "ok":
                    break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise LlamaCppError(f"llama-server did not become ready on {self.model.name} in {timeout:.0f} s")
            time.sleep(0.2)

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def error_line(self) -> str:
        lines = [ln.strip() for ln in self.log_text().splitlines() if ln.strip()]
        for key in ("check_tensor_dims", "error", "failed", "unknown"):
            hits = [ln for ln in lines if key in ln.lower()]
            if hits:
                return hits[0]
        return lines[-1] if lines else f"exit code {self.proc.returncode}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> "LlamaServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokens for `text`, special tokens parsed (as a FIM prompt needs), no BOS."""
        return _http(self.url + "/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]

    def greedy(self, prompt: list[int] | str, n: int, n_probs: int = 0) -> dict:
        """`n` greedy tokens after `prompt` (no stop at EOS, no prompt cache): {"tokens": [...],
        "probs": per token the top `n_probs` (id, logprob) pairs when asked, None for a token
        that llama-server reports no probabilities for}."""
        r = _http(self.url + "/completion", {
            "prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1, "samplers": ["top_k"],
            "ignore_eos": True, "cache_prompt": False, "return_tokens": True, "n_probs": n_probs})
        # One entry per emitted piece of text: a token that ends inside a UTF-8 character has
        # none, so the entries are matched to the tokens by their own "id" (None where missing).
        entries = r.get("completion_probabilities", [])
        probs: list = [None] * len(r["tokens"])
        j = 0
        for i, t in enumerate(r["tokens"]):
            if j < len(entries) and entries[j]["id"] == t:
                probs[i] = [(p["id"], p["logprob"]) for p in entries[j].get("top_logprobs", [])]
                j += 1
        return {"tokens": r["tokens"], "probs": probs}


# ---- llama-bench --------------------------------------------------------------------------------------

def llama_bench(bin_dir: Path, model: str | os.PathLike, threads: int, prompt_len: int, decode_tokens: int,
                repeats: int = 2, timeout: float = 3600) -> dict:
    """llama-bench's pp{prompt_len} and tg{decode_tokens} on one file: tokens/s, the best of
    `repeats` samples (as our side's figures are the best of theirs: on a shared machine the
    slower samples measure the other jobs; `*_mean_tps` keep llama-bench's own mean), plus what
    it reports about the build and the CPU."""
    cmd = [str(tool(bin_dir, "llama-bench")), "-m", str(model), "-t", str(threads), "-p", str(prompt_len),
           "-n", str(decode_tokens), "-r", str(repeats), "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        raise LlamaCppError(f"llama-bench failed on {Path(model).name}: {err[-1] if err else r.returncode}")
    rows = json.loads(r.stdout)
    out = {"model_type": rows[0].get("model_type"), "model_size": rows[0].get("model_size"),
           "build": f"{rows[0].get('build_commit')} ({rows[0].get('build_number')})",
           "cpu_info": rows[0].get("cpu_info"), "backends": rows[0].get("backends")}
    for row in rows:
        kind = "prompt" if row.get("n_prompt") and not row.get("n_gen") else \
            "decode" if row.get("n_gen") and not row.get("n_prompt") else None
        if kind:
            out[f"{kind}_mean_tps"] = row["avg_ts"]
            out[f"{kind}_tps"] = max(row.get("samples_ts") or [row["avg_ts"]])
    return out


# ---- the same checkpoint on both sides -----------------------------------------------------------------

def write_random_checkpoint(cfg, out: Path, tokenizer_dir: Path | None = None) -> Path:
    """bf16 random weights (N(0, 0.02), tied head like CodeShell-7B's) in the official layout,
    one safetensors shard per block (memory: one block at a time); the tokenizer copied in when
    given (GGUF files carry it; without it `export-gguf` refuses)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from .testing import random_state_dict
    from .tokenizer import TOKENIZER_FILES
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    d = cfg.n_embd
    top = {"transformer.wte.weight": (torch.randn((cfg.vocab_size, d), generator=g) * 0.02).to(torch.bfloat16),
           "transformer.ln_f.weight": torch.ones(d, dtype=torch.bfloat16),
           "transformer.ln_f.bias": torch.zeros(d, dtype=torch.bfloat16)}
    save_file(top, str(out / "model-top.safetensors"))
    weight_map = {k: "model-top.safetensors" for k in top}
    one = cfg.replace(n_layer=1, vocab_size=8)  # one block's tensors, a token embedding not worth making
    for i in range(cfg.n_layer):
        sd = random_state_dict(one, seed=i, dtype=torch.bfloat16, std=0.02)
        block = {k.replace("transformer.h.0.", f"transformer.h.{i}."): v for k, v in sd.items()
                 if k.startswith("transformer.h.0.")}
        fname = f"model-{i:03d}.safetensors"
        save_file(block, str(out / fname))
        weight_map.update({k: fname for k in block})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_dtype": "bfloat16"}))
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).exists():
                shutil.copy(Path(tokenizer_dir) / f, out / f)
    return out


def shared_tokenizer_dir() -> Path | None:
    env = os.environ.get("CODESHELL_SHARED")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    p = root / "codeshell-tokenizer"
    return p if p.is_dir() else None


def export_with_cli(src: Path, out: Path, gguf_type: str) -> float:
    """`codeshell export-gguf SRC OUT --type T` as a user runs it; seconds taken."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "codeshell.cli", "export-gguf", str(src), str(out), "--type", gguf_type,
                        "--overwrite"], capture_output=True, text=True, env={**os.environ, "CODESHELL_NO_PROGRESS": "1"})
    if r.returncode != 0:
        raise LlamaCppError(f"codeshell export-gguf --type {gguf_type} failed: {r.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t


def print_comparison(rows: list[dict], threads: int, prompt_len: int, decode_tokens: int, bandwidth_gbs: float,
                     llama_info: dict | None) -> None:
    """One table: per format ours vs llama.cpp (prompt and decode tokens/s) and the ratios,
    headed by the CPU, its flags and the read bandwidth measured in this run."""
    print(f"\nCPU: {cpu_name()}; flags: {' '.join(cpu_flags()) or '-'}; {threads} threads; "
          f"read bandwidth {bandwidth_gbs:.1f} GB/s (measured now)")
    if llama_info:
        print(f"llama.cpp: build {llama_info.get('build')}, backends {llama_info.get('backends')}, "
              f"its CPU: {llama_info.get('cpu_info')}")
    print(f"| format (ours / llama.cpp) | prompt tok/s ({prompt_len}): ours / llama.cpp | ratio | "
          f"decode tok/s ({decode_tokens}): ours / llama.cpp | ratio | llama.cpp decode % of bound |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lp, ld = r.get("llama_prompt_tps"), r.get("llama_decode_tps")
        pr = f"{r['prompt_tps'] / lp:.2f}x" if lp else "-"
        dr = f"{r['decode_tps'] / ld:.2f}x" if ld else "-"
        bound = ""
        if ld and r.get("gguf_bytes"):
            bound = f"{100 * ld / (bandwidth_gbs * 1e9 / r['gguf_bytes']):.0f}%"
        print(f"| {r['format']} / {GGUF_OF[r['format']][1]} | {r['prompt_tps']:.1f} / {lp or float('nan'):.1f} | {pr} | "
              f"{r['decode_tps']:.2f} / {ld or float('nan'):.2f} | {dr} | {bound} |")
    print("ratio = ours / llama.cpp, both measured in this run on the same weights "
          "(our checkpoint folders and the GGUF files `codeshell export-gguf` wrote from them).")


# `codeshell bench --compare-llamacpp`: each side's figures are the best of this many samples (our
# engine's runs; llama-bench's -r), the same count on both sides.
COMPARE_SAMPLES = 3


def bench_compare(model: str | None, shape: str | None, bin_dir: str | os.PathLike | None,
                  formats: tuple[str, ...] = ("bf16", "int8", "int4"), threads: int | None = None,
                  prompt_len: int = 512, decode_tokens: int = 16, workdir: str | os.PathLike | None = None) -> list[dict]:
    """`codeshell bench --compare-llamacpp`: for each format, our engine on the checkpoint
    (bf16, or `codeshell quantize` int8 / int4 g128) and llama-bench on the GGUF that
    `codeshell export-gguf` writes from the same bf16 weights; prints one table."""
    import shutil

    from .config import SHAPES
    from .quant.convert import quantize_checkpoint
    from .quant.scheme import QuantScheme
    bins = find_bin_dir(bin_dir, need="llama-bench")
    if bins is None:
        raise LlamaCppError(f"llama.cpp not found (pass its build/bin folder, set {ENV_BIN}, or run "
                            ".ci/install-llamacpp.sh)")
    threads = threads or min(os.cpu_count() or 1, 8)
    work = Path(workdir or tempfile.mkdtemp(prefix="codeshell_vs_llamacpp_"))
    try:
        if model is None:
            if shape not in SHAPES:
                raise ValueError(f"unknown --shape {shape!r}; choose one of {', '.join(SHAPES)}")
            tok = shared_tokenizer_dir()
            if tok is None:
                raise LlamaCppError("a GGUF file needs the tokenizer: set CODESHELL_SHARED to the folder holding "
                                    "codeshell-tokenizer/, or pass --model with a checkpoint that has one")
            src = write_random_checkpoint(SHAPES[shape], work / "bf16", tok)
        else:
            src = Path(model)
        from .weights import load_config
        cfg = load_config(src)
        group = 128 if cfg.n_embd % 128 == 0 and cfg.ffn_dim % 128 == 0 else 32
        rows, info = [], None
        for fmt in formats:
            folder = src
            if fmt != "bf16":
                scheme = QuantScheme(bits=8) if fmt == "int8" else QuantScheme(bits=4, group_size=group)
                folder = quantize_checkpoint(src, work / fmt, scheme, overwrite=True)
            gguf = work / f"model-{GGUF_OF[fmt][0]}.gguf"
            export_with_cli(src, gguf, GGUF_OF[fmt][0])
            # both sides the best of the same number of samples (llama-bench's -r)
            ours = _ours_subprocess(folder, threads, prompt_len, decode_tokens, COMPARE_SAMPLES)
            lb = llama_bench(bins, gguf, threads, prompt_len, decode_tokens, repeats=COMPARE_SAMPLES)
            info = info or lb
            rows.append({"format": fmt, "prompt_tps": ours["prefill_tok_s"], "decode_tps": ours["decode_b1_tok_s"],
                         "llama_prompt_tps": lb.get("prompt_tps"), "llama_decode_tps": lb.get("decode_tps"),
                         "gguf_bytes": decode_bytes(gguf)})
            if fmt != "bf16":
                shutil.rmtree(work / fmt, ignore_errors=True)
            gguf.unlink()
        print_comparison(rows, threads, prompt_len, decode_tokens, read_bandwidth_gbs(threads), info)
        return rows
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def decode_bytes(path: Path) -> int:
    """Bytes of a GGUF file's tensors that one decode step reads: all but token_embd (of which
    it reads one row; the output head, tied or not, is read whole)."""
    from .quant.gguf_reader import read_gguf
    return sum(t.n_bytes for name, t in read_gguf(Path(path))[2].items() if name != "token_embd.weight")


def _ours_subprocess(folder: Path, threads: int, prompt_len: int, decode_tokens: int, samples: int = 1) -> dict:
    """codeshell.bench.run_bench on `folder` in a fresh process (memory of one format at a time),
    each figure the best of `samples` runs."""
    code = ("import json, sys; from codeshell.bench import run_bench; "
            f"r = run_bench(model={str(folder)!r}, shape=None, dtype='bfloat16', prompt_len={prompt_len}, "
            f"decode_tokens={decode_tokens}, batch=1, threads={threads}, print_table=False, samples={samples}); "
            "print('RESULT ' + json.dumps(r))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "CODESHELL_NO_PROGRESS": "1"})
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise LlamaCppError(f"our side failed on {folder}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1][len("RESULT "):])
