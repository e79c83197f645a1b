"""The `codeshell` command: generate, infill, chat, info and bench on the runtime, plus the
subcommands of the other areas (serve, eval, data, tokenizer, quantize), mounted here.

Each command is a thin layer over the Python API; heavy imports happen inside commands so
`codeshell --help` stays fast. Bad input ends in one `error: ...` line and exit code 2, never a
traceback; after each answer, prompt and generation speed go to stderr (`--quiet` hides them).
This module holds no model logic of its own.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .mini.package import HUB_MODEL, NAME as MINI_NAME, cli_model  # standard library only

# Without --model, every command runs the codeshell-mini model shipped in the package (one note
# on stderr says so); the real CodeShell-7B is `--model WisdomShell/CodeShell-7B-Chat` away.

app = typer.Typer(help="CodeShell: run, serve, evaluate, tune and build CodeShell-family code LLMs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _click_style_help() -> None:
    """Help and usage errors as a well-kept CLI shows them, for every command mounted here.

    Recent typer releases print each option's Python type (`<str>`, `<list[str]>`, and
    `<bool>` even for flags such as `--help`) and usage errors in a multi-line box. Show
    click's metavars instead (TEXT, INTEGER, FLOAT, PATH; none for flags; choices as [a|b];
    arguments by upper-case name) and a usage error as one `error:` line. Older typer releases
    already print click's metavars and lack those hooks: there only the error line changes.
    """
    from typer import core, rich_utils

    def format_error(e) -> None:
        if type(e).__name__ == "NoArgsIsHelpError":
            return
        ctx = getattr(e, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        msg = " ".join(e.format_message().split())
        typer.secho(f"error: {msg}{where}", fg="red", err=True)

    if hasattr(rich_utils, "rich_format_error"):  # typer calls it by module attribute, every release
        rich_utils.rich_format_error = format_error
    if not hasattr(core, "_TyperParameter") or not hasattr(core._TyperParameter, "display_type"):
        return  # an older typer: click's metavars already
    names = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN", "Path": "PATH",
             "int range": "INTEGER", "float range": "FLOAT"}

    def display_type_rich(self, ctx):
        if self.metavar is not None and not isinstance(self, core.TyperArgument):
            return self.metavar  # an argument's metavar is its name, shown beside this
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        label = self.display_type(ctx).strip("<>")
        if label.startswith("list[") and label.endswith("]"):
            label = label[5:-1]
        if "|" in label:
            return f"[{label}]"
        return names.get(label, label.upper())

    core._TyperParameter.display_type_rich = display_type_rich
    if "display_type_rich" in vars(core.TyperOption):
        core.TyperOption.display_type_rich = display_type_rich

    # Arguments by their upper-case names (`MODEL OUT`, `[PROMPT]`), not `{model}` / `[prompt]`.
    if hasattr(core.TyperArgument, "_usage_display_name"):
        def usage_name(self) -> str:
            name = self.display_name_raw
            name = name if self.required else f"[{name}]"
            return name + ("..." if self.nargs != 1 else "")
        core.TyperArgument.display_name_raw = property(
            lambda self: self.metavar if self.metavar is not None else (self.name or "").upper())
        core.TyperArgument._usage_display_name = usage_name


_click_style_help()


def _version(value: bool) -> None:
    if value:
        from . import __version__
        typer.echo(f"codeshell {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """CodeShell: run, serve, evaluate, tune and build CodeShell-family code LLMs."""

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help=f"Checkpoint folder or Hugging Face hub id (default: the built-in {MINI_NAME}).")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (the checkpoint's own).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda.")]
TokOpt = Annotated[Optional[str], typer.Option(help="Tokenizer folder, when the model folder has none.")]
MaxTokOpt = Annotated[int, typer.Option("--max-tokens", "-n", "--max-new-tokens", help="Most new tokens to generate.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")]
TopKOpt = Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")]
MinPOpt = Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability.")]
RepOpt = Annotated[float, typer.Option(help="transformers-style repetition penalty (1: off).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")]
TruncOpt = Annotated[bool, typer.Option("--truncate-prompt", help="Cut a prompt longer than the context "
                                        "(minus --max-tokens) from the start instead of refusing it.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No token counts and speeds on stderr.")]


def _fail(msg: str) -> None:
    msg = " ".join(str(msg).split())  # one line, whatever the exception's text
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _load(model: str | None, dtype: str, device: str, tokenizer: str | None = None, need_text: bool = True):
    """LLM for a command (None: the built-in model), with the model-not-available message users need.

    `need_text`: the command encodes text, so a model without a tokenizer is an error here
    (pointing at --tokenizer) rather than at the first prompt.
    """
    model = cli_model(model)
    from .omp import wait_policy

    try:  # before torch loads libgomp: sampled decode's OpenMP worker must not spin through the team's step
        wait_policy()
    except ValueError as e:
        _fail(str(e))
    from .config import ConfigError
    from .llm import LLM
    from .tokenizer import TokenizerError
    from .weights import CheckpointError
    try:
        llm = LLM(model, dtype=dtype, device=device, tokenizer=tokenizer)
    except (CheckpointError, ConfigError, TokenizerError, ValueError, OSError) as e:
        hint = ""
        if model == HUB_MODEL:
            hint = ("; this model is fetched from the Hugging Face hub: when you are offline, "
                    "pass a local checkpoint folder with --model PATH")
        _fail(f"{e}{hint}")
    if need_text and llm.tokenizer is None:
        _fail(f"{model} has no tokenizer.json, and text prompts need a tokenizer: pass --tokenizer FOLDER "
              "(a folder with the model's tokenizer.json)")
    return llm


def _params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, truncate_prompt=False):
    from .engine.sampling import SamplingError, SamplingParams
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                              truncate_prompt=truncate_prompt)
    except SamplingError as e:
        _fail(str(e))


class Stats:
    """Token counts and speeds of one completion, llama.cpp-style: the prompt phase runs from
    the request to its first token; the generation phase from there to the last token (its
    tokens/s counts the tokens after the first, like llama.cpp's eval time)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end: float | None = None
        self.last = None  # the last RequestOutput

    def seen(self, out) -> None:
        now = time.perf_counter()
        if self.first is None and out.outputs[0].token_ids:
            self.first = now
        self.end = now
        self.last = out

    def line(self) -> str:
        if self.last is None or self.first is None:
            return "no tokens generated"
        n_prompt, n_gen = len(self.last.prompt_token_ids), len(self.last.outputs[0].token_ids)
        cached = self.last.num_cached_tokens
        prompt_s = self.first - self.start
        parts = [f"prompt: {n_prompt} tokens" + (f" ({cached} cached)" if cached else "")
                 + f", {_rate(n_prompt - cached, prompt_s)}",
                 f"generated: {n_gen} tokens, {_rate(n_gen - 1, self.end - self.first)}"]
        return " | ".join(parts) + f" | finish: {self.last.outputs[0].finish_reason}"


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.2f} tokens/s" if n > 0 and seconds > 0 else "- tokens/s"


