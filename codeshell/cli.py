"""The `codeshell` command: generate, infill, chat, info and bench on the runtime, plus the
subcommands of the other areas (serve, eval, data, tokenizer, quantize), mounted here.

Each command is a thin layer over the Python API; heavy imports happen inside commands so
`codeshell --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

DEFAULT_MODEL = "WisdomShell/CodeShell-7B-Chat"

app = typer.Typer(help="CodeShell: run, serve, evaluate, tune and build CodeShell-family code LLMs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder or Hugging Face hub id.")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (the checkpoint's own).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda.")]
TokOpt = Annotated[Optional[str], typer.Option(help="Tokenizer folder, when the model folder has none.")]
MaxTokOpt = Annotated[int, typer.Option("--max-tokens", "-n", help="Most new tokens to generate.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")]
TopKOpt = Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")]
MinPOpt = Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability.")]
RepOpt = Annotated[float, typer.Option(help="transformers-style repetition penalty (1: off).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")]


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _load(model: str, dtype: str, device: str, tokenizer: str | None = None):
    """LLM for a command, with the model-not-available message users need."""
    from .config import ConfigError
    from .llm import LLM
    from .tokenizer import TokenizerMissingError
    from .weights import CheckpointError
    try:
        return LLM(model, dtype=dtype, device=device, tokenizer=tokenizer)
    except (CheckpointError, ConfigError, TokenizerMissingError, ValueError) as e:
        hint = ""
        if model == DEFAULT_MODEL:
            hint = ("\nThe default model is fetched from the Hugging Face hub; when you are offline, "
                    "pass a local checkpoint folder with --model PATH.")
        _fail(f"{e}{hint}")


def _params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop):
    from .engine.sampling import SamplingError, SamplingParams
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop)
    except SamplingError as e:
        _fail(str(e))


def _stream_out(deltas) -> None:
    for d in deltas:
        sys.stdout.write(d)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


@app.command()
def generate(prompt: Annotated[Optional[str], typer.Argument(help="The prompt; '-' or none reads stdin.")] = None,
             model: ModelOpt = DEFAULT_MODEL, dtype: DtypeOpt = "auto", device: DeviceOpt = "cpu",
             tokenizer: TokOpt = None, max_tokens: MaxTokOpt = 256, temperature: TempOpt = 0.2,
             top_p: TopPOpt = 0.95, top_k: TopKOpt = 0, min_p: MinPOpt = 0.0, repetition_penalty: RepOpt = 1.0,
             seed: SeedOpt = None, stop: StopOpt = None) -> None:
    """Continue a prompt, streaming the completion to the terminal."""
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        _fail("the prompt is empty: pass it as an argument or on stdin")
    sp = _params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop)
    llm = _load(model, dtype, device, tokenizer)
    from .engine.engine import RequestError
    try:
        _stream_out(llm.stream(prompt, sp))
    except RequestError as e:
        _fail(str(e))


@app.command()
def infill(prefix: Annotated[Optional[str], typer.Option(help="Code before the cursor.")] = None,
           suffix: Annotated[Optional[str], typer.Option(help="Code after the cursor.")] = None,
           prefix_file: Annotated[Optional[Path], typer.Option(help="Read the prefix from a file.")] = None,
           suffix_file: Annotated[Optional[Path], typer.Option(help="Read the suffix from a file.")] = None,
           model: ModelOpt = DEFAULT_MODEL, dtype: DtypeOpt = "auto", device: DeviceOpt = "cpu",
           tokenizer: TokOpt = None, max_tokens: MaxTokOpt = 64, temperature: TempOpt = 0.2,
           top_p: TopPOpt = 0.95, top_k: TopKOpt = 0, min_p: MinPOpt = 0.0, repetition_penalty: RepOpt = 1.0,
           seed: SeedOpt = None, stop: StopOpt = None) -> None:
    """Fill in the middle between a prefix and a suffix (CodeShell's FIM format)."""
    def read(text, file, name):
        if file is not None:
            try:
                return file.read_text(encoding="utf-8")
            except OSError as e:
                _fail(f"cannot read --{name}-file {file}: {e.strerror}")
        return text or ""
    pre, suf = read(prefix, prefix_file, "prefix"), read(suffix, suffix_file, "suffix")
    if not pre and not suf:
        _fail("give --prefix/--prefix-file and/or --suffix/--suffix-file")
    sp = _params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop)
    llm = _load(model, dtype, device, tokenizer)
    from .llm import with_stops
    from .prompts import FIM, fim_prompt
    _stream_out(llm.stream(fim_prompt(pre, suf), with_stops(sp, FIM.stop)))


