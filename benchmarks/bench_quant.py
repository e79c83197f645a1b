"""Benchmark weight-only quantization on this CPU: bf16 vs int8 vs int4 (group 128), and
llama.cpp on the same weights in the same run.

For each format, in a fresh subprocess (so memory figures are clean): load time of the
checkpoint folder, resident memory after load, prompt tokens/s (one 512-token prompt),
decode tokens/s at batch 1 and aggregate at batch 8, and decode's fraction of the
memory-bandwidth bound (bandwidth measured by this script: a streaming read of a 512 MiB
buffer with the same thread count, before the formats and again after each one's decode, the
best probe counting; bound = bandwidth / bytes of weights read per token);
each decode figure the best of repeated samples filling at least half a second (a small model's
16 tokens take milliseconds), the prompt figure the best of as many samples as llama-bench takes of
its prompt (its -r, below); the prompt's TFLOP/s as a fraction of the machine's bf16 matmul peak measured in the same run
(the best of torch's bf16 matmul on CodeShell-7B's linear shapes and our micro-kernels: AMX tiles, vdpbf16ps;
on CPUs without bf16 hardware, where our bf16 path is fp32 FMA, also torch's fp32 matmul and our
fp32-FMA micro-kernel: `codeshell.bench.bf16_matmul_peak`).
The model has random weights (written once per run to a temporary folder, shard by shard;
int8/int4 folders come from `codeshell quantize`, whose time is printed too). Their output
head is int8 per channel by default (`--head int8`: `int8-head`, `int4-g128-head8`), as the
Q8_0 and Q4_0 files `codeshell export-gguf` writes keep theirs in Q8_0, so both sides read
8-bit heads; `--head bf16` keeps our head in bf16 (on the small shapes the 70k-row head is
most of the bytes a token reads, so that compares a larger format against llama.cpp's).

llama.cpp in the same run: the bf16 checkpoint is exported with `codeshell export-gguf` to
BF16, Q8_0 and Q4_0, and llama.cpp's `llama-bench` runs each file right after our side of
that format (same threads, same prompt length, same number of decode tokens, as many
repetitions as fill about half a second of its decode at our speed, its best sample reported as
ours is); the table gives
both sides and the ratios, with the CPU's flags and the bandwidth measured now. llama.cpp is
found by --compare-llamacpp BIN_DIR, else $CODESHELL_LLAMACPP_BIN, else the cache that
.ci/install-llamacpp.sh builds (../shared/tools/build_llamacpp.sh builds the same programs).

    python benchmarks/bench_quant.py                    # mid-size shape (~0.5B), minutes
    python benchmarks/bench_quant.py --shape 1b
    python benchmarks/bench_quant.py --shape 7b         # the issue's table (needs ~16 GiB RAM for bf16)
    python benchmarks/bench_quant.py --formats int4 --decode-tokens 32
    python benchmarks/bench_quant.py --compare-llamacpp ~/.cache/codeshell/llama.cpp/build/bin
    python benchmarks/bench_quant.py --shape 7b --workdir /tmp/q7 --reuse   # keep the checkpoints between runs
    python benchmarks/bench_quant.py --model codeshell-mini --prompt-len 256  # a real bf16 checkpoint instead
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

def shape_config(name: str):
    from codeshell.config import SHAPES, CodeShellConfig
    if name == "mid":  # ~0.5B: the real vocabulary, 12 narrower layers
        return CodeShellConfig(n_embd=1536, n_layer=12, n_head=12, num_query_groups=4, n_inner=6144)
    if name == "small":  # ~0.2B: the real vocabulary, 8 layers of width 1024 (a quick proof run)
        return CodeShellConfig(n_embd=1024, n_layer=8, n_head=8, num_query_groups=2, n_inner=4096)
    if name == "1.7b":  # 8 layers of CodeShell-7B's width (bench_serve's 1.7b): the 7B's kernels, 1/5 of the bytes
        return CodeShellConfig(n_embd=4096, n_layer=8, n_head=32, num_query_groups=8, n_inner=16384)
    if name not in SHAPES:
        raise SystemExit(f"unknown --shape {name!r}: choose mid, {', '.join(SHAPES)}")
    return SHAPES[name]


def write_random_checkpoint(cfg, out: Path) -> None:
    """bf16 random weights, one shard per block, with the real tokenizer (GGUF files carry it)."""
    from codeshell.llamacpp import shared_tokenizer_dir, write_random_checkpoint as write
    write(cfg, out, shared_tokenizer_dir())


# Seconds of samples each decode figure is the best of (at least two samples): long enough for a
# small model's best sample to be an undisturbed one; a 7B's two samples already take longer.
DECODE_MIN_S = 0.5


def llamacpp_repeats(decode_tps: float, decode_tokens: int) -> int:
    """llama-bench's -r for a format whose decode our side ran at `decode_tps`: as many
    repetitions as fill about DECODE_MIN_S of its decode (2 to 30), so that both sides' best
    samples come from about as much time (llamacpp.llama_bench reports the best sample)."""
    if not decode_tps or decode_tps != decode_tps:
        return 2
    return max(2, min(30, math.ceil(DECODE_MIN_S * decode_tps / max(decode_tokens, 1))))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_bandwidth(threads: int) -> float:
    """Read bandwidth in bytes/s: `codeshell.bench.read_bandwidth_gbs` over a 512 MiB buffer."""
    from codeshell.llamacpp import read_bandwidth_gbs
    return read_bandwidth_gbs(threads, gib=0.5) * 1e9


def worker(fmt: str, folder: str, threads: int, prompt_len: int, decode_tokens: int, batch: int) -> dict:
    import psutil

    # codeshell.llm before torch, as a user's `from codeshell import LLM` first: the library's
    # OpenMP setting (omp.library_spin) applies only where it comes before libgomp loads
    from codeshell import LLM, SamplingParams
    import torch
    from codeshell.bench import weight_bytes_per_token
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    llm = LLM(folder, dtype="bfloat16", threads=threads, max_batch=max(batch, 1),
              max_model_len=prompt_len + decode_tokens + 8)
    load_s = time.perf_counter() - t
    rss = proc.memory_info().rss - rss0
    g = torch.Generator().manual_seed(1)
    V = min(llm.config.vocab_size, 70000)

    def prompt(n):
        return {"prompt_token_ids": torch.randint(0, V, (n,), generator=g).tolist()}

    def run(prompts, max_tokens, repeats=2, min_s=0.0):
        # Best of `repeats`, and of as many more as fill `min_s` (at most 100): on a shared
        # machine the slower samples measure the other jobs, and a small model's 16 tokens
        # (~4 ms for codeshell-mini) are too short for two samples to miss every preemption.
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        times = []
        while len(times) < repeats or (sum(times) < min_s and len(times) < 100):
            times.append(_timed(lambda: llm.generate(prompts, sp)))
        return min(times)

    run([prompt(16)], 2)  # warm-up
    # The first prompt of this length is printed apart (the prefill candidates of each weight
    # shape were measured at load, `kernels.choose_prefill_paths`; what is left is first-touch
    # cost), as llama-bench's figures follow its warm-up run.
    first_s = run([prompt(prompt_len)], 1, repeats=1)
    short = [prompt(16)]
    t1, tn = run(short, 1, min_s=DECODE_MIN_S), run(short, decode_tokens + 1, min_s=DECODE_MIN_S)
    many = [prompt(16) for _ in range(batch)]
    b1, bn = run(many, 1, min_s=DECODE_MIN_S), run(many, decode_tokens + 1, min_s=DECODE_MIN_S)
    decode1_tps = decode_tokens / (tn - t1) if tn > t1 else float("nan")
    # The prompt figure: the best of as many samples as llama-bench takes of its prompt (its -r,
    # `llamacpp_repeats`, from this decode speed), so both sides' best prompt comes from as many
    # samples. Why: llama-bench runs pp -r times, up to 30 for a small model, and this host's speed
    # moves over seconds (docs/kernels-log.md, session 35 helper A: one thread's FMA peak 46-101
    # GFLOP/s within 40 s); a best of 2 against a best of 30 measured the host's minute, not ours.
    prompt_samples = llamacpp_repeats(decode1_tps, decode_tokens)
    prefill_s = run([prompt(prompt_len)], 1, repeats=prompt_samples)
    # The read bandwidth again, in this process right after its decode: on a VM it drifts between
    # minutes (17-27 GB/s here), and a probe taken once before all formats made "% of bound" say
    # the probe more than the kernels. The bound uses the best probe of the run.
    bw = measure_bandwidth(threads)
    from codeshell.kernels import ops
    return {"format": fmt, "load_s": load_s, "rss_gib": rss / 2**30, "prompt_tps": prompt_len / prefill_s,
            "first_prompt_tps": prompt_len / first_s, "choices": {f"{k[0]} {k[1]}x{k[2]}": v
                                                               for k, v in ops._CHOICES.items()},
            "prompt_samples": prompt_samples,
            # nan where the decode time is lost in the noise of the 1-token run it is the difference of
            "decode1_tps": decode1_tps,
            "decodeb_tps": batch * decode_tokens / (bn - b1) if bn > b1 else float("nan"),
            "bytes_per_token": weight_bytes_per_token(llm.model), "bandwidth": bw,
            "folder_gib": sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mid", help="mid (default, ~0.5B), small (~0.2B), 1.7b (8 layers of 7B width), 1b, 7b, tiny")
    ap.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4"])
    ap.add_argument("--model", default=None,
                    help="a bf16 checkpoint folder (with its tokenizer) instead of random weights of --shape; "
                         "`codeshell-mini` names the built-in model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--head", choices=["int8", "bf16"], default="int8",
                    help="output head of our int8/int4 checkpoints: int8 (default, as llama.cpp's Q8_0/Q4_0 "
                         "files) or bf16")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="where to write the random checkpoints (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --workdir: keep checkpoints an earlier run left there instead of rewriting them")
    ap.add_argument("--compare-llamacpp", metavar="BIN_DIR", default=None,
                    help="llama.cpp's build/bin folder (default: $CODESHELL_LLAMACPP_BIN or the install script's cache)")
    ap.add_argument("--no-llamacpp", action="store_true", help="our side only")
    ap.add_argument("--worker", nargs=2, metavar=("FORMAT", "FOLDER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.threads, a.prompt_len, a.decode_tokens, a.batch)))
        return
    os.environ.setdefault("CODESHELL_NO_PROGRESS", "1")
    from codeshell import llamacpp
    from codeshell.bench import HostLoad, best_peaks, bf16_matmul_peak, prompt_flops
    model = None
    if a.model:
        from codeshell.weights import CheckpointError, load_config
        model = Path(a.model)
        if a.model == "codeshell-mini":
            from codeshell.mini import MODEL_DIR
            model = Path(MODEL_DIR)
        try:
            cfg = load_config(model)
        except (CheckpointError, OSError, ValueError) as e:
            sys.exit(f"error: --model {a.model}: {e}")
        if cfg.quantization:
            sys.exit(f"error: --model {a.model} is quantized; give the full-precision checkpoint")
        a.shape = model.name
    else:
        cfg = shape_config(a.shape)
    bins = None
    if not a.no_llamacpp:
        try:
            bins = llamacpp.find_bin_dir(a.compare_llamacpp, need="llama-bench")
        except llamacpp.LlamaCppError as e:
            sys.exit(f"error: {e}")
        if bins is None:
            print("llama.cpp not found: our side only (build it with .ci/install-llamacpp.sh or "
                  "../shared/tools/build_llamacpp.sh and pass --compare-llamacpp BIN_DIR)", flush=True)
        else:
            print(f"llama.cpp: {bins} ({llamacpp.version(bins)})", flush=True)
    if bins is not None and model is None and llamacpp.shared_tokenizer_dir() is None:
        sys.exit("error: the GGUF export needs the tokenizer at ../shared/codeshell-tokenizer (set CODESHELL_SHARED)")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_quant_"))
    work.mkdir(parents=True, exist_ok=True)  # --model writes only the quantized folders and GGUF files there
    print(f"shape {a.shape}: {cfg.num_parameters() / 1e9:.2f}B parameters, {a.threads} threads, "
          f"prompt {a.prompt_len}, decode {a.decode_tokens} tokens, batch {a.batch}; work dir {work}", flush=True)
    rows = []
    try:
        from codeshell.quant.convert import quantize_checkpoint
        from codeshell.quant.scheme import QuantScheme
        src = model or work / "bf16"
        def kept(folder: Path, scheme=None) -> bool:
            if not (a.reuse and (folder / "config.json").is_file()):
                return False
            stored = json.loads((folder / "config.json").read_text()).get("quantization")
            return scheme is None or stored == scheme.to_dict()  # another head is not reused

        t = time.perf_counter()
        if model is not None:
            print(f"model {model} ({cfg.torch_dtype or 'bfloat16'})", flush=True)
        elif kept(src):
            print(f"reusing {src}", flush=True)
        else:
            write_random_checkpoint(cfg, src)
            print(f"wrote random bf16 checkpoint in {time.perf_counter() - t:.1f} s", flush=True)
        folders = {"bf16": src}
        group = 128 if cfg.n_embd % 128 == 0 and cfg.ffn_dim % 128 == 0 else 32  # 128 except for tiny shapes
        head = a.head == "int8"
        for fmt, scheme in (("int8", QuantScheme(bits=8, quantize_head=head)),
                            ("int4", QuantScheme(bits=4, group_size=group, quantize_head=head, head_bits=8))):
            if fmt in a.formats and kept(work / fmt, scheme):
                folders[fmt] = work / fmt
                print(f"reusing {folders[fmt]}", flush=True)
            elif fmt in a.formats:
                t = time.perf_counter()
                folders[fmt] = quantize_checkpoint(src, work / fmt, scheme, overwrite=True)
                print(f"codeshell quantize -> {fmt} ({scheme.name}): {time.perf_counter() - t:.1f} s", flush=True)
        bw = measure_bandwidth(a.threads)
        print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s", flush=True)
        peaks = [bf16_matmul_peak(a.prompt_len)]  # on a.threads: measure_bandwidth set them
        print("measured bf16 matmul peak: " + ", ".join(f"{k} {v:.2f}" for k, v in peaks[0].items()) + " TFLOP/s",
              flush=True)
        for fmt in a.formats:
            with HostLoad() as load:  # what else used the cores while this format ran
                r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", fmt, str(folders[fmt]),
                                    "--threads", str(a.threads), "--prompt-len", str(a.prompt_len),
                                    "--decode-tokens", str(a.decode_tokens), "--batch", str(a.batch)],
                                   capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{fmt}: worker failed:\n{r.stderr[-3000:]}")
                continue
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]) | {"other": load.other})
            print(f"  measured {fmt} ({load})", flush=True)
            if bins is not None:  # llama.cpp on the same weights, right after ours
                gtype = llamacpp.GGUF_OF[fmt][0]
                gfile = work / f"model-{gtype}.gguf"
                try:
                    t = llamacpp.export_with_cli(src, gfile, gtype)
                    print(f"  codeshell export-gguf --type {gtype}: {t:.1f} s", flush=True)
                    with HostLoad() as load:
                        reps = llamacpp_repeats(rows[-1]["decode1_tps"], a.decode_tokens)
                        lb = llamacpp.llama_bench(bins, gfile, a.threads, a.prompt_len, a.decode_tokens, repeats=reps)
                except llamacpp.LlamaCppError as e:
                    print(f"  llama.cpp {gtype}: {e}", flush=True)
                else:
                    rows[-1].update(llama_prompt_tps=lb.get("prompt_tps"), llama_decode_tps=lb.get("decode_tps"),
                                    gguf_bytes=llamacpp.decode_bytes(gfile), llama_info=lb)
                    print(f"  measured llama.cpp {gtype}, {reps} repetitions ({load})", flush=True)
                finally:
                    gfile.unlink(missing_ok=True)
        if rows:  # again after the formats: the best of the run's probes is the peak (bench.best_peaks says why)
            peaks.append(bf16_matmul_peak(a.prompt_len))
            print("measured bf16 matmul peak again: " + ", ".join(f"{k} {v:.2f}" for k, v in peaks[-1].items())
                  + " TFLOP/s", flush=True)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    peak = best_peaks(*peaks)
    print()
    print(f"| format | files GiB | load s | RSS GiB | prompt tok/s | 1st prompt tok/s | prompt TFLOP/s | % of bf16 peak | "
          f"decode tok/s b=1 | bound tok/s | % of bound | % of own probe | decode tok/s b={a.batch} (aggregate) | b={a.batch} / b=1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    probes = [bw] + [r["bandwidth"] for r in rows]
    bw = max(probes)  # the bound: the best read bandwidth seen in this run
    flops = prompt_flops(cfg, a.prompt_len)
    for r in rows:
        bound = bw / r["bytes_per_token"]
        tflops = flops * r["prompt_tps"] / a.prompt_len / 1e12
        print(f"| {r['format']} | {r['folder_gib']:.2f} | {r['load_s']:.1f} | {r['rss_gib']:.2f} | "
              f"{r['prompt_tps']:.1f} | {r['first_prompt_tps']:.1f} | {tflops:.2f} | {100 * tflops / peak['peak']:.0f}% | "
              f"{r['decode1_tps']:.2f} | {bound:.2f} | "
              f"{100 * r['decode1_tps'] / bound:.0f}% | {100 * r['decode1_tps'] * r['bytes_per_token'] / r['bandwidth']:.0f}% | "
              f"{r['decodeb_tps']:.2f} | {r['decodeb_tps'] / r['decode1_tps']:.1f}x |")
    print("(1st prompt: the first prompt after load (each weight shape's prefill path is chosen at load, in "
          "load s: measured there once per machine, then read from disk); prompt: best of the next "
          + "/".join(str(r["prompt_samples"]) for r in rows) + " (per format: llama-bench's -r, from our decode "
          "speed), taken after the decode figures. Prompt TFLOP/s: the blocks' linears, causal attention "
          f"and the last token's head, the work the engine does (the last block past its keys and values on the "
          f"sampled token only: `codeshell.bench.prompt_flops`); bf16 peak {peak['peak']:.2f} TFLOP/s, the "
          f"best of torch's bf16 matmul on the 7B shapes at M = {a.prompt_len} (torch {peak['torch']:.2f}) and our "
          f"micro-kernels (AMX tiles on L2-resident data: kernel {peak.get('kernel', float('nan')):.2f}; vdpbf16ps on "
          f"L1-resident operands: dot_kernel {peak.get('dot_kernel', float('nan')):.2f}; nan where the CPU lacks it); "
          "on a CPU without bf16 hardware (no AVX512-BF16, no AMX) our bf16 path is fp32 FMA (bf16 weights "
          "widened to fp32) and torch's bf16 matmul is emulated, so there the candidates also include torch's "
          f"fp32 matmul on the same shapes (torch_fp32 {peak.get('torch_fp32', float('nan')):.2f}) and our fp32-FMA "
          f"micro-kernel on L1-resident operands (fma_kernel {peak.get('fma_kernel', float('nan')):.2f}); "
          "measured in this run, each the best of its probes before and after the formats ("
          + " / ".join(f"{p['peak']:.2f}" for p in peaks) + " TFLOP/s: the host's speed moves between minutes). "
          f"Bound: weight bytes per token / {bw / 1e9:.1f} GB/s, the best of the run's read-bandwidth probes "
          f"({', '.join(f'{p / 1e9:.1f}' for p in probes)} GB/s: before the formats, then after each one's decode); "
          "% of own probe: against the probe taken right after that format's decode, in the same process (the "
          "host's bandwidth moves between minutes: the best probe of the run can come from a faster minute))")
    if any(r.get("other") is not None for r in rows):
        print("Other processes on the machine while our side of each format ran (from /proc/stat, this run's own "
              "processes excluded): " + ", ".join(f"{r['format']} {r['other']:.2f}" for r in rows
                                                  if r.get("other") is not None) + " cores")
    for r in rows:  # the measured choices (ops.plan), so a figure says which kernels made it
        if r.get("choices"):
            print(f"{r['format']} prefill/batch paths: " + "; ".join(f"{k} -> {v}" for k, v in sorted(r["choices"].items())))
    if bins is not None:
        info = next((r["llama_info"] for r in rows if r.get("llama_info")), None)
        llamacpp.print_comparison([{"format": r["format"], "prompt_tps": r["prompt_tps"], "decode_tps": r["decode1_tps"],
                                    **{k: r[k] for k in ("llama_prompt_tps", "llama_decode_tps", "gguf_bytes") if k in r}}
                                   for r in rows], a.threads, a.prompt_len, a.decode_tokens, bw / 1e9, info)
        print(f"(ours: int8 per channel, int4 groups of {group}, the output head in {a.head}; llama.cpp: Q8_0 and "
              "Q4_0, blocks of 32, the output head in Q8_0 in both; the GGUF files are `codeshell export-gguf` "
              "of the same bf16 weights)")
    else:
        print(f"\nCPU flags: {' '.join(llamacpp.cpu_flags())}; read bandwidth {bw / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