def _echo(outputs, stats: Stats, text: list[str]) -> None:
    """Write each new piece of a streamed completion to stdout as it comes, into `text` and `stats`."""
    for out in outputs:
        stats.seen(out)
        d = out.outputs[0].delta
        if d:
            text.append(d)
            sys.stdout.write(d)
            sys.stdout.flush()


def _run_stream(llm, outputs, sp, quiet: bool, n_given: int | None = None) -> str:
    """Write a completion to stdout as it streams; then its speeds (unless quiet) and, always,
    whether the context cut it short. Returns the text."""
    stats, text = Stats(), []
    _echo(outputs, stats, text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    _report(llm, stats, sp, quiet, n_given)
    return "".join(text)


def _report(llm, stats: Stats, sp, quiet: bool, n_given: int | None = None) -> None:
    """Notes on stderr: a truncated prompt and a stop at the context limit (always), speeds (unless quiet)."""
    last = stats.last
    if last is not None and n_given is not None and n_given > len(last.prompt_token_ids):
        typer.secho(f"note: --truncate-prompt cut the prompt from {n_given} to {len(last.prompt_token_ids)} tokens "
                    "to fit the context", fg="yellow", err=True)
    if last is not None:
        co = last.outputs[0]
        used = len(last.prompt_token_ids) + len(co.token_ids)
        if co.finish_reason == "length" and used >= llm.max_model_len and len(co.token_ids) < (sp.max_tokens or 0):
            typer.secho(f"note: stopped at the context limit ({llm.max_model_len} tokens: {len(last.prompt_token_ids)} "
                        f"of prompt + {len(co.token_ids)} generated), finish reason `length`, before --max-tokens "
                        f"{sp.max_tokens}", fg="yellow", err=True)
    if not quiet:
        typer.secho(stats.line(), dim=True, err=True)


@app.command()
def generate(prompt: Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="The prompt; '-' or none reads stdin.")] = None,
             model: ModelOpt = None, dtype: DtypeOpt = "auto", device: DeviceOpt = "cpu",
             tokenizer: TokOpt = None, max_tokens: MaxTokOpt = 256, temperature: TempOpt = 0.2,
             top_p: TopPOpt = 0.95, top_k: TopKOpt = 0, min_p: MinPOpt = 0.0, repetition_penalty: RepOpt = 1.0,
             seed: SeedOpt = None, stop: StopOpt = None, truncate_prompt: TruncOpt = False,
             quiet: QuietOpt = False) -> None:
    """Continue a prompt, streaming the completion to the terminal."""
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        _fail("the prompt is empty: pass it as an argument or on stdin")
    sp = _params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, truncate_prompt)
    llm = _load(model, dtype, device, tokenizer)
    from .engine.engine import RequestError
    try:
        ids = llm.encode(prompt)
        _run_stream(llm, llm.stream_outputs({"prompt": prompt, "prompt_token_ids": ids}, sp), sp, quiet, len(ids))
    except RequestError as e:
        _fail(str(e))


