"""`codeshell tokenizer ...`: train, extend and evaluate byte-level BPE tokenizers.
Heavy imports happen inside the commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Train, extend and evaluate CodeShell-style BPE tokenizers.", no_args_is_help=True)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _texts(paths: list[Path], limit: int | None = None) -> list[str]:
    from codeshell.tokenizer_tools.corpus import iter_texts

    out, total = [], 0
    try:
        for _, t in iter_texts(paths):
            out.append(t)
            total += len(t)
            if limit and total >= limit:
                break
    except FileNotFoundError as e:
        _fail(str(e))
    if not out:
        _fail(f"no UTF-8 text found in {', '.join(map(str, paths))}")
    return out


@app.command()
def train(corpus: list[Path] = typer.Argument(..., help="files, folders or JSONL (text/content field)"),
          vocab_size: int = typer.Option(70020, "--vocab-size", help="total size, the 20 special tokens included"),
          output: Path = typer.Option(..., "--output", "-o", help="folder for tokenizer.json and configs"),
          min_frequency: int = typer.Option(2, "--min-frequency"),
          max_chars: int = typer.Option(None, "--max-chars", help="read at most this many characters")):
    """Train a byte-level BPE tokenizer with CodeShell's pre-tokenization and special tokens."""
    from codeshell.tokenizer_tools.train import save_tokenizer, train_tokenizer

    texts = _texts(corpus, max_chars)
    try:
        tok = train_tokenizer(texts, vocab_size, min_frequency=min_frequency, show_progress=True)
    except ValueError as e:
        _fail(str(e))
    save_tokenizer(tok, output)
    typer.echo(f"wrote {output}/tokenizer.json: {tok.get_vocab_size()} tokens from {len(texts)} texts")


@app.command()
def extend(base: Path = typer.Argument(..., help="base tokenizer.json or its folder"),
           corpus: list[Path] = typer.Option(..., "--corpus", help="new corpus to learn merges on"),
           add: int = typer.Option(..., "--add", help="number of merges (new tokens) to add"),
           prune_below: int = typer.Option(0, "--prune-below",
                                           help="drop base tokens seen fewer times than this on the prune corpus"),
           prune_corpus: list[Path] = typer.Option(None, "--prune-corpus",
                                                   help="corpus for the token counts (default: --corpus)"),
           output: Path = typer.Option(..., "--output", "-o"),
           min_pair_count: int = typer.Option(2, "--min-pair-count")):
    """Prune a base vocabulary's low-frequency tokens and add merges learned on a new corpus."""
    from rich.progress import Progress

    from codeshell.tokenizer_tools.extend import extend_tokenizer
    from codeshell.tokenizer_tools.train import save_tokenizer

    texts = _texts(corpus)
    prune_texts = _texts(prune_corpus) if prune_corpus else None
    with Progress(transient=True) as prog:
        task = prog.add_task("learning merges", total=add)
        try:
            text, info = extend_tokenizer(base, texts, add, prune_below, prune_texts, min_pair_count,
                                          progress=lambda: prog.advance(task))
        except (FileNotFoundError, ValueError) as e:
            _fail(str(e))
    from tokenizers import Tokenizer

    save_tokenizer(Tokenizer.from_str(text), output)
    typer.echo(json.dumps(info, indent=1))


@app.command("eval")
def eval_(tokenizers: list[str] = typer.Argument(..., help="tokenizer.json files, folders or Hub names"),
          corpus: list[Path] = typer.Option(None, "--corpus", help="texts, categorized automatically"),
          chinese: list[Path] = typer.Option(None, "--chinese"),
          english: list[Path] = typer.Option(None, "--english"),
          code: list[Path] = typer.Option(None, "--code"),
          as_json: bool = typer.Option(False, "--json")):
    """Characters per token by category (Chinese, English, code, per language), side by side."""
    from codeshell.tokenizer_tools.corpus import iter_records
    from codeshell.tokenizer_tools.evaluate import chars_per_token, format_table, load_tokenizer_any

    if not (corpus or chinese or english or code):
        _fail("give --corpus or at least one of --chinese/--english/--code")
    toks = {}
    for spec in tokenizers:
        try:
            toks[Path(spec).name or spec] = load_tokenizer_any(spec)
        except Exception as e:  # tokenizers/hub raise several types
            _fail(f"cannot load tokenizer {spec}: {e}")
    texts, forced = [], {}
    try:
        for paths, cat in ((corpus, None), (chinese, "chinese"), (english, "english"), (code, "code")):
            for name, t, lang in iter_records(paths or []):  # a JSONL record keeps its own language
                texts.append((name, t, lang))
                if cat:
                    forced[name] = cat
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        _fail(str(e))
    result = chars_per_token(toks, texts, forced)
    typer.echo(json.dumps(result, indent=1) if as_json else format_table(result))


if __name__ == "__main__":
    app()