@app.command()
def chat(model: ModelOpt = DEFAULT_MODEL, dtype: DtypeOpt = "auto", device: DeviceOpt = "cpu",
         tokenizer: TokOpt = None, system: Annotated[Optional[str], typer.Option(help="A system message.")] = None,
         max_tokens: MaxTokOpt = 512, temperature: TempOpt = 0.2, top_p: TopPOpt = 0.95, top_k: TopKOpt = 0,
         min_p: MinPOpt = 0.0, repetition_penalty: RepOpt = 1.0, seed: SeedOpt = None) -> None:
    """Multi-turn chat, streamed. /clear starts over, /exit quits; Ctrl-C stops the current answer."""
    sp = _params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, None)
    llm = _load(model, dtype, device, tokenizer)
    interactive = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    if interactive:
        typer.secho(f"Chatting with {llm.path.name}. /clear starts over, /exit quits, Ctrl-C stops an answer.",
                    fg="cyan")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        q = line.strip()
        if not q:
            continue
        if q in ("/exit", "/quit"):
            break
        if q == "/clear":
            history = history[:1] if system else []
            typer.secho("(history cleared)", fg="cyan", err=not interactive)
            continue
        history.append({"role": "user", "content": q})
        if interactive:
            sys.stdout.write("codeshell> ")
        answer = []
        stream = llm.chat_stream(history, sp)
        try:
            for d in stream:
                answer.append(d)
                sys.stdout.write(d)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()  # aborts the request in the engine
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(answer).strip()})


@app.command()
def info(model: Annotated[str, typer.Argument(help="Checkpoint folder or hub id.")] = DEFAULT_MODEL) -> None:
    """Show a checkpoint's config, parameter count, dtype and size in memory (without loading it)."""
    from rich.console import Console
    from rich.table import Table

    from .config import ConfigError
    from .weights import CheckpointError, load_config, resolve_model_path, weight_files
    try:
        path = resolve_model_path(model)
        cfg = load_config(path)
        files = weight_files(path)
    except (CheckpointError, ConfigError) as e:
        _fail(str(e))
    n = cfg.num_parameters()
    t = Table(title=f"{model}", show_header=False)
    t.add_row("folder", str(path))
    t.add_row("model_type", cfg.model_type)
    t.add_row("layers / width / heads / KV groups", f"{cfg.n_layer} / {cfg.n_embd} / {cfg.n_head} / {cfg.num_query_groups}")
    t.add_row("FFN / vocab / context", f"{cfg.ffn_dim} / {cfg.vocab_size} / {cfg.n_positions}")
    t.add_row("positions", cfg.position_embedding_type + (f" ({cfg.rope_scaling_type} x{cfg.rope_scaling_factor})"
                                                         if cfg.rope_scaling_type else ""))
    t.add_row("parameters", f"{n:,} ({n / 1e9:.2f} B)")
    t.add_row("checkpoint dtype", str(cfg.torch_dtype))
    if cfg.quantization:
        t.add_row("quantization", str(cfg.quantization))
    t.add_row("weight files", f"{len(files)} ({sum(f.stat().st_size for f in files) / 2**30:.2f} GiB on disk)")
    t.add_row("memory (bfloat16 / float32)", f"{n * 2 / 2**30:.2f} GiB / {n * 4 / 2**30:.2f} GiB")
    kv = 2 * cfg.n_layer * cfg.kv_dim * 2
    t.add_row("KV cache per token (bf16)", f"{kv / 1024:.1f} KiB ({kv * cfg.n_positions / 2**30:.2f} GiB at full context)")
    Console().print(t)


@app.command()
def bench(model: Annotated[Optional[str], typer.Option("--model", "-m", help="Benchmark a real checkpoint.")] = None,
          shape: Annotated[Optional[str], typer.Option(help="7b, 1b or tiny: random weights of that shape.")] = None,
          dtype: DtypeOpt = "bfloat16", device: DeviceOpt = "cpu",
          prompt_len: Annotated[int, typer.Option(help="Prompt tokens for the prefill figure.")] = 512,
          decode_tokens: Annotated[int, typer.Option(help="Tokens per decode measurement.")] = 16,
          batch: Annotated[int, typer.Option(help="Batch size for the batched decode figure.")] = 8,
          threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: all available).")] = None,
          json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures as JSON.")] = None) -> None:
    """Prefill and decode tokens/s and memory on this machine.

    With --shape, random weights of that shape: learn how fast CodeShell-7B runs here before
    downloading 15 GB.
    """
    from .bench import run_bench
    if (model is None) == (shape is None):
        _fail("give exactly one of --model PATH and --shape 7b|1b|tiny")
    try:
        run_bench(model=model, shape=shape, dtype=dtype, device=device, prompt_len=prompt_len,
                  decode_tokens=decode_tokens, batch=batch, threads=threads, json_out=json_out)
    except (ValueError, RuntimeError) as e:
        _fail(str(e))


def _mount() -> None:
    """Subcommands of the other areas, each defined in its own package (light imports only)."""
    from .data.cli import app as data_app
    from .eval.cli import app as eval_app
    from .quant.cli import export_gguf, quantize
    from .serve.cli import app as serve_app
    from .tokenizer_tools.cli import app as tokenizer_app
    from .train.cli import app as train_app
    app.add_typer(serve_app, name="serve")
    app.command("quantize")(quantize)
    app.command("export-gguf")(export_gguf)
    app.add_typer(eval_app, name="eval", help="HumanEval, MBPP and MultiPL-E: generate, run sandboxed, score.")
    app.add_typer(data_app, name="data", help="The pretraining data pipeline (ingest, filter, dedup, pack).")
    app.add_typer(tokenizer_app, name="tokenizer", help="Train, extend and evaluate BPE tokenizers.")
    app.add_typer(train_app, name="train", help="Pretrain, fine-tune (full or LoRA) and merge models.")


_mount()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