@app.command()
def infill(prefix: Annotated[Optional[str], typer.Option(help="Code before the cursor.")] = None,
           suffix: Annotated[Optional[str], typer.Option(help="Code after the cursor.")] = None,
           prefix_file: Annotated[Optional[Path], typer.Option(help="Read the prefix from a file.")] = None,
           suffix_file: Annotated[Optional[Path], typer.Option(help="Read the suffix from a file.")] = None,
           model: ModelOpt = None, dtype: DtypeOpt = "auto", device: DeviceOpt = "cpu",
           tokenizer: TokOpt = None, max_tokens: MaxTokOpt = 64, temperature: TempOpt = 0.2,
           top_p: TopPOpt = 0.95, top_k: TopKOpt = 0, min_p: MinPOpt = 0.0, repetition_penalty: RepOpt = 1.0,
           seed: SeedOpt = None, stop: StopOpt = None,
           truncate_prompt: Annotated[bool, typer.Option(
               "--truncate-prompt", help="Fit a prefix + suffix longer than the context (minus --max-tokens) by "
               "cutting the code farthest from the cursor: the prefix's start, the suffix's end.")] = False,
           quiet: QuietOpt = False) -> None:
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
    from .engine.engine import RequestError
    from .llm import with_stops
    from .prompts import FIM, fim_prompt
    sp = with_stops(sp, FIM.stop)
    try:
        text = fim_prompt(pre, suf)
        ids = llm.encode(text)
        n_given = len(ids)
        if truncate_prompt and len(ids) > llm.max_model_len - 1:
            ids, dropped = _fit_fim(llm, pre, suf, max(1, llm.max_model_len - max_tokens))
            n_given = len(ids) + dropped
        _run_stream(llm, llm.stream_outputs({"prompt": text, "prompt_token_ids": ids}, sp), sp, quiet, n_given)
    except (RequestError, ValueError) as e:
        _fail(str(e))


def _fit_fim(llm, prefix: str, suffix: str, budget: int) -> tuple[list[int], int]:
    """FIM prompt ids of at most `budget` tokens: the prefix keeps its end, the suffix its start
    (the code next to the cursor), the suffix at most half when both are long. Special tokens
    split the text before BPE runs, so encoding the parts apart gives the ids of the whole."""
    from .prompts import FIM
    head, mid, tail = llm.encode(FIM.prefix), llm.encode(FIM.suffix), llm.encode(FIM.middle)
    pre, suf = llm.encode(prefix) if prefix else [], llm.encode(suffix) if suffix else []
    room = budget - len(head) - len(mid) - len(tail)
    if room < 2:
        raise ValueError(f"--max-tokens {llm.max_model_len - budget} leaves no room for a prompt in the "
                         f"{llm.max_model_len}-token context")
    keep_suf = min(len(suf), max(room // 2, room - len(pre)))
    keep_pre = min(len(pre), room - keep_suf)
    dropped = len(pre) - keep_pre + len(suf) - keep_suf
    pre = pre[len(pre) - keep_pre:]
    return head + pre + mid + suf[:keep_suf] + tail, dropped


@app.command()
def chat(model: ModelOpt = None, dtype: DtypeOpt = "auto", device: DeviceOpt = "cpu",
         tokenizer: TokOpt = None, system: Annotated[Optional[str], typer.Option(help="A system message.")] = None,
         max_tokens: MaxTokOpt = 512, temperature: TempOpt = 0.2, top_p: TopPOpt = 0.95, top_k: TopKOpt = 0,
         min_p: MinPOpt = 0.0, repetition_penalty: RepOpt = 1.0, seed: SeedOpt = None,
         quiet: QuietOpt = False) -> None:
    """Multi-turn chat, streamed. /clear starts over, /exit quits; Ctrl-C stops the current answer.

    A conversation longer than the context keeps its latest part (as the official code does).
    """
    sp = _params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, None)
    llm = _load(model, dtype, device, tokenizer)
    from .engine.engine import RequestError
    interactive = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    if interactive:
        name = llm.path.name if model is not None else MINI_NAME
        typer.secho(f"Chatting with {name}. /clear starts over, /exit quits, Ctrl-C stops an answer.", fg="cyan")
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
        stats = Stats()
        stream = llm.chat_stream_outputs(history, sp)
        try:
            _echo(stream, stats, answer)
        except KeyboardInterrupt:
            stream.close()  # aborts the request in the engine
            sys.stdout.write(" [stopped]")
        except RequestError as e:
            _fail(str(e))
        sys.stdout.write("\n")
        sys.stdout.flush()
        _report(llm, stats, sp, quiet)
        history.append({"role": "assistant", "content": "".join(answer).strip()})


@app.command()
def info(model_arg: Annotated[Optional[str], typer.Argument(
             metavar="MODEL", help="Checkpoint folder, hub id, .gguf file or .safetensors file.")] = None,
         model: Annotated[Optional[str], typer.Option("--model", "-m", help="The same, as an option.")] = None
         ) -> None:
    """Show a checkpoint's config, parameter count, dtype and size in memory (without loading it).

    MODEL defaults to the built-in codeshell-mini model.
    """
    from rich.console import Console
    from rich.table import Table

    from .config import ConfigError
    from .weights import CheckpointError, load_config, resolve_model_path, weight_files
    if model_arg is not None and model is not None and model_arg != model:
        _fail(f"give the model once: as an argument ({model_arg}) or with --model ({model})")
    model = cli_model(model_arg or model)
    t = Table(title=f"{model}", show_header=False)
    try:
        path = resolve_model_path(model)
        if path.is_file():
            cfg = _info_file(path, t)
        else:
            cfg = load_config(path)
            files = weight_files(path)
            t.add_row("folder", str(path))
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        _fail(str(e))
    if cfg is not None:
        _config_rows(t, cfg)
    if not path.is_file():
        t.add_row("weight files", f"{len(files)} ({sum(f.stat().st_size for f in files) / 2**30:.2f} GiB on disk)")
    if cfg is not None:
        n = cfg.num_parameters()
        t.add_row("memory (bfloat16 / float32)", f"{n * 2 / 2**30:.2f} GiB / {n * 4 / 2**30:.2f} GiB")
        kv = 2 * cfg.n_layer * cfg.kv_dim * 2
        t.add_row("KV cache per token (bf16)",
                  f"{kv / 1024:.1f} KiB ({kv * cfg.n_positions / 2**30:.2f} GiB at full context)")
    Console().print(t)


def _config_rows(t, cfg) -> None:
    n = cfg.num_parameters()
    t.add_row("model_type", cfg.model_type)
    t.add_row("layers / width / heads / KV groups", f"{cfg.n_layer} / {cfg.n_embd} / {cfg.n_head} / {cfg.num_query_groups}")
    t.add_row("FFN / vocab / context", f"{cfg.ffn_dim} / {cfg.vocab_size} / {cfg.n_positions}")
    t.add_row("positions", cfg.position_embedding_type + (f" ({cfg.rope_scaling_type} x{cfg.rope_scaling_factor})"
                                                         if cfg.rope_scaling_type else ""))
    t.add_row("parameters", f"{n:,} ({n / 1e9:.2f} B)")
    if cfg.torch_dtype:
        t.add_row("checkpoint dtype", str(cfg.torch_dtype))
    if cfg.quantization:
        t.add_row("quantization", str(cfg.quantization))


def _info_file(path: Path, t):
    """Rows for a single weight file; the config when the file carries one (GGUF) or sits in a
    checkpoint folder (safetensors beside config.json), else None."""
    from collections import Counter
    from math import prod

    from .weights import load_config, safetensors_header
    size = path.stat().st_size
    t.add_row("file", f"{path} ({size / 2**30:.2f} GiB)")
    from .quant.gguf_io import is_gguf
    if is_gguf(path):
        from .quant.gguf_io import config_from_gguf, read_gguf
        version, fields, tensors = read_gguf(path)
        kinds = Counter(getattr(x.tensor_type, "name", str(x.tensor_type)) for x in tensors.values())
        t.add_row("format", f"GGUF v{version}, {len(tensors)} tensors ("
                  + ", ".join(f"{k} {v}" for k, v in kinds.most_common()) + ")")
        t.add_row("tokenizer", "in the file" if "tokenizer.ggml.tokens" in fields else "none")
        return config_from_gguf(fields, tensors)
    if path.suffix == ".safetensors":
        table, _ = safetensors_header(path)
        kinds = Counter(e["dtype"] for e in table.values())
        n = sum(prod(e["shape"]) for e in table.values())
        t.add_row("format", f"safetensors, {len(table)} tensors ("
                  + ", ".join(f"{k} {v}" for k, v in kinds.most_common()) + ")")
        t.add_row("values in this file", f"{n:,} ({n / 1e9:.2f} B)")
        if (path.parent / "config.json").exists():
            return load_config(path.parent)
        t.add_row("config", "none (no config.json beside the file)")
        return None
    raise ValueError(f"{path} is a file but neither GGUF nor safetensors: give a checkpoint folder, "
                     "a .gguf file or a .safetensors file")


@app.command()
def bench(model: Annotated[Optional[str], typer.Option(
              "--model", "-m", help=f"Benchmark a real checkpoint (default: the built-in {MINI_NAME}).")] = None,
          shape: Annotated[Optional[str], typer.Option(help="7b, 1b or tiny: random weights of that shape.")] = None,
          dtype: DtypeOpt = "bfloat16", device: DeviceOpt = "cpu",
          prompt_len: Annotated[int, typer.Option(help="Prompt tokens for the prefill figure.")] = 512,
          decode_tokens: Annotated[int, typer.Option(help="Tokens per decode measurement.")] = 16,
          batch: Annotated[int, typer.Option(help="Batch size for the batched decode figure.")] = 8,
          threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: all available).")] = None,
          json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures as JSON.")] = None,
          compare_llamacpp: Annotated[Optional[str], typer.Option(
              "--compare-llamacpp", help="llama.cpp's build/bin folder ('auto': $CODESHELL_LLAMACPP_BIN or the "
              "install script's cache): bf16/int8/int4 vs llama-bench on the GGUF export of the same weights."
          )] = None) -> None:
    """Prefill and decode tokens/s and memory on this machine (default: of the built-in codeshell-mini).

    With --shape, random weights of that shape: learn how fast CodeShell-7B runs here before
    downloading 15 GB.
    """
    from .bench import run_bench
    if model is not None and shape is not None:
        _fail("give one of --model PATH and --shape 7b|1b|tiny, not both")
    if shape is None:
        model = cli_model(model)
    if compare_llamacpp is not None:
        from .llamacpp import LlamaCppError, bench_compare
        try:
            bench_compare(model, shape, None if compare_llamacpp == "auto" else compare_llamacpp, threads=threads,
                          prompt_len=prompt_len, decode_tokens=decode_tokens)
        except (LlamaCppError, ValueError, RuntimeError, OSError) as e:
            _fail(str(e))
        return
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
    from .mini.cli import app as mini_app
    from .train.cli import app as train_app
    app.add_typer(serve_app, name="serve")
    app.command("quantize")(quantize)
    app.command("export-gguf")(export_gguf)
    app.add_typer(eval_app, name="eval", help="HumanEval, MBPP and MultiPL-E: generate, run sandboxed, score.")
    app.add_typer(data_app, name="data", help="The pretraining data pipeline (ingest, filter, dedup, pack).")
    app.add_typer(tokenizer_app, name="tokenizer", help="Train, extend and evaluate BPE tokenizers.")
    app.add_typer(train_app, name="train", help="Pretrain, fine-tune (full or LoRA) and merge models.")
    app.add_typer(mini_app, name="mini", help="Build codeshell-mini end to end on this machine, and measure it.")


_mount()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
